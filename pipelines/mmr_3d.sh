#!/usr/bin/env bash
# The 3D Siemens mMR study: simulate, train FBSEM-Net sequentially (fully unrolled, K = 63),
# evaluate on fresh phantoms. Every step is a sirf-fbsem command; each resumes where it stopped.
#
#   bash pipelines/mmr_3d.sh WORK_DIR [simulate|simulate_train|simulate_eval|train|export|evaluate|all|floor|carry]
#   (simulate_train: the training set only; simulate_eval: the tuning and confirmation sets only;
#   floor: on the tuning set alone, the iteration-dependent targets' error against the truth at each
#   stage up to FLOOR_STAGES, beside the best baselines: how many stages K the targets need;
#   export: write a finished run's model file $MODEL from its checkpoints, when train did not (a run
#   carried to another host; sirf-fbsem export-model); carry: copy the training run's checkpoints and the
#   training set's manifest into CARRIED, to go on in another session or machine)
#
# Setting (docs/studies/mmr_3d.md): mMR span 11 (837 sinograms x 252 views x 344 bins), image
# 127 x 128 x 128 of 2.03125 x 2.08626 x 2.08626 mm, 7 subsets, K = 63 stages (9 full iterations, chosen
# on the tuning set by the floor step); 24 training samples, 12 epochs per stage, count-aware betas;
# count levels 1e6 (a 10-s frame, as the bundled listmode), 3e7 (low) and 3e8 (standard) prompts,
# cycled by sample index; phantoms MNI152-based and procedural (--phantom mixed).
# Seeds: training 1001, tuning 2001, confirmation 3002 (disjoint; 3001 was the K = 21 model's, seen before
# K was chosen again). The defaults are the bundled model's study; its K = 21 predecessor (git history) was
# STAGES=21 TRAIN_SAMPLES=12 EPOCHS=6 CONFIRM_SEED=3001 OSEM_ITERATIONS=8 MAP_ITERATIONS=8
# BETAS="0.003 0.01 0.03 0.1" BETA_COUNTS=none.
# Sizes and times (2 CPU cores, measured 2026-12-05, K = 63, 24 samples): ~1.5 GB and ~70 s wall per
# sample (24 in 25 min, 36 GB); training 4.6-5 min per stage alone (setup: the previous stage's outputs
# and this stage's terms, ~1.5 min; 17 s per epoch of 19 samples), so K = 63 takes about 5 h: on a GPU
# when one is lent (pipelines/gpu_mmr3d.sh), or over several runs, each resuming where the last stopped.
#
# Settings (environment; defaults: the bundled model's study):
#   STAGES (63)        K: stages, and noise-free OSEM sub-iterates simulated as targets
#   TRAIN_SAMPLES (24), TUNE_SAMPLES (4), CONFIRM_SAMPLES (12), EPOCHS (12), LOSS (scaled_mse)
#   CONFIRM_SEED (3002) a fresh seed for a new configuration's confirmation set, once the old one was seen
#   TRAIN_SEED (0)     train --seed: the network's initial weights, the validation split and the shuffles
#   BETA_COUNTS (log_linear) train --beta-counts: each stage's beta depends on the data's count level;
#                      none: one beta per stage (runs begun before sirf_fbsem 0.9 resume only with it: the
#                      K = 21 model's and pipelines/carried_runs/mmr3d_k63_seed0)
#   DEVICE (cpu)       simulate, train and evaluate on this device (e.g. cuda)
#   PRELOAD (none)     train --preload: none, cpu or device (hold the samples on the GPU: no reads per stage)
#   RUN ($WORK/run)    the training run's directory; MODEL ($RUN/model.pt) the model evaluate scores
#   MODELS ($MODEL)    evaluate: several model files (space-separated), one per training seed of the same
#                      method, scored together (mean and spread over seeds)
#   MNI152_TEMPLATES   simulate --mni152-templates FILE (where nilearn is not installed, e.g. a GPU node)
#   OSEM_ITERATIONS (16), MAP_ITERATIONS (16), BETAS ("0.0003 0.001 0.003 0.01 0.03 0.1"): the baselines' grids
#   EVAL_OUT ($WORK/eval) where evaluate writes
#   SCANNER (Siemens_mMR), SPAN (11), IMAGE_SHAPE (127,128,128): a smaller setting for a dry run
#   FLOOR_STAGES (112) the floor step's targets per tuning phantom; PYTHON (python3) runs pipelines/targets_floor.py
#   CARRIED (unset)    a folder holding a run's checkpoints/ kept between sessions (hosts whose files are
#                      not kept; e.g. pipelines/carried_runs/mmr3d_k63_seed0): train copies them into
#                      $RUN when $RUN has none and resumes; the carry step copies $RUN's back (the
#                      stage caches are not carried: train rebuilds them from the checkpoints) with
#                      the training set's manifest.json (CARRIED/train: what export reads), and a
#                      stopped evaluation's $EVAL_OUT/mmr_3d.partial into CARRIED/eval, which evaluate
#                      copies back and resumes when $EVAL_OUT has neither it nor the finished mmr_3d.json
set -euo pipefail
WORK=${1:?usage: mmr_3d.sh WORK_DIR [simulate|simulate_train|simulate_eval|train|export|evaluate|all|floor|carry]}
STEP=${2:-all}
SF=${SIRF_FBSEM:-sirf-fbsem}
STAGES=${STAGES:-63}
DEVICE=${DEVICE:-cpu}
GEOM=(--scanner "${SCANNER:-Siemens_mMR}" --span "${SPAN:-11}" --image-shape "${IMAGE_SHAPE:-127,128,128}"
      --num-subsets 7 --num-stages "$STAGES")
