"""`tslm download` never loses or corrupts a file: links, foreign .part files, changed files on the
server, --force, gzip bombs, redirects, stalls and the sha256 a Hugging Face server publishes.

Network only to the local HTTP server of test_download.py (127.0.0.1, ephemeral port).
"""

from __future__ import annotations

import email.message
import gzip
import hashlib
import io
import json
import os
import time
import urllib.request

import pytest

from tinystories_cli import download as dl
from tinystories_cli.cli import main
from tinystories_cli.errors import UserError

from download_server import BODY, SHA, Route, interrupt_at, leftovers, write_origin
from train_fixtures import one_error_line

NEW_BODY = BODY.replace(b"Once", b"Twice")
NEW_SHA = hashlib.sha256(NEW_BODY).hexdigest()


# ----------------------------------------------------------------------------- links and odd files

def test_symlinked_part_is_refused_and_its_target_untouched(server, tmp_path, sleeps):
    server.routes["/f.txt"] = Route(BODY)
    victim = tmp_path / "precious.txt"
    victim.write_bytes(b"do not touch")
    out = tmp_path / "f.txt"
    dl.part_path(out).symlink_to(victim)
    with pytest.raises(UserError, match="symbolic link"):
        dl.download_url(server.url + "/f.txt", out)
    assert victim.read_bytes() == b"do not touch" and not out.exists()
    assert dl.part_path(out).is_symlink() and server.log == []  # refused before any request, link left as it was


def test_hard_linked_fifo_and_directory_part_are_refused(server, tmp_path, sleeps):
    server.routes["/f.txt"] = Route(BODY)
    out = tmp_path / "f.txt"
    victim = tmp_path / "precious.txt"
    victim.write_bytes(b"do not touch")
    os.link(victim, dl.part_path(out))
    with pytest.raises(UserError, match="hard links"):
        dl.download_url(server.url + "/f.txt", out)
    assert victim.read_bytes() == b"do not touch"
    dl.part_path(out).unlink()
    os.mkfifo(dl.part_path(out))
    with pytest.raises(UserError, match="not a regular file"):
        dl.download_url(server.url + "/f.txt", out)
    dl.part_path(out).unlink()
    dl.part_path(out).mkdir()
    with pytest.raises(UserError, match="not a regular file"):
        dl.download_url(server.url + "/f.txt", out)
    assert server.log == []


def test_symlinked_destination_is_refused_even_with_force(server, tmp_path, sleeps, capsys):
    server.routes["/f.txt"] = Route(BODY)
    target = tmp_path / "elsewhere.txt"
    target.write_bytes(b"mine")
    out = tmp_path / "f.txt"
    out.symlink_to(target)
    for force in (False, True):
        with pytest.raises(UserError, match="symbolic link"):
            dl.download_url(server.url + "/f.txt", out, force=force)
        assert target.read_bytes() == b"mine" and out.is_symlink()
    assert main(["download", server.url + "/f.txt", "--out", str(out), "--force"]) == 2
    assert "symbolic link" in one_error_line(capsys.readouterr().err)
    assert server.log == [] and leftovers(out) == ["f.txt"]


def test_a_running_download_locks_its_part(server, tmp_path, sleeps):
    server.routes["/f.txt"] = Route(BODY)
    out = tmp_path / "f.txt"
    with dl._locked_part(dl.part_path(out)):
        with pytest.raises(UserError, match="another tslm download"):
            dl.download_url(server.url + "/f.txt", out)
    assert server.log == []
    dl.download_url(server.url + "/f.txt", out)
    assert out.read_bytes() == BODY


