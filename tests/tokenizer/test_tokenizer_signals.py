"""Reliability of `tslm encode` / `tslm bpe`: SIGINT and SIGTERM end the workers, remove every temporary
file and exit 130 / 143 without a traceback; a full disk is one line and exit 2, with no litter.

The commands run as real subprocesses (`python -m tinystories_cli`) in their own session, so the test
can check that no process of theirs outlives them. Their SIGINT disposition is set explicitly: the
suite may itself run in the background, where SIGINT is inherited as ignored.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tinystories_cli.tokenizer import bpe
from tinystories_cli.tokenizer import encode as enc
from tinystories_cli.tokenizer.files import write_vocab_merges

from train_fixtures import REPO

EOT = "<|endoftext|>"


def _text(n_bytes: int, seed: int = 0) -> str:
    """Many distinct made-up words (cold caches everywhere), sentences, newlines and EOT separators."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(60_000)]
    out, size = [], 0
    while size < n_bytes:
        s = " ".join(rng.choice(vocab) for _ in range(rng.randint(3, 15))) + rng.choice(
            [". ", ".\n", "!\n", ". " + EOT + "\n"]
        )
        out.append(s)
        size += len(s)
    return "".join(out)


@pytest.fixture(scope="module")
def big_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("signals") / "big.txt"
    path.write_text(_text(8_000_000), encoding="utf-8")
    return path


@pytest.fixture
def workdir(tmp_path, big_text) -> Path:
    """A fresh directory holding only the input text and a small tokenizer."""
    (tmp_path / "big.txt").symlink_to(big_text)
    tok = tmp_path / "tok"
    tok.mkdir()
    vocab = {i: bytes([i]) for i in range(256)}
    merges = [(b" ", b"t"), (b"h", b"e"), (b" t", b"he"), (b"a", b"n")]
    for a, b in merges:
        vocab[len(vocab)] = a + b
    write_vocab_merges(tok, vocab, merges)
    (tok / "tokenizer_config.json").write_text(json.dumps({"special_tokens": [EOT]}))
    return tmp_path


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    def child_setup() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # whatever the test runner inherited

    env = {**os.environ, "PYTHONPATH": str(REPO), "TSLM_DEBUG": ""}
    return subprocess.Popen([sys.executable, "-m", "tinystories_cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=child_setup,
                            start_new_session=True)


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the command ended (rc {proc.returncode}) before it could be interrupted: {err[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the command never reached the point to interrupt")
        time.sleep(0.02)


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def _finish(proc: subprocess.Popen, sig: int) -> tuple[int, str]:
    os.kill(proc.pid, sig)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the command did not stop after the signal")
    deadline = time.monotonic() + 5
    while not _group_gone(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    leftover = not _group_gone(proc.pid)
    if leftover:
        os.killpg(proc.pid, signal.SIGKILL)
    assert not leftover, "a worker process outlived the command"
    return proc.returncode, err


@pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="SKIPPED LOUDLY: needs Linux /proc to find worker processes"
)
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_encode_signal_ends_workers_and_removes_temp_files(workdir, sig, code):
    proc = _start(["encode", "big.txt", "--tokenizer", "tok", "--workers", "2", "--backend", "python",
                   "--out", "big.npy", "--json"], workdir)
    # the part files' directory exists once the workers run; wait until they have written something
    _wait_for(lambda: any(p.name.startswith(".encode-parts.") and any(p.iterdir()) for p in workdir.iterdir()), proc)
    time.sleep(0.2)
    rc, err = _finish(proc, sig)
    assert rc == code, err
    assert "Traceback" not in err and err.strip().count("\n") == 0 and "interrupted by" in err, err
    assert sorted(p.name for p in workdir.iterdir()) == ["big.txt", "tok"]
    assert sorted(p.name for p in (workdir / "tok").iterdir()) == ["merges.txt", "tokenizer_config.json", "vocab.json"]


@pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="SKIPPED LOUDLY: needs Linux /proc to find worker processes"
)
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_bpe_signal_ends_workers_and_removes_temp_files(workdir, sig, code):
    proc = _start(["bpe", "big.txt", "--vocab-size", "2000", "--workers", "2", "--out", "out", "--json"], workdir)
    _wait_for(lambda: len(_children(proc.pid)) >= 2, proc)
    time.sleep(0.3)
    rc, err = _finish(proc, sig)
    assert rc == code, err
    assert "Traceback" not in err and "interrupted by" in err, err
    assert sorted(p.name for p in workdir.iterdir()) == ["big.txt", "tok"]


# --------------------------------------------------------------------------- a full disk


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("workers", ["1", "2"])
def test_encode_disk_full_is_one_line_exit_2_no_litter(workdir, run_cli, monkeypatch, workers):
    monkeypatch.setattr(enc, "MIN_PARALLEL_BYTES", 0)
    small = workdir / "small.txt"
    small.write_text(_text(300_000, seed=1), encoding="utf-8")
    real = enc.append_file if workers == "2" else enc._encode_range

    def full_after_some(*args, **kwargs):
        real(*args, **kwargs)  # something was written, then the disk fills up
        _enospc()

    monkeypatch.setattr(enc, "append_file" if workers == "2" else "_encode_range", full_after_some)
    code, out, err = run_cli(
        "encode", str(small), "--tokenizer", str(workdir / "tok"), "--workers", workers, "--backend", "python", "--json"
    )
    assert code == 2 and "no space left" in err and err.strip().count("\n") == 0 and "Traceback" not in err, err
    assert sorted(p.name for p in workdir.iterdir()) == ["big.txt", "small.txt", "tok"]


def test_bpe_disk_full_is_one_line_exit_2_keeps_the_old_tokenizer(workdir, run_cli, monkeypatch):
    small = workdir / "small.txt"
    small.write_text(_text(100_000, seed=2), encoding="utf-8")
    code, _, err = run_cli("bpe", str(small), "--vocab-size", "300", "--out", str(workdir / "out"), "--json")
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in (workdir / "out").iterdir()}
    real = bpe.write_vocab_merges

    def full(d, vocab, merges):
        real(d, vocab, merges)
        _enospc()

    monkeypatch.setattr(bpe, "write_vocab_merges", full)
    code, _, err = run_cli("bpe", str(small), "--vocab-size", "320", "--out", str(workdir / "out"), "--force", "--json")
    assert code == 2 and "no space left" in err and err.strip().count("\n") == 0, err
    assert sorted(p.name for p in workdir.iterdir()) == ["big.txt", "out", "small.txt", "tok"]
    assert {p.name: p.read_bytes() for p in (workdir / "out").iterdir()} == before
