"""Training tokens/s of one process vs DDP vs FSDP on 2 gloo ranks (CPU), same global batch.

    python tests/benchmarks/bench_parallel.py [--preset tinystories-cpu] [--steps 8] [--rounds 3]

Each side is `tinystories_cli.train.train` on a memmapped token file (random ids; speed does not depend on
them) with the preset's model and global batch: one process with `batch_size` sequences (all cores), or
two processes (torch.multiprocessing, gloo, one thread each) with half of it each, replicated (DDP) or
sharded (FSDP2). The one process uses `--threads` threads (default 1, see --help). A side's figure is the
median step time over steps 2..N-1 (step 1 warms up, the last one writes a checkpoint); tokens/s = global
tokens per step / that time.

The machine is shared, so the sides run in interleaved rounds (single, DDP, FSDP, single, ...) and the
comparison is the median over rounds of the per-round ratios (paired medians); every run is printed.
Prints one JSON object. The issue's target: FSDP within 15% of DDP (`fsdp_vs_ddp` >= 0.85).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from bench_train import write_tokens  # this folder is on sys.path when the script runs

from tinystories_cli import train as T
from tinystories_cli.config import PRESETS


def step_seconds(preset: str, steps: int, root: Path, tag: str, batch: int, parallel: str) -> float:
    """Median seconds per step of train() (steps 2..N-1) on this process's share of the global batch."""
    p = PRESETS[preset]
    tc = p.train.model_copy(update={"max_steps": steps, "warmup_steps": 1, "eval_every": 10**9, "save_every": 10**9,
                                    "log_every": 10**9, "device": "cpu", "batch_size": batch, "parallel": parallel,
                                    "dtype": "float32", "compile": False})
    opts = T.TrainOptions(run_name=tag, display="quiet", peak_tflops=1.0, force=True)
    tok_dir = root / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    run = T.Run(preset, p.model, tc, opts, root / "runs" / tag, tok_dir, root / "train.npy", root / "valid.npy",
                None, steps, steps, fresh=True)
    stamps: list[float] = []
    T.train(run, on_step=lambda step, record: stamps.append(time.perf_counter()))
    gaps = [b - a for a, b in zip(stamps, stamps[1:])][:-1]  # step k's time = stamp k - stamp k-1; drop the last
    return statistics.median(gaps)


def _worker(rank: int, port: int, args: tuple) -> None:
    preset, steps, root, tag, batch, parallel, out = args
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        secs = step_seconds(preset, steps, Path(root), tag, batch, parallel)
        if rank == 0:
            Path(out).write_text(json.dumps(secs))
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(preset: str, steps: int, root: Path, tag: str, batch: int, parallel: str) -> float:
    out = root / f"{tag}.json"
    torch.multiprocessing.spawn(_worker, args=(free_port(), (preset, steps, str(root), tag, batch, parallel, str(out))),
                                nprocs=2, join=True)
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tinystories-cpu")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the one-process side (default 1: on a shared, oversubscribed machine "
                         "more OpenMP threads than free cores slow a process down many times over)")
    args = ap.parse_args()
    p = PRESETS[args.preset]
    cfg, batch = p.model, p.train.batch_size
    tokens_per_step = batch * cfg.context_length
    runs: dict[str, list[float]] = {"single": [], "ddp": [], "fsdp": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_tokens(root / "train.npy", 400_000, cfg.vocab_size, 0)
        write_tokens(root / "valid.npy", 50_000, cfg.vocab_size, 1)
        for r in range(args.rounds):
            torch.set_num_threads(args.threads)
            runs["single"].append(
                tokens_per_step / step_seconds(args.preset, args.steps, root, f"single{r}", batch, "ddp")
            )
            for mode in ("ddp", "fsdp"):
                runs[mode].append(
                    tokens_per_step / two_ranks(args.preset, args.steps, root, f"{mode}{r}", batch // 2, mode)
                )
            print(json.dumps({"round": r, **{k: round(v[-1], 1) for k, v in runs.items()}}), flush=True)
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(runs[a], runs[b]))  # noqa: E731
    print(json.dumps({
        "benchmark": "parallel_tokens_per_s", "preset": args.preset, "global_batch": batch,
        "tokens_per_step": tokens_per_step, "steps": args.steps, "rounds": args.rounds,
        "single_threads": args.threads,
        "median_tokens_per_s": {k: round(statistics.median(v), 1) for k, v in runs.items()},
        "every_run_tokens_per_s": {k: [round(x, 1) for x in v] for k, v in runs.items()},
        "fsdp_vs_ddp": round(ratio("fsdp", "ddp"), 3), "ddp_vs_single": round(ratio("ddp", "single"), 3),
        "fsdp_vs_single": round(ratio("fsdp", "single"), 3),
        "torch": torch.__version__, "cpus": os.cpu_count(), "machine": platform.machine(),
        "date": datetime.now(UTC).date().isoformat(),
    }, indent=2))


if __name__ == "__main__":
    main()
