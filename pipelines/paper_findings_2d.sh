#!/usr/bin/env bash
# The paper's findings in 2D (docs/studies/paper_findings.md), under the study rules
# (docs/studies/rules.md): disjoint training / tuning / confirmation phantoms by seed, three
# training seeds per learned method, baselines tuned on the tuning set, the confirmation set
# scored once. Every step is a sirf-fbsem command; each is skipped when its output exists.
#
#   bash pipelines/paper_findings_2d.sh WORK_DIR [simulate|train [NAME...]|tune|confirm|all]
#
# Setting: one ring of the Siemens mMR (1 direct sinogram, 252 views x 344 bins), image
# 1 x 128 x 128 of 2.086 mm, 2e5 prompts per slice (the low-count level of mmr_2d.md), 20 % randoms
# + 20 % scatter, normalisation and attenuation; 6 subsets, K = 12 stages (2 full iterations);
# 2D CNN of 32 channels x 5 layers; 12 epochs (per stage when sequential), Adam 2e-3, loss mse in
# phantom-mean units, 20 training phantoms of which 4 validate; the recipe of mmr_2d.md, frozen
# before these sets were drawn. Phantom sets (base seeds; disjoint from every earlier study's):
#   procedural: training 1100 (20), tuning 2100 (6), confirmation 3100 (10)
#   MNI152:     training 1101 (20), tuning 2101 (6), confirmation 3101 (10)
# Training seeds 0, 1, 2 (split, shuffles and initial weights). 27 runs: 2 h 33 min on 2 CPU
# cores shared with the tuning runs (measured); a 4-epoch sequential run alone took 54 s.
#
# K = 36: at K = 12 the last stage's target (noise-free OSEM after 12 sub-iterations) is nearly as
# far from the truth as the tuned baselines (`targets_nrmse_by_stage` of the tuning runs against
# their grids; docs/studies/paper_findings.md) and further than MR-guided MAP-EM, so PET-only and
# PET+MR sequential FBSEM are also trained at K = 36 (the smallest K at which the earlier 2D
# study, on other phantoms, beat the baselines):
# the same training phantoms and noise (same seed) with 36 stages of targets, scored on the same
# tuning and confirmation sets, once. PET-only sequential FBSEM is also trained at K = 36 on the
# MNI152 training phantoms (seed 1101, 36 stages of targets), for the K = 36 generalisation rows:
# scored once on each confirmation set; and with fixed targets on the same set, for findings 1 and 2
# at K = 36 (pipelines/paper_findings_k36_domains.py pairs the runs' phantoms). On the procedural
# training set K = 36 also has fixed targets (findings 1 and 2) and end-to-end training with
# iteration-dependent and with one shared network (findings 3 and 4), greedy training and the
# block-wise regulariser.
# Finding 3 with more data: at K = 12 one shared network beat iteration-dependent ones, perhaps
# because each of 12 networks saw only 16 training inputs; e2e_n60 / e2e_shared_n60 are the same K = 12
# end-to-end configurations on 60 new procedural phantoms (seed 1102; 48 train, 12 validate).
# With the MR image at K = 36: fixed targets, end-to-end and one shared network on the procedural
# training set, and iteration-dependent and fixed targets on the MNI152 one (findings 1 to 4 for
# PET+MR); PET-only end-to-end and one shared network on the MNI152 training set (findings 3 and 4).
set -euo pipefail
# shellcheck source=pipelines/study_runs.sh
source "$(dirname "$0")/study_runs.sh"
WORK=${1:?usage: paper_findings_2d.sh WORK_DIR [simulate|train [NAME...]|tune|confirm|all]}
STEP=${2:-all}
SF=${SIRF_FBSEM:-sirf-fbsem}
SEEDS=${SEEDS:-"0 1 2"}
GEOM=(--2d --scanner Siemens_mMR --image-shape 1,128,128 --counts 2e5 --num-subsets 6 --num-stages 12)
GEOM36=(--2d --scanner Siemens_mMR --image-shape 1,128,128 --counts 2e5 --num-subsets 6 --num-stages 36)
RECIPE=(--dims 2 --epochs 12 --lr 2e-3 --loss mse --image-units phantom_mean --validation-fraction 0.2 --no-progress)
# the first tuning runs chose 8 iterations (the grid's end) for filtered OSEM and MAP-EM (MNI152)
# and for MR-guided MAP-EM, and 2 Bowsher neighbours (the grid's start): grids widened to 16
# iterations and 1..5 neighbours; no beta near 3 was chosen, so the beta grid ends at 1
GRIDS=(--osem-iterations 16 --map-iterations 16 --fwhm-mm 0 2 4 6 8 10 12 --betas 0.003 0.01 0.03 0.1 0.3 1)
BOWSHER=(--bowsher 1 2 3 4 5)
# training configurations: NAME|DATA|ARGS (DATA: the training set's directory under WORK/data)
CONFIGS=(
    "seq_osem|train_proc|--mode sequential --targets osem"
    "seq_truth|train_proc|--mode sequential --targets truth"
    "e2e|train_proc|--mode end_to_end --targets osem"
    "e2e_shared|train_proc|--mode end_to_end --shared --targets osem"
    "greedy|train_proc|--mode greedy --targets osem"
    "seq_block|train_proc|--mode sequential --targets osem --block-size 1,64,64"
    "seq_osem_pm|train_proc|--mode sequential --targets osem --anatomical"
    "seq_osem_mni|train_mni|--mode sequential --targets osem"
    "seq_truth_mni|train_mni|--mode sequential --targets truth"
)
K12=(seq_osem seq_truth e2e e2e_shared greedy seq_block seq_osem_pm seq_osem_mni seq_truth_mni)
CONFIGS+=(
    "seq_osem_k36|train36_proc|--mode sequential --targets osem"
    "seq_osem_pm_k36|train36_proc|--mode sequential --targets osem --anatomical"
    "seq_osem_mni_k36|train36_mni|--mode sequential --targets osem"
    "seq_truth_mni_k36|train36_mni|--mode sequential --targets truth"
    "seq_truth_k36|train36_proc|--mode sequential --targets truth"
    "e2e_k36|train36_proc|--mode end_to_end --targets osem"
    "e2e_shared_k36|train36_proc|--mode end_to_end --shared --targets osem"
    "greedy_k36|train36_proc|--mode greedy --targets osem"
    "seq_block_k36|train36_proc|--mode sequential --targets osem --block-size 1,64,64"
    "e2e_n60|train60_proc|--mode end_to_end --targets osem"
    "e2e_shared_n60|train60_proc|--mode end_to_end --shared --targets osem"
    "seq_truth_pm_k36|train36_proc|--mode sequential --targets truth --anatomical"
    "e2e_pm_k36|train36_proc|--mode end_to_end --targets osem --anatomical"
    "e2e_shared_pm_k36|train36_proc|--mode end_to_end --shared --targets osem --anatomical"
    "e2e_mni_k36|train36_mni|--mode end_to_end --targets osem"
    "e2e_shared_mni_k36|train36_mni|--mode end_to_end --shared --targets osem"
    "seq_osem_pm_mni_k36|train36_mni|--mode sequential --targets osem --anatomical"
    "seq_truth_pm_mni_k36|train36_mni|--mode sequential --targets truth --anatomical"
)

