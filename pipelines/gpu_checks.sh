#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run (each step under its own time limit, so that a slow or
# failing step leaves the others their time; every result is written as soon as it exists):
#   1. the CUDA tests: Joseph's CUDA kernels = the CPU kernels, the AcquisitionModel contract on
#      embedded-cuda, CUDA = CPU numbers, FBSEM on CUDA = on the CPU
#   2. bench_projector.py on CUDA (numba CUDA kernels) and on the CPU, full mMR span-11 sinogram
#   3. bench_training_memory.py on the 3D mMR setting (span 11, 127 x 128 x 128, 7 subsets, 3D CNN of
#      16 channels x 5 layers): torch.cuda.max_memory_allocated of one training step, sequential vs
#      end-to-end (and checkpointed), K up to 42
#   4. the main job's 3D mMR reconstruction (bundled listmode and model) with --device cuda, timed;
#      its NIfTI is kept for comparison with the CPU's (Joseph ray tracing on both)
#   5. bench_projector.py with the vectorised torch kernels on CUDA (the fallback), 172 x 172 only
# Needs python3 with a CUDA build of torch, numba (with its CUDA target), numpy, nibabel, pydicom, tqdm,
# matplotlib, pytest; sirf_fbsem is used from this checkout (PYTHONPATH), not installed.
# Usage: bash pipelines/gpu_checks.sh OUT_DIR
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash pipelines/gpu_checks.sh OUT_DIR}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LOG="$OUT/gpu_checks.log"
step() { echo "== $(date -u +%T) $*" | tee -a "$LOG"; }

step "device"
{ nvidia-smi -L; "$PY" -c 'import torch, numba, numpy; print("torch", torch.__version__, "cuda", torch.version.cuda,
  torch.cuda.get_device_name(), "numba", numba.__version__, "numpy", numpy.__version__)'; nproc; } 2>&1 | tee -a "$LOG"

step "1. CUDA tests"
timeout 150 "$PY" -m pytest -q -p no:cacheprovider -rs -k "cuda and not simulator" tests/projectors/test_joseph_cuda.py \
    tests/projectors/test_backend_contract.py tests/test_reconstructor.py 2>&1 | tee -a "$LOG"

step "2. projector on CUDA (numba CUDA kernels) and CPU"
timeout 150 "$PY" pipelines/bench_projector.py --devices cuda,cpu --images default,172 \
    --out "$OUT/bench_projector_cuda.json" 2>&1 | tee -a "$LOG"

MEM="$OUT/bench_training_memory_mmr3d_cuda.json"
BTM=("$PY" pipelines/bench_training_memory.py --problem mmr3d --devices cuda --output "$MEM" --point-timeout 120)
step "3. training memory, sequential"
timeout 90 "${BTM[@]}" --modes sequential --stages 1 4 21 42 2>&1 | tee -a "$LOG"
step "3. training memory, end-to-end"
timeout 180 "${BTM[@]}" --modes end_to_end --stages 1 2 4 8 16 21 32 42 --resume 2>&1 | tee -a "$LOG"
step "3. training memory, checkpointed"
timeout 60 "${BTM[@]}" --modes checkpointed --stages 21 42 --resume 2>&1 | tee -a "$LOG"
"$PY" pipelines/bench_training_memory.py --replot --output "$MEM" 2>&1 | tee -a "$LOG"

step "4. main job (3D mMR, bundled model) on CUDA"
T0=$SECONDS
timeout 90 "$PY" -m sirf_fbsem reconstruct test_data/mmr_brain.l.hdr --model test_data/fbsem_mmr_model.pt \
    --norm test_data/mmr_brain_norm.n.hdr --mu-map test_data/mmr_brain_mu_map.hv --device cuda \
    --ray-tracing joseph --output "$OUT/mmr_fbsem_cuda.nii.gz" --dicom /tmp/gpu_checks_dicom --no-progress \
    --overwrite 2>&1 | tee -a "$LOG"
echo "main job on CUDA: rc ${PIPESTATUS[0]}, wall $((SECONDS - T0)) s, DICOM files:" \
    "$(ls /tmp/gpu_checks_dicom 2>/dev/null | wc -l)" | tee -a "$LOG"

step "5. projector on CUDA, vectorised torch kernels"
timeout 120 "$PY" pipelines/bench_projector.py --devices cuda-torch --images 172 \
    --out "$OUT/bench_projector_cuda_torch.json" 2>&1 | tee -a "$LOG"
step "done"
