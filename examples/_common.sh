# Shared by ablations.sh, lr_sweep.sh and batch_size_sweep.sh (sourced, not run).
# Plain bash 3.2+ (the macOS default): no associative arrays, no `wait -n`.
#
# Common options of every recipe:
#   --budget tiny|small|full   tiny: a 2-layer d=64 model, seconds per run on a CPU (a smoke test);
#                              small: 4 layers d=128, 300 steps x 8 x 128 tokens, minutes per run on a CPU;
#                              full: the tinystories-17m preset, 20,000 steps x 64 x 256 tokens as in the CS336 baseline (GPU)
#   --text FILE                build the dataset from this UTF-8 text instead of data/tinystories/
#                              (last 5% of its lines held out for validation), e.g. ../shared/data/tinystories_train.txt
#   --dataset NAME             use data/NAME/ (default: tinystories, or text-<budget> with --text)
#   --workdir DIR              where data/, runs/ and results/ live (default: the current directory)
#   --device DEV               auto | cpu | cuda | mps (default: auto)
#   --jobs N                   train N runs at a time (default: 2 for tiny, where process start-up dominates, else 1)
#   --eval each|compare        each: `tslm eval` every run (eval_valid.json in its directory), then `tslm compare`;
#                              compare: one `tslm compare --data valid.npy` evaluates them all in one process
#                              (the same numbers, fewer start-ups) (default: compare for tiny, else each)
#   --seeds N                  train every run with N random seeds (--seed 0..N-1, runs NAME-s0..NAME-sN-1);
#                              `tslm compare` then shows each group's mean ± std and marks differences within
#                              seed noise with ~ (default: 1, one run per setting, named NAME)
#   --dry-run                  print the tslm train commands and exit: no data, no training
#   --force                    retrain runs that already finished
#   -- ARGS...                 extra flags for every `tslm train`, e.g. -- --dtype bfloat16 --compile
# Set TSLM="python -m tinystories_cli" to use a tslm that is not on PATH.

set -euo pipefail

if [ -n "${TSLM:-}" ]; then
    tslm() { $TSLM "$@"; }
fi

die() { echo "error: $*" >&2; exit 2; }

# --help: the recipe's header comment, then the common options above.
recipe_usage() {
    sed -n '2,/^source/p' "$1" | sed -e '$d' -e 's/^# \{0,1\}//'
    echo
    sed -n '/^# Common options/,/^# Set TSLM/p' "${BASH_SOURCE[0]}" | sed -e 's/^# \{0,1\}//'
}

BUDGET=tiny
TEXT=""
DATASET=""
WORKDIR=.
DEVICE=auto
JOBS=""
EVAL_MODE=""
SEEDS=1
DRY_RUN=0
FORCE=0
TRAIN_EXTRA=()
RECIPE_ARGS=()   # options the recipe itself understands (parsed by the recipe)

