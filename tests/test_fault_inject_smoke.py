"""A short run of tests/benchmarks/fault_inject.py in CI (the long one, 50 kills per stage, is in RESULTS.md):
kill -9 and a full disk during export and encode leave no lost input, half-written output or litter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_fault_inject_short_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO)), "TMPDIR": str(tmp_path)}
    p = subprocess.run([sys.executable, str(REPO / "tests" / "benchmarks" / "fault_inject.py"), "--kills", "4",
                        "--stages", "export,encode", "--seed", "7"], capture_output=True, text=True, timeout=600,
                       env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout[p.stdout.index("\n{") + 1:] if not p.stdout.startswith("{") else p.stdout)
    total = out["total"]
    assert total["kills"] == 8 and total["disk_full_attempts"] >= 2
    for k in ("lost", "half_written", "litter", "rerun_failed", "internal_errors"):
        assert total[k] == 0, (k, out)