simulate() {
    local kind phantom base
    for kind in proc mni; do
        if [ "$kind" = proc ]; then phantom=procedural; base=1100; else phantom=mni152; base=1101; fi
        $SF simulate --out "$WORK/data/train_$kind" --num-samples 20 --seed "$base" --phantom "$phantom" "${GEOM[@]}" --no-progress
        $SF simulate --out "$WORK/data/tune_$kind" --num-samples 6 --seed $((base + 1000)) --phantom "$phantom" "${GEOM[@]}" --no-progress
        $SF simulate --out "$WORK/data/confirm_$kind" --num-samples 10 --seed $((base + 2000)) --phantom "$phantom" "${GEOM[@]}" --no-progress
    done
    # the procedural training set again, with 36 stages of targets (same seed: same phantoms and noise)
    $SF simulate --out "$WORK/data/train36_proc" --num-samples 20 --seed 1100 --phantom procedural "${GEOM36[@]}" --no-progress
    $SF simulate --out "$WORK/data/train36_mni" --num-samples 20 --seed 1101 --phantom mni152 "${GEOM36[@]}" --no-progress
    # finding 3 with three times the training phantoms (a new seed): 48 training inputs per network
    $SF simulate --out "$WORK/data/train60_proc" --num-samples 60 --seed 1102 --phantom procedural "${GEOM[@]}" --no-progress
}

# the tuning runs: baselines' grids searched on the tuning sets (the JSON flags a choice at a grid's edge)
tune() {
    $SF evaluate --data "$WORK/data/tune_proc" --out "$WORK/results" --name paper_findings_2d_tune_proc \
        "${GRIDS[@]}" "${BOWSHER[@]}" --no-progress --overwrite
    $SF evaluate --data "$WORK/data/tune_mni" --out "$WORK/results" --name paper_findings_2d_tune_mni \
        "${GRIDS[@]}" --no-progress --overwrite
}