parse_common_args() {
    while [ $# -gt 0 ]; do
        case "$1" in
            --budget) BUDGET=${2:?--budget needs tiny, small or full}; shift 2 ;;
            --text) TEXT=${2:?--text needs a file}; shift 2 ;;
            --dataset) DATASET=${2:?--dataset needs a name}; shift 2 ;;
            --workdir) WORKDIR=${2:?--workdir needs a directory}; shift 2 ;;
            --device) DEVICE=${2:?--device needs a value}; shift 2 ;;
            --jobs) JOBS=${2:?--jobs needs a number}; shift 2 ;;
            --eval) EVAL_MODE=${2:?--eval needs each or compare}; shift 2 ;;
            --seeds) SEEDS=${2:?--seeds needs a number}; shift 2 ;;
            --dry-run) DRY_RUN=1; shift ;;
            --force) FORCE=1; shift ;;
            -h|--help) usage; exit 0 ;;
            --) shift; TRAIN_EXTRA=("$@"); break ;;
            *) RECIPE_ARGS+=("$1"); shift ;;
        esac
    done
    case "$BUDGET" in tiny|small|full) ;; *) die "--budget must be tiny, small or full, got '$BUDGET'" ;; esac
    JOBS=${JOBS:-$([ "$BUDGET" = tiny ] && echo 2 || echo 1)}
    EVAL_MODE=${EVAL_MODE:-$([ "$BUDGET" = tiny ] && echo compare || echo each)}
    case "$JOBS" in ''|*[!0-9]*|0) die "--jobs must be a positive integer, got '$JOBS'" ;; esac
    case "$SEEDS" in ''|*[!0-9]*|0) die "--seeds must be a positive integer, got '$SEEDS'" ;; esac
    case "$EVAL_MODE" in each|compare) ;; *) die "--eval must be each or compare, got '$EVAL_MODE'" ;; esac
    if [ -n "$TEXT" ]; then
        [ -s "$TEXT" ] || die "--text file not found or empty: $TEXT"
        TEXT=$(cd "$(dirname "$TEXT")" && pwd)/$(basename "$TEXT")   # absolute: we cd into --workdir
    fi
    DATASET=${DATASET:-$([ -n "$TEXT" ] && echo "text-$BUDGET" || echo tinystories)}
    [ "$DRY_RUN" = 1 ] && return   # nothing is created
    mkdir -p "$WORKDIR"
    cd "$WORKDIR"   # tslm reads and writes data/ and runs/ under the current directory
    if [ "$JOBS" -gt 1 ] && [ -z "${OMP_NUM_THREADS:-}" ]; then
        # Parallel runs share the cores: one thread each avoids oversubscription.
        export OMP_NUM_THREADS=1
    fi
}

# Model and schedule per budget. Every run starts from the tinystories-17m preset (the seeds'
# baseline: pre-norm RMSNorm, RoPE, SwiGLU, untied, lr 8e-4 cosine to 8e-5, AdamW wd 1e-4, clip 1).
budget_settings() {
    case "$BUDGET" in
        tiny)   # ~5 s per run on 2 CPU cores, mostly start-up: checks that everything runs, not what wins
            VOCAB=512; MAX_LINES=3000; CTX=64; BATCH=8; STEPS=25
            SIZE_FLAGS=(--d-model 64 --num-layers 2 --num-heads 4 --ctx 64)
            SCHED_FLAGS=(--warmup-steps 3 --eval-every 5 --eval-batches 2 --log-every 5) ;;
        small)  # 1.4M parameters, 307K tokens per run: minutes per run on a laptop CPU
            VOCAB=2048; MAX_LINES=200000; CTX=128; BATCH=8; STEPS=300
            SIZE_FLAGS=(--d-model 128 --num-layers 4 --num-heads 4 --ctx 128)
            SCHED_FLAGS=(--warmup-steps 30 --eval-every 50 --eval-batches 8 --log-every 10) ;;
        full)   # the CS336 baseline's setting: 20,000 steps x 64 x 256 tokens (327.7M tokens), a GPU
            VOCAB=10000; MAX_LINES=0; CTX=256; BATCH=64; STEPS=20000
            SIZE_FLAGS=()
            SCHED_FLAGS=(--eval-every 500) ;;
    esac
}