def test_stale_temp_files_of_this_download_are_removed(server, tmp_path, sleeps):
    server.routes["/f.txt"] = Route(BODY)
    out = tmp_path / "f.txt"
    stale = [
        tmp_path / ".f.txt.abcd1234.tmp",
        tmp_path / ".f.txt.sha256.x_y_z_12.tmp",
        tmp_path / ".f.txt.part.json.qwertyui.tmp",
    ]
    others = [tmp_path / ".g.txt.abcd1234.tmp", tmp_path / ".f.txt.notours.tmp"]
    for p in stale + others:
        p.write_bytes(b"x")
    dl.download_url(server.url + "/f.txt", out)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in others)


# ----------------------------------------------------------------------------- the .part's origin

def test_origin_is_recorded_and_resume_sends_if_range(server, tmp_path, sleeps):
    server.routes["/f.txt"] = Route(BODY)
    out = tmp_path / "f.txt"

    with pytest.raises(dl.DownloadInterrupted):
        dl.download_url(server.url + "/f.txt", out, progress=interrupt_at(40_000), chunk_size=8192)
    origin = json.loads(dl.origin_path(dl.part_path(out)).read_text())
    assert origin == {"version": 1, "url": server.url + "/f.txt", "etag": Route(BODY).current_etag(),
                      "last_modified": None, "size": len(BODY), "sha256": None}
    res = dl.download_url(server.url + "/f.txt", out)
    assert out.read_bytes() == BODY and res.resumed_from >= 40000
    assert server.if_range_log[-1] == Route(BODY).current_etag() and server.log[-1][1] == f"bytes={res.resumed_from}-"
    assert leftovers(out) == ["f.txt", "f.txt.sha256"]  # origin removed with the .part


@pytest.mark.parametrize(
    "origin",
    [
        None,  # no sidecar at all
        {
            "version": 1,
            "url": "http://127.0.0.1:1/other.txt",
            "etag": None,
            "last_modified": None,
            "size": None,
            "sha256": None,
        },
        {"version": 1, "url": "URL", "etag": 5, "last_modified": None, "size": None, "sha256": None},  # wrong type
        {"version": 1, "url": "URL", "etag": None, "last_modified": None, "size": -3, "sha256": None},  # out of range
        {
            "version": 2,
            "url": "URL",
            "etag": None,
            "last_modified": None,
            "size": None,
            "sha256": None,
        },  # unknown version
        "[" * 100000,  # deeply nested: no RecursionError
    ],
)
def test_foreign_part_is_discarded_never_spliced(server, tmp_path, sleeps, origin):
    server.routes["/f.txt"] = Route(BODY)
    out = tmp_path / "f.txt"
    foreign = b"Some other file entirely. " * 1000  # shorter than BODY: a Range request would append the tail
    dl.part_path(out).write_bytes(foreign)
    side = dl.origin_path(dl.part_path(out))
    if isinstance(origin, dict):
        side.write_text(json.dumps({**origin, "url": origin["url"].replace("URL", server.url + "/f.txt")}))
    elif isinstance(origin, str):
        side.write_text(origin)
    res = dl.download_url(server.url + "/f.txt", out)
    assert out.read_bytes() == BODY and res.sha256 == SHA and res.resumed_from == len(foreign)
    assert server.log == [("/f.txt", None)]  # fetched from the first byte
    assert json.loads(dl.record_path(out).read_text())["sha256"] == SHA
    assert leftovers(out) == ["f.txt", "f.txt.sha256"]


def test_changed_file_on_server_if_range_answers_200_and_restarts(server, tmp_path, sleeps):
    out = tmp_path / "f.txt"
    half = len(BODY) // 2
    dl.part_path(out).write_bytes(BODY[:half])
    write_origin(out, server.url + "/f.txt", Route(BODY).current_etag(), len(BODY))
    server.routes["/f.txt"] = Route(NEW_BODY)  # the file changed since: new ETag, honours If-Range
    res = dl.download_url(server.url + "/f.txt", out)
    assert out.read_bytes() == NEW_BODY and res.sha256 == NEW_SHA
    assert server.log == [("/f.txt", f"bytes={half}-")] and server.if_range_log == [Route(BODY).current_etag()]


