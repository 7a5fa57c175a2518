"""`tslm download`: resumable, verified, atomic downloads against a local HTTP server.

Every test talks only to a `http.server` bound to 127.0.0.1 on an ephemeral port (or to file://
URLs). The handler's behaviour per path is set by the test: drop the connection half way, ignore
Range, fail with 5xx a few times, 404. Backoff sleeps are captured, never slept.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os

import pytest

from tinystories_cli import download as dl
from tinystories_cli.cli import main
from tinystories_cli.errors import UserError

from download_server import BODY, SHA, Route, interrupt_at, leftovers, write_origin

# ----------------------------------------------------------------------------- library

def test_fresh_download_verifies_and_records(server, tmp_path, sleeps):
    server.routes["/f.txt"] = Route(BODY)
    out = tmp_path / "sub" / "f.txt"
    seen = []
    res = dl.download_url(server.url + "/f.txt", out, progress=lambda s, d, t: seen.append((s, d, t)), chunk_size=16384)
    assert out.read_bytes() == BODY
    assert (res.status, res.sha256, res.size, res.verified) == ("downloaded", SHA, len(BODY), False)
    assert leftovers(out) == ["f.txt", "f.txt.sha256"]  # no .part, no temp files
    rec = json.loads(dl.record_path(out).read_text())
    assert rec["sha256"] == SHA and rec["size"] == len(BODY) and rec["mtime_ns"] == out.stat().st_mtime_ns
    downloads = [d for s, d, t in seen if s == "download"]
    assert downloads == sorted(downloads) and downloads[-1] == len(BODY) and len(downloads) > 3
    assert all(t == len(BODY) for s, d, t in seen)
    assert server.log == [("/f.txt", None)] and sleeps == []


def test_resume_after_connection_drop(server, tmp_path, sleeps):
    server.routes["/f.txt"] = Route(BODY, drop_first=1)
    res = dl.download_url(server.url + "/f.txt", tmp_path / "f.txt", sha256=SHA, chunk_size=8192)
    assert (tmp_path / "f.txt").read_bytes() == BODY and res.verified
    assert len(server.log) == 2 and server.log[0][1] is None
    half = len(BODY) // 2
    assert server.log[1][1] == f"bytes={half}-"  # asked only for the rest
    assert sleeps == [dl.BACKOFF]


def test_resume_through_redirect(server, tmp_path, sleeps):
    server.routes["/resolve/f.txt"] = Route(b"", redirect="/cdn/f.txt")
    server.routes["/cdn/f.txt"] = Route(BODY, drop_first=1)
    dl.download_url(server.url + "/resolve/f.txt", tmp_path / "f.txt", sha256=SHA)
    assert (tmp_path / "f.txt").read_bytes() == BODY
    assert server.log[-1] == ("/cdn/f.txt", f"bytes={len(BODY) // 2}-")  # the Range header survived the redirect


def test_ctrl_c_keeps_part_and_next_run_resumes(server, tmp_path, sleeps):
    server.routes["/f.txt"] = Route(BODY)
    out = tmp_path / "f.txt"

    with pytest.raises(dl.DownloadInterrupted) as ei:
        dl.download_url(server.url + "/f.txt", out, progress=interrupt_at(40_000), chunk_size=8192)
    part = dl.part_path(out)
    assert not out.exists() and part.exists() and ei.value.have == part.stat().st_size >= 40000
    assert BODY.startswith(part.read_bytes())
    res = dl.download_url(server.url + "/f.txt", out, chunk_size=8192)
    assert out.read_bytes() == BODY and res.resumed_from == ei.value.have
    assert server.log[-1][1] == f"bytes={ei.value.have}-" and not part.exists()


def test_server_without_range_support_restarts(server, tmp_path, sleeps):
    # Dropped half way, then the server ignores Range and sends 200 + the whole file again.
    server.routes["/f.txt"] = Route(BODY, ranges=False, drop_first=1)
    res = dl.download_url(server.url + "/f.txt", tmp_path / "f.txt", sha256=SHA)
    assert (tmp_path / "f.txt").read_bytes() == BODY and res.sha256 == SHA
    assert server.log[1][1] is not None  # it did ask for a range, and coped with getting 200


def test_complete_part_gets_416_and_finishes(server, tmp_path, sleeps):
    # Interrupted after the last byte arrived but before the rename: the range request is unsatisfiable.
    server.routes["/f.txt"] = Route(BODY)
    dl.part_path(tmp_path / "f.txt").write_bytes(BODY)
    write_origin(tmp_path / "f.txt", server.url + "/f.txt", Route(BODY).current_etag(), len(BODY))
    dl.download_url(server.url + "/f.txt", tmp_path / "f.txt", sha256=SHA)
    assert (tmp_path / "f.txt").read_bytes() == BODY and server.log == [("/f.txt", f"bytes={len(BODY)}-")]


def test_checksum_mismatch_leaves_nothing(server, tmp_path, sleeps):
    server.routes["/f.txt"] = Route(BODY)
    out = tmp_path / "f.txt"
    wrong = "ab" * 32
    with pytest.raises(UserError) as ei:
        dl.download_url(server.url + "/f.txt", out, sha256=wrong)
    assert wrong in str(ei.value) and SHA in str(ei.value)
    assert list(tmp_path.iterdir()) == []  # no file, no .part, no record


def test_size_mismatch_leaves_nothing(server, tmp_path, sleeps):
    server.routes["/f.txt"] = Route(BODY)
    with pytest.raises(UserError, match=f"expected {len(BODY) + 1}"):
        dl.download_url(server.url + "/f.txt", tmp_path / "f.txt", size=len(BODY) + 1)
    assert list(tmp_path.iterdir()) == []


def test_5xx_is_retried_with_exponential_backoff(server, tmp_path, sleeps):
    server.routes["/f.txt"] = Route(BODY, fail_first=3)
    dl.download_url(server.url + "/f.txt", tmp_path / "f.txt", backoff=0.5)
    assert (tmp_path / "f.txt").read_bytes() == BODY
    assert sleeps == [0.5, 1.0, 2.0] and len(server.log) == 4


def test_5xx_gives_up_after_retries(server, tmp_path, sleeps):
    server.routes["/f.txt"] = Route(BODY, fail_first=100)
    with pytest.raises(UserError, match="failed after 3 attempts.*HTTP 500"):
        dl.download_url(server.url + "/f.txt", tmp_path / "f.txt", retries=2)
    assert len(server.log) == 3 and sleeps == [1.0, 2.0] and not (tmp_path / "f.txt").exists()


def test_404_is_not_retried(server, tmp_path, sleeps):
    with pytest.raises(UserError, match="HTTP 404"):
        dl.download_url(server.url + "/missing.txt", tmp_path / "f.txt")
    assert len(server.log) == 1 and sleeps == [] and list(tmp_path.iterdir()) == []


def test_connection_refused_before_any_byte_is_one_immediate_error(tmp_path, sleeps):
    # A port nobody listens on: bind one, note it, close it. Nothing started, so no retry storm (issue 28);
    # test_offline.py checks that a refusal while resuming a .part is still retried.
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(dl.Unreachable, match="connection refused"):
        dl.download_url(f"http://127.0.0.1:{port}/f.txt", tmp_path / "f.txt", retries=1)
    assert sleeps == [] and list(tmp_path.iterdir()) == []


def test_gzip_source_is_verified_then_decompressed(server, tmp_path, sleeps):
    gz = gzip.compress(BODY, mtime=0)
    server.routes["/f.txt.gz"] = Route(gz, drop_first=1)
    out = tmp_path / "f.txt"
    res = dl.download_url(server.url + "/f.txt.gz", out, sha256=hashlib.sha256(gz).hexdigest(), gunzip=True)
    assert out.read_bytes() == BODY and res.sha256 == SHA and res.source_sha256 == hashlib.sha256(gz).hexdigest()
    assert server.log[1][1] == f"bytes={len(gz) // 2}-"  # the compressed stream resumed
    assert leftovers(out) == ["f.txt", "f.txt.sha256"]
    assert dl.download_url(server.url + "/f.txt.gz", out, gunzip=True).status == "skipped"
    # Stopped after decompressing but before the record was written: the .part marks it unfinished.
    dl.record_path(out).unlink()
    dl.part_path(out).write_bytes(gz)
    out.write_bytes(BODY[:100])
    res = dl.download_url(server.url + "/f.txt.gz", out, gunzip=True)
    assert res.status == "downloaded" and out.read_bytes() == BODY and leftovers(out) == ["f.txt", "f.txt.sha256"]


def test_bad_gzip_is_removed(server, tmp_path, sleeps):
    server.routes["/f.txt.gz"] = Route(b"not gzip at all" * 100)
    with pytest.raises(UserError, match="not a valid gzip"):
        dl.download_url(server.url + "/f.txt.gz", tmp_path / "f.txt", gunzip=True)
    assert list(tmp_path.iterdir()) == []


def test_skip_when_complete_and_detect_corruption(server, tmp_path, sleeps):
    server.routes["/f.txt"] = Route(BODY)
    out = tmp_path / "f.txt"
    dl.download_url(server.url + "/f.txt", out)
    assert dl.download_url(server.url + "/f.txt", out).status == "skipped"
    assert len(server.log) == 1  # skipped without contacting the server
    # Same bytes, new mtime: re-hashed once, still fine, record refreshed.
    os.utime(out, ns=(1, 1))
    assert dl.download_url(server.url + "/f.txt", out).status == "skipped"
    assert json.loads(dl.record_path(out).read_text())["mtime_ns"] == 1
    # Same size, different bytes: corruption is reported, not used.
    out.write_bytes(b"X" + BODY[1:])
    with pytest.raises(UserError, match="corrupted: sha256"):
        dl.download_url(server.url + "/f.txt", out)
    out.write_bytes(BODY[:-1])
    with pytest.raises(UserError, match="corrupted: .* bytes"):
        dl.download_url(server.url + "/f.txt", out)
    res = dl.download_url(server.url + "/f.txt", out, force=True)
    assert res.status == "downloaded" and out.read_bytes() == BODY and len(server.log) == 2


def test_existing_file_without_record_is_not_overwritten(server, tmp_path, sleeps):
    server.routes["/f.txt"] = Route(BODY)
    (tmp_path / "f.txt").write_text("mine")
    with pytest.raises(UserError, match="`force`"):
        dl.download_url(server.url + "/f.txt", tmp_path / "f.txt")
    assert (tmp_path / "f.txt").read_text() == "mine" and server.log == []


def test_file_url_source(tmp_path, sleeps):
    src = tmp_path / "src.txt"
    src.write_bytes(BODY)
    out = tmp_path / "out" / "copy.txt"
    dl.part_path(out).parent.mkdir()
    dl.part_path(out).write_bytes(b"stale partial bytes")  # file:// has no Range: restarted, not appended
    res = dl.download_url(src.as_uri(), out, sha256=SHA)
    assert out.read_bytes() == BODY and res.verified and not dl.part_path(out).exists()
    with pytest.raises(UserError, match="cannot read"):
        dl.download_url((tmp_path / "nope.txt").as_uri(), tmp_path / "x.txt")
    assert sleeps == []


def test_registry_urls_and_endpoint_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    plan = dl.plan_dataset("tinystories", "valid", root=tmp_path)
    assert [(p.url, p.dest) for p in plan] == [(
        "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-valid.txt",
        tmp_path / "tinystories" / "valid.txt")]
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example/")
    plan = dl.plan_dataset("gpt2-tokenizer", "train", root=tmp_path)  # no split: always both files
    assert [p.url for p in plan] == ["https://mirror.example/openai-community/gpt2/resolve/main/vocab.json",
                                     "https://mirror.example/openai-community/gpt2/resolve/main/merges.txt"]
    owt = dl.plan_dataset("owt", "all", root=tmp_path, endpoint=str(tmp_path))  # a local directory works too
    assert owt[0].url == f"{tmp_path.as_uri()}/datasets/stanford-cs336/owt-sample/resolve/main/owt_train.txt.gz"
    assert owt[0].gunzip and owt[0].dest == tmp_path / "owt" / "train.txt"
    for f in (f for d in dl.DATASETS.values() for f in d.files):  # recorded values must be well-formed
        assert f.sha256 is None or (len(f.sha256) == 64 and f.sha256 == f.sha256.lower())
        assert f.size is None or f.size > 0


# ----------------------------------------------------------------------------- CLI

@pytest.fixture
def no_registry_hashes(monkeypatch):
    """The test server serves fake bytes: drop any recorded checksums from the registry."""
    for n, d in list(dl.DATASETS.items()):  # the one registry dict every module reads
        files = tuple(dataclasses.replace(f, sha256=None, size=None) for f in d.files)
        monkeypatch.setitem(dl.DATASETS, n, dataclasses.replace(d, files=files))


def test_cli_dataset_from_endpoint(server, tmp_path, capsys, monkeypatch, sleeps, no_registry_hashes):
    base = "/datasets/roneneldan/TinyStories/resolve/main/"
    server.routes[base + "TinyStoriesV2-GPT4-train.txt"] = Route(BODY, drop_first=1)
    server.routes[base + "TinyStoriesV2-GPT4-valid.txt"] = Route(BODY[:5000])
    owt = "/datasets/stanford-cs336/owt-sample/resolve/main/"
    server.routes[owt + "owt_valid.txt.gz"] = Route(gzip.compress(BODY[:7000]))
    server.routes["/openai-community/gpt2/resolve/main/vocab.json"] = Route(b'{"a": 0}')
    server.routes["/openai-community/gpt2/resolve/main/merges.txt"] = Route(b"#version: 0.2\n")

    assert main(["download", "tinystories", "--dir", str(tmp_path), "--endpoint", server.url, "--split", "valid"]) == 0
    assert (tmp_path / "tinystories" / "valid.txt").read_bytes() == BODY[:5000]
    assert not (tmp_path / "tinystories" / "train.txt").exists()
    assert hashlib.sha256(BODY[:5000]).hexdigest() in capsys.readouterr().out  # the computed hash is printed

    assert main(["download", "tinystories", "--dir", str(tmp_path), "--endpoint", server.url]) == 0
    assert (tmp_path / "tinystories" / "train.txt").read_bytes() == BODY
    assert "skipped" in capsys.readouterr().out  # valid.txt was already complete
    train_requests = [r for path, r in server.log if path.endswith("train.txt")]
    assert train_requests == [None, f"bytes={len(BODY) // 2}-"]  # dropped, then resumed

    monkeypatch.setenv("HF_ENDPOINT", server.url)
    assert main(["download", "owt", "--dir", str(tmp_path), "--split", "valid"]) == 0
    assert (tmp_path / "owt" / "valid.txt").read_bytes() == BODY[:7000]
    assert main(["download", "gpt2-tokenizer", "--dir", str(tmp_path)]) == 0
    assert (tmp_path / "gpt2-tokenizer" / "merges.txt").read_bytes() == b"#version: 0.2\n"
    assert (tmp_path / "gpt2-tokenizer" / "vocab.json").read_bytes() == b'{"a": 0}'


def test_cli_url_mode(server, tmp_path, capsys, sleeps):
    server.routes["/c.txt"] = Route(BODY)
    out = tmp_path / "corpus.txt"
    assert main(["download", server.url + "/c.txt", "--out", str(out), "--sha256", SHA.upper()]) == 0
    assert out.read_bytes() == BODY and "verified" in capsys.readouterr().out


def test_cli_wrong_sha256_exits_2_with_both_hashes(server, tmp_path, capsys, sleeps):
    server.routes["/c.txt"] = Route(BODY)
    out = tmp_path / "corpus.txt"
    assert main(["download", server.url + "/c.txt", "--out", str(out), "--sha256", "0" * 64]) == 2
    err = capsys.readouterr().err
    assert SHA in err and "0" * 64 in err
    assert list(tmp_path.iterdir()) == []


def test_cli_404_is_one_line_exit_2(server, tmp_path, capsys, sleeps):
    assert main(["download", server.url + "/missing.txt", "--out", str(tmp_path / "x.txt")]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "HTTP 404" in lines[0] and "error" in lines[0]


def test_cli_user_errors(tmp_path, capsys):
    assert main(["download", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and all(n in err for n in dl.DATASETS)
    assert main(["download", "http://127.0.0.1:9/x.txt"]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["download", "tinystories", "--split", "test", "--dir", str(tmp_path)]) == 2
    assert "train, valid, all" in capsys.readouterr().err
    assert main(["download", "file:///x", "--out", str(tmp_path / "x"), "--sha256", "xyz"]) == 2
    assert "64 hex" in capsys.readouterr().err
    assert main(["download", "--list"]) == 0
    assert "gpt2-tokenizer" in capsys.readouterr().out


def test_cli_ctrl_c_keeps_part_and_says_so(tmp_path, capsys, monkeypatch):
    part = tmp_path / "x.txt.part"

    def interrupted(pf, **kw):
        raise dl.DownloadInterrupted(part, 1234)

    monkeypatch.setattr(dl, "download_planned", interrupted)
    assert main(["download", "file:///nowhere.txt", "--out", str(tmp_path / "x.txt")]) == 130
    err = capsys.readouterr().err
    assert "x.txt.part" in err and "resume" in err


def test_library_names_parameters_and_the_cli_names_flags(tmp_path, capsys):
    """Library messages name the parameter in backticks (issue 25); the CLI prints the flag in its place."""
    with pytest.raises(UserError, match=r"^`sha256` must be 64 hex digits"):
        dl.download_url("file:///x", tmp_path / "x", "xyz")
    with pytest.raises(UserError, match=r"pass a URL with `out` FILE"):
        dl.get_dataset("nosuch")
    assert main(["download", "file:///x", "--out", str(tmp_path / "x"), "--sha256", "xyz"]) == 2
    assert "error: --sha256 must be 64 hex digits" in capsys.readouterr().err
    assert main(["download", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "pass a URL with --out FILE" in err and "`" not in err.partition("`hf-model REPO`")[2]