# data/$DATASET/{train,valid}.npy and tokenizer/, made with tslm bpe + tslm encode when missing.
prepare_data() {
    local dir="data/$DATASET"
    if [ "$DRY_RUN" = 1 ]; then
        echo "== data: data/$DATASET (tslm bpe + tslm encode when missing)"
        return
    fi
    if [ -f "$dir/train.npy" ] && [ -f "$dir/valid.npy" ] && [ -d "$dir/tokenizer" ]; then
        echo "== data: reusing $dir (token files and tokenizer present)"
        return
    fi
    mkdir -p "$dir"
    if [ -n "$TEXT" ]; then
        local src=$TEXT
        if [ "$MAX_LINES" -gt 0 ]; then
            head -n "$MAX_LINES" "$TEXT" > "$dir/all.txt.tmp"
            src="$dir/all.txt.tmp"
        fi
        local total nvalid
        total=$(awk 'END { print NR }' "$src")
        nvalid=$(( total / 20 )); [ "$nvalid" -ge 1 ] || nvalid=1
        [ "$total" -gt "$nvalid" ] || die "--text $TEXT has only $total line(s); need at least 2"
        echo "== data: $TEXT -> $dir/train.txt ($(( total - nvalid )) lines) + valid.txt ($nvalid lines)"
        awk -v n=$(( total - nvalid )) 'NR <= n' "$src" > "$dir/train.txt"
        awk -v n=$(( total - nvalid )) 'NR > n' "$src" > "$dir/valid.txt"
        rm -f "$dir/all.txt.tmp"
    elif [ ! -f "$dir/train.txt" ] || [ ! -f "$dir/valid.txt" ]; then
        [ "$DATASET" = tinystories ] || die "data/$DATASET/{train,valid}.txt not found; pass --text FILE"
        if [ "$BUDGET" != full ]; then
            # tiny/small need far less than the 2.2 GB train split: the 22 MB validation file, split.
            tslm download tinystories --split valid   # resumable and verified; skipped when complete
            rmdir "$dir" 2>/dev/null || true
            TEXT="$PWD/data/tinystories/valid.txt"
            DATASET="tinystories-valid-$BUDGET"
            echo "== data: no data/tinystories/train.txt; using its validation file as data/$DATASET"
            prepare_data
            return
        fi
        tslm download tinystories   # resumable and verified
    fi
    tslm bpe "$dir/train.txt" --vocab-size "$VOCAB" --force
    tslm encode "$DATASET" --force
}

# Queue a run: queue_run NAME [tslm train flags...]; with --seeds N, N runs NAME-s0.. with --seed 0..
RUN_NAMES=()
RUN_FLAGS=()
queue_run() {
    local name=$1 seed; shift
    if [ "$SEEDS" = 1 ]; then
        RUN_NAMES+=("$name")
        RUN_FLAGS+=("$*")   # flags never contain spaces: kept as one string, split again when run
        return
    fi
    for (( seed = 0; seed < SEEDS; seed++ )); do
        RUN_NAMES+=("$name-s$seed")
        RUN_FLAGS+=("$* --seed $seed")
    done
}

# The tslm train arguments of one run: train_args NAME FLAGS -> TRAIN_ARGS
train_args() {
    local name=$1 flags=$2
    # shellcheck disable=SC2206  # $flags is a list of flags
    TRAIN_ARGS=(--preset tinystories-17m --dataset "$DATASET" ${SIZE_FLAGS[@]+"${SIZE_FLAGS[@]}"}
                --batch-size "$BATCH" --max-steps "$STEPS" ${SCHED_FLAGS[@]+"${SCHED_FLAGS[@]}"} $flags
                --device "$DEVICE" --run-name "$name" --force --plain ${TRAIN_EXTRA[@]+"${TRAIN_EXTRA[@]}"})
}

# Train one run, then (--eval each) evaluate it on the whole validation file (tslm eval ->
# runs/NAME/eval_valid.json). Output goes to runs/.logs/NAME.log, the exit status to runs/.logs/NAME.status,
# and runs/.logs/NAME.done marks a finished run: the run directory itself holds only what tslm writes.
LOGS=runs/.logs
_train_and_eval() {
    local name=$1 flags=$2 dir="runs/$1" log="$LOGS/$1"
    mkdir -p "$LOGS"
    rm -f "$log.status" "$log.done"
    train_args "$name" "$flags"
    if tslm train "${TRAIN_ARGS[@]}" > "$log.log" 2>&1 \
        && { [ "$EVAL_MODE" = compare ] \
             || tslm eval "$dir" --data "data/$DATASET/valid.npy" --device "$DEVICE" >> "$log.log" 2>&1; }; then
        echo 0 > "$log.status"
        touch "$log.done"
    else
        echo 1 > "$log.status"
    fi
}

