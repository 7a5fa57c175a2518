#!/usr/bin/env bash
# The pipeline behind `tslm quickstart`, one tslm command per stage, so each can be changed.
#
#   bash examples/quickstart.sh                   # TinyStories validation file, tinystories-cpu, ~10 min on CPU
#   STEPS=200 bash examples/quickstart.sh         # a shorter run
#   PRESET=tinystories-17m VOCAB=10000 SPLIT=train STEPS=5000 bash examples/quickstart.sh   # GPU, full data
#
# Environment variables (defaults in brackets):
#   WORKDIR  where data/ and runs/ go                      [quickstart-work]
#   SPLIT    valid: the 22 MB file, split 95/5 below;      [valid]
#            train: the full 2.2 GB train + valid files
#   VOCAB    tokenizer vocabulary size                     [2048]
#   PRESET   model preset (tslm account --list)            [tinystories-cpu]
#   STEPS    optimizer steps                               [600: about 10 min at ~8K tokens/s]
#   DEVICE   auto | cpu | cuda | mps                       [auto]
#   PROMPT   start of the story                            [Once upon a time]
set -euo pipefail

WORKDIR=${WORKDIR:-quickstart-work}
SPLIT=${SPLIT:-valid}
VOCAB=${VOCAB:-2048}
PRESET=${PRESET:-tinystories-cpu}
STEPS=${STEPS:-600}
DEVICE=${DEVICE:-auto}
PROMPT=${PROMPT:-Once upon a time}

mkdir -p "$WORKDIR"
cd "$WORKDIR"   # every tslm command reads and writes data/ and runs/ under the current directory

# 1. Text: resumable and verified; a rerun skips a complete file.
if [ "$SPLIT" = train ]; then
    tslm download tinystories                     # data/tinystories/train.txt + valid.txt
    DATASET=tinystories
else
    tslm download tinystories --split valid       # data/tinystories/valid.txt (22 MB)
    # Hold out the last 5% of the stories (separated by <|endoftext|>) for validation.
    DATASET=quickstart
    mkdir -p data/quickstart
    python3 - <<'EOF'
from pathlib import Path
from tinystories_cli.quickstart import split_point
data = Path("data/tinystories/valid.txt").read_bytes()
cut = split_point(data)
Path("data/quickstart/train.txt").write_bytes(data[:cut])
Path("data/quickstart/valid.txt").write_bytes(data[cut:])
EOF
fi

# 2. Tokenizer: byte-level BPE on the training text -> data/$DATASET/tokenizer/
tslm bpe "data/$DATASET/train.txt" --vocab-size "$VOCAB" --force

# 3. Token ids: data/$DATASET/{train,valid}.npy (+ .json sidecars)
tslm encode "$DATASET" --force

# 4. Train: runs/$DATASET-$PRESET/ (checkpoints, metrics.jsonl, a copy of the tokenizer)
RUN="$DATASET-$PRESET"
tslm train --preset "$PRESET" --dataset "$DATASET" --max-steps "$STEPS" --warmup-steps $(( STEPS / 20 + 1 )) \
    --eval-every $(( STEPS / 5 + 1 )) --device "$DEVICE" --run-name "$RUN" --force

# 5. A story, and the held-out loss.
tslm generate "$PROMPT" --run "runs/$RUN" --temp 0.8 --top-p 0.95 --seed 0
tslm eval "runs/$RUN"
