"""`tslm download hf-model REPO`: a Hugging Face model repo's config, weights and tokenizer files,
against a local HTTP server laid out like the Hub (`/{repo}/resolve/main/{file}`), or a local mirror
directory with the same layout.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from tinystories_cli import download as dl
from tinystories_cli.cli import main
from tinystories_cli.errors import UserError

from download_server import Route

REPO = "tiny-org/tiny-llama"
WEIGHTS = bytes(range(256)) * 400  # ~100 KB standing in for model.safetensors
FILES = {
    "config.json": b'{"architectures": ["LlamaForCausalLM"], "hidden_size": 8}',
    "tokenizer.json": b'{"model": {"type": "BPE"}}',
    "tokenizer_config.json": b'{"tokenizer_class": "PreTrainedTokenizerFast"}',
}


def serve_repo(srv, files: dict[str, bytes], repo: str = REPO, lfs_sha: str | None = None) -> None:
    """Like the Hub: small files served at resolve/, model.safetensors redirected to a CDN path with
    the LFS sha256 in X-Linked-Etag."""
    base = f"/{repo}/resolve/main/"
    for name, body in files.items():
        srv.routes[base + name] = Route(body)
    weights = WEIGHTS if "model.safetensors" not in files else files["model.safetensors"]
    sha = lfs_sha or hashlib.sha256(weights).hexdigest()
    srv.routes[base + "model.safetensors"] = Route(b"", redirect=f"/cdn/{sha}", headers={
        "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(weights))})
    srv.routes[f"/cdn/{sha}"] = Route(weights)


def test_cli_fetches_the_repo_and_prints_the_directory(server, tmp_path, capsys, sleeps):
    serve_repo(server, FILES)
    code = main(["download", "hf-model", REPO, "--dir", str(tmp_path), "--endpoint", server.url])
    out, err = capsys.readouterr()
    d = tmp_path / "hf" / "tiny-org--tiny-llama"
    assert code == 0 and out.strip().splitlines()[-1] == str(d)  # the last line is the directory, for `tslm import`
    for name, body in FILES.items():
        assert (d / name).read_bytes() == body
    assert (d / "model.safetensors").read_bytes() == WEIGHTS
    assert json.loads((d / "model.safetensors.sha256").read_text())["verified"]  # the LFS sha256 was checked
    assert "vocab.json" in err and "merges.txt" in err and "skipped" in err  # optional files the repo lacks
    assert not (d / "vocab.json").exists()
    assert sorted(p.name for p in d.iterdir()) == sorted(
        [*FILES, "model.safetensors"] + [f"{n}.sha256" for n in [*FILES, "model.safetensors"]])
    # A rerun downloads nothing again (the 404s of optional files are asked again: they are not files).
    n = len([p for p, _ in server.log if "/cdn/" in p])
    assert main(["download", "hf-model", REPO, "--dir", str(tmp_path), "--endpoint", server.url]) == 0
    assert len([p for p, _ in server.log if "/cdn/" in p]) == n and "skipped" in capsys.readouterr().out


def test_vocab_and_merges_tokenizer_and_out_dir(server, tmp_path, capsys, monkeypatch, sleeps):
    serve_repo(server, {"config.json": b"{}", "vocab.json": b'{"a": 0}', "merges.txt": b"#version: 0.2\n"},
               repo="gpt2")
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    out = tmp_path / "my-model"
    assert main(["download", "hf-model", "gpt2", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".sha256")) == [
        "config.json", "merges.txt", "model.safetensors", "vocab.json"]


def test_missing_required_file_is_one_line(server, tmp_path, capsys, sleeps):
    serve_repo(server, {"tokenizer.json": b"{}"})  # no config.json
    assert main(["download", "hf-model", REPO, "--dir", str(tmp_path), "--endpoint", server.url]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "has no config.json" in lines[0] and "Traceback" not in err


def test_no_tokenizer_is_refused_before_the_weights(server, tmp_path, capsys, sleeps):
    serve_repo(server, {"config.json": b"{}", "vocab.json": b"{}"})  # vocab.json without merges.txt
    assert main(["download", "hf-model", REPO, "--dir", str(tmp_path), "--endpoint", server.url]) == 2
    err = capsys.readouterr().err
    assert "neither tokenizer.json nor vocab.json + merges.txt" in err and "Traceback" not in err
    assert not any("safetensors" in p or "/cdn/" in p for p, _ in server.log)  # the weights were never requested


def test_wrong_lfs_sha256_keeps_nothing(server, tmp_path, capsys, sleeps):
    serve_repo(server, FILES, lfs_sha="ab" * 32)
    assert main(["download", "hf-model", REPO, "--dir", str(tmp_path), "--endpoint", server.url]) == 2
    assert "published by the server" in capsys.readouterr().err
    assert not list((tmp_path / "hf" / "tiny-org--tiny-llama").glob("model.safetensors*"))


def test_local_mirror_directory(tmp_path, capsys):
    mirror = tmp_path / "mirror" / REPO / "resolve" / "main"
    mirror.mkdir(parents=True)
    for name, body in {**FILES, "model.safetensors": WEIGHTS}.items():
        (mirror / name).write_bytes(body)
    out = tmp_path / "m"
    assert main(["download", "hf-model", REPO, "--out", str(out), "--endpoint", str(tmp_path / "mirror")]) == 0
    assert (out / "model.safetensors").read_bytes() == WEIGHTS and (out / "config.json").read_bytes() == FILES[
        "config.json"
    ]


@pytest.mark.parametrize("repo", ["../etc", "a/b/c", "a--b/c", "/abs", "a/..", "", "a b"])
def test_bad_repo_ids_are_refused(repo, tmp_path):
    with pytest.raises(UserError, match="invalid Hugging Face repo id"):
        dl.plan_hf_model(repo, root=tmp_path, endpoint="http://127.0.0.1:9")


def test_cli_argument_errors(tmp_path, capsys):
    assert main(["download", "hf-model"]) == 2
    assert "needs a repo id" in capsys.readouterr().err
    assert main(["download", "tinystories", "extra", "--dir", str(tmp_path)]) == 2
    assert "only `hf-model` takes a REPO" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert main(["download", "hf-model", REPO, "--out", str(tmp_path / "afile"), "--endpoint", str(tmp_path)]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["download", "hf-model", REPO, "--out", str(tmp_path / "m"), "--dir", str(tmp_path)]) == 2
    assert "--dir and --out" in capsys.readouterr().err
    assert main(["download", "--list"]) == 0
    assert "hf-model REPO" in capsys.readouterr().out