COUNTS=(--counts 1e6,3e7,3e8 --phantom mixed)
# tuning and confirmation at the two levels the evaluation reports (low 3e7, standard 3e8); with
# --phantom mixed each level gets MNI152-based and procedural heads in equal numbers
EVAL_COUNTS=(--counts 3e7,3e8 --phantom mixed)
TRAIN_SAMPLES=${TRAIN_SAMPLES:-24}
TUNE_SAMPLES=${TUNE_SAMPLES:-4}
CONFIRM_SAMPLES=${CONFIRM_SAMPLES:-12}
EPOCHS=${EPOCHS:-12}
CONFIRM_SEED=${CONFIRM_SEED:-3002}
PRELOAD=${PRELOAD:-none}
RUN=${RUN:-$WORK/run}
EVAL_OUT=${EVAL_OUT:-$WORK/eval}
TEMPLATES=()
[ -n "${MNI152_TEMPLATES:-}" ] && TEMPLATES=(--mni152-templates "$MNI152_TEMPLATES")
# the model evaluate scores (MODEL=test_data/fbsem_mmr_model.pt: the bundled one)
MODEL=${MODEL:-$RUN/model.pt}
MODELS=${MODELS:-$MODEL}
# the K = 21 model's first run (2026-12-03) was begun with --loss mse (sirf_fbsem 0.4); LOSS=mse resumes it
LOSS=${LOSS:-scaled_mse}

simulate_train() {
    $SF simulate --out "$WORK/train" --num-samples "$TRAIN_SAMPLES" --seed 1001 "${GEOM[@]}" "${COUNTS[@]}" \
        --device "$DEVICE" "${TEMPLATES[@]}"
}

simulate_eval() {
    $SF simulate --out "$WORK/tune" --num-samples "$TUNE_SAMPLES" --seed 2001 "${GEOM[@]}" "${EVAL_COUNTS[@]}" \
        --device "$DEVICE" "${TEMPLATES[@]}"
    $SF simulate --out "$WORK/confirm" --num-samples "$CONFIRM_SAMPLES" --seed "$CONFIRM_SEED" "${GEOM[@]}" \
        "${EVAL_COUNTS[@]}" --device "$DEVICE" "${TEMPLATES[@]}"
}

