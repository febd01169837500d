#!/usr/bin/env bash
# Install sirf_fbsem (CPU torch) into ./.venv and run the main job on the bundled scans:
#  small: test_data/phantom_scan.hs (small test scanner) with the bundled FBSEM model
#         -> OUT/recon.nii.gz, OUT/dicom/, OUT/recon.png
#  mmr:   test_data/mmr_brain.l.hdr, a simulated Siemens mMR brain scan as PETLINK listmode with its
#         ECAT8 norm and mu-map: histogram (span 11), randoms from the delayeds, normalisation x
#         attenuation, FBSEM with the 3D mMR model test_data/fbsem_mmr_model.pt (OSEM 1 x 21 without it)
#         -> OUT/mmr/recon.nii.gz, OUT/mmr/dicom/, OUT/mmr/recon.png (about 3.5 min on 2 CPU cores)
# Usage: bash pipelines/demo.sh [output directory, default out/] [small|mmr|all, default all]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-out}
JOBS=${2:-all}
case "$JOBS" in small | mmr | all) ;; *) echo "usage: bash pipelines/demo.sh [OUT] [small|mmr|all]" >&2; exit 2 ;; esac
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-ci.txt
.venv/bin/python -m pip install -q --disable-pip-version-check -e .
if [ "$JOBS" != mmr ]; then
  MODEL_ARGS=()
  if [ -f test_data/fbsem_model.pt ]; then MODEL_ARGS=(--model test_data/fbsem_model.pt); fi
  .venv/bin/sirf-fbsem reconstruct test_data/phantom_scan.hs "${MODEL_ARGS[@]}" \
      --norm test_data/phantom_mult.hs --additive test_data/phantom_additive.hs \
      --output "$OUT/recon.nii.gz" --dicom "$OUT/dicom" --preview "$OUT/recon.png" --overwrite
fi
if [ "$JOBS" != small ]; then
  MMR_ARGS=(--iterations 1 --subsets 21)  # OSEM where the 3D mMR model is absent
  # the model (pipelines/mmr_3d.sh) reconstructs on the grid it was trained on, 127 x 128 x 128 voxels
  if [ -f test_data/fbsem_mmr_model.pt ]; then MMR_ARGS=(--model test_data/fbsem_mmr_model.pt); fi
  .venv/bin/sirf-fbsem reconstruct test_data/mmr_brain.l.hdr "${MMR_ARGS[@]}" \
      --norm test_data/mmr_brain_norm.n.hdr --mu-map test_data/mmr_brain_mu_map.hv \
      --output "$OUT/mmr/recon.nii.gz" --dicom "$OUT/mmr/dicom" --preview "$OUT/mmr/recon.png" --overwrite
fi
