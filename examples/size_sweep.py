#!/usr/bin/env python3
"""Which model size and learning rate learn the most from a short CPU budget? The sweep behind
`tslm train --auto-size` (tinystories_cli/train/autosize.py).

    python examples/size_sweep.py --text ../shared/data/tinystories_train.txt --workdir /tmp/size_sweep \
        --budgets 0.5e6,1.5e6 --widths 64,128,192,256 --lrs 3e-3 [--lr-widths 128 --extra-lrs 1e-3,6e-3]
        [--layers 4,6] [--batch-sizes 16,32] [--warmups 20,100] [--schedule wsd] [--vocab-size 4096]
        [--set beta2=0.95 --set decay_fraction=0.4]

Budgets are counted in REFERENCE TOKENS: the tokens the reference model (d_model 128, 4 layers,
batch 16 x 256, the model `autosize` probes) processes in the same wall-clock time. A probe at
the start times every width back to back, so each candidate gets its fair share:

    tokens of width w = budget x (tokens/s of w) / (tokens/s of the reference)

This keeps the sweep independent of how loaded the machine is (only the wall-clock of the sweep
changes): "2 minutes of this machine" is probe tokens/s x 120 reference tokens.

--seconds S instead gives every run S seconds of wall-clock, as quickstart does (the trainer's own time
budget: its probe, any compile and the evaluations count against it; `--compile auto` and `--dtype auto`
decide as they do for a real run). Equal minutes, so the machine must be otherwise idle.

    python examples/size_sweep.py --text ../shared/data/tinystories_train.txt --workdir /tmp/sweep240 \
        --seconds 240 --widths 128,192 --lrs 4e-3 --schedule wsd --batch-sizes 8 \
        --set decay_fraction=0.4 --set optimizer=muon --set muon_lr=0.02 --set seed=1

Data: quickstart's 95/5 split of --text and its 2048-id tokenizer (or --vocab-size; built under
WORKDIR/data by the same library functions `tslm quickstart` uses). Every run: 4 layers (2 for
d_model 64) unless --layers, heads of width 32, batch 16 x 256 unless --batch-sizes, warmup 20
steps unless --warmups, cosine to lr/10 (or --schedule wsd), any other training setting as the base
preset has it unless --set NAME=VALUE (a TrainConfig field, e.g. beta2=0.95: it joins the run's name,
and min_lr_ratio=R sets min_lr to R x lr); the score is the loss of the best
checkpoint over the whole held-out file (what `tslm eval` reports). Each shape and batch size is
probed on its own (a deeper model or a bigger batch runs at another speed).

Prints one JSON line per run and appends it to WORKDIR/sweep.jsonl (a rerun skips finished runs).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tinystories_cli import quickstart as qs
from tinystories_cli import train as tl
from tinystories_cli.evaluate import evaluate_run
from tinystories_cli.train import autosize


def prepare(text: Path, workdir: Path, vocab_size: int) -> tuple[Path, Path, Path]:
    data = workdir / "data" / "quickstart"
    data.mkdir(parents=True, exist_ok=True)
    qs.split_text(text, data / "train.txt", data / "valid.txt")
    qs.train_tokenizer(data / "train.txt", data / "tokenizer", vocab_size)
    for split in ("train", "valid"):
        qs.encode_text(data / f"{split}.txt", data / f"{split}.npy", data / "tokenizer")
    return data / "train.npy", data / "valid.npy", data / "tokenizer"


def run_options(run_dir: Path, files: tuple[Path, Path, Path], seconds: float | None = None) -> tl.TrainOptions:
    train_file, valid_file, tok = files
    return tl.TrainOptions(run_dir=run_dir, train_file=train_file, valid_file=valid_file, tokenizer_dir=tok,
                           display="quiet", force=True, time_budget=seconds)


def shape_of(width: int, layers: int | None) -> autosize.Shape:
    """The rule's shape of `width`, with `layers` layers when given."""
    shape = autosize.shape_for(width)
    return shape if layers is None else autosize.Shape(width, layers, shape.num_heads)


def variant(width: int, layers: int | None, batch: int) -> str:
    """The key of a probed speed: the width alone for the rule's shape and batch (as the first sweep
    recorded them), else e.g. "128x6b32"."""
    if layers in (None, autosize.shape_for(width).num_layers) and batch == autosize.BATCH_SIZE:
        return str(width)
    return f"{width}x{layers or autosize.shape_for(width).num_layers}b{batch}"


def probe(shape: autosize.Shape, batch: int, files, workdir: Path, seconds: float) -> float:
    run = tl.prepare_run(autosize.BASE_PRESET, None, shape.model_overrides(),
                         {"dataset": "quickstart", "max_steps": 100, "warmup_steps": 1, "batch_size": batch},
                         run_options(workdir / "runs" / "probe", files))
    tps, _ = tl.measure_throughput(run, seconds, max_steps=50)
    return tps


