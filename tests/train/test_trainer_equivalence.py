"""The trainer computes what it computed before its restructuring (issue 25), bit for bit on one thread.

tests/train/fixtures/trainer_losses.json holds the per-step training and validation losses (as exact float hex
strings) of short fixed-seed runs, recorded with the code of commit bf9a479 (before the trainer was
restructured) by `python tests/train/test_trainer_equivalence.py --record`. tests/train/fixtures/old_run/ is a run
directory that the same code wrote (stopped at step 4 of 8), with the tiny data it trained on: resuming
it must continue with the recorded losses ("resuming an old run is tested").

Rerun the recording only when a change is meant to alter the numerics, and say so in the commit.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from tinystories_cli import train as T

from train_fixtures import TINY_TRAIN, make_dataset, workspace_at
from train_fixtures import train_tiny as _run

FIXTURES = Path(__file__).parent / "fixtures"
LOSSES = FIXTURES / "trainer_losses.json"
OLD_RUN = FIXTURES / "old_run"
RECORDED_AT = "bf9a479"

# Each scenario: model and train overrides over TINY_MODEL / TINY_TRAIN (8 steps), run on data/tiny. They
# were recorded in float32, which `dtype` auto chose on every CPU then (a CPU with native bf16 now picks
# bfloat16, issue 27), so they name it.
SCENARIOS = {
    # gradient accumulation (2 micro-batches of 2), cosine schedule, evaluations at steps 4 and 8
    "accum": ({}, {"batch_size": 2, "grad_accum_steps": 2, "dtype": "float32"}),
    # dropout (the RNG state matters), warmup-stable-decay, gradient clipping that bites
    "wsd_dropout": ({"dropout": 0.1}, {"schedule": "wsd", "decay_fraction": 0.5, "grad_clip": 0.5,
                                       "dtype": "float32"}),
}
# The old run: a smaller model and text so its directory stays small.
OLD_DATA = {"vocab_size": 260, "n_train": 60, "n_valid": 20}
OLD_MODEL = {"context_length": 16, "d_model": 8, "num_layers": 1, "num_heads": 2, "d_ff": 16,
             "tie_embeddings": True, "dropout": 0.1}
OLD_TRAIN = {**TINY_TRAIN, "batch_size": 2, "grad_accum_steps": 2, "eval_batches": 1, "keep_last": 1}


def _hex(losses: dict[int, float]) -> dict[str, str]:
    return {str(k): float(v).hex() for k, v in sorted(losses.items())}


def _scenario(name: str) -> dict:
    """The scenario's straight run, and the same run stopped at step 4 and resumed."""
    model, train = SCENARIOS[name]
    full = _run(name, model, train)
    first = _run(name + "-split", model, train, stop_at=4)
    second = _run(name + "-split", model, train, resume="auto")
    return {"train": _hex(full.train_losses), "val": _hex(full.val_losses),
            "resumed_train": _hex({**first.train_losses, **second.train_losses}),
            "resumed_val": _hex(second.val_losses)}


def _resume_old_run(root: Path) -> dict:
    """Copy tests/train/fixtures/old_run under `root` and resume it to its end."""
    shutil.copytree(OLD_RUN, root / "old_run")
    data = root / "old_run" / "data" / "tiny"
    options = T.TrainOptions(resume=str(root / "old_run" / "runs" / "old"), display="quiet", peak_tflops=1.0,
                             train_file=data / "train.npy", valid_file=data / "valid.npy")
    result = T.train(T.prepare_run(None, None, None, None, options))
    return {"train": _hex(result.train_losses), "val": _hex(result.val_losses), "step": result.step}


def _expected() -> dict:
    return json.loads(LOSSES.read_text(encoding="utf-8"))


def test_short_runs_reproduce_the_recorded_losses(tiny_workspace):
    expected = _expected()
    for name in SCENARIOS:
        got = _scenario(name)
        assert got == expected["scenarios"][name], name
        assert got["resumed_train"] == got["train"]  # the resume is exact too


def test_resuming_a_run_written_by_the_old_code(tmp_path):
    torch.set_num_threads(1)
    with workspace_at(tmp_path):
        got = _resume_old_run(tmp_path)
    want = _expected()["old_run"]
    assert got["step"] == 8 and set(got["train"]) == {"5", "6", "7", "8"}
    assert got == want


def record(out: Path) -> None:  # pragma: no cover - run by hand at RECORDED_AT
    import tempfile

    torch.set_num_threads(1)
    result: dict = {"_comment": f"recorded at commit {RECORDED_AT} by `python tests/train/test_trainer_equivalence.py "
                                "--record` (one thread, CPU); float.hex() of each step's loss",
                    "torch": torch.__version__, "scenarios": {}}
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        make_dataset(root)
        with workspace_at(root):
            for name in SCENARIOS:
                result["scenarios"][name] = _scenario(name)
    # The old run directory: trained to step 4 of 8 and kept (only the files a resume reads).
    if OLD_RUN.exists():
        shutil.rmtree(OLD_RUN)
    make_dataset(OLD_RUN, **OLD_DATA)
    with workspace_at(OLD_RUN):
        _run("old", OLD_MODEL, OLD_TRAIN, stop_at=4)
    data = OLD_RUN / "data" / "tiny"
    for f in ("train.txt", "valid.txt"):
        (data / f).unlink()
    (OLD_RUN / "runs" / "latest").unlink()
    with tempfile.TemporaryDirectory() as d, workspace_at(Path(d)):
        result["old_run"] = _resume_old_run(Path(d))
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).parent))
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/train/test_trainer_equivalence.py --record")
    record(LOSSES)
