#!/usr/bin/env bash
# Learning-rate sweep of the tinystories-17m baseline, then loss curves and a results table.
#
#   bash examples/lr_sweep.sh --budget tiny --text ../shared/data/tinystories_train.txt   # CPU, ~30 s
#   bash examples/lr_sweep.sh --budget small --lrs "3e-4 1e-3 3e-3"                       # CPU
#   bash examples/lr_sweep.sh --budget full -- --dtype bfloat16                           # GPU, the seeds' size
#
# One run per peak learning rate (cosine decay to lr/10 after the warmup); everything else is the
# budget's baseline. Too high an lr shows up as a diverging or NaN curve (the run stops with a
# message; the table shows how far it got), too low as a slow one.
#   --lrs "A B C"   the learning rates (default: tiny "1e-3 3e-3 1e-2"; small "3e-4 1e-3 3e-3 1e-2";
#                   full "1e-4 3e-4 8e-4 2e-3 5e-3", around the seeds' 8e-4)
#
# Writes runs/lr-<budget>-<lr>/, then results/lr_sweep-<budget>/: val_loss.png, train_loss.png and
# results.md (tslm compare --markdown).
source "$(dirname "$0")/_common.sh"

usage() { recipe_usage "$0"; }

parse_common_args "$@"
LRS=""
set -- ${RECIPE_ARGS[@]+"${RECIPE_ARGS[@]}"}
while [ $# -gt 0 ]; do
    case "$1" in
        --lrs) LRS=${2:?--lrs needs a list}; shift 2 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done
budget_settings
case "$BUDGET" in
    tiny) LRS=${LRS:-"1e-3 3e-3 1e-2"} ;;
    small) LRS=${LRS:-"3e-4 1e-3 3e-3 1e-2"} ;;
    full) LRS=${LRS:-"1e-4 3e-4 8e-4 2e-3 5e-3"} ;;
esac
prepare_data

for lr in $LRS; do
    min_lr=$(awk -v x="$lr" 'BEGIN { if (x + 0 <= 0) exit 1; printf "%g", x / 10 }') \
        || die "--lrs: '$lr' is not a positive number"
    queue_run "lr-$BUDGET-$lr" --lr "$lr" --min-lr "$min_lr"
done

run_queue
finish "results/lr_sweep-$BUDGET" "Learning-rate sweep"
