"""Issue 31: a download record names its source and is compared; registry files are pinned by sha256; the
small files of a model repo are capped. Local mirror directories (the Hub's layout) stand in for the Hub."""

from __future__ import annotations

import json
import os

import pytest

from tinystories_cli import download as dl
from tinystories_cli.cli import main

from train_fixtures import one_error_line

WEIGHTS = bytes(range(256)) * 64


def _repo(mirror, repo: str, files: dict[str, bytes]) -> None:
    d = mirror / repo / "resolve" / "main"
    d.mkdir(parents=True)
    for name, body in files.items():
        (d / name).write_bytes(body)


def test_another_repo_into_the_same_dir_is_refused_then_replaced_with_force(tmp_path, capsys):
    mirror = tmp_path / "mirror"
    _repo(mirror, "a/m", {"config.json": b'{"repo": "a"}', "tokenizer.json": b'{"a": 1}',
                          "tokenizer_config.json": b'{"from": "a"}', "model.safetensors": WEIGHTS})
    _repo(mirror, "b/m", {"config.json": b'{"repo": "b"}', "tokenizer.json": b'{"b": 1}',
                          "model.safetensors": WEIGHTS[::-1]})
    out = tmp_path / "M"
    assert main(["download", "hf-model", "a/m", "--out", str(out), "--endpoint", str(mirror)]) == 0
    capsys.readouterr()
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    assert main(["download", "hf-model", "b/m", "--out", str(out), "--endpoint", str(mirror)]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "/a/m/resolve/main/" in err and "/b/m/resolve/main/" in err
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    # --force: b's files, and nothing of a's left mixed in (b has no tokenizer_config.json)
    assert main(["download", "hf-model", "b/m", "--out", str(out), "--endpoint", str(mirror), "--force"]) == 0
    assert (out / "config.json").read_bytes() == b'{"repo": "b"}'
    assert (out / "model.safetensors").read_bytes() == WEIGHTS[::-1]
    assert not (out / "tokenizer_config.json").exists() and not (out / "tokenizer_config.json.sha256").exists()
    # the same repo through another endpoint (a mirror of the Hub) is the same source: skipped
    mirror2 = tmp_path / "mirror2"
    _repo(mirror2, "b/m", {"config.json": b'{"repo": "b"}', "tokenizer.json": b'{"b": 1}',
                           "model.safetensors": WEIGHTS[::-1]})
    capsys.readouterr()
    assert main(["download", "hf-model", "b/m", "--out", str(out), "--endpoint", str(mirror2)]) == 0


def test_a_single_file_from_another_url_is_not_already_complete(tmp_path, capsys):
    (tmp_path / "one.txt").write_text("one")
    (tmp_path / "two.txt").write_text("two")
    out = tmp_path / "f.txt"
    assert dl.download_url((tmp_path / "one.txt").as_uri(), out).status == "downloaded"
    with pytest.raises(ValueError, match="was downloaded from .*one.txt, not from .*two.txt"):
        dl.download_url((tmp_path / "two.txt").as_uri(), out)
    assert dl.download_url((tmp_path / "two.txt").as_uri(), out, force=True).status == "downloaded"
    assert out.read_text() == "two"


def test_gpt2_tokenizer_files_are_pinned_by_sha256(tmp_path, capsys, shared_data):
    files = {f.dest: f for f in dl.DATASETS["gpt2-tokenizer"].files}
    assert all(f.sha256 and f.size for f in files.values())
    vocab = (shared_data / "gpt2_vocab.json").read_bytes()
    merges = b"#version: 0.2\n" + (shared_data / "gpt2_merges.txt").read_bytes()
    assert len(vocab) == files["vocab.json"].size and len(merges) == files["merges.txt"].size
    mirror = tmp_path / "mirror"
    # a same-size tampered vocab.json: one token's id changed
    tampered = vocab.replace(b'"\\u0120the": 262', b'"\\u0120the": 263', 1)
    assert tampered != vocab and len(tampered) == len(vocab)
    _repo(mirror, "openai-community/gpt2", {"vocab.json": tampered, "merges.txt": merges})
    code = main(["download", "gpt2-tokenizer", "--dir", str(tmp_path / "data"), "--endpoint", str(mirror)])
    assert code == 2 and "sha256 mismatch" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "data" / "gpt2-tokenizer" / "vocab.json").exists()
    (mirror / "openai-community/gpt2/resolve/main/vocab.json").write_bytes(vocab)
    assert main(["download", "gpt2-tokenizer", "--dir", str(tmp_path / "data"), "--endpoint", str(mirror)]) == 0
    rec = json.loads((tmp_path / "data" / "gpt2-tokenizer" / "vocab.json.sha256").read_text())
    assert rec["verified"] is True


def test_small_files_of_a_model_repo_are_capped(tmp_path, capsys):
    mirror = tmp_path / "mirror"
    _repo(mirror, "a/m", {"tokenizer.json": b"{}", "model.safetensors": WEIGHTS})
    big = mirror / "a/m/resolve/main/config.json"
    with open(big, "wb") as f:  # sparse: 60 MB of zeros that take no disk
        f.truncate(dl.HF_SMALL_FILE_CAP + (10 << 20))
    out = tmp_path / "M"
    assert main(["download", "hf-model", "a/m", "--out", str(out), "--endpoint", str(mirror)]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "over the limit" in err or "more than the limit" in err
    assert not (out / "config.json").exists()
    left = [f for f in os.listdir(out) if f.startswith("config.json")] if out.is_dir() else []
    assert sum((out / f).stat().st_size for f in left) <= dl.HF_SMALL_FILE_CAP
