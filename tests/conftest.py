"""Shared fixtures. `shared_data` locates ../shared/data beside the repo and skips loudly when absent."""

from __future__ import annotations

from pathlib import Path

import pytest

from train_fixtures import SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def kernel_cache(tmp_path_factory):
    """The fast decode kernel (tinystories_cli/fastpath) compiles once per test session, into a
    temporary cache rather than the user's (subprocesses inherit the variable)."""
    import os

    old = os.environ.get("TSLM_KERNEL_CACHE")
    os.environ["TSLM_KERNEL_CACHE"] = str(tmp_path_factory.mktemp("kernels"))
    yield
    if old is None:
        os.environ.pop("TSLM_KERNEL_CACHE", None)
    else:
        os.environ["TSLM_KERNEL_CACHE"] = old


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"SKIPPED LOUDLY: shared data not found at {SHARED_DATA} (CI provides it)")
    return SHARED_DATA


@pytest.fixture
def tiny_workspace(tmp_path, monkeypatch):
    """tmp_path with data/tiny (tokenizer + token files) and runs/, wired into tslm's path defaults, one
    intra-op thread; returns (tmp_path, the tokenizer)."""
    import torch

    from tinystories_cli import paths
    from train_fixtures import make_dataset

    tok = make_dataset(tmp_path)
    monkeypatch.setattr(paths, "DATA_ROOT", tmp_path / "data")
    monkeypatch.setattr(paths, "RUNS_ROOT", tmp_path / "runs")
    torch.set_num_threads(1)
    return tmp_path, tok


@pytest.fixture
def run_cli(capsys):
    """Call `tslm` in-process; returns (exit code, stdout, stderr)."""
    from tinystories_cli.cli import main

    def run(*args: str):
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
