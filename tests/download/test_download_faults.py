"""Faults during `tslm download`, in child processes: `kill -9` at random points (a short loop; the
long one is tests/benchmarks/fault_download.py) and a full disk (RLIMIT_FSIZE, SIGXFSZ ignored).
"""

from __future__ import annotations

import gzip
import subprocess
import sys

from tinystories_cli import download as dl

from benchmarks.fault_download import run_trials
from download_server import BODY, SHA, Route, leftovers
from train_fixtures import one_error_line

# The child ignores SIGXFSZ so that a write past RLIMIT_FSIZE fails with EFBIG (as on a full disk)
# instead of killing the process, sets SIGINT's disposition explicitly, then runs the CLI.
FSIZE_CHILD = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.default_int_handler)
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from tinystories_cli.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _run_with_fsize_limit(limit: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", FSIZE_CHILD, str(limit), *args], capture_output=True, text=True,
                          timeout=120, env={"PYTHONDONTWRITEBYTECODE": "1", "PATH": "/usr/bin:/bin"})


def test_disk_full_while_downloading_keeps_a_resumable_part(server, tmp_path, sleeps):
    server.routes["/f.txt"] = Route(BODY)
    out = tmp_path / "f.txt"
    p = _run_with_fsize_limit(60_000, "download", server.url + "/f.txt", "--out", str(out))
    assert p.returncode == 2, p.stderr
    line = one_error_line(p.stderr)
    assert "disk full" in line and "f.txt.part" in line and "to resume" in line
    assert leftovers(out) == ["f.txt.part", "f.txt.part.json"]  # exactly the resumable .part and its origin
    part = dl.part_path(out).read_bytes()
    assert 0 < len(part) <= 60_000 and BODY.startswith(part)
    res = dl.download_url(server.url + "/f.txt", out)  # room again: it resumes
    assert res.sha256 == SHA and res.resumed_from == len(part) and leftovers(out) == ["f.txt", "f.txt.sha256"]


def test_disk_full_before_the_first_byte_leaves_nothing(server, tmp_path, sleeps):
    server.routes["/f.txt"] = Route(BODY)
    out = tmp_path / "f.txt"
    p = _run_with_fsize_limit(100, "download", server.url + "/f.txt", "--out", str(out))  # not even the origin fits
    assert p.returncode == 2, p.stderr
    line = one_error_line(p.stderr)
    assert "disk full" in line and "nothing was kept" in line
    assert list(tmp_path.iterdir()) == []


def test_disk_full_while_unpacking_keeps_the_gz(server, tmp_path, sleeps):
    gz = gzip.compress(BODY, mtime=0)
    assert len(gz) < 30_000 < len(BODY)
    server.routes["/datasets/stanford-cs336/owt-sample/resolve/main/owt_valid.txt.gz"] = Route(gz)
    args = ["download", "owt", "--split", "valid", "--dir", str(tmp_path), "--endpoint", server.url]
    p = _run_with_fsize_limit(60_000, *args)
    assert p.returncode == 2, p.stderr
    line = one_error_line(p.stderr)
    assert "disk full while unpacking" in line and "valid.txt.part" in line
    d = tmp_path / "owt"
    assert sorted(x.name for x in d.iterdir()) == ["valid.txt.part", "valid.txt.part.json"]  # no partial output
    assert dl.part_path(d / "valid.txt").read_bytes() == gz  # the verified .gz is kept
    res = dl.download_url(server.url + "/datasets/stanford-cs336/owt-sample/resolve/main/owt_valid.txt.gz",
                          d / "valid.txt", gunzip=True)
    assert res.sha256 == SHA and (d / "valid.txt").read_bytes() == BODY
    assert server.log[-1][1] == f"bytes={len(gz)}-"  # not downloaded again


def test_kill_9_loop_loses_nothing(tmp_path):
    counts = run_trials(trials=9, seed=1, size=384 * 1024, workdir=tmp_path)
    assert counts["trials"] == 9 and counts["faults_injected"] >= 5, counts
    assert counts["kills_by_state"]["part_with_bytes"] >= 1, counts  # some kills hit a download in flight
    bad = {k: counts[k] for k in ("files_lost", "files_corrupted", "litter", "internal_errors", "final_failures")}
    assert bad == dict.fromkeys(bad, 0), counts["problems"]
