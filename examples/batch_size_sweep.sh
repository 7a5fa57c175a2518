#!/usr/bin/env bash
# Batch-size sweep at a fixed token budget: every run sees the same number of training tokens, so a
# larger batch takes proportionally fewer (and less noisy) steps. Then loss curves and a results table.
#
#   bash examples/batch_size_sweep.sh --budget tiny --text ../shared/data/tinystories_train.txt   # CPU, ~30 s
#   bash examples/batch_size_sweep.sh --budget small --batch-sizes "8 16 32"                      # CPU
#   bash examples/batch_size_sweep.sh --budget full -- --dtype bfloat16                           # GPU
#
#   --batch-sizes "A B C"  sequences per step (default: tiny "4 8 16"; small "4 8 16 32 64";
#                          full "16 32 64 128 256")
#   --tokens N             training tokens of every run (default: the budget's baseline, batch x steps x ctx:
#                          tiny 12,800; small 307,200; full 327,680,000 = the seeds' 20,000 x 64 x 256)
# Each run gets --train-tokens N (its step count follows), a warmup of 10% and 5 evaluations; the
# peak lr stays the preset's 8e-4 (add -- --lr X to change it for all runs).
#
# Writes runs/bs-<budget>-<batch>/, then results/batch_size_sweep-<budget>/: val_loss.png (against
# tokens, so the runs line up), train_loss.png and results.md (tslm compare --markdown).
source "$(dirname "$0")/_common.sh"

usage() { recipe_usage "$0"; }

parse_common_args "$@"
SIZES=""
TOKENS=""
set -- ${RECIPE_ARGS[@]+"${RECIPE_ARGS[@]}"}
while [ $# -gt 0 ]; do
    case "$1" in
        --batch-sizes) SIZES=${2:?--batch-sizes needs a list}; shift 2 ;;
        --tokens) TOKENS=${2:?--tokens needs a number}; shift 2 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done
budget_settings
case "$BUDGET" in
    tiny) SIZES=${SIZES:-"4 8 16"} ;;
    small) SIZES=${SIZES:-"4 8 16 32 64"} ;;
    full) SIZES=${SIZES:-"16 32 64 128 256"} ;;
esac
TOKENS=${TOKENS:-$(( BATCH * STEPS * CTX ))}
case "$TOKENS" in ''|*[!0-9]*|0) die "--tokens must be a positive integer, got '$TOKENS'" ;; esac
prepare_data

for bs in $SIZES; do
    case "$bs" in ''|*[!0-9]*|0) die "--batch-sizes: '$bs' is not a positive integer" ;; esac
    steps=$(( (TOKENS + bs * CTX - 1) / (bs * CTX) ))
    warmup=$(( steps / 10 ))
    every=$(( steps / 5 )); [ "$every" -ge 1 ] || every=1
    # --train-tokens sets the step count; --max-steps only has to allow the warmup.
    queue_run "bs-$BUDGET-$bs" --batch-size "$bs" --train-tokens "$TOKENS" --max-steps "$steps" \
        --warmup-steps "$warmup" --eval-every "$every"
done

run_queue
PLOT_X=tokens   # the same token budget: compare the curves at equal tokens seen
finish "results/batch_size_sweep-$BUDGET" "Batch-size sweep at $TOKENS tokens"
