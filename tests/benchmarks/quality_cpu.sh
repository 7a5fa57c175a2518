#!/usr/bin/env bash
# Quality at a fixed budget: the tinystories-cpu preset for ~30 minutes on 2 CPU cores.
#
#   tests/benchmarks/quality_cpu.sh                  # the full run (the preset's max_steps, ~30 min)
#   STEPS=20 WARMUP=5 tests/benchmarks/quality_cpu.sh   # a 1-2 minute smoke version
#
# Pipeline, in a work directory outside the repo (default /tmp/tslm_quality, override with WORK=):
#   tslm bpe    ../shared/data/tinystories_train.txt  -> data/tinystories/tokenizer/   (4096 ids)
#   tslm encode train and valid text                   -> data/tinystories/{train,valid}.npy
#   tslm train  --preset tinystories-cpu               -> runs/quality/
#   tslm eval   on all of tinystories_valid.txt        -> loss, perplexity, bits per byte (JSON)
#   tslm generate 3 samples from "Once upon a time"
# Prints one JSON summary at the end (paste it into tests/benchmarks/RESULTS.md).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SHARED="${SHARED:-$REPO/../shared/data}"
WORK="${WORK:-/tmp/tslm_quality}"
STEPS="${STEPS:-}"
WARMUP="${WARMUP:-}"
TSLM=(python -m tinystories_cli)

if [[ ! -f "$SHARED/tinystories_train.txt" || ! -f "$SHARED/tinystories_valid.txt" ]]; then
  echo "SKIPPED: $SHARED/tinystories_{train,valid}.txt not found (set SHARED=DIR)" >&2
  exit 1
fi
mkdir -p "$WORK"
cd "$WORK"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

t0=$(date +%s)
if [[ ! -f data/tinystories/tokenizer/tokenizer_config.json ]]; then
  "${TSLM[@]}" bpe "$SHARED/tinystories_train.txt" --preset tinystories-cpu --out data/tinystories/tokenizer
fi
for split in train valid; do
  if [[ ! -f data/tinystories/$split.npy ]]; then
    "${TSLM[@]}" encode "$SHARED/tinystories_$split.txt" --tokenizer data/tinystories/tokenizer \
      --out data/tinystories/$split.npy
  fi
done
t1=$(date +%s)

extra=()
[[ -n "$STEPS" ]] && extra+=(--max-steps "$STEPS" --eval-every "$STEPS" --save-every "$STEPS" --log-every 5)
[[ -n "$WARMUP" ]] && extra+=(--warmup-steps "$WARMUP")
"${TSLM[@]}" train --preset tinystories-cpu --run-name quality --force --plain --device cpu "${extra[@]}"
t2=$(date +%s)

"${TSLM[@]}" eval quality --data data/tinystories/valid.npy --json --force --out runs/quality/eval_full_valid.json \
  > /dev/null
"${TSLM[@]}" generate "Once upon a time" --run quality -n 3 --max-tokens 200 --seed 0 --temp 0.8 --top-p 0.95 \
  --json > runs/quality/samples.jsonl
t3=$(date +%s)

python - "$t0" "$t1" "$t2" "$t3" <<'EOF'
import json, os, platform, sys
t0, t1, t2, t3 = map(int, sys.argv[1:])
ev = json.load(open("runs/quality/eval_full_valid.json"))
cfg = json.load(open("runs/quality/config.json"))
metrics = [json.loads(l) for l in open("runs/quality/metrics.jsonl")]
samples = [json.loads(l) for l in open("runs/quality/samples.jsonl") if l.strip()]
tps = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m]
print(json.dumps({
    "benchmark": "quality_tinystories_cpu",
    "machine": f"{platform.machine()} {os.cpu_count()} cpus",
    "steps": cfg["max_steps"], "tokens_per_step": cfg["tokens_per_step"], "train_tokens": metrics[-1]["tokens"],
    "train_minutes": round((t2 - t1) / 60, 2), "prep_minutes": round((t1 - t0) / 60, 2),
    "mean_tokens_per_s": round(sum(tps) / len(tps), 1) if tps else None,
    "final_train_loss": next((m["train_loss"] for m in reversed(metrics) if "train_loss" in m), None),
    "valid_loss": round(ev["loss"], 4), "valid_perplexity": round(ev["perplexity"], 3),
    "valid_bits_per_byte": round(ev["bits_per_byte"], 4), "valid_tokens": ev["predicted_tokens"],
    "samples": [s.get("text", s) for s in samples],
}, indent=2))
EOF
