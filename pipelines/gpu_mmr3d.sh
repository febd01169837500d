#!/usr/bin/env bash
# The 3D mMR study (pipelines/mmr_3d.sh) with K = 63 stages on a CUDA GPU, in time-limited steps that
# resume: each run simulates the training set again (deterministic from its seed), continues the
# training run from its checkpoints, and leaves the run in OUT/run.
#
#   bash pipelines/gpu_mmr3d.sh OUT train      simulate the training set, train (resuming OUT/run or
#                                              .gpu_carry/run) until BUDGET_S is spent
#   bash pipelines/gpu_mmr3d.sh OUT evaluate   simulate the tuning and a fresh confirmation set, score
#                                              the finished model against the baselines (widened grids)
#
# Setting: docs/studies/mmr_3d.md, with K = 63 (9 iterations of 7 subsets), chosen on the tuning set
# (2026-12-05, `mmr_3d.sh WORK floor`, pipelines/results/targets_floor_mmr3d.json): the noise-free
# targets' NRMSE is 0.76x the best baseline's at 3e8 prompts at K = 63, against 0.94x at K = 42;
# 24 training samples (20 % validation) at 1e6/3e7/3e8 prompts, 12 epochs per stage of 8 patches
# of 32^3 per sample (the best epoch on validation kept), samples held on the GPU (train --preload device).
# Confirmation seed 3003: 3001 scored the K = 21 model and 3002 the three CPU-trained K = 63 seeds
# (docs/studies/mmr_3d.md); a model trained after those results were seen is confirmed on a fresh seed.
# Measured on an H200 (2026-12-04): one sequential training step 0.40 s, a full mMR span-11
# projection 0.11 s forward, 0.06 s back (docs/benchmarks.md). A sample is about 1.3 GB at K = 42 and
# 1.5 GB at K = 63 (each target 8.3 MB; 24 samples: about 36 GB of GPU memory and of disk under WORK).
# Training time about 100 s per stage, 1.8 h for K = 63 (estimated from the step time, not measured).
#
# Carried from the host (gitignored): .gpu_carry/mni152.npz, nilearn's MNI152 templates for the
# MNI152-based phantoms on a machine without nilearn (sirf_fbsem.simulation.phantoms.save_mni152_templates);
# optionally .gpu_carry/run, the run of an earlier call to resume.
# Needs python3 with a CUDA torch, numba (CUDA target), numpy, nibabel, tqdm, matplotlib; sirf_fbsem from
# this checkout. Environment: DEVICE (cuda), WORK (/tmp/mmr3d_gpu), BUDGET_S (570: the seconds this
# call may take; simulation may take all but the last minute, training or evaluation the rest), and
# mmr_3d.sh's settings (STAGES, TRAIN_SAMPLES, EPOCHS, ...).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash pipelines/gpu_mmr3d.sh OUT [train|evaluate]}
STEP=${2:-train}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export SIRF_FBSEM=${SIRF_FBSEM:-$PY -m sirf_fbsem}
export STAGES=${STAGES:-63} TRAIN_SAMPLES=${TRAIN_SAMPLES:-24} EPOCHS=${EPOCHS:-12} DEVICE=${DEVICE:-cuda}
export PRELOAD=${PRELOAD:-device} CONFIRM_SEED=${CONFIRM_SEED:-3003} RUN=$OUT/run EVAL_OUT=$OUT/eval
export OSEM_ITERATIONS=${OSEM_ITERATIONS:-16} MAP_ITERATIONS=${MAP_ITERATIONS:-16}
# MAP-EM's beta grid, from the tuning set's grid of the floor step (evaluate_mmr3d_floor_k112.json: beta 0.01,
# the top of {0.001, 0.003, 0.01}, was best at 3e7 and 0.001, the bottom, at 3e8): widened both ways; below
# 0.0003 MAP-EM tends to OSEM (beta = 0), which is scored beside it
export BETAS=${BETAS:-0.0003 0.001 0.003 0.01 0.03 0.1}
export MNI152_TEMPLATES=${MNI152_TEMPLATES:-$PWD/.gpu_carry/mni152.npz}
WORK=${WORK:-/tmp/mmr3d_gpu}
LOG="$OUT/gpu_mmr3d.log"
BUDGET_S=${BUDGET_S:-570}
left() { echo $((BUDGET_S - SECONDS - 10)); }  # seconds left for the next step
need() {  # need SECONDS WHAT: stop this call when fewer seconds are left (timeout 0 would mean no limit)
    [ "$(left)" -ge "$1" ] || { echo "only $(left) s left: no $2 in this call" | tee -a "$LOG"; exit 1; }
}
step() { echo "== $(date -u +%T) $*" | tee -a "$LOG"; }

