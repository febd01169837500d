#!/usr/bin/env bash
# The 3D Siemens mMR study: simulate, train FBSEM-Net sequentially (fully unrolled, K = 21),
# evaluate on fresh phantoms. Every step is a sirf-fbsem command; each resumes where it stopped.
#
#   bash pipelines/mmr_3d.sh WORK_DIR [simulate|simulate_eval|train|evaluate|all]
#   (simulate_eval: the tuning and confirmation sets only)
#
# Setting (docs/studies/mmr_3d.md): mMR span 11 (837 sinograms x 252 views x 344 bins), image
# 127 x 128 x 128 of 2.03125 x 2.08626 x 2.08626 mm, 7 subsets, K = 21 stages (3 full iterations);
# count levels 1e6 (a 10-s frame, as the bundled listmode), 3e7 (low) and 3e8 (standard) prompts,
# cycled by sample index; phantoms MNI152-based and procedural (--phantom mixed).
# Seeds: training 1001, tuning 2001, confirmation 3001 (disjoint).
# Sizes and times (2 CPU cores, measured under load): ~1.1 GB and ~3 min CPU per sample;
# training ~9 min per stage with 8 samples (stage setup ~4 min, 50 s per epoch), so 21 stages
# take about 3 h (estimated): run it where a GPU is lent, or let it resume over several runs.
set -euo pipefail
WORK=${1:?usage: mmr_3d.sh WORK_DIR [simulate|train|evaluate|all]}
STEP=${2:-all}
SF=${SIRF_FBSEM:-sirf-fbsem}
GEOM=(--scanner Siemens_mMR --span 11 --image-shape 127,128,128 --num-subsets 7 --num-stages 21)
COUNTS=(--counts 1e6,3e7,3e8 --phantom mixed)
# tuning and confirmation at the two levels the evaluation reports (low 3e7, standard 3e8); with
# --phantom mixed each level gets MNI152-based and procedural heads in equal numbers
EVAL_COUNTS=(--counts 3e7,3e8 --phantom mixed)
TRAIN_SAMPLES=${TRAIN_SAMPLES:-12}
TUNE_SAMPLES=${TUNE_SAMPLES:-4}
CONFIRM_SAMPLES=${CONFIRM_SAMPLES:-12}
EPOCHS=${EPOCHS:-6}
# the model evaluate scores (MODEL=test_data/fbsem_mmr_model.pt: the bundled one)
MODEL=${MODEL:-$WORK/run/model.pt}
# the bundled model's run (2026-12-03) was begun with --loss mse (sirf_fbsem 0.4); LOSS=mse resumes it
LOSS=${LOSS:-scaled_mse}

simulate_train() {
    $SF simulate --out "$WORK/train" --num-samples "$TRAIN_SAMPLES" --seed 1001 "${GEOM[@]}" "${COUNTS[@]}"
}

simulate_eval() {
    $SF simulate --out "$WORK/tune" --num-samples "$TUNE_SAMPLES" --seed 2001 "${GEOM[@]}" "${EVAL_COUNTS[@]}"
    $SF simulate --out "$WORK/confirm" --num-samples "$CONFIRM_SAMPLES" --seed 3001 "${GEOM[@]}" "${EVAL_COUNTS[@]}"
}

train() {
    local resume=()
    [ -d "$WORK/run/checkpoints" ] && resume=(--resume)
    $SF train --data "$WORK/train" --out "$WORK/run" --mode sequential --epochs "$EPOCHS" --loss "$LOSS" \
        --channels 16 --layers 5 --patch-size 32,32,32 --patches-per-sample 8 \
        --validation-fraction 0.2 --seed 0 "${resume[@]}"
}

# the grids (2 CPU cores: ~9 s per full iteration of this geometry): 0.03 was the 2D studies' MAP-EM
# beta at a similar count per voxel (2e5 counts on 128 x 128); edges are flagged in the JSON
evaluate() {
    $SF evaluate --data "$WORK/confirm" --tune-data "$WORK/tune" --model "FBSEM sequential=$MODEL" \
        --out "$WORK/eval" --name mmr_3d --osem-iterations 8 --map-iterations 8 \
        --betas 0.003 0.01 0.03 0.1 --fwhm-mm 0 2 4 6 8 10 12 --overwrite
}

case "$STEP" in
    simulate) simulate_train; simulate_eval ;;
    simulate_eval) simulate_eval ;;
    train) train ;;
    evaluate) evaluate ;;
    all) simulate_train; simulate_eval; train; evaluate ;;
    *) echo "unknown step $STEP (simulate|simulate_eval|train|evaluate|all)" >&2; exit 2 ;;
esac
