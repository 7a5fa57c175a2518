#!/usr/bin/env bash
# The seeds' architecture ablations, one tslm run each, then loss curves and a results table.
#
#   bash examples/ablations.sh --budget tiny --text ../shared/data/tinystories_train.txt   # CPU, ~1 min
#   bash examples/ablations.sh --budget small                                              # CPU, under an hour
#   bash examples/ablations.sh --budget full -- --dtype bfloat16                           # GPU, the seeds' size
#   bash examples/ablations.sh --budget tiny --seeds 3 --text ../shared/data/tinystories_train.txt   # 3 random seeds each
#
# Every run is the tinystories-17m baseline (pre-norm RMSNorm, RoPE, SwiGLU, untied embeddings,
# lr 8e-4) with one switch changed:
#
#   baseline            the preset as is
#   post-norm           --norm-position post        normalize after each residual add (original Transformer)
#   nope                --pos-emb nope              no position information at all (causal mask only)
#   silu                --ffn silu                  SiLU FFN, d_ff = 4 d_model (about SwiGLU's parameters)
#   no-rmsnorm          --norm none                 no normalization, at the baseline lr 8e-4 ...
#   no-rmsnorm-lr3e-4   --norm none --lr 3e-4       ... and at a lower lr, where it is more stable
#   sinusoidal          --pos-emb sinusoidal        fixed sinusoids added to the embeddings
#   learned             --pos-emb learned           a learned position embedding table
#   tied                --tie-embeddings            the LM head shares the token embedding
#
# Writes runs/abl-<budget>-<name>/ (tslm train + tslm eval), then results/ablations-<budget>/:
# val_loss.png and train_loss.png (tslm plot; .txt terminal plots without matplotlib) and results.md
# (tslm compare --markdown). With --seeds N every variant runs with --seed 0..N-1 (runs/abl-<budget>-<name>-s<k>/)
# and the table shows each variant's mean ± std over its seeds, with ~ on the means that are within seed
# noise of the baseline's. Options: see examples/_common.sh; --only NAME,NAME runs a subset.
source "$(dirname "$0")/_common.sh"

usage() { recipe_usage "$0"; }

parse_common_args "$@"
ONLY=""
set -- ${RECIPE_ARGS[@]+"${RECIPE_ARGS[@]}"}
while [ $# -gt 0 ]; do
    case "$1" in
        --only) ONLY=${2:?--only needs names}; shift 2 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done
budget_settings
prepare_data

add() {   # add NAME FLAGS...: queue it unless --only excludes it
    case ",${ONLY:-$1}," in *",$1,"*) queue_run "abl-$BUDGET-$1" "${@:2}" ;; esac
}
add baseline
add post-norm          --norm-position post
add nope               --pos-emb nope
add silu               --ffn silu
add no-rmsnorm         --norm none --lr 8e-4
add no-rmsnorm-lr3e-4  --norm none --lr 3e-4
add sinusoidal         --pos-emb sinusoidal
add learned            --pos-emb learned
add tied               --tie-embeddings
[ "${#RUN_NAMES[@]}" -gt 0 ] || die "--only $ONLY matches no ablation"

run_queue
finish "results/ablations-$BUDGET" "Architecture ablations"
