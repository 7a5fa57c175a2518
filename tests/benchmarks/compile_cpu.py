"""Does torch.compile pay on a CPU for the auto size's model? Eager vs compiled training tokens/s of the
reference model (d_model 128 x 4, batch 16 x 256), and what the first compile costs.

    python tests/benchmarks/compile_cpu.py --data data/quickstart [--seconds 10] [--rounds 2]

--data is a quickstart data directory (train.npy, valid.npy, tokenizer/). Each round times an eager
probe, then a compiled one (`train.measure_throughput`: one warm-up step, which compiles, then steps
for --seconds). The first compiled probe pays the cold compile unless torch's on-disk cache already
holds the graph: point TORCHINDUCTOR_CACHE_DIR at an empty directory to measure a first run. Prints
one JSON line per probe, then a summary with the paired median of compiled/eager per round.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from tinystories_cli import train as tl
from tinystories_cli.train import autosize


def probe(data: Path, compiled: bool, seconds: float, workdir: Path) -> dict:
    opts = tl.TrainOptions(run_dir=workdir / ("compiled" if compiled else "eager"), train_file=data / "train.npy",
                           valid_file=data / "valid.npy", tokenizer_dir=data / "tokenizer", display="quiet",
                           force=True)
    run = tl.prepare_run(autosize.BASE_PRESET, None, autosize.shape_for(autosize.REFERENCE_WIDTH).model_overrides(),
                         {"dataset": "quickstart", "max_steps": 100, "warmup_steps": 1,
                          "batch_size": autosize.BATCH_SIZE, "compile": compiled}, opts)
    tps, spent = tl.measure_throughput(run, seconds, max_steps=1000)
    return {"compiled": compiled, "tokens_per_s": round(tps), "seconds_with_warmup": round(spent, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/tslm_compile_cpu"))
    args = ap.parse_args()
    ratios, rows = [], []
    for _ in range(args.rounds):
        eager = probe(args.data, False, args.seconds, args.workdir)
        compiled = probe(args.data, True, args.seconds, args.workdir)
        for row in (eager, compiled):
            print(json.dumps(row), flush=True)
        rows += [eager, compiled]
        ratios.append(compiled["tokens_per_s"] / eager["tokens_per_s"])
    print(json.dumps({"benchmark": "compile_cpu", "compiled_over_eager": [round(r, 3) for r in ratios],
                      "median": round(statistics.median(ratios), 3),
                      "first_compiled_seconds": rows[1]["seconds_with_warmup"],
                      "later_compiled_seconds": [r["seconds_with_warmup"] for r in rows[3::2]]}))


if __name__ == "__main__":
    main()
