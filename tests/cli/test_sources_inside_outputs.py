"""Issue 31: a command never reads its input from, or keeps a source inside, what it is about to clear,
overwrite or move (`fileio.check_source_outside`). Each case here lost user data before, exiting 0."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tinystories_cli.fileio import sha256_file

from train_fixtures import TINY_MODEL, TINY_TRAIN_ARGS, refused, train_tiny


def _stories(n: int) -> str:
    return "".join(f"Once upon a time a cat number {i} found a ball and played all day.<|endoftext|>\n"
                   for i in range(n))


@pytest.mark.parametrize("via_link", [False, True])
def test_quickstart_text_that_is_its_own_split_file_is_refused(tmp_path, run_cli, via_link):
    work = tmp_path / "work"
    d = work / "data" / "quickstart"
    d.mkdir(parents=True)
    mine = d / "train.txt"
    mine.write_text(_stories(200), encoding="utf-8")
    before = sha256_file(mine)
    given = mine
    if via_link:
        given = tmp_path / "link.txt"
        given.symlink_to(mine)
    for extra in ([], ["--force"]):
        err = refused(run_cli, "quickstart", "--text", str(given), "--dir", str(work), "--minutes", "0.05",
                       "--vocab-size", "300", "--preset", "debug", "--device", "cpu", *extra)
        assert str(given) in err and "quickstart" in err and "would overwrite the input" in err, err
        assert sha256_file(mine) == before


def test_quickstart_text_inside_the_tokenizer_or_run_dir_is_refused(tmp_path, run_cli):
    work = tmp_path / "work"
    for rel in ("data/quickstart/tokenizer/notes.txt", "runs/quickstart/notes.txt", "data/quickstart/valid.npy"):
        f = work / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(_stories(50), encoding="utf-8")
        err = refused(run_cli, "quickstart", "--text", str(f), "--dir", str(work), "--minutes", "0.05",
                       "--vocab-size", "300", "--preset", "debug", "--device", "cpu")
        assert "would overwrite the input" in err
        assert f.read_text(encoding="utf-8") == _stories(50)


@pytest.fixture
def base_run(tiny_workspace):
    tmp_path, _ = tiny_workspace
    res = train_tiny("base")
    return tmp_path, res.run_dir


def _snapshot(d):
    return {str(p.relative_to(d)): sha256_file(p) for p in sorted(d.rglob("*")) if p.is_file()
            and p.name != ".tslm.lock"}


def test_init_from_the_run_being_cleared_is_refused(base_run, run_cli):
    tmp, run_dir = base_run
    before = _snapshot(run_dir)
    err = refused(run_cli, "train", "--init-from", "base", "--run-name", "base", "--force", "--max-steps", "2",
                   "--train-data", str(tmp / "data/tiny/train.npy"), "--valid-data", str(tmp / "data/tiny/valid.npy"),
                   "--quiet", "--peak-tflops", "1")
    assert "would clear the input" in err and str(run_dir) in err
    assert _snapshot(run_dir) == before and (run_dir / "tokenizer" / "vocab.json").is_file()


def test_tokenizer_inside_the_run_being_cleared_is_refused(base_run, run_cli):
    tmp, run_dir = base_run
    before = _snapshot(run_dir)
    # through a symlink too: the real paths are compared
    (tmp / "tok-link").symlink_to(run_dir / "tokenizer")
    for tok in (run_dir / "tokenizer", tmp / "tok-link"):
        err = refused(run_cli, "train", *TINY_TRAIN_ARGS, "--tokenizer", str(tok), "--run-name", "base", "--force")
        assert "would clear the input" in err and "lies inside" in err and str(tok) in err
        assert _snapshot(run_dir) == before


def test_init_from_a_run_still_training_says_so_and_leaves_no_run_dir(tiny_workspace, run_cli):
    tmp, _ = tiny_workspace
    busy = tmp / "runs" / "busy"
    busy.mkdir(parents=True)
    (busy / "config.json").write_text(json.dumps({"model": TINY_MODEL, "preset": "debug"}))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(busy / '.tslm.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, b'{\"pid\": %d, \"host\": \"here\", \"since\": \"now\"}\\n' % os.getpid())\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        err = refused(
            run_cli,
            "train",
            "--init-from",
            "busy",
            "--run-name",
            "ft",
            "--max-steps",
            "2",
            "--train-data",
            str(tmp / "data/tiny/train.npy"),
            "--valid-data",
            str(tmp / "data/tiny/valid.npy"),
        )
        assert "being trained" in err and f"process {holder.pid}" in err, err
        assert not (tmp / "runs" / "ft").exists()
    finally:
        holder.kill()
        holder.wait()


def test_bpe_and_encode_never_overwrite_their_input(tmp_path, run_cli):
    text = _stories(100)
    tok = tmp_path / "tok"
    tok.mkdir()
    # a text file named like a tokenizer file, inside --out: bpe would overwrite it with --force
    (tok / "merges.txt").write_text(text, encoding="utf-8")
    for extra in ([], ["--force"]):
        err = refused(run_cli, "bpe", str(tok / "merges.txt"), "--out", str(tok), "--vocab-size", "300",
                       "--workers", "1", *extra)
        assert (tok / "merges.txt").read_text(encoding="utf-8") == text
    # encode: the sidecar of --out x.npy is x.json; an input called x.json is never overwritten
    src = tmp_path / "x.json"
    src.write_text(text, encoding="utf-8")
    code, _, err = run_cli("bpe", str(src), "--out", str(tmp_path / "t2"), "--vocab-size", "300", "--workers", "1")
    assert code == 0, err
    err = refused(run_cli, "encode", str(src), "--tokenizer", str(tmp_path / "t2"), "--out", str(tmp_path / "x.npy"),
                   "--force")
    assert "would overwrite the input" in err
    assert src.read_text(encoding="utf-8") == text
