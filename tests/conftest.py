"""Shared fixtures. `shared_data` locates ../shared/data beside the repo and skips loudly when absent."""

from __future__ import annotations

import contextlib
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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    fastest for them, and on a shared 2-core machine the OpenMP barriers of a second thread cost ~100x.
    The count is restored afterwards for the other modules."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"SKIPPED LOUDLY: shared data not found at {SHARED_DATA} (CI provides it)")
    return SHARED_DATA


@pytest.fixture
def tiny_workspace(tmp_path, use_workspace, request):
    """tmp_path with data/tiny (tokenizer + token files) and runs/, wired into tslm's path defaults, one
    intra-op thread; returns (tmp_path, the tokenizer). A module or test marked
    `pytest.mark.tiny_data(n_valid=120)` gets those `make_dataset` sizes instead of the defaults."""
    import torch

    from train_fixtures import make_dataset

    marker = request.node.get_closest_marker("tiny_data")
    tok = make_dataset(tmp_path, **(marker.kwargs if marker else {}))
    use_workspace(tmp_path)
    torch.set_num_threads(1)
    return tmp_path, tok


@pytest.fixture
def use_workspace():
    """`use_workspace(root)`: tslm's default data/ and runs/ under `root` until the test ends (the one
    mechanism: `train_fixtures.workspace_at`); returns `root`."""
    from train_fixtures import workspace_at

    with contextlib.ExitStack() as stack:
        yield lambda root: stack.enter_context(workspace_at(root))


@pytest.fixture
def run_cli(capsys):
    """Call `tslm` in-process; returns (exit code, stdout, stderr)."""
    from tinystories_cli.cli import main

    def run(*args: str):
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture
def server():
    """The download tests' local HTTP server (tests/download_server.py): set `server.routes[path] = Route(...)`."""
    from download_server import serve

    with serve() as srv:
        yield srv


@pytest.fixture
def sleeps(monkeypatch):
    """Capture tslm download's backoff pauses instead of sleeping."""
    from tinystories_cli import download as dl

    calls: list[float] = []
    monkeypatch.setattr(dl.transfer, "SLEEP", calls.append)  # the module whose retry loop reads it
    return calls


@pytest.fixture
def story_text(tmp_path: Path) -> Path:
    """stories.txt in tmp_path: 400 template stories (`train_fixtures.tiny_stories`)."""
    from train_fixtures import tiny_stories

    p = tmp_path / "stories.txt"
    p.write_text(tiny_stories(400), encoding="utf-8")
    return p
