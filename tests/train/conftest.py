"""Fixtures of the training tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def workspace(tiny_workspace):
    """The root of `tiny_workspace` (data/tiny and runs/ under it, wired into tslm's path defaults)."""
    return tiny_workspace[0]
