"""`tslm encode` and tokenizer/encode.py: .npy token files, sidecars, parallel == serial, bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from tinystories_cli.errors import UserError
from tinystories_cli.tokenizer import encode as enc
from tinystories_cli.tokenizer.files import write_vocab_merges
from tinystories_cli.tokenizer.tokenizer import Tokenizer
from tinystories_cli.tokens import check_token_file, load_token_file

from train_fixtures import SHARED_DATA

EOT = "<|endoftext|>"

STORY = (
    "Once upon a time, there was a little dog named Max. Max liked to run in the park.\n"
    "One day, he saw a cat. \"Hello!\" said Max. The cat said, \"Let's play!\" They're friends now.\n"
    "Ünïcödé café 🙂 日本語 \r\n  spaces   and\ttabs 1234 5678\n"
)


def _toy_tokenizer(specials=(EOT,)) -> Tokenizer:
    """Bytes plus a few hand-picked merges (each part made by an earlier merge, like real training)."""
    vocab = {i: bytes([i]) for i in range(256)}
    merges = []
    for a, b in [(b" ", b"t"), (b"h", b"e"), (b" t", b"he"), (b"a", b"n"), (b" ", b"a"), (b"i", b"n"),
                 (b" a", b"n"), (b" an", b"d"), (b"o", b"n"), (b"e", b"r"), (b" ", b"s"), (b"a", b"y")]:
        vocab[len(vocab)] = a + b
        merges.append((a, b))
    return Tokenizer(vocab, merges, list(specials))


def _write_text(path: Path, stories: int) -> str:
    text = "".join(STORY.replace("Max", f"Max{i % 7}") + EOT for i in range(stories))
    path.write_bytes(text.encode("utf-8"))
    return text


def _tokenizer_dir(d: Path, tok: Tokenizer) -> Path:
    write_vocab_merges(d, tok.vocab, tok.merges)
    (d / "tokenizer_config.json").write_text(json.dumps({"special_tokens": tok.special_tokens}))
    return d


# --------------------------------------------------------------------------- library


def test_encode_file_serial_matches_encode_and_sidecar(tmp_path):
    tok = _toy_tokenizer()
    src = tmp_path / "a.txt"
    text = _write_text(src, 40)
    meta = enc.encode_file(src, tmp_path / "a.npy", tok, workers=1)
    ids = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert isinstance(ids, np.memmap) and ids.dtype == np.uint16
    assert ids.tolist() == tok.encode(text)
    side = json.loads((tmp_path / "a.json").read_text())
    assert side == meta
    assert side["num_tokens"] == len(ids) and side["max_id"] == int(ids.max())
    assert side["source_bytes"] == src.stat().st_size
    assert side["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert side["fingerprint"] == tok.fingerprint and side["vocab_size"] == tok.vocab_size
    assert side["special_tokens"] == [EOT] and side["dtype"] == "uint16"
    loaded, m = load_token_file(tmp_path / "a.npy")
    assert np.array_equal(loaded, ids) and m["num_tokens"] == len(ids)


def test_parallel_equals_serial_byte_for_byte(tmp_path, monkeypatch):
    monkeypatch.setattr(enc, "MIN_PARALLEL_BYTES", 0)
    tok = _toy_tokenizer()
    src = tmp_path / "t.txt"
    _write_text(src, 300)  # ~60 KB, cut into 8 chunks
    seen = []
    m1 = enc.encode_file(src, tmp_path / "serial.npy", tok, workers=1)
    m2 = enc.encode_file(
        src, tmp_path / "par.npy", tok, workers=2, chunks_per_worker=4, progress=lambda b, t: seen.append((b, t))
    )
    assert m2["chunks"] > 2 and m2["workers"] == 2
    assert (tmp_path / "serial.npy").read_bytes() == (tmp_path / "par.npy").read_bytes()
    assert m1["source_sha256"] == m2["source_sha256"] and m1["num_tokens"] == m2["num_tokens"]
    assert seen[-1] == (src.stat().st_size, m2["num_tokens"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # part files cleaned up


@pytest.mark.parametrize("slow", ["even", "odd"])
def test_parallel_output_in_file_order_whoever_finishes_first(tmp_path, monkeypatch, slow):
    # Make every other chunk slow so that workers finish out of order: the file must not change,
    # and the parent itself encodes nothing (it would warm a cache the workers already warm).
    import multiprocessing
    import os
    import time

    monkeypatch.setattr(enc, "MIN_PARALLEL_BYTES", 0)
    tok = _toy_tokenizer()
    src = tmp_path / "t.txt"
    _write_text(src, 300)
    enc.encode_file(src, tmp_path / "serial.npy", tok, workers=1)
    parent, encode_range = os.getpid(), enc._encode_range
    points = enc.split_points(src, 12)
    in_parent = []

    def paced(encoder, path, start, end, *args, **kwargs):
        if os.getpid() == parent:
            in_parent.append(start)
        elif points.index(start) % 2 == (slow == "odd"):
            time.sleep(0.05)
        return encode_range(encoder, path, start, end, *args, **kwargs)

    monkeypatch.setattr(enc, "_encode_range", paced)
    meta = enc.encode_file(src, tmp_path / "par.npy", tok, workers=2, chunks_per_worker=6)
    assert meta["chunks"] == len(points) - 1 > 6 and meta["workers"] == 2
    assert in_parent == []
    assert (tmp_path / "serial.npy").read_bytes() == (tmp_path / "par.npy").read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert multiprocessing.active_children() == []


def test_parallel_worker_error_leaves_nothing(tmp_path, monkeypatch):
    import multiprocessing

    monkeypatch.setattr(enc, "MIN_PARALLEL_BYTES", 0)
    tok = _toy_tokenizer()
    src = tmp_path / "bad.txt"
    good = _write_text(tmp_path / "g.txt", 200).encode()
    src.write_bytes(good + b"abc\xff" + good)
    (tmp_path / "g.txt").unlink()
    with pytest.raises(UserError, match=f"byte offset {len(good) + 3}"):
        enc.encode_file(src, tmp_path / "bad.npy", tok, workers=2, chunks_per_worker=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt"]
    assert multiprocessing.active_children() == []


def test_append_file_falls_back_without_copy_file_range(tmp_path, monkeypatch):
    part = tmp_path / "part"
    part.write_bytes(b"x" * 100_000)
    with open(tmp_path / "out", "wb") as f:
        f.write(b"head")
        enc.append_file(f, part)
        monkeypatch.delattr(enc.os, "copy_file_range", raising=False)
        enc.append_file(f, part)
        f.write(b"tail")
    assert (tmp_path / "out").read_bytes() == b"head" + b"x" * 200_000 + b"tail"


def test_split_points_are_safe_cuts(tmp_path):
    tok = _toy_tokenizer()
    src = tmp_path / "t.txt"
    tricky = "a  b\n\n c's 'll 🙂 x" + EOT + "  \r\n" + "日本 語 " * 3
    src.write_bytes((tricky * 200).encode())
    points = enc.split_points(src, 37, probe=16)
    assert points[0] == 0 and points[-1] == src.stat().st_size and len(points) > 10
    data = src.read_bytes()
    pieces = [tok.encode(data[a:b].decode("utf-8")) for a, b in zip(points[:-1], points[1:])]
    assert [i for p in pieces for i in p] == tok.encode(data.decode("utf-8"))


def test_uint32_when_vocab_exceeds_uint16(tmp_path):
    vocab = {i: bytes([i]) for i in range(256)} | {i: f"<t{i}>".encode() for i in range(256, 70_000)}
    tok = Tokenizer(vocab, [], [EOT])
    src = tmp_path / "x.txt"
    src.write_text("hi" + EOT)
    meta = enc.encode_file(src, tmp_path / "x.npy", tok)
    ids = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert ids.dtype == np.uint32 and ids.tolist() == [104, 105, 70_000] and meta["dtype"] == "uint32"


def test_invalid_utf8_names_offset_and_replace_opt_in(tmp_path, monkeypatch):
    tok = _toy_tokenizer()
    src = tmp_path / "bad.txt"
    good = _write_text(tmp_path / "g.txt", 100).encode()
    src.write_bytes(good + b"abc\xff\xfedef" + good)
    with pytest.raises(UserError, match=f"byte offset {len(good) + 3}"):
        enc.encode_file(src, tmp_path / "bad.npy", tok)
    monkeypatch.setattr(enc, "MIN_PARALLEL_BYTES", 0)
    with pytest.raises(UserError, match=f"byte offset {len(good) + 3}"):  # absolute offset from a worker
        enc.encode_file(src, tmp_path / "bad.npy", tok, workers=2)
    assert not (tmp_path / "bad.npy").exists()  # nothing half-written
    enc.encode_file(src, tmp_path / "bad.npy", tok, errors="replace")
    ids = np.load(tmp_path / "bad.npy").tolist()
    assert tok.decode(ids) == src.read_bytes().decode("utf-8", errors="replace")


def test_utf8_character_split_across_blocks(tmp_path):
    src = tmp_path / "u.txt"
    text = "é🙂日" * 5000
    src.write_bytes(text.encode())
    chunks = list(enc.iter_text(src, 0, src.stat().st_size, block_bytes=7))
    assert "".join(chunks) == text and len(chunks) > 100


def test_refuses_existing_output_unless_force(tmp_path):
    tok = _toy_tokenizer()
    src = tmp_path / "a.txt"
    _write_text(src, 3)
    enc.encode_file(src, tmp_path / "a.npy", tok)
    with pytest.raises(UserError, match="already exists"):
        enc.encode_file(src, tmp_path / "a.npy", tok)
    enc.encode_file(src, tmp_path / "a.npy", tok, force=True)
    weird = tmp_path / "text.npy"  # a text file named .npy: never encode it onto itself
    weird.write_text("hello")
    with pytest.raises(UserError, match="overwrite the input"):
        enc.encode_file(weird, weird, tok, force=True)
    assert weird.read_text() == "hello"


def test_load_and_check_token_file_errors(tmp_path):
    tok = _toy_tokenizer()
    src = tmp_path / "a.txt"
    _write_text(src, 3)
    out = tmp_path / "a.npy"
    with pytest.raises(UserError, match="tslm encode"):
        load_token_file(out)
    enc.encode_file(src, out, tok)
    ids, meta = check_token_file(out, tok.fingerprint, tok.vocab_size)
    assert len(ids) == meta["num_tokens"]
    with pytest.raises(UserError, match="different tokenizer.*tslm encode"):
        check_token_file(out, _toy_tokenizer(specials=()).fingerprint, tok.vocab_size)
    with pytest.raises(UserError, match=f"holds id {meta['max_id']}"):
        check_token_file(out, tok.fingerprint, meta["max_id"])
    side = tmp_path / "a.json"
    bad = dict(meta, num_tokens=meta["num_tokens"] + 1)
    side.write_text(json.dumps(bad))
    with pytest.raises(UserError, match="does not match its sidecar"):
        load_token_file(out)
    side.write_text("{oops")
    with pytest.raises(UserError, match="malformed token sidecar"):
        load_token_file(out)
    side.unlink()
    with pytest.raises(UserError, match="no sidecar"):
        load_token_file(out)


@pytest.mark.shared_data
def test_gpt2_parallel_file_matches_tiktoken(tmp_path, monkeypatch, gpt2, tiktoken_gpt2):
    monkeypatch.setattr(enc, "MIN_PARALLEL_BYTES", 0)
    tok, ref = gpt2, tiktoken_gpt2
    src = SHARED_DATA / "tinystories_valid.txt"
    meta = enc.encode_file(src, tmp_path / "valid.npy", tok, workers=2, backend="python")  # the from-scratch path
    ids = np.load(tmp_path / "valid.npy", mmap_mode="r")
    assert meta["chunks"] > 2 and meta["backend"] == "python"
    assert ids.tolist() == ref.encode(src.read_text(encoding="utf-8"), allowed_special="all")


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def dataset(tmp_path, monkeypatch):
    """A data/tinystories/ layout in a temp cwd: train/valid text plus a tokenizer directory."""
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "data" / "tinystories"
    d.mkdir(parents=True)
    _write_text(d / "train.txt", 30)
    _write_text(d / "valid.txt", 5)
    _tokenizer_dir(d / "tokenizer", _toy_tokenizer())
    return d


def test_cli_encodes_dataset_by_default(dataset, run_cli):
    code, out, err = run_cli("encode", "--workers", "2")
    assert code == 0, err
    tok = Tokenizer.from_dir(dataset / "tokenizer")
    for split in ("train", "valid"):
        ids = np.load(dataset / f"{split}.npy", mmap_mode="r")
        assert ids.tolist() == tok.encode((dataset / f"{split}.txt").read_bytes().decode("utf-8"))
        assert json.loads((dataset / f"{split}.json").read_text())["fingerprint"] == tok.fingerprint
    assert "bytes/token" in out
    code, _, err = run_cli("encode")
    assert code == 2 and "already exists" in err and "--force" in err
    code, _, err = run_cli("encode", "tinystories", "--force", "--json")
    assert code == 0, err


def test_cli_file_with_out(dataset, run_cli, tmp_path):
    code, out, err = run_cli("encode", str(dataset / "valid.txt"), "--out", str(tmp_path / "v.npy"), "--json")
    assert code == 0, err
    assert json.loads(out)["num_tokens"] == len(np.load(tmp_path / "v.npy"))
    code, _, err = run_cli("encode", str(dataset / "valid.txt"), str(dataset / "train.txt"), "--out", "x.npy")
    assert code == 2 and "--out" in err


def test_cli_missing_tokenizer_names_bpe(tmp_path, monkeypatch, run_cli):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "tinystories").mkdir(parents=True)
    (tmp_path / "data" / "tinystories" / "train.txt").write_text("hello")
    code, _, err = run_cli("encode")
    assert code == 2 and "tslm bpe" in err and "Traceback" not in err


def test_cli_missing_data_names_download(tmp_path, monkeypatch, run_cli):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("encode", "owt")
    assert code == 2 and "tslm download owt" in err


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "vocab.json").write_text("{broken"), "malformed vocab"),
    (lambda d: (d / "merges.txt").write_text("#version: 0.2\nq z\n"), "inconsistent"),
    (lambda d: (d / "merges.txt").unlink(), "no tokenizer"),
])
def test_cli_bad_tokenizer_files(dataset, run_cli, damage, message):
    damage(dataset / "tokenizer")
    code, _, err = run_cli("encode")
    assert code == 2 and message in err and "Traceback" not in err


def test_cli_non_utf8_input(dataset, run_cli, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello \x80 world")
    code, _, err = run_cli("encode", str(bad), "--tokenizer", str(dataset / "tokenizer"))
    assert code == 2 and "byte offset 6" in err and "--errors replace" in err
    code, _, err = run_cli("encode", str(bad), "--tokenizer", str(dataset / "tokenizer"), "--errors", "replace")
    assert code == 0, err
    code, _, err = run_cli("encode", str(bad), "--errors", "ignore", "--force")
    assert code == 2 and "strict or replace" in err


def test_tokenizer_gpt2_names_the_downloaded_gpt2_files(tmp_path, monkeypatch, run_cli, shared_data):
    from tinystories_cli import paths

    monkeypatch.setattr(paths, "DATA_ROOT", tmp_path / "data")
    text = tmp_path / "s.txt"
    text.write_bytes((shared_data / "tinystories_valid.txt").read_bytes()[:4000])
    code, _, err = run_cli("encode", str(text), "--tokenizer", "gpt2")
    assert code == 2 and "tslm download gpt2-tokenizer" in err
    d = tmp_path / "data" / "gpt2-tokenizer"
    d.mkdir(parents=True)
    (d / "vocab.json").write_bytes((shared_data / "gpt2_vocab.json").read_bytes())
    (d / "merges.txt").write_bytes((shared_data / "gpt2_merges.txt").read_bytes())
    code, _, err = run_cli("encode", str(text), "--tokenizer", "gpt2")
    assert code == 0, err
    meta = json.loads(text.with_suffix(".json").read_text())
    assert meta["vocab_size"] == 50257