def test_changed_etag_on_a_206_is_discarded(server, tmp_path, sleeps):
    # A server that honours Range but ignores If-Range: the ETag of its 206 gives the change away.
    out = tmp_path / "f.txt"
    half = len(BODY) // 2
    dl.part_path(out).write_bytes(BODY[:half])
    write_origin(out, server.url + "/f.txt", '"old-version"', len(BODY))
    server.routes["/f.txt"] = Route(NEW_BODY, etag='"new-version"', if_range=False)
    res = dl.download_url(server.url + "/f.txt", out)
    assert out.read_bytes() == NEW_BODY and res.sha256 == NEW_SHA
    assert [r for _, r in server.log] == [f"bytes={half}-", None] and sleeps == [dl.BACKOFF]


def test_changed_size_on_a_206_is_discarded(server, tmp_path, sleeps):
    out = tmp_path / "f.txt"
    half = len(BODY) // 2
    dl.part_path(out).write_bytes(BODY[:half])
    write_origin(out, server.url + "/f.txt", None, len(BODY) + 10)  # no validator; the size changed
    server.routes["/f.txt"] = Route(BODY, etag=None)
    res = dl.download_url(server.url + "/f.txt", out)
    assert out.read_bytes() == BODY and res.sha256 == SHA
    assert [r for _, r in server.log] == [f"bytes={half}-", None]


# ----------------------------------------------------------------------------- --force

def test_force_that_fails_keeps_the_good_file(server, tmp_path, sleeps, capsys):
    server.routes["/f.txt"] = Route(BODY)
    out = tmp_path / "f.txt"
    dl.download_url(server.url + "/f.txt", out)
    record = dl.record_path(out).read_bytes()
    for broken in (Route(BODY, status=404), Route(BODY, fail_first=100), Route(NEW_BODY)):
        server.routes["/f.txt"] = broken
        sha = SHA if broken.body is NEW_BODY else None  # NEW_BODY fails its --sha256 check
        with pytest.raises(UserError):
            dl.download_url(server.url + "/f.txt", out, sha, force=True, retries=1)
        assert out.read_bytes() == BODY and dl.record_path(out).read_bytes() == record
        assert leftovers(out) == ["f.txt", "f.txt.sha256"]
    assert dl.download_url(server.url + "/f.txt", out).status == "skipped"
    server.routes["/f.txt"] = Route(NEW_BODY)
    assert main(["download", server.url + "/f.txt", "--out", str(out), "--force"]) == 0
    assert out.read_bytes() == NEW_BODY and json.loads(dl.record_path(out).read_text())["sha256"] == NEW_SHA


def test_force_interrupted_keeps_the_good_file_and_resumes(server, tmp_path, sleeps):
    server.routes["/f.txt"] = Route(BODY)
    out = tmp_path / "f.txt"
    dl.download_url(server.url + "/f.txt", out)
    server.routes["/f.txt"] = Route(NEW_BODY)

    with pytest.raises(dl.DownloadInterrupted):
        dl.download_url(server.url + "/f.txt", out, force=True, progress=interrupt_at(40_000), chunk_size=8192)
    assert out.read_bytes() == BODY  # still the old, good file
    assert dl.download_url(server.url + "/f.txt", out).status == "skipped"  # complete: the stray .part is tidied
    assert leftovers(out) == ["f.txt", "f.txt.sha256"]


# ----------------------------------------------------------------------------- gzip

BOMB = gzip.compress(b"\0" * 3_000_000, mtime=0)


