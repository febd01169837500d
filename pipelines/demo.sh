#!/usr/bin/env bash
# Install sirf_fbsem (CPU torch) into ./.venv and run the main job: reconstruct the bundled
# scan (test_data/phantom_scan.hs) with the bundled FBSEM model, writing NIfTI, DICOM and a preview.
# Usage: bash pipelines/demo.sh [output directory, default out/]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-out}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-ci.txt
.venv/bin/python -m pip install -q --disable-pip-version-check -e .
MODEL_ARGS=()
if [ -f test_data/fbsem_model.pt ]; then MODEL_ARGS=(--model test_data/fbsem_model.pt); fi
.venv/bin/sirf-fbsem reconstruct test_data/phantom_scan.hs "${MODEL_ARGS[@]}" \
    --norm test_data/phantom_mult.hs --additive test_data/phantom_additive.hs \
    --output "$OUT/recon.nii.gz" --dicom "$OUT/dicom" --preview "$OUT/recon.png" --overwrite
