"""The auto-size rule's relative speeds (`Rule.speed`), measured as a run uses them (issue 27).

    python tests/benchmarks/autosize_speeds.py --data DIR [--rounds 3] [--seconds 12]
        [--compiled-rows 128,192 --compiled-seconds 50]

--data is a directory with train.npy, valid.npy and tokenizer/ (e.g. a quickstart data directory).

A row's `speed` turns a budget in the chosen model's own tokens (--train-tokens, --max-steps) into
reference tokens, the unit the rule's thresholds are in; a time budget becomes reference tokens through
`autosize.probe_reference`. So both sides are timed the way a run times them, with the dtype the run
would choose (`--dtype auto`: bf16 autocast on a CPU with native bf16) and eagerly, as the probe runs;
the rows in --compiled-rows are timed compiled instead (the steady rate after the compile, which a run that
lasts long enough pays once: the rows whose budgets start above about 90 s on this machine):

    reference  `autosize.probe_reference`: d_model 128 x 4, batch 16, the base preset's optimizer (AdamW)
    row        `shape_for(d_model)` with the row's own training settings (`Choice.train_overrides`: its batch
               and Muon on the hidden matrices)

Each round times the reference and every row back to back, the order rotating between rounds; the ratio of a
row to the reference of its own round is one sample. Prints one JSON line per round and a summary with the
median ratio per row next to the rule's current `speed`. Run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from datetime import UTC, datetime
from pathlib import Path

import torch

from tinystories_cli import train as tl
from tinystories_cli.train import autosize


def options(data: Path, workdir: Path) -> tl.TrainOptions:
    return tl.TrainOptions(run_dir=workdir / "probe", train_file=data / "train.npy", valid_file=data / "valid.npy",
                           tokenizer_dir=data / "tokenizer", display="quiet", force=True)


def time_reference(data: Path, workdir: Path, seconds: float) -> float:
    tps, _ = autosize.probe_reference(autosize.BASE_PRESET, {}, options(data, workdir), seconds)
    return tps


def time_row(rule: autosize.Rule, data: Path, workdir: Path, seconds: float, compiled: bool) -> float:
    choice = autosize.choose(rule.min_ref_tokens)  # the row itself, at its threshold
    assert choice.shape.d_model == rule.d_model
    train = {**choice.train_overrides(), "max_steps": 1000, "warmup_steps": 1, "compile": compiled}
    run = tl.prepare_run(autosize.BASE_PRESET, None, choice.model_overrides(), train, options(data, workdir))
    tps, _ = tl.measure_throughput(run, seconds, max_steps=1000)
    return tps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=12.0, help="seconds per timing (model build and warm-up included)")
    ap.add_argument("--compiled-rows", default="", help="rows (d_model, comma-separated) timed compiled")
    ap.add_argument("--compiled-seconds", type=float, default=50.0,
                    help="seconds per compiled timing (the compile included)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/autosize_speeds"))
    args = ap.parse_args()
    compiled = set(args.compiled_rows.split(",")) - {""}
    args.workdir.mkdir(parents=True, exist_ok=True)

    arms = ["reference", *[str(r.d_model) for r in autosize.RULES]]
    rules = {str(r.d_model): r for r in autosize.RULES}
    ratios: dict[str, list[float]] = {k: [] for k in rules}
    for i in range(args.rounds):
        order = arms[i % len(arms):] + arms[:i % len(arms)]
        tps = {}
        for arm in order:
            tps[arm] = (time_reference(args.data, args.workdir, args.seconds) if arm == "reference"
                        else time_row(rules[arm], args.data, args.workdir,
                                      args.compiled_seconds if arm in compiled else args.seconds, arm in compiled))
        for k in rules:
            ratios[k].append(tps[k] / tps["reference"])
        print(json.dumps({"round": i, "order": order, "tokens_per_s": {k: round(v) for k, v in tps.items()},
                          "ratio": {k: round(tps[k] / tps["reference"], 3) for k in rules}}), flush=True)
    print(json.dumps({
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "rounds": args.rounds,
        "seconds": args.seconds, "compiled_rows": sorted(compiled), "compiled_seconds": args.compiled_seconds,
        "rows": {k: {"median_ratio": round(statistics.median(v), 3), "ratios": [round(x, 3) for x in v],
                     "rule_speed": rules[k].speed} for k, v in ratios.items()}}, indent=1))


if __name__ == "__main__":
    main()