def test_gzip_bomb_stops_at_the_cap_and_keeps_the_verified_gz(server, tmp_path, sleeps):
    server.routes["/b.gz"] = Route(BOMB)
    out = tmp_path / "b.txt"
    with pytest.raises(UserError, match="exceeds 100000 bytes .*registry"):
        dl.download_url(server.url + "/b.gz", out, gunzip=True, max_unpacked=100_000, chunk_size=8192)
    assert leftovers(out) == ["b.txt.part", "b.txt.part.json"] and dl.part_path(out).read_bytes() == BOMB
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # the partial output is gone
    with pytest.raises(UserError, match="exceeds 200000 bytes .*`max_bytes`"):
        dl.download_url(server.url + "/b.gz", out, gunzip=True, max_unpacked=10**9, max_bytes=200_000)
    res = dl.download_url(server.url + "/b.gz", out, gunzip=True, max_unpacked=4_000_000)
    assert res.size == 3_000_000 and res.source_sha256 == hashlib.sha256(BOMB).hexdigest()
    assert server.log[-1][1] == f"bytes={len(BOMB)}-"  # the kept .gz was not downloaded again
    assert leftovers(out) == ["b.txt", "b.txt.sha256"]


def test_cli_gzip_bomb_is_one_line_exit_2(server, tmp_path, capsys, monkeypatch, sleeps):
    import dataclasses
    owt = dl.DATASETS["owt"]
    files = tuple(dataclasses.replace(f, sha256=None, size=None) for f in owt.files)
    monkeypatch.setitem(dl.DATASETS, "owt", dataclasses.replace(owt, files=files))
    server.routes["/datasets/stanford-cs336/owt-sample/resolve/main/owt_valid.txt.gz"] = Route(BOMB)
    args = ["download", "owt", "--split", "valid", "--dir", str(tmp_path), "--endpoint", server.url]
    assert main(args + ["--max-bytes", "50000"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "gzip bomb" in line and "50000" in line
    assert sorted(p.name for p in (tmp_path / "owt").iterdir()) == ["valid.txt.part", "valid.txt.part.json"]
    assert main(args) == 0  # the registry's cap (1 GB) lets 3 MB through
    assert (tmp_path / "owt" / "valid.txt").stat().st_size == 3_000_000


def test_registry_gz_entries_have_a_cap():
    for d in dl.DATASETS.values():
        for f in d.files:
            assert not f.gunzip or (f.max_unpacked is not None and f.max_unpacked > 0)


def test_max_bytes_caps_a_plain_download(server, tmp_path, sleeps):
    server.routes["/f.txt"] = Route(BODY)
    with pytest.raises(UserError, match="over the limit of 1000"):
        dl.download_url(server.url + "/f.txt", tmp_path / "f.txt", max_bytes=1000)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- integrity and stalls

def _headers(**kv) -> email.message.Message:
    m = email.message.Message()
    for k, v in kv.items():
        m[k] = v
    return m


def test_https_to_http_redirect_is_refused():
    guard = dl._RedirectGuard()
    fp = io.BytesIO(b"")
    req = urllib.request.Request("https://hub.example/m/resolve/main/model.safetensors")
    with pytest.raises(UserError, match="downgrades https to http"):
        guard.redirect_request(req, fp, 302, "Found", _headers(Location="http://cdn.example/x"), "http://cdn.example/x")
    assert fp.closed
    ok = guard.redirect_request(req, io.BytesIO(), 302, "Found", _headers(Location="https://cdn.example/x"),
                                "https://cdn.example/x")
    assert ok.full_url == "https://cdn.example/x"
    plain = urllib.request.Request("http://127.0.0.1/x")
    assert guard.redirect_request(plain, io.BytesIO(), 302, "Found", _headers(), "http://127.0.0.1/y").full_url.endswith("/y")


def test_trickling_server_is_a_stall_not_a_hang(server, tmp_path, sleeps):
    server.routes["/f.txt"] = Route(BODY, trickle=0.05)  # one byte every 50 ms
    t0 = time.monotonic()
    with pytest.raises(UserError, match="stalled"):
        dl.download_url(server.url + "/f.txt", tmp_path / "f.txt", idle_timeout=0.4, retries=1)
    assert time.monotonic() - t0 < 5 and sleeps == [dl.BACKOFF]
    part = dl.part_path(tmp_path / "f.txt")
    assert BODY.startswith(part.read_bytes())  # what arrived is kept for a resume


def test_trickled_response_headers_are_a_stall_not_a_hang(server, tmp_path, sleeps):
    server.routes["/f.txt"] = Route(BODY, slow_headers=0.05)  # every read returns within the socket timeout
    t0 = time.monotonic()
    with pytest.raises(UserError, match="no complete response headers within 0.4 s"):
        dl.download_url(server.url + "/f.txt", tmp_path / "f.txt", idle_timeout=0.4, retries=1)
    assert time.monotonic() - t0 < 5 and sleeps == [dl.BACKOFF] and list(tmp_path.iterdir()) == []


def test_lfs_sha256_published_by_the_server_is_verified(server, tmp_path, sleeps):
    server.routes["/m/resolve/main/w.bin"] = Route(b"", redirect="/cdn/w.bin", headers={
        "X-Linked-Etag": f'"{SHA}"', "X-Linked-Size": str(len(BODY))})
    server.routes["/cdn/w.bin"] = Route(BODY, drop_first=1)
    res = dl.download_url(server.url + "/m/resolve/main/w.bin", tmp_path / "w.bin")
    assert res.verified and res.sha256 == SHA and json.loads(dl.record_path(tmp_path / "w.bin").read_text())["verified"]
    # A server publishing another sha256 than the bytes it serves: refused, nothing kept.
    wrong = "0" * 64
    server.routes["/m/resolve/main/x.bin"] = Route(b"", redirect="/cdn/w.bin", headers={"X-Linked-Etag": f'"{wrong}"'})
    with pytest.raises(UserError, match=f"published by the server {wrong}, got {SHA}"):
        dl.download_url(server.url + "/m/resolve/main/x.bin", tmp_path / "x.bin")
    assert leftovers(tmp_path / "x.bin") == []


def test_lfs_sha_change_between_runs_discards_the_part(server, tmp_path, sleeps):
    out = tmp_path / "w.bin"
    dl.part_path(out).write_bytes(BODY[:1000])
    write_origin(out, server.url + "/m/w.bin", Route(NEW_BODY).current_etag(), len(NEW_BODY), sha256=SHA)
    # The same ETag (a server ignoring If-Range would resume): only the published sha256 changed.
    server.routes["/m/w.bin"] = Route(NEW_BODY, if_range=False, headers={"X-Linked-Etag": f'"{NEW_SHA}"'})
    res = dl.download_url(server.url + "/m/w.bin", out)
    assert out.read_bytes() == NEW_BODY and res.verified
    assert [r for _, r in server.log] == ["bytes=1000-", None]


def test_size_published_by_the_server_is_checked(server, tmp_path, sleeps):
    server.routes["/m/resolve/main/w.bin"] = Route(
        b"", redirect="/cdn/w.bin", headers={"X-Linked-Size": str(len(BODY) + 1)}
    )
    server.routes["/cdn/w.bin"] = Route(BODY)
    with pytest.raises(UserError, match=f"announces {len(BODY)} bytes but publishes a size of {len(BODY) + 1}"):
        dl.download_url(server.url + "/m/resolve/main/w.bin", tmp_path / "w.bin")
    assert list(tmp_path.iterdir()) == []


def test_odd_files_in_the_way_are_one_line(server, tmp_path, sleeps, capsys):
    server.routes["/f.txt"] = Route(BODY)
    out = tmp_path / "f.txt"
    dl.origin_path(dl.part_path(out)).mkdir()  # a directory where the origin file goes
    assert main(["download", server.url + "/f.txt", "--out", str(out)]) == 2
    assert "f.txt.part.json" in one_error_line(capsys.readouterr().err)
    assert not out.exists() and not dl.part_path(out).exists()