def parse_setting(text: str) -> tuple[str, float | int | str]:
    """"beta2=0.95" -> ("beta2", 0.95): numbers as numbers, anything else as text."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--set wants NAME=VALUE, got {text!r}")
    for kind in (int, float):
        try:
            return name, kind(value)
        except ValueError:
            pass
    return name, value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--workdir", type=Path, default=Path("size_sweep"))
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--budgets", default="0.5e6,1.5e6", help="reference-token budgets, comma-separated")
    ap.add_argument("--seconds", default="",
                    help="wall-clock budgets instead of --budgets, comma-separated: each run trains for that long "
                         "(the trainer's time budget: its probe, compile and evaluations count), as quickstart does")
    ap.add_argument("--widths", default="64,128,192,256")
    ap.add_argument("--lrs", default="3e-3", help="learning rates tried at every width")
    ap.add_argument("--lr-widths", default="", help="widths that also try --extra-lrs")
    ap.add_argument("--extra-lrs", default="1e-3,6e-3")
    ap.add_argument("--schedule", default="cosine", help="cosine, wsd, or both")
    ap.add_argument("--layers", default="", help="depths tried at every width (default: the rule's depth)")
    ap.add_argument("--batch-sizes", default=str(autosize.BATCH_SIZE), help="batch sizes (sequences of 256 tokens)")
    ap.add_argument("--warmups", default=str(autosize.WARMUP_STEPS), help="warmup steps")
    ap.add_argument("--probe-seconds", type=float, default=8.0)
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="a training setting for every run of this invocation (repeatable)")
    args = ap.parse_args()

    files = prepare(args.text, args.workdir, args.vocab_size)
    widths = [int(w) for w in args.widths.split(",")]
    depths = [int(x) for x in args.layers.split(",")] if args.layers else [None]
    batches = [int(x) for x in args.batch_sizes.split(",")]
    warmups = [int(x) for x in args.warmups.split(",")]
    settings = dict(parse_setting(x) for x in args.set)
    speeds_file = args.workdir / "speeds.json"
    speeds = json.loads(speeds_file.read_text()) if speeds_file.is_file() else {}
    wanted = {(autosize.REFERENCE_WIDTH, None, autosize.BATCH_SIZE)} | {
        (w, d, b) for w in widths for d in depths for b in batches
    }
    for w, d, b in sorted(wanted, key=lambda k: (k[0], k[1] or 0, k[2])):
        if variant(w, d, b) not in speeds:
            speeds[variant(w, d, b)] = probe(shape_of(w, d), b, files, args.workdir, args.probe_seconds)
            speeds_file.write_text(json.dumps(speeds, indent=1))
    ref = speeds[str(autosize.REFERENCE_WIDTH)]
    print(json.dumps({"probe_tokens_per_s": speeds}), flush=True)

    out = args.workdir / "sweep.jsonl"
    done = {json.loads(line)["name"] for line in out.read_text().splitlines()} if out.is_file() else set()
    lr_widths = {int(w) for w in args.lr_widths.split(",") if w}
    schedules = ["cosine", "wsd"] if args.schedule == "both" else [args.schedule]
    timed = bool(args.seconds)
    for budget in (float(b) for b in (args.seconds or args.budgets).split(",")):
        for w in widths:
            lrs = [float(x) for x in args.lrs.split(",")]
            if w in lr_widths:
                lrs += [float(x) for x in args.extra_lrs.split(",")]
            for d, batch, warmup, lr, schedule in ((d, b, u, lr, s) for d in depths for b in batches
                                                   for u in warmups for lr in lrs for s in schedules):
                shape = shape_of(w, d)
                extra = (f"-L{shape.num_layers}" if d is not None else "") + \
                    (f"-B{batch}" if batch != autosize.BATCH_SIZE else "") + \
                    (f"-wu{warmup}" if warmup != autosize.WARMUP_STEPS else "") + \
                    "".join(f"-{k}{v:g}" if isinstance(v, float) else f"-{k}{v}" for k, v in settings.items())
                name = f"{'s' if timed else 'b'}{budget:g}-d{w}{extra}-lr{lr:g}-{schedule}"
                if name in done:
                    continue
                tokens_per_step = batch * autosize.CONTEXT_LENGTH
                own_speed = speeds[variant(w, d, batch)]
                tokens = int(budget * own_speed if timed else budget * own_speed / ref)  # timed: an estimate
                steps = max(warmup + 1, tokens // tokens_per_step)
                given = {k: v for k, v in settings.items() if k != "min_lr_ratio"}
                train_over = {"dataset": "quickstart", **({} if timed else {"max_steps": steps}), "lr": lr,
                              "min_lr": lr * settings.get("min_lr_ratio", 0.1), **given,
                              "warmup_steps": warmup, "batch_size": batch,
                              "schedule": schedule, "eval_every": max(1, steps // 4), "eval_batches": 4,
                              "save_every": max(1, steps // 4), "log_every": 50}
                run_dir = args.workdir / "runs" / name
                run = tl.prepare_run(autosize.BASE_PRESET, None, shape.model_overrides(), train_over,
                                     run_options(run_dir, files, budget if timed else None))
                t = time.perf_counter()
                result = tl.train(run)
                wall = time.perf_counter() - t
                steps = result.max_steps if timed else steps
                if result.stopped not in ("finished", "time_budget"):  # a signal: incomplete, not a data point
                    raise SystemExit(f"{name} stopped at step {result.step}/{steps} ({result.stopped}); "
                                     "rerun the same command to redo it")
                ev = evaluate_run(run_dir, files[1])
                rec = {"name": name, ("budget_seconds" if timed else "budget_ref_tokens"): budget, "d_model": w,
                       "num_layers": shape.num_layers,
                       "num_heads": shape.num_heads, "lr": lr, "schedule": schedule, "batch_size": batch,
                       "warmup_steps": warmup, **({"settings": settings} if settings else {}),
                       "vocab_size": args.vocab_size, "steps": steps,
                       "tokens": steps * tokens_per_step, "val_loss": round(ev["loss"], 4),
                       "bits_per_byte": ev.get("bits_per_byte"), "wall_s": round(wall, 1),
                       "train_tokens_per_s": round(result.tokens_per_s, 1),
                       "chosen": json.loads((run_dir / "config.json").read_text()).get("chosen")}
                print(json.dumps(rec), flush=True)
                with open(out, "a") as f:
                    f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
