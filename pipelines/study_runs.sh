# Shell functions shared by the findings studies' scripts (sourced by pipelines/paper_findings_2d.sh
# and pipelines/paper_findings_3d.sh). A study's runs live in $WORK/runs/NAME_sSEED: one per training
# configuration (CONFIGS: "NAME|DATA|ARGS" entries, DATA the training set's folder under $WORK/data) and
# training seed in $SEEDS; every run is trained by `$SF train` with the study's RECIPE.

# check_names NAME...: exit 2, naming the known configurations, unless every NAME is one of CONFIGS'
check_names() {
    local cfg name known=" "
    for cfg in "${CONFIGS[@]}"; do known+="${cfg%%|*} "; done
    for name in "$@"; do
        [[ "$known" == *" $name "* ]] || { echo "$(basename "$0") train: unknown configuration '$name' (known:$known)" >&2; exit 2; }
    done
}

# models NAME...: "--model NAME=PATH" for every training seed's run of the configurations named; exits
# when one is not trained yet (a confirmation run scores a complete set of runs, once)
models() {
    local name seed model
    for name in "$@"; do
        for seed in $SEEDS; do
            model="$WORK/runs/${name}_s$seed/model.pt"
            [ -f "$model" ] || { echo "$(basename "$0"): $model is missing: run the train step first" >&2; exit 1; }
            echo "--model $name=$model"
        done
    done
}

# train_runs [NAME...]: train every configuration's runs, or the named ones', skipping finished runs
# (model.pt) and resuming stopped ones (checkpoints/). When CARRIED is set (runs carried between
# sessions), a run with no model of its own takes $CARRIED/NAME_sSEED/model.pt (a finished run, with its
# .json) and is done; one with no checkpoints of its own starts from $CARRIED/NAME_sSEED/checkpoints
train_runs() {
    local cfg name data args seed out kept resume
    check_names "$@"
    for seed in $SEEDS; do
        for cfg in "${CONFIGS[@]}"; do
            IFS='|' read -r name data args <<< "$cfg"
            [ $# -eq 0 ] || [[ " $* " == *" $name "* ]] || continue
            out="$WORK/runs/${name}_s$seed"
            [ -f "$out/model.pt" ] && continue
            kept="${CARRIED:+$CARRIED/${name}_s$seed}"
            if [ -n "$kept" ] && [ -f "$kept/model.pt" ]; then
                mkdir -p "$out"
                cp "$kept"/model.* "$out/"
                continue
            fi
            if [ -n "$kept" ] && [ ! -d "$out/checkpoints" ] && [ -d "$kept/checkpoints" ]; then
                mkdir -p "$out/checkpoints"
                cp "$kept"/checkpoints/*.pt "$out/checkpoints/"
            fi
            resume=()
            [ -d "$out/checkpoints" ] && resume=(--resume)
            # shellcheck disable=SC2086  # ARGS are words
            $SF train --data "$WORK/data/$data" --out "$out" --seed "$seed" "${RECIPE[@]}" $args "${resume[@]}"
        done
    done
}

# carry_runs: every run into $CARRIED, each in its own folder (what train_runs reads back): a finished
# run's model file (model.pt and its .json: all that a confirmation run needs; the run's carried
# checkpoints, which carry_runs wrote, are dropped), or a stopped run's checkpoints, the stages'
# (sequential) or the joint one (end-to-end); not initial.pt (train derives it again from --seed) nor
# the stage caches (train rebuilds them)
carry_runs() {
    local run dest f n=0 m=0
    for run in "$WORK"/runs/*/; do
        dest="$CARRIED/$(basename "$run")"
        if [ -f "${run}model.pt" ]; then
            mkdir -p "$dest"
            for f in "$run"model.pt "$run"model.json; do
                if [ -f "$f" ]; then cp "$f" "$dest/"; fi
            done
            rm -rf "$dest/checkpoints"
            m=$((m + 1))
            continue
        fi
        for f in "$run"checkpoints/stage_*.pt "$run"checkpoints/checkpoint.pt; do
            [ -f "$f" ] || continue
            mkdir -p "$dest/checkpoints"
            cp "$f" "$dest/checkpoints/"
            n=$((n + 1))
        done
    done
    echo "carried $m finished models and $n checkpoints of $WORK/runs into $CARRIED"
}

# evaluation_resume NAME: prints --resume when evaluate run NAME stopped part-way ($WORK/results/NAME.partial),
# after taking the partial results carried from another session ($CARRIED/eval/NAME.partial) when this host
# has neither them nor the finished NAME.json
evaluation_resume() {
    local name=$1 results="$WORK/results"
    if [ -n "${CARRIED:-}" ] && [ -d "$CARRIED/eval/$name.partial" ] && [ ! -e "$results/$name.partial" ] \
            && [ ! -e "$results/$name.json" ]; then
        mkdir -p "$results"
        cp -r "$CARRIED/eval/$name.partial" "$results/"
    fi
    if [ -d "$results/$name.partial" ]; then echo --resume; fi
}

# carry_evaluations NAME...: into $CARRIED/eval, each named evaluate run's JSON when it finished (what a later
# run reads, as the confirmation run reads the tuning run's) or its partial results when it stopped
carry_evaluations() {
    local name results="$WORK/results" n=0
    for name in "$@"; do
        [ -f "$results/$name.json" ] || [ -d "$results/$name.partial" ] || continue
        mkdir -p "$CARRIED/eval"
        rm -rf "$CARRIED/eval/$name.partial"
        if [ -f "$results/$name.json" ]; then
            cp "$results/$name.json" "$CARRIED/eval/"
        else
            cp -r "$results/$name.partial" "$CARRIED/eval/"
        fi
        n=$((n + 1))
    done
    echo "carried $n evaluations of $results into $CARRIED/eval"
}
