"""Fault injection: kill -9 a process at random moments while it saves checkpoints, then check that
nothing was lost.

Each trial starts a child that saves checkpoint k+1 over checkpoint k in a loop (the trainer's
`save_checkpoint`, atomic: temp file, fsync, rename, directory fsync), kills it with SIGKILL after a
random delay, and then checks the target file: it must load, and hold an iteration the child reported
as saved or the one it was saving. A run directory owner removes the temporaries a killed writer left
(`runs.remove_stale_temps`); the check counts them before and after that cleanup.

    python tests/benchmarks/fault_checkpoint.py --trials 200     # prints one JSON object

`lost` (a checkpoint that does not load, or an iteration older than the last one reported saved) must
be 0; `faults` counts the kills that landed while a save was in progress.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import sys, torch
from pathlib import Path
from tinystories_cli.checkpoint import save_checkpoint
from tinystories_cli.config import ModelConfig
from tinystories_cli.model import TransformerLM
target = Path(sys.argv[1])
model = TransformerLM(ModelConfig(vocab_size=512, context_length=32, d_model=64, num_layers=2, num_heads=4))
k = int(sys.argv[2])
while True:
    print(f"saving {k}", flush=True)
    save_checkpoint(model, None, k, target)
    print(f"saved {k}", flush=True)
    k += 1
"""


def trial(workdir: Path, rng: random.Random) -> dict:
    from tinystories_cli import runs
    from tinystories_cli.checkpoint import read_checkpoint

    ckpt_dir = workdir / runs.CHECKPOINT_DIR
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    target = ckpt_dir / runs.step_checkpoint_name(1)
    start = read_checkpoint(target).iteration + 1 if target.exists() else 1
    out = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(target), str(start)], stdout=out, text=True)
    # Let it get going (import torch, build the model), then kill at a random moment of its save loop.
    deadline = time.time() + 60
    while time.time() < deadline:
        out.seek(0)
        if "saving" in out.read():
            break
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.3))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    out.seek(0)
    lines = out.read().split("\n")
    saved = [int(line.split()[1]) for line in lines if line.startswith("saved ")]
    saving = [int(line.split()[1]) for line in lines if line.startswith("saving ")]
    in_progress = bool(saving) and (not saved or saving[-1] > saved[-1])
    temps_before = len(list(ckpt_dir.glob(".*.tmp")))
    try:
        got = read_checkpoint(target).iteration
        lost = got < (saved[-1] if saved else start - 1) or got not in set(saved) | set(saving) | {start - 1}
    except Exception:  # noqa: BLE001 (any failure to load is a lost checkpoint)
        got, lost = None, True
    runs.remove_stale_temps(workdir)
    return {"fault_mid_save": in_progress, "lost": lost, "temps_left_by_kill": temps_before,
            "temps_after_cleanup": len(list(ckpt_dir.glob(".*.tmp"))), "iteration": got}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as d:
        results = [trial(Path(d), rng) for _ in range(args.trials)]
    report = {
        "trials": len(results),
        "faults_mid_save": sum(r["fault_mid_save"] for r in results),
        "lost": sum(r["lost"] for r in results),
        "temps_left_by_kill": sum(r["temps_left_by_kill"] for r in results),
        "temps_after_cleanup": sum(r["temps_after_cleanup"] for r in results),
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