train() {
    local resume=()
    if [ -n "${CARRIED:-}" ] && [ ! -d "$RUN/checkpoints" ] && [ -d "$CARRIED/checkpoints" ]; then
        mkdir -p "$RUN/checkpoints"
        cp "$CARRIED"/checkpoints/*.pt "$RUN/checkpoints/"
    fi
    [ -d "$RUN/checkpoints" ] && resume=(--resume)
    $SF train --data "$WORK/train" --out "$RUN" --mode sequential --epochs "$EPOCHS" --loss "$LOSS" \
        --channels 16 --layers 5 --patch-size 32,32,32 --patches-per-sample 8 \
        --validation-fraction 0.2 --seed "${TRAIN_SEED:-0}" --beta-counts "${BETA_COUNTS:-log_linear}" \
        --device "$DEVICE" --preload "$PRELOAD" "${resume[@]}"
}

# A finished run's model file from its checkpoints (sirf-fbsem export-model): $RUN's, or CARRIED's when
# $RUN has none; the training set's manifest from $WORK/train, or CARRIED/train when the training set was
# not simulated on this host. Nothing is done when $MODEL exists (train writes it when the run completes).
export_model() {
    if [ -e "$MODEL" ]; then echo "export: $MODEL exists"; return 0; fi
    local run=$RUN data=$WORK/train
    if [ ! -d "$RUN/checkpoints" ] && [ -n "${CARRIED:-}" ]; then run=$CARRIED; fi
    if [ ! -f "$data/manifest.json" ] && [ -n "${CARRIED:-}" ]; then data=$CARRIED/train; fi
    mkdir -p "$(dirname "$MODEL")"
    $SF export-model --run "$run" --data "$data" --output "$MODEL"
}

# the grids (2 CPU cores: ~9 s per full iteration of this geometry), widened from the floor step's on the
# tuning set (evaluate_mmr3d_floor_k112.json: OSEM chose 12 iterations at 3e8, MAP-EM beta 0.01, the top of
# {0.001, 0.003, 0.01}, at 3e7 and 0.001, the bottom, at 3e8); edges are flagged in the JSON
evaluate() {
    local resume=()
    # a stopped evaluation carried from another session, unless this one has its own or has finished
    if [ -n "${CARRIED:-}" ] && [ -d "$CARRIED/eval/mmr_3d.partial" ] && [ ! -e "$EVAL_OUT/mmr_3d.partial" ] \
            && [ ! -e "$EVAL_OUT/mmr_3d.json" ]; then
        mkdir -p "$EVAL_OUT"
        cp -r "$CARRIED/eval/mmr_3d.partial" "$EVAL_OUT/"
    fi
    [ -d "$EVAL_OUT/mmr_3d.partial" ] && resume=(--resume)  # a stopped evaluation continues
    local models=() m
    for m in $MODELS; do
        [ -f "$m" ] || { echo "evaluate: model $m is missing: run the train step (or export, for a carried run) first" >&2; exit 2; }
        models+=(--model "FBSEM sequential=$m")
    done
    $SF evaluate --data "$WORK/confirm" --tune-data "$WORK/tune" "${models[@]}" \
        --out "$EVAL_OUT" --name mmr_3d "${resume[@]}" --osem-iterations "${OSEM_ITERATIONS:-16}" \
        --map-iterations "${MAP_ITERATIONS:-16}" --betas ${BETAS:-0.0003 0.001 0.003 0.01 0.03 0.1} --fwhm-mm 0 2 4 6 8 10 12 \
        --device "$DEVICE" --overwrite
}

# The targets' floor, to choose K on the tuning set (seed 2001; no model, no confirmation set): a
# network that matched its stage-k target exactly would keep that target's error, so K must be
# large enough for the noise-free sub-iterate to beat the best baseline. The baselines' grids are
# chosen on these same phantoms (recorded in the JSON as tuned on the scored set).
floor() {
    local k=${FLOOR_STAGES:-112} resume=()
    local dir="$WORK/tune_k$k"
    $SF simulate --out "$dir" --num-samples "$TUNE_SAMPLES" --seed 2001 --scanner "${SCANNER:-Siemens_mMR}" \
        --span "${SPAN:-11}" --image-shape "${IMAGE_SHAPE:-127,128,128}" --num-subsets 7 --num-stages "$k" \
        "${EVAL_COUNTS[@]}" --device "$DEVICE" "${TEMPLATES[@]}"
    [ -d "$EVAL_OUT/floor_k$k.partial" ] && resume=(--resume)
    $SF evaluate --data "$dir" --out "$EVAL_OUT" --name "floor_k$k" "${resume[@]}" \
        --osem-iterations "${OSEM_ITERATIONS:-16}" --map-iterations "${MAP_ITERATIONS:-16}" \
        --betas ${BETAS:-0.001 0.003 0.01} --device "$DEVICE" --overwrite
    "${PYTHON:-python3}" "$(dirname "$0")/targets_floor.py" "$EVAL_OUT/floor_k$k.json" --out "$EVAL_OUT/targets_floor_k$k"
}

# the run's checkpoints (written atomically: a stopped or running run's are whole) with the training set's
# manifest (4 kB: the geometry and phantoms export records, so that a finished run's model is written on a
# host without the training set), and a stopped evaluation's partial results (each unit written
# atomically; a few hundred kB) when there is one. Not the model file: export writes it from these.
carry() {
    : "${CARRIED:?carry: set CARRIED to the folder that keeps the run between sessions}"
    local carried=0
    if [ -d "$RUN/checkpoints" ]; then
        mkdir -p "$CARRIED/checkpoints"
        # not initial.pt: train derives it again (the network seeded with --seed)
        cp "$RUN"/checkpoints/stage_*.pt "$CARRIED/checkpoints/"
        echo "carried $(ls "$RUN"/checkpoints/stage_*.pt | wc -l) stage checkpoints of $RUN into $CARRIED/checkpoints"
        if [ -f "$WORK/train/manifest.json" ]; then
            mkdir -p "$CARRIED/train"
            cp "$WORK/train/manifest.json" "$CARRIED/train/"
        fi
        carried=1
    fi
    if [ -d "$EVAL_OUT/mmr_3d.partial" ]; then
        mkdir -p "$CARRIED/eval/mmr_3d.partial"
        cp "$EVAL_OUT"/mmr_3d.partial/* "$CARRIED/eval/mmr_3d.partial/"
        echo "carried the stopped evaluation $EVAL_OUT/mmr_3d.partial into $CARRIED/eval"
        carried=1
    fi
    [ "$carried" = 1 ] || { echo "carry: neither $RUN/checkpoints nor $EVAL_OUT/mmr_3d.partial exists" >&2; exit 2; }
}

case "$STEP" in
    simulate) simulate_train; simulate_eval ;;
    simulate_train) simulate_train ;;
    simulate_eval) simulate_eval ;;
    train) train ;;
    export) export_model ;;
    evaluate) evaluate ;;
    all) simulate_train; simulate_eval; train; evaluate ;;
    floor) floor ;;
    carry) carry ;;
    *) echo "unknown step $STEP (simulate|simulate_train|simulate_eval|train|export|evaluate|all|floor|carry)" >&2; exit 2 ;;
esac
