"""Held-out loss of `tslm quickstart` with the auto size vs the fixed `tinystories-cpu` preset, same budget.

    python tests/benchmarks/quality_budget.py --minutes 4 [--text ../shared/data/tinystories_train.txt]
        [--workdir /tmp/quality_budget] [--order auto,preset]

Both runs are quickstart's own pipeline (`quickstart.run_quickstart`) on the same text: the auto run
builds the 95/5 split, the 2048-id tokenizer and the token files; the preset run gets a copy of that
data directory (its stages are then skipped), so both train and evaluate on the same split. The runs go
one after the other, each with the whole machine; since a shared machine's speed drifts, each run's
training tokens/s is reported beside its loss. Scores: `tslm eval` (evaluate.evaluate_run) of the best
checkpoint over the whole held-out file: mean loss (nats/token) and bits per byte of text.

Target (issue 19) at 4 minutes: auto <= 3.0 and at least 0.5 nats below the preset.

Prints one JSON object: per run {loss, bits_per_byte, tokens_per_s, steps, model, story, minutes},
the difference preset - auto, and whether the target was met.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from tinystories_cli import quickstart as qs
from tinystories_cli.evaluate import evaluate_run

TARGET_LOSS = 3.0
TARGET_GAIN = 0.5


def one_run(kind: str, text: Path, workdir: Path, minutes: float, vocab_size: int) -> dict:
    opts = qs.QuickstartOptions(text=text, minutes=minutes, workdir=workdir / kind, vocab_size=vocab_size,
                                device="cpu", force=False, preset=None if kind == "auto" else qs.CPU_PRESET,
                                display="quiet", max_new_tokens=120)
    shutil.rmtree(workdir / kind / "runs", ignore_errors=True)  # a fresh run every time; the data is reused
    t = time.perf_counter()
    r = qs.run_quickstart(opts, lambda stage, msg: print(f"[{kind}] {stage}: {msg}", flush=True))
    wall = time.perf_counter() - t
    ev = evaluate_run(r.run_dir, r.valid_tokens)
    plan = json.loads((r.run_dir / "config.json").read_text(encoding="utf-8")).get("time_budget")
    return {"loss": round(ev["loss"], 4), "bits_per_byte": round(ev["bits_per_byte"], 4),
            "tokens_per_s": round(r.tokens_per_s, 1), "steps": r.steps, "train_s": round(r.seconds.get("train", 0), 1),
            "wall_s": round(wall, 1), "model": qs.model_label(r), "auto_size": r.auto_size,
            "sampling": r.sampling, "story": r.story, "eval_tokens": ev["tokens"],
            "time_plan": plan}  # the deadline's plan, the actual time, and any change of the schedule's length


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument(
        "--text", type=Path, default=Path(__file__).resolve().parents[3] / "shared/data/tinystories_train.txt"
    )
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/quality_budget"))
    ap.add_argument("--vocab-size", type=int, default=qs.DEFAULT_VOCAB_SIZE)
    ap.add_argument(
        "--order", default="auto,preset", help="which run goes first (the machine drifts); one name runs that one alone"
    )
    args = ap.parse_args()
    if not args.text.is_file():
        raise SystemExit(f"error: {args.text} not found (pass --text)")

    kinds = args.order.split(",")
    results = {}
    for kind in kinds:
        other = next((k for k in kinds if k != kind and (args.workdir / k / "data").is_dir()), None)
        if not (args.workdir / kind / "data").is_dir() and other is not None:
            shutil.copytree(args.workdir / other / "data", args.workdir / kind / "data")  # the same split
        results[kind] = one_run(kind, args.text, args.workdir, args.minutes, args.vocab_size)
    out = {"benchmark": "quality_budget", "date": datetime.now(UTC).date().isoformat(),
           "machine": f"{platform.machine()} {torch.get_num_threads()} threads", "torch": torch.__version__,
           "minutes": args.minutes, "text": str(args.text), "order": kinds, **results}
    if "auto" in results and "preset" in results:  # --order may run one of them alone (a rerun)
        gain = results["preset"]["loss"] - results["auto"]["loss"]
        out.update(gain_nats=round(gain, 4), target_met=results["auto"]["loss"] <= TARGET_LOSS and gain >= TARGET_GAIN)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