if [ ! -f "$MNI152_TEMPLATES" ]; then
    echo "gpu_mmr3d.sh: MNI152 templates $MNI152_TEMPLATES missing: write them where nilearn is installed" >&2
    exit 2
fi
step "device"
{ nvidia-smi -L 2>/dev/null; "$PY" -c 'import torch; print("torch", torch.__version__, torch.cuda.is_available())'; } \
    2>&1 | tee -a "$LOG"

case "$STEP" in
    train)
        if [ ! -d "$RUN" ] && [ -d .gpu_carry/run ]; then cp -r .gpu_carry/run "$RUN"; fi
        need 90 simulation
        step "simulate the training set ($TRAIN_SAMPLES samples, K = $STAGES)"
        T0=$SECONDS
        timeout $(($(left) - 50)) bash pipelines/mmr_3d.sh "$WORK" simulate_train 2>&1 | tee -a "$LOG"
        rc=${PIPESTATUS[0]}
        echo "simulate: rc $rc, $((SECONDS - T0)) s" | tee -a "$LOG"
        [ "$rc" = 0 ] || { echo "the training set is incomplete: no training in this call" | tee -a "$LOG"; exit 1; }
        need 30 training
        step "train (sequential, K = $STAGES, at most $(left) s)"
        T0=$SECONDS
        timeout "$(left)" bash pipelines/mmr_3d.sh "$WORK" train 2>&1 | tr '\r' '\n' | grep -v -E "%\||^\s*$" \
            | tee -a "$LOG"
        echo "train: rc ${PIPESTATUS[0]}, $((SECONDS - T0)) s; stages done:" \
            "$(ls "$RUN"/checkpoints/stage_*.pt 2>/dev/null | wc -l)" | tee -a "$LOG"
        ;;
    evaluate)
        MODEL_FILE=${MODEL:-$RUN/model.pt}
        [ -f "$MODEL_FILE" ] || MODEL_FILE=.gpu_carry/run/model.pt
        if [ ! -f "$MODEL_FILE" ]; then echo "gpu_mmr3d.sh: no trained model (run the train step)" >&2; exit 2; fi
        export MODEL=$MODEL_FILE
        rm -rf "$WORK/train"  # this script's own training samples: the disk holds one set at a time
        need 90 simulation
        step "simulate the tuning and confirmation sets"
        timeout $(($(left) - 50)) bash pipelines/mmr_3d.sh "$WORK" simulate_eval 2>&1 | tee -a "$LOG"
        rc=${PIPESTATUS[0]}
        [ "$rc" = 0 ] || { echo "the evaluation sets are incomplete (rc $rc): no evaluation in this call" | tee -a "$LOG"; exit 1; }
        need 30 evaluation
        step "evaluate $MODEL (at most $(left) s)"
        timeout "$(left)" bash pipelines/mmr_3d.sh "$WORK" evaluate 2>&1 | tr '\r' '\n' \
            | grep -v -E "%\||^\s*$" | tee -a "$LOG"
        ;;
    *) echo "unknown step $STEP (train|evaluate)" >&2; exit 2 ;;
esac
step "done"
