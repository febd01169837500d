#!/usr/bin/env bash
# Finding 4 of the paper (truncated backpropagation does not notably hurt: sequential against
# end-to-end training at equal K) in 3D, on a scanner small enough for end-to-end 3D training on
# CPU cores, under the study rules (docs/studies/rules.md): disjoint training / tuning /
# confirmation phantoms by seed, three training seeds per method, the baselines tuned on the
# tuning set, the confirmation set scored once. Every step is a sirf-fbsem command; each is
# skipped when its output exists, and a stopped training run resumes from its checkpoints.
#
#   [SCALE=small|mmr] bash pipelines/paper_findings_3d.sh WORK_DIR [simulate|train [NAME...]|tune|confirm|carry|all]
#
# Why this setting: on the Siemens mMR (span 11, 127 x 128 x 128) one end-to-end step at K = 21 takes
# 162 s on 2 CPU cores (pipelines/results/bench_training_memory_mmr3d.json, 2026-12-07), so the mMR
# model's recipe at K = 21 (19 samples x 12 epochs) takes about 10 h per training seed (estimated):
# several sessions per seed (docs/studies/paper_findings.md, "Not done yet").
# Here the whole problem is 3D as on the mMR (oblique segments, 3D CNN, full-volume EM steps in
# every end-to-end step) at about 1/60 of the mMR image's voxels.
#
# Setting: the small test scanner (8 rings, span 3: 5 segments, 47 sinograms x 48 views x 48 bins,
# not arc-corrected), image 15 x 47 x 47 of 2 x 4 x 4 mm; 3e6 prompts per sample (about 2e5 per image
# slice, the 2D study's level), 20 % randoms + 20 % scatter, normalisation and attenuation;
# procedural heads; 3 subsets (16 views each), K = 21 stages (7 full iterations: the mMR study's
# K = 21, and enough iterations for OSEM's targets to converge); 3D CNN of 16 channels x 5 layers
# (the bundled mMR model's); 12 epochs (per stage when sequential) on whole images, Adam 1e-3, loss
# scaled_mse, one beta per stage (one count level); 20 training phantoms of which 4 validate. The
# recipe is the mMR model's, fixed before these sets were drawn (no choice is made on them but the
# baselines' grids, on the tuning set).
# Phantom sets (base seeds; disjoint from every earlier study's): training 1200 (20), tuning 2200 (6),
# confirmation 3200 (10). Training seeds 0, 1, 2 (split, shuffles and initial weights).
#
# SCALE=mmr: the same comparison in the 3D mMR study's setting (docs/studies/mmr_3d.md): mMR span 11,
# image 127 x 128 x 128 of the mMR's voxels, 7 subsets, K = 21 (3 full iterations); mixed MNI152-based
# and procedural heads, training at 1e6/3e7/3e8 prompts and tuning/confirmation at 3e7 and 3e8; the
# K = 21 mMR model's recipe (12 training samples, 6 epochs; count-aware betas as the bundled model's),
# on whole images in both schemes (sequential as end-to-end: no patches), every stage's CNN in blocks of
# 32 x 64 x 64 (the block-wise regulariser: same values, end-to-end at K = 21 in 7.4 GiB instead of 18);
# the mMR baselines' grids. Sets: training 1300 (12), tuning 2300 (4), confirmation 3300 (12), disjoint
# from every earlier study's. Time on 2 CPU cores (estimated from measured steps, 2026-12-07): about
# 2.5 h per end-to-end run (60 steps of 150 s) and 2.3 h per sequential run (21 stages of 60 steps of
# 5.7 s), so some 15 h for the six runs: several sessions, carried between them (CARRIED default
# pipelines/carried_runs/paper_findings_mmr3d).
#
# carry: copy every finished run's model file, and every stopped run's checkpoints, into CARRIED
# (pipelines/carried_runs/paper_findings_3d by default), to go on in another session; train takes a
# carried model as the run's, or copies a run's carried checkpoints back when WORK has none of its
# own and resumes. Likewise the tuning and confirmation runs (CARRIED/eval): a finished tuning run's
# JSON, which tune takes, or a stopped evaluation's partial results, which it resumes from. The
# phantom sets are simulated again from their seeds (deterministic).
set -euo pipefail
# shellcheck source=pipelines/study_runs.sh
source "$(dirname "$0")/study_runs.sh"
WORK=${1:?usage: paper_findings_3d.sh WORK_DIR [simulate|train [NAME...]|tune|confirm|carry|all]}
STEP=${2:-all}
SF=${SIRF_FBSEM:-sirf-fbsem}
SEEDS=${SEEDS:-"0 1 2"}
SCALE=${SCALE:-small}
case "$SCALE" in
    small)
        STUDY=paper_findings_3d
        GEOM=(--scanner small_test --num-subsets 3 --num-stages 21)
        TRAIN_COUNTS=(--counts 3e6 --phantom procedural)
        EVAL_COUNTS=("${TRAIN_COUNTS[@]}")
        SETS="train:1200:20 tune:2200:6 confirm:3200:10"
        RECIPE=(--dims 3 --channels 16 --layers 5 --epochs 12 --lr 1e-3 --loss scaled_mse --beta-counts none
                --validation-fraction 0.2 --no-progress)
        # the baselines' grids: 48 iterations (144 sub-iterations), widened from 16 because the first tuning run
        # chose the last of 16 iterations for post-filtered OSEM and MAP-EM (docs/studies/rules.md: an edge
        # choice widens the grid)
        GRIDS=(--osem-iterations 48 --map-iterations 48 --fwhm-mm 0 2 4 6 8 10 12 --betas 0.003 0.01 0.03 0.1 0.3 1)
        ;;
    mmr)
        STUDY=paper_findings_mmr3d
        GEOM=(--scanner Siemens_mMR --span 11 --image-shape 127,128,128 --num-subsets 7 --num-stages 21)
        TRAIN_COUNTS=(--counts 1e6,3e7,3e8 --phantom mixed)
        EVAL_COUNTS=(--counts 3e7,3e8 --phantom mixed)
        SETS="train:1300:12 tune:2300:4 confirm:3300:12"
        RECIPE=(--dims 3 --channels 16 --layers 5 --epochs 6 --lr 1e-3 --loss scaled_mse --beta-counts log_linear
                --validation-fraction 0.2 --block-size 32,64,64 --no-progress)
        # mmr_3d.sh's grids (widened there from the floor step's on the mMR tuning set)
        GRIDS=(--osem-iterations 16 --map-iterations 16 --fwhm-mm 0 2 4 6 8 10 12
               --betas 0.0003 0.001 0.003 0.01 0.03 0.1)
        ;;
    *) echo "paper_findings_3d.sh: SCALE must be small or mmr, got '$SCALE'" >&2; exit 2 ;;
