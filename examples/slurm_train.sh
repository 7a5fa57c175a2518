#!/usr/bin/env bash
# Train on several GPU nodes under Slurm: one torchrun per node (srun), FSDP across all GPUs, and a
# requeue when the job's time runs out or it is preempted.
#
#   sbatch examples/slurm_train.sh                      # 2 nodes x 8 GPUs, gpt2-xl, FSDP + activation checkpointing
#   PRESET=gpt2-large RUN=large sbatch --nodes 4 examples/slurm_train.sh
#   sbatch examples/slurm_train.sh -- --time-budget 20h  # extra flags for `tslm train`
#
# How the requeue works: Slurm sends SIGTERM (--signal=TERM@300: five minutes before the time limit, and
# on preemption). Every `tslm train` process saves a checkpoint at the end of its step and exits with
# status 143 (128 + SIGTERM), which tells this script the run did not finish: it requeues the job, and
# the next start continues with `--resume auto` from the newest checkpoint. A finished run exits 0 and
# is not requeued. Checkpoints are one portable file, so the requeued job may get another number of
# nodes: pass the --batch-size (or --grad-accum) that keeps the global batch, as the error says.
#
#SBATCH --job-name=tslm
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -uo pipefail

PRESET="${PRESET:-gpt2-xl}"
RUN="${RUN:-${PRESET}-slurm}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
PORT="${PORT:-29500}"
EXTRA=()
if [ "${1:-}" = "--" ]; then shift; EXTRA=("$@"); fi

if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "error: run this with sbatch (it needs Slurm's SLURM_* variables)" >&2
    exit 2
fi

# The first node of the allocation hosts the rendezvous.
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

# srun starts one torchrun per node; each starts GPUS_PER_NODE training processes. Slurm's SIGTERM
# goes to srun, which forwards it to the torchruns and they to every rank.
srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_JOB_NUM_NODES" --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$HEAD:$PORT" --rdzv-id "$SLURM_JOB_ID" \
    -m tinystories_cli train --preset "$PRESET" --run-name "$RUN" --resume auto \
    --parallel fsdp --activation-checkpointing --dtype bfloat16 --plain "${EXTRA[@]}" &
TRAIN=$!

# Forward the early SIGTERM to srun (bash defers traps while waiting on a foreground job, hence `&` + wait).
SIGNALLED=0
trap 'SIGNALLED=1; kill -TERM "$TRAIN" 2>/dev/null' TERM
wait "$TRAIN"
STATUS=$?
if [ "$SIGNALLED" -eq 1 ]; then
    # the trap interrupted `wait` (which then returns 143); wait again for training's own exit status
    wait "$TRAIN"
    STATUS=$?
fi

# 143/130: `tslm train` saved and stopped on a signal. When the job itself was signalled, torchrun may
# report its own status for the stopped workers, so a signalled job is requeued as well (the newest
# checkpoint is complete: checkpoints are written atomically).
if [ "$STATUS" -eq 0 ]; then
    echo "run $RUN finished"
elif [ "$STATUS" -eq 143 ] || [ "$STATUS" -eq 130 ] || [ "$SIGNALLED" -eq 1 ]; then
    echo "run $RUN stopped with a checkpoint (status $STATUS): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
else
    echo "run $RUN failed with status $STATUS: not requeued (see the log above)" >&2
fi
exit "$STATUS"
