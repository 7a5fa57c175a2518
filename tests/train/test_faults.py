"""Fault injection: kill -9 during checkpoint saves, a full disk during training. Nothing is lost and
nothing is left behind. (The long kill loop is tests/benchmarks/fault_checkpoint.py --trials 200.)"""

from __future__ import annotations

import importlib.util
import os
import resource
import subprocess
import sys
from pathlib import Path

from tinystories_cli import runs
from tinystories_cli.checkpoint import read_checkpoint

from train_fixtures import TINY_MODEL, make_dataset

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "fault_checkpoint.py"


def test_kill_9_at_random_moments_of_checkpoint_saves_loses_nothing():
    spec = importlib.util.spec_from_file_location("fault_checkpoint", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    report = mod.main(["--trials", "3", "--seed", "1"])
    assert report["trials"] == 3 and report["faults_mid_save"] >= 1
    assert report["lost"] == 0 and report["temps_after_cleanup"] == 0


def _limit_file_size(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_older_checkpoint(tmp_path):
    make_dataset(tmp_path)
    env = {**os.environ, "TSLM_DATA": str(tmp_path / "data"), "TSLM_RUNS": str(tmp_path / "runs"),
           "OMP_NUM_THREADS": "1"}
    model = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_MODEL.items()]
    args = [sys.executable, "-m", "tinystories_cli", "train", "--preset", "debug", "--dataset", "tiny",
            "--run-name", "full", "--quiet", "--peak-tflops", "1", "--device", "cpu", "--max-steps", "8",
            "--warmup-steps", "1", "--save-every", "4", "--eval-every", "4", *model]
    first = subprocess.run([*args, "--stop-at", "4"], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    run_dir = tmp_path / "runs" / "full"
    (step4,) = [p for _, p in runs.step_checkpoints(run_dir)]
    kept = step4.read_bytes()
    # Every file may grow to half a checkpoint: metrics lines fit, the next checkpoint does not.
    second = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True, timeout=300,
                            preexec_fn=_limit_file_size(len(kept) // 2))
    err = second.stderr
    assert second.returncode == 2, err
    assert "no space left to write" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert step4.read_bytes() == kept and read_checkpoint(step4).iteration == 4
    assert [s for s, _ in runs.step_checkpoints(run_dir)] == [4]
    litter = [p.name for p in run_dir.rglob(".*.tmp")]
    assert litter == [] and not (run_dir / runs.LOCK_FILE).exists()
    # With room again, the run resumes from step 4 and finishes.
    third = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr
    assert [s for s, _ in runs.step_checkpoints(run_dir)][-1] == 8