# score NAME KIND "CONFIGS" ARGS...: one confirmation run of the configurations' models on confirm_KIND,
# with the baselines tuned on tune_KIND (skipped once NAME.json exists: each configuration is scored
# once; the models are looked up only then, so a run can be scored before later configurations train)
score() {
    local name=$1 kind=$2 configs=$3 models_args
    shift 3
    [ -f "$WORK/results/$name.json" ] && return 0
    # shellcheck disable=SC2086  # CONFIGS are words
    models_args=$(models $configs)
    # shellcheck disable=SC2086  # --model NAME=PATH words
    $SF evaluate --data "$WORK/data/confirm_$kind" --tune-data "$WORK/data/tune_$kind" --out "$WORK/results" \
        --name "$name" "${GRIDS[@]}" --no-progress "$@" $models_args
}

# the confirmation runs: scored once, after every choice is frozen
confirm() {
    score paper_findings_2d_proc proc "${K12[*]}" "${BOWSHER[@]}"
    score paper_findings_2d_mni mni "seq_osem seq_truth seq_osem_mni seq_truth_mni"
    # K = 36: PET-only (both phantom kinds), then PET+MR against MR-guided MAP-EM
    score paper_findings_2d_k36_proc proc seq_osem_k36
    score paper_findings_2d_k36_mni mni seq_osem_k36
    score paper_findings_2d_k36_pm_proc proc seq_osem_pm_k36 "${BOWSHER[@]}"
    # K = 36 trained on MNI152 phantoms: on MNI152 (its kind) and on procedural phantoms, with
    # iteration-dependent and with fixed targets
    score paper_findings_2d_k36_mni_on_mni mni seq_osem_mni_k36
    score paper_findings_2d_k36_mni_on_proc proc seq_osem_mni_k36
    score paper_findings_2d_k36_truth_mni_on_mni mni seq_truth_mni_k36
    score paper_findings_2d_k36_truth_mni_on_proc proc seq_truth_mni_k36
    # K = 36 with fixed targets on the procedural training set (findings 1 and 2), and end-to-end
    # with iteration-dependent and with one shared network (findings 3 and 4)
    score paper_findings_2d_k36_truth_proc_on_proc proc seq_truth_k36
    score paper_findings_2d_k36_truth_proc_on_mni mni seq_truth_k36
    score paper_findings_2d_k36_e2e_proc proc "e2e_k36 e2e_shared_k36"
    # K = 36 greedy training and the block-wise regulariser (compared with the two runs above)
    score paper_findings_2d_k36_schemes_proc proc "greedy_k36 seq_block_k36"
    # K = 12 end-to-end with 60 training phantoms: does finding 3 turn with more data per network?
    score paper_findings_2d_n60_e2e_proc proc "e2e_n60 e2e_shared_n60"
    # K = 36 with the MR image (findings 1 to 4; MR-guided MAP-EM tuned alongside) and PET-only end-to-end
    # on the MNI152 training set (findings 3 and 4; pipelines/paper_findings_k36_pm_mni.py pairs the runs)
    score paper_findings_2d_k36_truth_pm_proc proc seq_truth_pm_k36 "${BOWSHER[@]}"
    score paper_findings_2d_k36_e2e_pm_proc proc "e2e_pm_k36 e2e_shared_pm_k36" "${BOWSHER[@]}"
    score paper_findings_2d_k36_e2e_mni mni "e2e_mni_k36 e2e_shared_mni_k36"
    score paper_findings_2d_k36_pm_on_mni mni "seq_osem_pm_k36 seq_truth_pm_k36" "${BOWSHER[@]}"
    score paper_findings_2d_k36_pm_mni_on_mni mni "seq_osem_pm_mni_k36 seq_truth_pm_mni_k36" "${BOWSHER[@]}"
    score paper_findings_2d_k36_pm_mni_on_proc proc "seq_osem_pm_mni_k36 seq_truth_pm_mni_k36" "${BOWSHER[@]}"
}

case "$STEP" in
    simulate) simulate ;;
    train) shift 2; train_runs "$@" ;;
    tune) tune ;;
    confirm) confirm ;;
    all) simulate; train_runs; tune; confirm ;;
    *) echo "unknown step $STEP (simulate|train|tune|confirm|all)" >&2; exit 2 ;;
esac