# Run every queued run, $JOBS at a time; finished runs are skipped unless --force.
run_queue() {
    local i name failed=0
    if [ "$DRY_RUN" = 1 ]; then
        for i in "${!RUN_NAMES[@]}"; do
            train_args "${RUN_NAMES[$i]}" "${RUN_FLAGS[$i]}"
            echo "tslm train ${TRAIN_ARGS[*]}"
        done
        echo "== dry run: ${#RUN_NAMES[@]} runs; nothing was trained"
        exit 0
    fi
    for i in "${!RUN_NAMES[@]}"; do
        name=${RUN_NAMES[$i]}
        if [ "$FORCE" = 0 ] && [ -f "$LOGS/$name.done" ] \
                && { [ "$EVAL_MODE" = compare ] || [ -f "runs/$name/eval_valid.json" ]; }; then
            echo "== $name: done already (--force retrains)"
            mkdir -p "$LOGS" && echo 0 > "$LOGS/$name.status"
            continue
        fi
        while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 0.2; done
        echo "== $name: tslm train ${RUN_FLAGS[$i]:-(baseline)}  (log: $LOGS/$name.log)"
        _train_and_eval "$name" "${RUN_FLAGS[$i]}" &
    done
    wait
    for name in "${RUN_NAMES[@]}"; do
        if [ "$(cat "$LOGS/$name.status" 2>/dev/null)" != 0 ]; then
            echo "!! $name failed; last lines of $LOGS/$name.log:" >&2
            tail -n 15 "$LOGS/$name.log" >&2 || true
            failed=1
        fi
        rm -f "$LOGS/$name.status"
    done
    [ "$failed" = 0 ] || die "some runs failed (see above)"
}

# Plots and the results table: finish OUTDIR TITLE (for the queued runs).
finish() {
    local out=$1 title=$2 run_dirs=() name
    mkdir -p "$out"
    for name in "${RUN_NAMES[@]}"; do run_dirs+=("runs/$name"); done
    for metric in val_loss train_loss; do
        local smooth=1; [ "$metric" = train_loss ] && smooth=5
        if ! tslm plot "${run_dirs[@]}" --metric "$metric" --x "${PLOT_X:-step}" --smooth "$smooth" \
                --title "$title: $metric" --out "$out/$metric.png" --force 2>"$out/.plot.err"; then
            # Most likely matplotlib is missing (pip install matplotlib): a terminal plot instead.
            echo "(no PNG: $(tail -n 1 "$out/.plot.err")); writing $out/$metric.txt" >&2
            rm -f "$out/$metric.png"   # never leave a stale figure of other runs beside the new table
            tslm plot "${run_dirs[@]}" --metric "$metric" --x "${PLOT_X:-step}" --smooth "$smooth" --ascii \
                > "$out/$metric.txt"
        else
            rm -f "$out/$metric.txt"
        fi
        rm -f "$out/.plot.err"
    done
    {
        echo "# $title"
        echo
        echo "Budget \`$BUDGET\`, data \`data/$DATASET\`, made by \`examples/$(basename "$0")\`$(
            [ "$SEEDS" = 1 ] || echo " with --seeds $SEEDS (every setting trained with --seed 0..$(( SEEDS - 1 )))")."
        echo "best/final val: validation loss logged during training (fixed windows); eval loss, ppl, bpb:"
        echo "\`tslm eval\` over the whole validation file (bpb = bits per byte of text)."
        echo
        if [ "$EVAL_MODE" = compare ]; then
            tslm compare "${run_dirs[@]}" --data "data/$DATASET/valid.npy" --device "$DEVICE" --markdown
        else
            tslm compare "${run_dirs[@]}" --markdown
        fi
    } > "$out/results.md"
    echo "== results: $out/results.md"
    cat "$out/results.md"
    ls "$out"/val_loss.* "$out"/train_loss.* 2>/dev/null | sed 's/^/== plot: /'
}
