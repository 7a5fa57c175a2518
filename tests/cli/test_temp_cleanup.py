"""Issue 31: temporary files. Every temp a command writes is named `.NAME.p<owner pid>.XXXXXXXX[.tmp]`; SIGTERM and
SIGINT remove it on the way out, and the next run removes the ones whose owner is dead (never a live one's)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tinystories_cli import fileio

from train_fixtures import REPO


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _plant(d: Path, pid: int, name: str = "x") -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    f = d / f".{name}.p{pid}.abcd1234.tmp"
    f.write_bytes(b"partial")
    sub = d / f".{name}.p{pid}.efgh5678.tmp"
    sub.mkdir()
    (sub / "config.json").write_text("{}")
    return [f, sub]


def test_remove_stale_temps_only_removes_dead_owners(tmp_path):
    dead = _plant(tmp_path, _dead_pid())
    live = _plant(tmp_path, os.getpid(), "y")
    other = tmp_path / ".not-ours.tmp"
    other.write_text("keep")
    link = tmp_path / f".z.p{_dead_pid()}.ijkl9012.tmp"
    link.symlink_to(tmp_path / "elsewhere")
    assert fileio.remove_stale_temps(tmp_path) == 3
    assert not any(p.exists() for p in dead) and all(p.exists() for p in live) and other.exists()
    assert not os.path.lexists(link)


def test_atomic_write_names_its_temp_with_the_owner(tmp_path):
    seen = []
    with fileio.atomic_write(tmp_path / "a.json", "w") as f:
        seen = [p.name for p in tmp_path.iterdir()]
        f.write("{}")
    assert len(seen) == 1 and seen[0].startswith(f".a.json.p{os.getpid()}.") and seen[0].endswith(".tmp")


@pytest.fixture
def trained(tiny_workspace):
    from train_fixtures import train_tiny

    tmp, _ = tiny_workspace
    train_tiny("base")
    return tmp


def test_next_export_import_bpe_encode_remove_stale_temps(trained, run_cli):
    tmp = trained
    dead = _dead_pid()
    exports = tmp / "exports"
    planted = _plant(exports, dead, "hf")
    assert run_cli("export", "base", "--out", str(exports / "hf"), "--format", "hf")[0] == 0
    assert not any(p.exists() for p in planted)
    runs_dir = tmp / "runs"
    planted = _plant(runs_dir, dead, "imported")
    assert run_cli("import", str(exports / "hf"), "--run-name", "imported")[0] == 0
    assert not any(p.exists() for p in planted)
    text = tmp / "data" / "tiny" / "train.txt"
    tok = tmp / "tok2"
    planted = _plant(tok, dead, "vocab.json")
    assert run_cli("bpe", str(text), "--out", str(tok), "--vocab-size", "270", "--workers", "1")[0] == 0
    assert not any(p.exists() for p in planted)
    planted = _plant(tmp / "enc", dead, "t.npy")
    assert run_cli("encode", str(text), "--tokenizer", str(tok), "--out", str(tmp / "enc" / "t.npy"))[0] == 0
    assert not any(p.exists() for p in planted)


def _stories(n: int) -> str:
    import random

    rng = random.Random(0)
    words = "cat dog ball tree sun happy sad big little red blue girl boy mom dad park run jump play went saw".split()
    return "".join(" ".join(rng.choice(words) for _ in range(60)) + ".<|endoftext|>\n" for _ in range(n))


@pytest.mark.parametrize("stage,pattern", [("tokenizer", ".bpe_sample."), ("encode", ".train.npy.")])
def test_sigterm_in_quickstart_stages_leaves_no_temp(tmp_path, stage, pattern):
    """SIGTERM while quickstart's own bpe (or encode) stage writes its temporary file: it is removed, exit 143."""
    text = tmp_path / "stories.txt"
    text.write_text(_stories(6000), encoding="utf-8")
    work = tmp_path / "w"
    env = {**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO))}
    args = [sys.executable, "-m", "tinystories_cli", "quickstart", "--text", str(text), "--dir", str(work),
            "--minutes", "0.05", "--vocab-size", "1200", "--preset", "debug", "--device", "cpu"]
    data = work / "data"
    if stage == "encode":
        # run once until the tokenizer exists, then kill it hard: the second run skips straight to encode
        p = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 240
        while not (data / "quickstart" / "tokenizer" / "tokenizer_config.json").exists() and time.time() < deadline:
            time.sleep(0.05)
        p.kill()
        p.wait()
        fileio.remove_stale_temps(data)  # (the hard kill's litter is another test's subject)
        fileio.remove_stale_temps(data / "quickstart")
    p = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def temps():
        return [f for d in (data, data / "quickstart") if d.is_dir() for f in os.listdir(d) if f.startswith(pattern)]

    deadline = time.time() + 240
    while not temps() and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert temps(), f"the {stage} stage's temporary file never appeared"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert not temps(), temps()


def test_disk_full_at_the_last_file_of_import_leaves_nothing_and_the_rerun_works(trained, run_cli, monkeypatch):
    import errno

    from tinystories_cli import importer

    tmp = trained
    assert run_cli("export", "base", "--out", str(tmp / "hf"), "--format", "hf")[0] == 0
    real = importer.write_run_readme

    def full(run_dir, **kw):
        raise OSError(errno.ENOSPC, "No space left on device", str(run_dir / "README.md"))

    monkeypatch.setattr(importer, "write_run_readme", full)
    code, _, err = run_cli("import", str(tmp / "hf"), "--run-name", "imp")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "internal error" not in err, err
    assert not (tmp / "runs" / "imp").exists()
    assert not [f for f in os.listdir(tmp / "runs") if f.startswith(".imp.")]
    monkeypatch.setattr(importer, "write_run_readme", real)
    code, _, err = run_cli("import", str(tmp / "hf"), "--run-name", "imp")
    assert code == 0, err
    readme = (tmp / "runs" / "imp" / "README.md").read_text()
    assert str(tmp / "runs" / "imp") in readme and ".imp.p" not in readme  # named by its final path
