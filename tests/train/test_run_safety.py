"""Nothing a user owns is lost: run directories are owned by one process, named safely, cleaned only of
what a run wrote, and resuming from an earlier checkpoint never deletes the checkpoint it just wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinystories_cli import runs
from tinystories_cli.checkpoint import read_checkpoint, save_checkpoint
from tinystories_cli.cli import main
from tinystories_cli.errors import UserError

from train_fixtures import TINY_MODEL, TINY_TRAIN
from train_fixtures import train_tiny as _run


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_a_second_owner_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(workspace):
    run_dir = workspace / "runs" / "own"
    run_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from tinystories_cli.runs import RunLock\n"
        f"lock = RunLock(Path({str(run_dir)!r})); lock.acquire(); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"in use by process {holder.pid} on "):
            _run("own")
        assert not (run_dir / runs.CONFIG_FILE).exists()  # nothing was written by the refused run
        code = main(["train", "--preset", "debug", "--dataset", "tiny", "--run-name", "own", "--force", "--quiet",
                     "--peak-tflops", "1", *[f"--{k.replace('_', '-')}={v}" for k, v in TINY_MODEL.items()],
                     "--max-steps", "4", "--warmup-steps", "1", "--device", "cpu"])
        assert code == 2
    finally:
        holder.kill()  # kill -9: the kernel drops its flock; the lock file stays behind, stale
        holder.wait()
    assert (run_dir / runs.LOCK_FILE).exists()
    assert _run("own").step == 8  # the stale lock is taken over
    assert not (run_dir / runs.LOCK_FILE).exists()  # and released at the end


def test_two_concurrent_trainings_of_one_run_directory(workspace):
    """While one training owns runs/race (held mid-run at step 3 by a gate), `tslm train --force` aimed at
    the same run exits 2 naming it; the first run then finishes whole."""
    gate = workspace / "gate"
    script = (
        "import sys, time\nfrom pathlib import Path\nfrom tinystories_cli import train as T\n"
        f"gate = Path({str(gate)!r})\n"
        "def hold(step, record):\n"
        "    if step == 3:\n"
        "        print('holding', flush=True)\n"
        "        while not gate.exists(): time.sleep(0.05)\n"
        f"run = T.prepare_run('debug', None, {TINY_MODEL!r}, {{'dataset': 'tiny', **{TINY_TRAIN!r}}},\n"
        "                    T.TrainOptions(run_name='race', display='quiet', peak_tflops=1.0))\n"
        "print(T.train(run, on_step=hold).step, flush=True)\n")
    env = {**os.environ, "TSLM_DATA": str(workspace / "data"), "TSLM_RUNS": str(workspace / "runs"),
           "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-c", script], cwd=workspace, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "holding", first.stderr.read()
        second = subprocess.run(
            [sys.executable, "-m", "tinystories_cli", "train", "--preset", "debug", "--dataset", "tiny",
             "--run-name", "race", "--force", "--quiet", "--peak-tflops", "1", "--device", "cpu",
             *[f"--{k.replace('_', '-')}={v}" for k, v in TINY_MODEL.items()]],
            cwd=workspace, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        assert f"is in use by process {first.pid}" in second.stderr and "Traceback" not in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        gate.write_text("go")
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0 and out.strip() == "8", err
    d = workspace / "runs" / "race"
    assert [s for s, _ in runs.step_checkpoints(d)] == [4, 8]
    assert json.loads((d / runs.CONFIG_FILE).read_text())["max_steps"] == 8


def test_force_deletes_only_what_a_run_wrote_and_refuses_foreign_files(workspace):
    res = _run("mine")
    d = res.run_dir
    (d / "notes.txt").write_text("my notes")
    (d / "checkpoints" / "keep.bin").write_bytes(b"x")
    before = _tree(d)
    with pytest.raises(UserError, match=r"holds files tslm did not write \(checkpoints/keep.bin, notes.txt\)"):
        _run("mine", force=True)
    assert _tree(d) == before
    (d / "notes.txt").unlink()
    (d / "checkpoints" / "keep.bin").unlink()
    assert _run("mine", force=True).step == 8


@pytest.mark.parametrize("name", ["latest", "../escape", "a/b", "/abs", ".hidden", ""])
def test_run_names_are_plain_and_latest_is_reserved(workspace, name):
    first = _run("first")
    before = _tree(first.run_dir)
    with pytest.raises(UserError, match="not a plain directory name"):
        _run(name, force=True)
    assert _tree(first.run_dir) == before
    assert (workspace / "runs" / "latest").resolve() == first.run_dir.resolve()


def test_run_dir_elsewhere_does_not_move_latest(workspace):
    first = _run("first")
    res = _run(None, run_dir=workspace / "elsewhere" / "r")
    assert res.run_dir == workspace / "elsewhere" / "r" and res.step == 8
    assert (workspace / "runs" / "latest").resolve() == first.run_dir.resolve()
    assert not (workspace / "elsewhere" / "latest").exists()


def test_latest_never_replaces_a_real_directory(workspace):
    (workspace / "runs" / "latest").mkdir(parents=True)
    (workspace / "runs" / "latest" / "mine.txt").write_text("x")
    _run("r")
    assert (workspace / "runs" / "latest").is_dir() and not (workspace / "runs" / "latest").is_symlink()
    assert (workspace / "runs" / "latest" / "mine.txt").read_text() == "x"


def test_resuming_an_earlier_checkpoint_moves_the_later_branch_aside(workspace):
    first = _run("branch", train={"save_every": 2, "keep_last": 10})
    d = first.run_dir
    assert [s for s, _ in runs.step_checkpoints(d)] == [2, 4, 6, 8]
    later = {p.name: p.read_bytes() for _, p in runs.step_checkpoints(d)[1:]}
    res = _run(
        "branch",
        train={"save_every": 2, "keep_last": 1},
        resume=str(d / "checkpoints" / "step_0000002.safetensors"),
        stop_at=4,
    )
    assert res.step == 4
    assert [s for s, _ in runs.step_checkpoints(d)] == [4]  # the checkpoint it just wrote is kept
    (abandoned,) = (d / "checkpoints").glob("abandoned-*")
    assert {p.name: p.read_bytes() for p in abandoned.glob("step_*")} == later  # nothing lost
    assert (abandoned / runs.BEST_CHECKPOINT).is_file()  # step 8's best belongs to the abandoned branch


def test_resume_refuses_a_checkpoint_of_another_run_before_touching_anything(workspace):
    a = _run("a", train={"save_every": 2})
    b = _run("b", train={"seed": 1, "lr": 1e-3})
    before_a, before_b = _tree(a.run_dir), _tree(b.run_dir)
    foreign = runs.latest_checkpoint(b.run_dir)
    target = a.run_dir / "checkpoints" / "step_0000002.safetensors"
    target.write_bytes(foreign.read_bytes())  # b's checkpoint planted in a
    before_a = _tree(a.run_dir)
    with pytest.raises(UserError, match=r"trained with other settings than .* \(lr, seed\)"):
        _run("a", resume=str(target), stop_at=6)
    assert _tree(a.run_dir) == before_a and _tree(b.run_dir) == before_b


def test_resume_with_malformed_run_state_is_one_line_before_metrics_are_trimmed(workspace):
    res = _run("bad", train={"save_every": 2, "keep_last": 10})
    d = res.run_dir
    ckpt_path = d / "checkpoints" / "step_0000004.safetensors"
    ckpt = read_checkpoint(ckpt_path)
    for bad_meta in ({**ckpt.metadata, "sampler": {"seed": "x"}}, {**ckpt.metadata, "elapsed_s": -1.0},
                     {k: v for k, v in ckpt.metadata.items() if k != "max_steps"}):
        from tinystories_cli.config import ModelConfig
        from tinystories_cli.model import TransformerLM

        model = TransformerLM(ModelConfig(**ckpt.metadata["model_config"]))
        model.load_state_dict(ckpt.model_state_dict())
        save_checkpoint(model, None, 4, ckpt_path, metadata=bad_meta)
        before = _tree(d)
        with pytest.raises(UserError, match="no usable run state|no optimizer state"):
            _run("bad", resume=str(ckpt_path))
        assert _tree(d) == before


def test_a_refused_owner_leaves_the_holders_lock_alone(workspace):
    """The refused process never touches the holder's lock file."""
    run_dir = workspace / "runs" / "held"
    lock = runs.RunLock(run_dir)
    lock.acquire()
    try:
        content = (run_dir / runs.LOCK_FILE).read_text()
        assert json.loads(content)["pid"] == os.getpid()
        with pytest.raises(UserError, match="in use"):
            runs.RunLock(run_dir).acquire()
        assert (run_dir / runs.LOCK_FILE).read_text() == content
    finally:
        lock.release()
    assert not (run_dir / runs.LOCK_FILE).exists()