esac
CARRIED=${CARRIED:-pipelines/carried_runs/$STUDY}
# training configurations: NAME|DATA|ARGS (DATA: the training set's folder under WORK/data)
CONFIGS=(
    "seq|train|--mode sequential"
    "e2e|train|--mode end_to_end"
)

simulate() {
    local role seed n
    local counts=()
    for role in $SETS; do
        IFS=: read -r role seed n <<< "$role"
        # simulate writes its manifest after every sample and resumes a stopped set; .simulated marks a whole one
        [ -f "$WORK/data/$role/.simulated" ] && continue
        if [ "$role" = train ]; then counts=("${TRAIN_COUNTS[@]}"); else counts=("${EVAL_COUNTS[@]}"); fi
        $SF simulate --out "$WORK/data/$role" --num-samples "$n" --seed "$seed" "${GEOM[@]}" "${counts[@]}" \
            --no-progress
        touch "$WORK/data/$role/.simulated"
    done
}

# the tuning run: the baselines' grids searched on the tuning set (the JSON flags a choice at a grid's edge);
# a finished one carried from another session is taken, a stopped one resumes
tune() {
    local resume
    [ -f "$WORK/results/${STUDY}_tune.json" ] && return 0
    if [ -f "$CARRIED/eval/${STUDY}_tune.json" ]; then
        mkdir -p "$WORK/results"
        cp "$CARRIED/eval/${STUDY}_tune.json" "$WORK/results/"
        return 0
    fi
    resume=$(evaluation_resume "${STUDY}_tune")
    # shellcheck disable=SC2086  # --resume or nothing
    $SF evaluate --data "$WORK/data/tune" --out "$WORK/results" --name "${STUDY}_tune" "${GRIDS[@]}" \
        --no-progress $resume
}

# the confirmation run: scored once (skipped once its JSON exists), after every choice is frozen; the
# baselines' choices come from the tuning run's grids (--tuning-result: checked to be the same tuning
# phantoms and grids, so the tuning phantoms are not reconstructed again: 2 h at the mMR's scale)
confirm() {
    local models_args resume tuned=()
    [ -f "$WORK/results/$STUDY.json" ] && return 0
    models_args=$(models seq e2e)
    [ -f "$WORK/results/${STUDY}_tune.json" ] && tuned=(--tuning-result "$WORK/results/${STUDY}_tune.json")
    resume=$(evaluation_resume "$STUDY")
    # shellcheck disable=SC2086  # --model NAME=PATH words, --resume or nothing
    $SF evaluate --data "$WORK/data/confirm" --tune-data "$WORK/data/tune" "${tuned[@]}" --out "$WORK/results" \
        --name "$STUDY" "${GRIDS[@]}" --no-progress $models_args $resume
}

case "$STEP" in
    simulate) simulate ;;
    train) shift 2; train_runs "$@" ;;
    tune) tune ;;
    confirm) confirm ;;
    carry) carry_runs; carry_evaluations "${STUDY}_tune" "$STUDY" ;;
    all) simulate; train_runs; tune; confirm ;;
    *) echo "unknown step $STEP (simulate|train|tune|confirm|carry|all)" >&2; exit 2 ;;
esac
