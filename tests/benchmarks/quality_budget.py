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

Baseline arm (issue 27): `--baseline REV` instead compares `tslm quickstart` at git revision REV (checked out
in a detached worktree under the workdir) with the current code, in paired rounds run in turn (the order
alternates: base, head, then head, base, ...), each arm a fresh process of `python -m tinystories_cli
quickstart --minutes M --text T --dir W/<arm> --device cpu --plain`. Each arm builds its split, tokenizer
and token files once (its first round; later rounds reuse them: the budget counts training only) and trains
a fresh run every round. Both arms are scored by the current `evaluate_run` on their own held-out file,
which must be byte-identical between the arms (checked). Reports per round both losses, bits/byte and
tokens/s, and the median over rounds of the paired difference base - head (positive: head is better).

    python tests/benchmarks/quality_budget.py --baseline b8d9a9e --rounds 3 --minutes 4 \
        --text ../shared/data/tinystories_train.txt --workdir /tmp/qb27
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
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


REPO = Path(__file__).resolve().parents[2]


def checkout(rev: str, workdir: Path) -> Path:
    """A detached worktree of `rev` (reused when it is already there at that revision)."""
    full = subprocess.run(["git", "-C", str(REPO), "rev-parse", rev], capture_output=True, text=True,
                          check=True).stdout.strip()
    tree = workdir / f"rev-{full[:12]}"
    if not (tree / "tinystories_cli").is_dir():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), full], check=True,
                       capture_output=True)
    return tree


def arm_run(arm: str, code: Path, text: Path, workdir: Path, minutes: float) -> dict:
    """One fresh `tslm quickstart` of the code at `code`, scored by the current evaluate_run."""
    shutil.rmtree(workdir / arm / "runs", ignore_errors=True)  # a fresh run; the arm's data is reused
    env = {**os.environ, "PYTHONPATH": str(code)}
    cmd = [sys.executable, "-m", "tinystories_cli", "quickstart", "--minutes", f"{minutes:g}", "--text", str(text),
           "--dir", str(workdir / arm), "--device", "cpu", "--plain"]
    t = time.perf_counter()
    # cwd = the code's tree: `python -m` puts the working directory first on sys.path, before PYTHONPATH
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=code)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{arm} quickstart failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    run_dir = workdir / arm / "runs" / "quickstart"
    valid = workdir / arm / "data" / "quickstart" / "valid.npy"
    ev = evaluate_run(run_dir, valid)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m]
    cfg = json.loads((run_dir / "config.json").read_text())
    return {"loss": round(ev["loss"], 4), "bits_per_byte": round(ev["bits_per_byte"], 4),
            "tokens_per_s": round(statistics.median(rates[len(rates) // 2:]), 1) if rates else None,
            "steps": ev.get("step"), "wall_s": round(wall, 1), "model": cfg.get("model"),
            "train": {k: cfg.get("train", {}).get(k) for k in ("lr", "batch_size", "dtype", "compile", "optimizer")},
            "chosen": cfg.get("chosen")}


def baseline_main(args) -> None:
    args.workdir = args.workdir.resolve()
    base_code = checkout(args.baseline, args.workdir)
    rounds = []
    for i in range(args.rounds):
        order = ("base", "head") if i % 2 == 0 else ("head", "base")
        r = {arm: arm_run(arm, base_code if arm == "base" else REPO, args.text, args.workdir, args.minutes)
             for arm in order}
        same = (args.workdir / "base/data/quickstart/valid.txt").read_bytes() == \
            (args.workdir / "head/data/quickstart/valid.txt").read_bytes()
        if not same:
            raise SystemExit("the two arms held out different text: compare them on one split")
        r["order"] = list(order)
        r["gain_nats"] = round(r["base"]["loss"] - r["head"]["loss"], 4)
        r["gain_bits_per_byte"] = round(r["base"]["bits_per_byte"] - r["head"]["bits_per_byte"], 4)
        rounds.append(r)
        print(json.dumps({"round": i, **r}), flush=True)
    print(json.dumps({"benchmark": "quality_budget_baseline", "baseline": args.baseline,
                      "date": datetime.now(UTC).isoformat(timespec="minutes"),
                      "machine": f"{platform.machine()} {os.cpu_count()} cpus", "torch": torch.__version__,
                      "minutes": args.minutes, "text": str(args.text), "rounds": len(rounds),
                      "gain_nats_median": statistics.median(r["gain_nats"] for r in rounds),
                      "gain_bits_per_byte_median": statistics.median(r["gain_bits_per_byte"] for r in rounds),
                      "gains_nats": [r["gain_nats"] for r in rounds],
                      "tokens_per_s_median": {a: statistics.median(r[a]["tokens_per_s"] for r in rounds)
                                              for a in ("base", "head")}}))


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
    ap.add_argument("--baseline", help="git revision: compare quickstart at it with the current code (paired)")
    ap.add_argument("--rounds", type=int, default=3, help="with --baseline: paired rounds")
    args = ap.parse_args()
    if not args.text.is_file():
        raise SystemExit(f"error: {args.text} not found (pass --text)")
    args.text = args.text.resolve()
    if args.baseline:
        baseline_main(args)
        return

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
