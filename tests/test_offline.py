"""Offline is a first-class case: the TinyStories sample that ships inside the package, `tslm quickstart`
falling back to it when the download cannot start, and `tslm download` failing fast (one line, no retry storm)
when a host cannot be reached."""

from __future__ import annotations

import hashlib
import socket
import time
from pathlib import Path

import pytest

from tinystories_cli import download as dl
from tinystories_cli import quickstart as qs
from tinystories_cli import sample

UNRESOLVABLE = "http://nonexistent.invalid"   # .invalid never resolves (RFC 2606)


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens once the socket is closed: connection refused


def test_the_sample_is_package_data_with_its_licence_and_source():
    packed = sample.bundled().read_bytes()          # through importlib.resources, as from an installed wheel
    assert hashlib.sha256(packed).hexdigest() == sample.XZ_SHA256
    assert 900_000 < len(packed) < 1_300_000
    text = sample.read_sample()
    assert len(text) == sample.TEXT_SIZE and hashlib.sha256(text).hexdigest() == sample.TEXT_SHA256
    assert text.count(b"<|endoftext|>") == 6039
    assert "Community Data License Agreement - Sharing - Version 1.0" in sample.bundled(sample.LICENSE).read_text()
    note = sample.bundled(sample.SOURCE_NOTE).read_text()
    assert "CDLA-Sharing-1.0" in note and sample.TEXT_SHA256 in note


def test_pyproject_ships_the_bundled_files():
    import tomllib
    conf = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    globs = conf["tool"]["setuptools"]["package-data"]["tinystories_cli"]
    import fnmatch
    for name in (sample.RESOURCE, sample.LICENSE, sample.SOURCE_NOTE):
        assert any(fnmatch.fnmatch(f"bundled/{name}", g) for g in globs), name


def test_a_damaged_sample_is_an_error_not_another_text(monkeypatch, tmp_path: Path):
    bad = tmp_path / "x.xz"
    good = sample.bundled().read_bytes()
    bad.write_bytes(good[:-10] + b"0123456789")
    monkeypatch.setattr(sample, "bundled", lambda name=sample.RESOURCE: bad)
    with pytest.raises(ValueError, match="damaged"):
        sample.read_sample()


def test_extract_sample_writes_once_and_verifies(tmp_path: Path):
    dest = tmp_path / "d" / "s.txt"
    assert sample.extract_sample(dest) == (dest, "done")
    assert sample.extract_sample(dest) == (dest, "skipped")
    dest.write_bytes(b"changed")
    assert sample.extract_sample(dest) == (dest, "done")
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == sample.TEXT_SHA256


@pytest.mark.parametrize("endpoint", [UNRESOLVABLE, "closed"])
def test_download_without_a_network_fails_at_once_in_one_line(tmp_path: Path, run_cli, endpoint):
    endpoint = _closed_port() if endpoint == "closed" else endpoint
    t = time.monotonic()
    code, out, err = run_cli("download", "tinystories", "--split", "valid", "--dir", str(tmp_path / "data"),
                             "--endpoint", endpoint)
    elapsed = time.monotonic() - t
    assert code == 2 and elapsed < 5, (elapsed, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = " ".join(lines)
    assert "cannot reach" in line and endpoint.split("//")[1] in line
    assert "--text" in line and "file://" in line and "--endpoint" in line and "HF_ENDPOINT" in line
    assert "attempts" not in line and ".part" not in line
    assert not list((tmp_path / "data").rglob("*.part"))  # nothing to resume, nothing left behind


def test_download_url_unreachable_raises_unreachable(tmp_path: Path):
    with pytest.raises(dl.Unreachable):
        dl.download_url(_closed_port() + "/x.txt", tmp_path / "x.txt", sleep=lambda s: pytest.fail("retried"))


def test_download_takes_a_plain_local_path(tmp_path: Path, run_cli, monkeypatch):
    src = tmp_path / "my text.txt"
    src.write_text("hello\n")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli("download", "my text.txt", "--out", str(tmp_path / "copy.txt"))
    assert code == 0, err
    assert (tmp_path / "copy.txt").read_text() == "hello\n"
    code, out, err = run_cli("download", str(src), "--out", str(tmp_path / "copy2.txt"))
    assert code == 0 and (tmp_path / "copy2.txt").read_text() == "hello\n"
    code, out, err = run_cli("download", "./missing.txt", "--out", str(tmp_path / "copy3.txt"))
    assert code == 2 and "missing.txt" in err and len(err.strip().splitlines()) == 1


def test_download_registry_with_out_names_no_placeholder(run_cli, tmp_path: Path):
    code, out, err = run_cli("download", "tinystories", "--out", str(tmp_path / "x.txt"))
    assert code == 2 and "{" not in err and "DIR/tinystories/" in err


def test_quickstart_offline_falls_back_to_the_bundled_sample(tmp_path: Path, monkeypatch):
    import torch
    torch.set_num_threads(1)
    events: list[tuple[float, str, str]] = []
    t0 = time.monotonic()
    opts = qs.QuickstartOptions(minutes=0.05, workdir=tmp_path, vocab_size=260, device="cpu", preset="debug",
                                endpoint=UNRESOLVABLE, max_new_tokens=8, temperature=0.8, top_p=0.95, display="quiet")
    r = qs.run_quickstart(opts, lambda stage, msg: events.append((time.monotonic() - t0, stage, msg)))
    when, stage, msg = events[0]
    assert stage == "text" and when < 5, events[0]
    assert "cannot reach nonexistent.invalid" in msg and "bundled" in msg and "--text" in msg
    assert sum(s == "text" for _, s, _ in events) == 1   # one line
    assert r.stages["text"] == "bundled" and r.story.startswith(qs.DEFAULT_PROMPT)
    assert hashlib.sha256(r.source.read_bytes()).hexdigest() == sample.TEXT_SHA256
    # the held-out split stays disjoint from the training text
    sep = "<|endoftext|>"
    train = {d.strip() for d in r.train_text.read_text().split(sep) if d.strip()}
    valid = {d.strip() for d in r.valid_text.read_text().split(sep) if d.strip()}
    assert valid and not (train & valid)
    # a second offline run reuses the extracted sample and every stage
    r2 = qs.run_quickstart(opts)
    assert r2.stages["text"] == "bundled" and r2.stages["split"] == "skipped"


def test_a_refusal_while_resuming_is_retried_and_keeps_the_part(tmp_path: Path):
    url = _closed_port() + "/f.txt"
    out = tmp_path / "f.txt"
    part = dl.part_path(out)
    part.write_bytes(b"first half")
    dl.origin_path(part).write_text(dl.Origin(url, None, None, 20, None).to_json())
    sleeps: list[float] = []
    with pytest.raises(ValueError, match="failed after 2 attempts") as e:
        dl.download_url(url, out, retries=1, sleep=sleeps.append)
    assert sleeps == [1.0] and "resume from f.txt.part" in str(e.value)
    assert part.read_bytes() == b"first half"


def test_readme_documents_offline_use_and_trains_on_no_held_out_file():
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    assert "Offline, or your own text" in readme
    training = [
        ln
        for ln in readme.splitlines()
        if "tinystories_valid.txt" in ln and ("--text" in ln or "train" in ln.split("#")[0])
    ]
    for f in (root / "examples").iterdir():
        training += [ln for ln in f.read_text(encoding="utf-8").splitlines() if "tinystories_valid.txt" in ln]
    assert not training, training
