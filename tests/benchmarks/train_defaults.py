"""`tslm train`'s defaults against eager float32, paired, on this machine: what `--dtype auto` and
`--compile auto` buy (issue 27).

    python tests/benchmarks/train_defaults.py --data DIR [--sizes 17m,quickstart] [--rounds 2]
    python tests/benchmarks/train_defaults.py --data DIR10K --sizes 17m-preset --rounds 3

--data is a directory with train.npy, valid.npy and tokenizer/ (e.g. a quickstart data directory). Sizes:
`17m` is tinystories-17m's shape (d_model 512, 4 layers, 16 heads) and `quickstart` the auto size's model at
4 minutes (d_model 128, 4 layers, 4 heads), both at batch 8 x 256 on the data's tokenizer. `17m-preset` is
`--preset tinystories-17m` itself, every training setting as the preset has it (batch 64 x 256, its lr)
but the run's length and warmup (14 steps, 2 of warmup), on the data's tokenizer (the preset's has 10,000
ids: `tslm bpe --vocab-size 10000`, then `tslm encode`). Each round runs, in turn (the order alternates),
one `tslm train` process per arm for the same steps on the same seed:

    default   no --dtype / --compile flag: what the run chooses (recorded under "chosen" in config.json)
    float32   --dtype float32 --no-compile: the old CPU path

Reported per run: the steady tokens/s (median of the logged windows after the first, so a compile is
excluded), the wall-clock of the whole process (a compile included), and the final training loss and
held-out loss at equal steps (equal tokens), so "faster at equal loss" can be read off. The summary gives
per size the paired median of default/float32 for both speeds and the loss difference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SIZES = {"17m": {"d_model": 512, "num_layers": 4, "num_heads": 16, "steps": 100, "lr": 2e-3},
         "quickstart": {"d_model": 128, "num_layers": 4, "num_heads": 4, "steps": 800, "lr": 4e-3},
         "17m-preset": {"preset": "tinystories-17m", "steps": 14, "log_every": 2, "eval_batches": 2}}
ARMS = {"default": [], "float32": ["--dtype", "float32", "--no-compile"]}


def one_run(size: str, arm: str, data: Path, workdir: Path, seed: int) -> dict:
    s = SIZES[size]
    run_dir = workdir / f"{size}-{arm}"
    if "preset" in s:  # the preset as it is, but for the run's length
        shape = ["--preset", s["preset"], "--warmup-steps", "2"]
    else:
        shape = ["--preset", "tinystories-cpu", "--d-model", str(s["d_model"]), "--num-layers", str(s["num_layers"]),
                 "--num-heads", str(s["num_heads"]), "--batch-size", "8", "--warmup-steps", "20", "--lr", str(s["lr"]),
                 "--min-lr", str(s["lr"] / 10), "--schedule", "wsd", "--decay-fraction", "0.4"]
    cmd = [sys.executable, "-m", "tinystories_cli", "train", *shape,
           "--train-data", str(data / "train.npy"), "--valid-data", str(data / "valid.npy"),
           "--tokenizer", str(data / "tokenizer"), "--run-dir", str(run_dir), "--force", "--plain",
           "--max-steps", str(s["steps"]), "--eval-every", str(s["steps"]), "--save-every", str(s["steps"]),
           "--log-every", str(s.get("log_every", max(10, s["steps"] // 20))),
           "--eval-batches", str(s.get("eval_batches", 16)), "--seed", str(seed), *ARMS[arm]]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{size}/{arm} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]
    train_losses = [r["train_loss"] for r in records if "train_loss" in r]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    chosen = json.loads((run_dir / "config.json").read_text()).get("chosen")
    return {"size": size, "arm": arm, "tokens_per_s": round(statistics.median(rates)), "wall_s": round(wall, 1),
            "train_loss": train_losses[-1] if train_losses else None, "val_loss": val[-1] if val else None,
            "steps": s["steps"], "chosen": chosen}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--sizes", default="17m,quickstart")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/tslm_train_defaults"))
    args = ap.parse_args()
    results = []
    for i in range(args.rounds):
        for size in args.sizes.split(","):
            order = list(ARMS) if i % 2 == 0 else list(reversed(ARMS))
            for arm in order:
                r = one_run(size, arm, args.data.resolve(), args.workdir, args.seed)
                r["round"] = i
                results.append(r)
                print(json.dumps(r), flush=True)
    summary = {}
    for size in args.sizes.split(","):
        pairs = [(d, f) for d in results for f in results if d["size"] == f["size"] == size
                 and d["round"] == f["round"] and d["arm"] == "default" and f["arm"] == "float32"]
        summary[size] = {
            "speedup_steady_median": round(
                statistics.median(d["tokens_per_s"] / f["tokens_per_s"] for d, f in pairs), 3),
            "speedup_wall_median": round(statistics.median(f["wall_s"] / d["wall_s"] for d, f in pairs), 3),
            "val_loss_diff_median": round(statistics.median(d["val_loss"] - f["val_loss"] for d, f in pairs), 4),
            "chosen": pairs[0][0]["chosen"] if pairs else None}
    print(json.dumps({"benchmark": "train_defaults", "date": datetime.now(UTC).isoformat(timespec="minutes"),
                      "machine": f"{platform.machine()} {os.cpu_count()} cpus", "rounds": args.rounds,
                      "summary": summary}))


if __name__ == "__main__":
    main()
