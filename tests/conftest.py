"""Shared fixtures. `shared_data` locates ../shared/data beside the repo and skips loudly when absent."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"SKIPPED LOUDLY: shared data not found at {SHARED_DATA} (CI provides it)")
    return SHARED_DATA


@pytest.fixture
def run_cli(capsys):
    """Call `tslm` in-process; returns (exit code, stdout, stderr)."""
    from tinystories_cli.cli import main

    def run(*args: str):
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
