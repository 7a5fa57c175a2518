"""Verified, resumable downloads: the dataset registry behind `tslm download`.

One file at a time, the life of a download is:

    <dest>.part       bytes arrive here. It is opened without following symlinks, must be a regular
                      file with one link, and is locked (flock) while a download writes it, so two
                      commands never append to the same .part.
    <dest>.part.json  the .part's origin, written atomically before its first byte: URL, ETag /
                      Last-Modified, expected size and the sha256 the server published (Hugging Face
                      LFS files). A resume sends `Range` + `If-Range`; a .part without a valid origin,
                      from another URL, or whose validators changed (the server answers 200 to the
                      If-Range, or a different ETag / size / published sha256) is discarded and
                      fetched again from the first byte, never spliced.
    verify            size against Content-Length, the registry and the server's X-Linked-Size; sha256
                      against the registry or --sha256 and against the sha256 the server publishes for
                      LFS files (X-Linked-Etag). On a mismatch the .part is deleted.
    <dest>            renamed into place only when complete and verified (with --force too: the old
                      file stays until the new one is verified). For .gz sources the verified .part
                      (the compressed bytes) is kept until the decompressed file is complete; the
                      decompression is capped (registry value or --max-bytes) so a gzip bomb stops.
    <dest>.sha256     a small JSON record beside the file: its sha256, size and mtime, and where it
                      came from. A later run trusts the file without re-reading it while size and
                      mtime are unchanged (hashing 2 GB is not instant); when either changed, it
                      re-hashes and reports a corrupted file instead of silently using it.

The destination is never written through a symlink: a destination that is a symlink is refused
(replacing it would silently undo a link the user made, e.g. onto a bigger disk; writing through it
would change a file outside the data directory). The final step is a rename, which replaces a
directory entry and never follows one.

Network errors, timeouts, stalls and HTTP 5xx/408/429 are retried with exponential backoff (1, 2,
4, ... seconds; a retry that made progress resets the count). A stall is an idle window
(`IDLE_TIMEOUT` seconds) in which fewer than `IDLE_MIN_BYTES` arrived, so a server trickling one byte
every 29 s does not hang the download. Other HTTP 4xx are a `UserError` at once, and so is a
redirect from https to http. A full disk is a `UserError` naming what was kept (a resumable .part and
its origin file). `file://` URLs and local directories work as sources/endpoints for offline copies.

Nothing here prints: callers pass a `progress(stage, done, total)` callback.

>>> url_for(DATASETS["tinystories"], "TinyStoriesV2-GPT4-valid.txt", "https://huggingface.co")
'https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-valid.txt'
>>> url_for(DATASETS["gpt2-tokenizer"], "vocab.json", "https://hf-mirror.example/")
'https://hf-mirror.example/openai-community/gpt2/resolve/main/vocab.json'
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gzip
import hashlib
import http.client
import json
import os
import re
import socket
import stat
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal, Optional

from tinystories_cli import __version__, paths
from tinystories_cli.errors import UserError
from tinystories_cli.fileio import atomic_write, atomic_write_text, fsync_dir, sha256_file

DEFAULT_ENDPOINT = "https://huggingface.co"
CHUNK_SIZE = 1 << 20
RETRIES = 5          # attempts after the first one, per stretch without progress
BACKOFF = 1.0        # seconds before the first retry; doubles each time
MAX_BACKOFF = 60.0
TIMEOUT = 30.0       # seconds a connect or a read may stall before it counts as a network error
IDLE_TIMEOUT = 60.0  # a window of this many seconds ...
IDLE_MIN_BYTES = 4096  # ... in which fewer bytes than this arrive is a stall (retried like a network error)
SLEEP = time.sleep   # the backoff pause when no `sleep` is passed (tests replace it)
ORIGIN_VERSION = 1
_DISK_FULL = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})

# progress(stage, done, total): stage is "download", "verify" or "decompress"; done/total in bytes
# (total None when the server does not say). For "download", done counts bytes already in the .part.
Progress = Callable[[str, int, Optional[int]], None]


# ----------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class RemoteFile:
    """One file of a registry entry.

    `sha256`/`size` describe the bytes as served (the compressed bytes for a .gz source). They are
    recorded only when known from a trustworthy source; None means "compute, print and record".
    `max_unpacked` caps the decompressed size of a .gz source (a gzip bomb stops there).
    """

    source: str                     # file name in the Hugging Face repo
    dest: str                       # file name under data/<dataset>/
    split: str | None = None        # "train" / "valid", or None: part of every --split
    sha256: str | None = None
    size: int | None = None
    gunzip: bool = False
    max_unpacked: int | None = None


@dataclass(frozen=True)
class Dataset:
    name: str
    repo: str
    repo_type: Literal["dataset", "model"]
    files: tuple[RemoteFile, ...]
    description: str


# Expected hashes: none recorded yet. This registry was written without network access, so no hash
# could be checked against the files as Hugging Face serves them today, and a wrong value would make
# every download fail. Sizes recorded below are those known independently of that:
#   gpt2 vocab.json: 1,042,301 bytes, the size of GPT-2's encoder.json; the copy in
#   stanford-cs336/assignment1-basics tests/fixtures (and ../shared/data/gpt2_vocab.json) has that size and
#   sha256 196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783 (a hash candidate).
#   gpt2 merges.txt: 456,318 bytes = the header-less copy in ../shared/data (456,304 bytes) + the Hub file's
#   14-byte "#version: 0.2\n" first line.
# Both GPT-2 files are pinned by sha256 too (issue 31), computed from those copies: vocab.json as it is (its size
# is the registry's), merges.txt as "#version: 0.2\n" + the ../shared/data copy (exactly the registry's size).
# Hugging Face LFS files are checked against the sha256 the Hub publishes for them in any case.
# The .gz caps are upper bounds with headroom over the documented unpacked sizes, not exact sizes.
GPT2_VOCAB_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
GPT2_MERGES_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset(
            "tinystories", "roneneldan/TinyStories", "dataset",
            (
                RemoteFile("TinyStoriesV2-GPT4-train.txt", "train.txt", "train"),   # ~2.2 GB
                RemoteFile("TinyStoriesV2-GPT4-valid.txt", "valid.txt", "valid"),   # ~22.5 MB
            ),
            "TinyStories V2 (GPT-4 stories), ~2.2 GB train + 22.5 MB valid",
        ),
        Dataset(
            "owt", "stanford-cs336/owt-sample", "dataset",
            (
                RemoteFile("owt_train.txt.gz", "train.txt", "train", gunzip=True,     # ~11.9 GB unpacked
                           max_unpacked=16 * 10**9),
                RemoteFile("owt_valid.txt.gz", "valid.txt", "valid", gunzip=True,     # ~290 MB unpacked
                           max_unpacked=1 * 10**9),
            ),
            "OpenWebText sample (CS336), gunzipped on the fly",
        ),
        Dataset(
            "gpt2-tokenizer", "openai-community/gpt2", "model",
            (RemoteFile("vocab.json", "vocab.json", sha256=GPT2_VOCAB_SHA256, size=1_042_301),
             RemoteFile("merges.txt", "merges.txt", sha256=GPT2_MERGES_SHA256, size=456_318)),
            "GPT-2's vocab.json + merges.txt (for Tokenizer.from_files)",
        ),
    )
}
SPLIT_CHOICES = ("train", "valid", "all")
HF_MODEL = "hf-model"  # `tslm download hf-model REPO`: not a registry entry, a Hugging Face model repo


@dataclass(frozen=True)
class PlannedFile:
    """One concrete download: where from, where to, and what to expect."""

    url: str
    dest: Path
    sha256: str | None = None
    size: int | None = None
    gunzip: bool = False
    max_unpacked: int | None = None


def get_dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}",
                        f"choose one of: {', '.join(DATASETS)}; or `{HF_MODEL} REPO`; or pass a URL with --out FILE")
    return DATASETS[name]


def resolve_endpoint(endpoint: str | None = None) -> str:
    """--endpoint, else $HF_ENDPOINT, else huggingface.co. A local directory becomes a file:// URL.

    >>> resolve_endpoint("https://hf-mirror.com/")
    'https://hf-mirror.com'
    """
    ep = endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT
    if "://" not in ep:
        p = Path(ep).expanduser()
        if not p.is_dir():
            raise UserError(f"endpoint {ep!r} is neither a URL nor a directory", "pass e.g. https://hf-mirror.com or a local mirror directory")
        ep = p.resolve().as_uri()
    return ep.rstrip("/")


def url_for(ds: Dataset, filename: str, endpoint: str) -> str:
    """The Hub's "resolve" URL: datasets live under /datasets/, models at the top level."""
    prefix = "datasets/" if ds.repo_type == "dataset" else ""
    return f"{endpoint.rstrip('/')}/{prefix}{ds.repo}/resolve/main/{urllib.parse.quote(filename)}"


def plan_dataset(name: str, split: str = "all", root: str | os.PathLike | None = None,
                 endpoint: str | None = None) -> list[PlannedFile]:
    """The files `tslm download NAME` fetches, in the data/<dataset>/ layout the other commands read."""
    ds = get_dataset(name)
    if split not in SPLIT_CHOICES:
        raise UserError(f"unknown split {split!r}", f"choose one of: {', '.join(SPLIT_CHOICES)}")
    ep = resolve_endpoint(endpoint)
    out_dir = paths.dataset_dir(name, Path(root) if root is not None else None)
    return [
        PlannedFile(url_for(ds, f.source, ep), out_dir / f.dest, f.sha256, f.size, f.gunzip, f.max_unpacked)
        for f in ds.files
        if split == "all" or f.split in (None, split)
    ]


# ----------------------------------------------------------------------------- records (.sha256)

@dataclass
class DownloadResult:
    path: Path
    sha256: str                 # of the file at `path`
    size: int
    source_sha256: str          # of the bytes as served (differs from sha256 for gunzipped sources)
    status: Literal["downloaded", "skipped"]
    verified: bool              # True when source_sha256 was checked against an expected value
    resumed_from: int = 0       # bytes that were already in the .part when this run started


def part_path(dest: str | os.PathLike) -> Path:
    """Where the bytes of `dest` accumulate until complete (the compressed bytes for .gz sources)."""
    dest = Path(dest)
    return dest.with_name(dest.name + ".part")


def origin_path(part: str | os.PathLike) -> Path:
    """The .part's sidecar: where its bytes came from (URL and validators)."""
    part = Path(part)
    return part.with_name(part.name + ".json")


def record_path(dest: str | os.PathLike) -> Path:
    dest = Path(dest)
    return dest.with_name(dest.name + ".sha256")


_HEX64 = re.compile(r"[0-9a-f]{64}")




def _read_small_json(path: Path, limit: int = 1 << 16):
    """A small JSON file read without following a symlink; None when absent, oversized or malformed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
        return json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError, OSError):
        return None
    finally:
        os.close(fd)


def _write_record(dest: Path, *, sha256: str, source_sha256: str, source_size: int, url: str, verified: bool,
                  st: os.stat_result | None = None) -> None:
    # os.replace keeps size and mtime, so the record of a plain download is written from the .part
    # *before* its rename: a crash in between leaves the complete .part, which the next run finishes.
    st = st or dest.stat()
    rec = {
        "sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
        "source": url, "source_sha256": source_sha256, "source_size": source_size, "verified": verified,
    }
    atomic_write_text(record_path(dest), json.dumps(rec, indent=1) + "\n")


def same_source(recorded: object, url: str) -> bool:
    """Whether a record's source URL names the file `url` names: the same URL, or the same Hugging Face
    repo file ("<repo>/resolve/<revision>/<file>") through another endpoint (a mirror). A record without
    a source (an older tslm) is taken as the same.

    >>> same_source("https://huggingface.co/a/m/resolve/main/config.json", "https://hf-mirror.com/a/m/resolve/main/config.json")
    True
    >>> same_source("https://huggingface.co/a/m/resolve/main/config.json", "https://huggingface.co/b/m/resolve/main/config.json")
    False
    """
    if recorded is None:
        return True
    if not isinstance(recorded, str):
        return False
    if recorded == url:
        return True
    return _hub_path(recorded) is not None and _hub_path(recorded) == _hub_path(url)


def _hub_path(url: str) -> str | None:
    """"[datasets/]OWNER/NAME/resolve/REV/FILE" of a Hub resolve URL (endpoint removed), else None."""
    m = re.search(r"/((?:datasets/)?[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*/resolve/[^/]+/.+)$",
                  urllib.parse.urlsplit(url).path)
    return m.group(1) if m else None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _read_record(dest: Path) -> dict | None:
    rec = _read_small_json(record_path(dest))
    ok = (isinstance(rec, dict) and isinstance(rec.get("sha256"), str) and bool(_HEX64.fullmatch(rec["sha256"]))
          and _is_int(rec.get("size")) and isinstance(rec.get("mtime_ns"), int) and not isinstance(rec.get("mtime_ns"), bool)
          and isinstance(rec.get("source_sha256"), str) and bool(_HEX64.fullmatch(rec["source_sha256"])))
    return rec if ok else None


def check_complete(dest: str | os.PathLike, expected_sha256: str | None = None,
                   progress: Progress | None = None, url: str | None = None) -> DownloadResult | None:
    """A result when `dest` is a complete, verified download; None when it has to be fetched.

    Fast path: size and mtime equal to the record -> trusted without reading the file. Otherwise the
    file is re-hashed; the same hash -> trusted (the record's mtime is refreshed), a different one
    -> UserError (the file was changed or corrupted; --force downloads it again). While a .part
    exists, a file that does not match its record is an unfinished replacement: None (finish it).
    """
    dest = Path(dest)
    if os.path.islink(dest):
        raise UserError(f"{dest} is a symbolic link; a download never writes through or replaces a link",
                        "download to the link's target path instead (e.g. --dir on that disk), or remove the link")
    if not dest.exists():
        return None
    pending = os.path.lexists(part_path(dest))
    rec = _read_record(dest)
    if rec is None and pending:
        return None  # stopped between decompression/rename and the record: finish it
    if rec is None:
        raise UserError(f"{dest} exists but has no valid download record ({record_path(dest).name})",
                        "pass --force to download it again, or move the file away")
    if url is not None and not same_source(rec.get("source"), url):
        raise UserError(f"{dest} was downloaded from {rec.get('source')}, not from {url}",
                        "pass --force to replace it with this source's file, or choose another output")
    if expected_sha256 and rec["source_sha256"] != expected_sha256.lower():
        raise UserError(f"{dest} was downloaded with sha256 {rec['source_sha256']}, expected {expected_sha256.lower()}",
                        "pass --force to download it again")
    st = dest.stat()
    if st.st_size != rec["size"]:
        if pending:
            return None
        raise UserError(f"{dest} is corrupted: {st.st_size} bytes, {rec['size']} recorded in {record_path(dest).name}",
                        "pass --force to download it again")
    if st.st_mtime_ns != rec["mtime_ns"]:
        if pending:
            return None
        if progress:
            progress("verify", 0, st.st_size)
        actual = sha256_file(dest)
        if progress:
            progress("verify", st.st_size, st.st_size)
        if actual != rec["sha256"]:
            raise UserError(f"{dest} is corrupted: sha256 {actual}, {rec['sha256']} recorded in {record_path(dest).name}",
                            "pass --force to download it again")
        rec["mtime_ns"] = st.st_mtime_ns
        atomic_write_text(record_path(dest), json.dumps(rec, indent=1) + "\n")
    verified = bool(rec.get("verified")) or expected_sha256 is not None  # checked against it just above
    return DownloadResult(dest, rec["sha256"], rec["size"], rec["source_sha256"], "skipped", verified)


# ----------------------------------------------------------------------------- the .part and its origin

@dataclass
class Origin:
    """Where a .part's bytes came from; a resume must come from the same URL with the same validators."""

    url: str
    etag: str | None = None           # a strong ETag of the response the bytes came from
    last_modified: str | None = None
    size: int | None = None           # total size the server announced
    sha256: str | None = None         # sha256 the server published for the file (Hugging Face LFS)

    def to_json(self) -> str:
        return json.dumps({"version": ORIGIN_VERSION, "url": self.url, "etag": self.etag,
                           "last_modified": self.last_modified, "size": self.size, "sha256": self.sha256}, indent=1) + "\n"


def read_origin(part: str | os.PathLike) -> Origin | None:
    """The validated origin of `part`, or None (absent, malformed, wrong types or ranges)."""
    raw = _read_small_json(origin_path(part))
    if not isinstance(raw, dict) or raw.get("version") != ORIGIN_VERSION:
        return None

    def opt_str(v, n=1024):
        return v is None or (isinstance(v, str) and 0 < len(v) <= n)

    url, size, sha = raw.get("url"), raw.get("size"), raw.get("sha256")
    if not (isinstance(url, str) and 0 < len(url) <= 8192 and opt_str(raw.get("etag")) and opt_str(raw.get("last_modified"))
            and (size is None or _is_int(size)) and (sha is None or (isinstance(sha, str) and _HEX64.fullmatch(sha)))):
        return None
    return Origin(url, raw.get("etag"), raw.get("last_modified"), size, sha)


class _Part:
    """The .part, opened O_NOFOLLOW, checked to be a regular file with one link, and flock'ed."""

    def __init__(self, path: Path, create: bool = True):
        self.path, self.origin_file = path, origin_path(path)
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        try:
            self.fd = os.open(path, flags, 0o666)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UserError(f"{path} is a symbolic link; refusing to write through it",
                                "remove the link and rerun (the download starts over)") from None
            if e.errno in (errno.EISDIR, errno.ENXIO, errno.EOPNOTSUPP):
                raise UserError(f"{path} is not a regular file", "remove it and rerun") from None
            raise
        try:
            st = os.fstat(self.fd)
            if not stat.S_ISREG(st.st_mode):
                raise UserError(f"{path} is not a regular file", "remove it and rerun")
            if st.st_nlink != 1:
                raise UserError(f"{path} has {st.st_nlink} hard links; refusing to write into a file shared with another name",
                                "remove it and rerun (the download starts over)")
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(f"another tslm download is writing {path}", "wait for it to finish, then rerun") from None
        except BaseException:
            os.close(self.fd)
            raise

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def discard(self) -> None:
        """Forget the bytes and their origin (the file itself stays, locked, empty)."""
        os.ftruncate(self.fd, 0)
        self.origin_file.unlink(missing_ok=True)

    def set_origin(self, origin: Origin) -> None:
        atomic_write_text(self.origin_file, origin.to_json())

    def write_at(self, pos: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, pos)
            view, pos = view[n:], pos + n

    def sha256(self, progress: Progress | None = None) -> str:
        h, pos, total = hashlib.sha256(), 0, self.size()
        if progress:
            progress("verify", 0, total)
        while chunk := os.pread(self.fd, CHUNK_SIZE, pos):
            h.update(chunk)
            pos += len(chunk)
        if progress:
            progress("verify", total, total)
        return h.hexdigest()

    def remove(self) -> None:
        """Delete the .part and its origin (both written by downloads of this destination)."""
        self.path.unlink(missing_ok=True)
        self.origin_file.unlink(missing_ok=True)

    def close(self) -> None:
        os.close(self.fd)


@contextlib.contextmanager
def _locked_part(path: Path, create: bool = True) -> Iterator[_Part]:
    path.parent.mkdir(parents=True, exist_ok=True)
    p = _Part(path, create)
    try:
        yield p
    finally:
        p.close()


_TMP_NAME = re.compile(r"\.(?P<name>.+?)(?:\.p\d{1,10})?\.[a-z0-9_]{8}\.tmp")  # with the owner PID or not


def _remove_stale_temps(dest: Path) -> None:
    """Temp files that an earlier, killed run of this download left (atomic_write's `.NAME.XXXXXXXX.tmp`).

    Called while the .part lock is held, so no live download of `dest` is writing them.
    """
    names = {dest.name, record_path(dest).name, origin_path(part_path(dest)).name}
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(dest.parent):
            m = _TMP_NAME.fullmatch(entry.name)
            if m and m.group("name") in names and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


# ----------------------------------------------------------------------------- fetching

class _Retry(Exception):
    """A transient failure: worth another attempt after a pause."""


class _Stalled(_Retry):
    """Too few bytes in an idle window: retried, but never counted as progress (a trickle must end)."""


class _NoRoute(_Retry):
    """The host cannot be reached at all: its name does not resolve, or the connection is refused or has
    no route. Retried only while resuming (a blip in the middle of a download); a download that has not
    started fails at once with `Unreachable`."""


OFFLINE_FIX = ("no network? `tslm quickstart --text FILE` learns from your own text; `tslm download` takes a "
               "plain path or a file:// URL with --out FILE; a mirror is set with --endpoint URL (or HF_ENDPOINT)")


class Unreachable(UserError):
    """The download could not start: the host's name does not resolve or it refused the connection."""

    def __init__(self, url: str, why: str):
        self.url, self.host = url, urllib.parse.urlsplit(url).netloc or url
        super().__init__(f"cannot reach {self.host}: {why}", OFFLINE_FIX)


def _no_route_reason(reason) -> str | None:
    """A short reason when `reason` (a URLError's) says the host cannot be reached at all, else None."""
    if isinstance(reason, socket.gaierror):
        return "its name does not resolve" + (f" ({reason.strerror})" if reason.strerror else "")
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, OSError) and reason.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return reason.strerror or "no route to the host"
    return None


class NotFound(UserError):
    """HTTP 404 (or a missing file:// path): the file is not there."""

    def __init__(self, url: str, what: str, fix: str | None = None):
        self.url = url
        super().__init__(what, fix)


class DownloadInterrupted(KeyboardInterrupt):
    """Ctrl-C during a download; the .part is kept for the next run to resume."""

    def __init__(self, part: Path, have: int):
        self.part, self.have = part, have
        super().__init__(f"interrupted; {have} bytes kept in {part}")


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def _int_header(headers, name: str) -> int | None:
    v = headers.get(name) if headers is not None else None
    return int(v) if v is not None and str(v).strip().isdigit() and len(str(v).strip()) < 20 else None


def _published_sha256(headers) -> str | None:
    """The sha256 a Hugging Face server publishes for an LFS file: an X-Linked-Etag of 64 hex digits.

    (A plain ETag is not taken as a sha256: other servers' 64-hex ETags need not be one.)
    """
    v = (headers.get("X-Linked-Etag") or "").strip().removeprefix("W/").strip('"').lower()
    return v if _HEX64.fullmatch(v) else None


def _strong_etag(headers) -> str | None:
    v = (headers.get("ETag") or "").strip()
    return v if v and not v.startswith("W/") and len(v) <= 1024 else None


class _RedirectGuard(urllib.request.HTTPRedirectHandler):
    """Follows redirects like urllib does, but refuses https -> http and keeps each hop's headers."""

    def __init__(self):
        super().__init__()
        self.hops: list = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        old = urllib.parse.urlsplit(req.full_url).scheme.lower()
        new = urllib.parse.urlsplit(urllib.parse.urljoin(req.full_url, newurl)).scheme.lower()
        if old == "https" and new != "https":
            with contextlib.suppress(Exception):
                fp.close()
            raise UserError(f"refusing the redirect from {req.full_url} to {newurl}: it downgrades https to {new or 'a relative URL'}",
                            "use a mirror that stays on https (--endpoint)")
        self.hops.append(headers)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _HeaderDeadline:
    """Shuts the connection down when the response headers have not all arrived within `limit` seconds.

    The socket timeout only bounds the wait for *one* read, so a server sending its status line and
    headers one byte at a time would otherwise hold `urlopen` forever.
    """

    def __init__(self, limit: float):
        self.socks: list[socket.socket] = []
        self.fired = False
        self.timer = threading.Timer(limit, self._fire)
        self.timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        for s in list(self.socks):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def handlers(self) -> list:
        watch = self

        def watched(base):
            class Conn(base):
                def connect(self):
                    super().connect()
                    watch.socks.append(self.sock)
            return Conn

        class HTTP(urllib.request.HTTPHandler):
            def http_open(self, req):
                return self.do_open(watched(http.client.HTTPConnection), req)

        class HTTPS(urllib.request.HTTPSHandler):
            def https_open(self, req):
                kw = {"context": self._context}
                if getattr(self, "_check_hostname", None) is not None:  # Python < 3.12
                    kw["check_hostname"] = self._check_hostname
                return self.do_open(watched(http.client.HTTPSConnection), req, **kw)

        return [HTTP(), HTTPS()]


def _open(url: str, have: int, origin: Origin | None, timeout: float, header_limit: float):
    """urlopen with Range/If-Range when resuming; maps failures to _Retry / _Stalled / UserError.

    Returns (response, published sha256 or None, published size or None).
    """
    req = urllib.request.Request(url, headers={"User-Agent": f"tslm/{__version__}", "Accept-Encoding": "identity"})
    if have:
        req.add_header("Range", f"bytes={have}-")
        validator = (origin.etag or origin.last_modified) if origin else None
        if validator:
            req.add_header("If-Range", validator)
    is_file = urllib.parse.urlsplit(url).scheme == "file"
    guard = _RedirectGuard()
    deadline = _HeaderDeadline(header_limit)
    opener = urllib.request.build_opener(guard, *deadline.handlers())
    deadline.timer.start()
    try:
        resp = opener.open(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and have:
            resp = e  # the caller inspects Content-Range: maybe the .part is already complete
        elif e.code >= 500 or e.code in (408, 429):
            raise _Retry(f"HTTP {e.code} {e.reason}") from None
        elif e.code == 404:
            raise NotFound(url, f"{url}: HTTP 404 {e.reason}", "check the URL (or --endpoint); the file may have moved") from None
        else:
            fix = "check the URL (or --endpoint); the file may have moved or need a login" if e.code in (401, 403) else None
            raise UserError(f"{url}: HTTP {e.code} {e.reason}", fix) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        if deadline.fired:
            raise _Stalled(f"no complete response headers within {header_limit:g} s") from None
        reason = getattr(e, "reason", None)
        if is_file and isinstance(reason, FileNotFoundError):
            raise NotFound(url, f"cannot read {url}: {reason}", "check the path") from None
        if isinstance(e, urllib.error.URLError) and (
                is_file or isinstance(reason, (FileNotFoundError, PermissionError, IsADirectoryError))):
            raise UserError(f"cannot read {url}: {reason}", "check the path") from None
        if isinstance(e, urllib.error.URLError):
            no_route = _no_route_reason(reason)
            if no_route is not None:
                raise _NoRoute(no_route) from None
            raise _Retry(f"network error: {reason}") from None
        raise _Retry(f"network error: {type(e).__name__}: {e}") from None  # timeouts, resets, bad status lines
    finally:
        deadline.timer.cancel()
    published = linked_size = None
    for h in [*guard.hops, resp.headers]:
        if h is not None:
            published = _published_sha256(h) or published
            linked_size = _int_header(h, "X-Linked-Size") or linked_size
    return resp, published, linked_size


def _disk_full(e: OSError) -> bool:
    return e.errno in _DISK_FULL


def _fetch_once(url: str, part: _Part, timeout: float, idle_timeout: float, chunk_size: int,
                max_bytes: int | None, progress: Progress | None) -> tuple[int, Origin]:
    """One attempt: append the rest of `url` to `part` (or restart it). Returns (total size, origin).

    Raises _Retry when the connection failed, stalled or ended early; the bytes received so far stay
    in `part`, with their origin, for the next attempt.
    """
    have = part.size()
    origin = read_origin(part.path)
    if have and (origin is None or origin.url != url or (origin.size is not None and have > origin.size)):
        part.discard()  # bytes of unknown or foreign origin: never spliced
        have, origin = 0, None
    resp, published, linked_size = _open(url, have, origin, min(timeout, idle_timeout), idle_timeout)
    with contextlib.closing(resp):
        status = getattr(resp, "status", None) or getattr(resp, "code", None)
        headers = resp.headers
        if status == 416:
            m = re.search(r"/(\d+)", headers.get("Content-Range", "") or "")
            if m and int(m.group(1)) == have and origin and origin.size in (None, have):
                return have, origin  # everything was already here (e.g. interrupted before the rename)
            part.discard()
            raise _Retry("the server refused to resume; starting over")
        length = _int_header(headers, "Content-Length")
        if status == 206:
            m = _CONTENT_RANGE.match(headers.get("Content-Range", "") or "")
            total = (int(m.group(3)) if m.group(3) != "*" else None) if m else None
            etag = _strong_etag(headers)
            changed = (origin is None or not m or int(m.group(1)) != have
                       or (origin.size is not None and total is not None and total != origin.size)
                       or (origin.etag is not None and etag is not None and etag != origin.etag)
                       or (origin.sha256 is not None and published is not None and published != origin.sha256))
            if changed:
                # Another range, or the file changed on the server: the bytes cannot be appended.
                part.discard()
                raise _Retry(f"the file changed on the server or the range does not fit "
                             f"(Content-Range {headers.get('Content-Range')!r}); starting over")
            offset = have
            if total is None and length is not None:
                total = offset + length
        else:
            # 200 (or file://, which has no status): the whole file. When we asked for a range with
            # If-Range, a 200 means the validators changed (or no Range support): start over.
            if have:
                part.discard()
            offset, total = 0, length
            if linked_size is not None and total is not None and linked_size != total:
                raise UserError(f"{url}: the server announces {total} bytes but publishes a size of {linked_size}",
                                "check --endpoint; the mirror may serve another file")
            origin = Origin(url, _strong_etag(headers), (headers.get("Last-Modified") or None) if headers else None,
                            total if total is not None else linked_size, published)
            if origin.last_modified is not None and len(origin.last_modified) > 1024:
                origin.last_modified = None
            part.set_origin(origin)  # before the first byte: every byte in a .part has a known origin
        if max_bytes is not None and total is not None and total > max_bytes:
            part.remove()
            raise UserError(f"{url} is {total} bytes, over the limit of {max_bytes}", "raise --max-bytes if the file is expected")
        got = 0
        read = getattr(resp, "read1", None) or resp.read
        window_start, window_bytes = time.monotonic(), 0
        if progress:
            progress("download", offset, total)
        try:
            while True:
                try:
                    chunk = read(chunk_size)
                except (OSError, http.client.HTTPException) as e:  # reset, timeout, IncompleteRead
                    raise _Retry(f"connection lost after {offset + got} bytes: {type(e).__name__}") from None
                now = time.monotonic()
                if chunk:
                    if max_bytes is not None and offset + got + len(chunk) > max_bytes:
                        part.remove()
                        raise UserError(f"{url} sent more than the limit of {max_bytes} bytes", "raise --max-bytes if the file is expected")
                    try:
                        part.write_at(offset + got, chunk)
                    except OSError as e:
                        if _disk_full(e):
                            raise _DiskFull(e) from None
                        raise UserError(f"cannot write {part.path}: {e.strerror or e}", "check the directory's permissions") from None
                    got += len(chunk)
                    window_bytes += len(chunk)
                    if progress:
                        progress("download", offset + got, total)
                if not chunk:
                    break
                if now - window_start >= idle_timeout:
                    if window_bytes < IDLE_MIN_BYTES:
                        raise _Stalled(f"stalled: {window_bytes} bytes in {now - window_start:.1f} s "
                                     f"(under {IDLE_MIN_BYTES} per {idle_timeout:g} s) after {offset + got} bytes")
                    window_start, window_bytes = now, 0
        finally:
            with contextlib.suppress(OSError):
                os.fsync(part.fd)  # what we keep for a resume must really be on disk
        if length is not None and got < length:
            raise _Retry(f"connection closed after {offset + got} of {offset + length} bytes")
        if length is not None and got > length:
            part.discard()
            raise _Retry(f"server sent {got} bytes, announced {length}; starting over")
        return offset + got, origin


class _DiskFull(Exception):
    def __init__(self, err: OSError):
        self.err = err


def _disk_full_error(url: str, part: Path, e: OSError, have: int | None = None) -> UserError:
    if have is None:
        with contextlib.suppress(OSError):
            have = os.lstat(part).st_size
    kept = f"kept {have} bytes in {part.name} and its origin in {origin_path(part).name} to resume" if have \
        else "nothing was kept"
    return UserError(f"disk full while downloading {url}: {e.strerror or e}; {kept}",
                     "free some disk space and rerun the same command")


def _fetch(url: str, part: _Part, *, retries: int, backoff: float, sleep: Callable[[float], None] | None,
           timeout: float, idle_timeout: float, chunk_size: int, max_bytes: int | None,
           progress: Progress | None) -> tuple[int, Origin]:
    failures = 0
    while True:
        before = part.size()
        try:
            return _fetch_once(url, part, timeout, idle_timeout, chunk_size, max_bytes, progress)
        except _Retry as e:
            now = part.size()
            if isinstance(e, _NoRoute) and now == 0:
                raise Unreachable(url, str(e)) from None  # nothing started: no point in a retry storm
            failures = 1 if now > before and not isinstance(e, _Stalled) else failures + 1
            if failures > retries:
                fix = (f"rerun the same command to resume from {part.path.name}" if now
                       else "check the network or --endpoint, then rerun")
                raise UserError(f"download of {url} failed after {retries + 1} attempts: {e}", fix) from None
            (sleep or SLEEP)(min(backoff * 2 ** (failures - 1), MAX_BACKOFF))
        except _DiskFull as e:
            raise _disk_full_error(url, part.path, e.err, part.size()) from None  # a short write kept some bytes too
        except KeyboardInterrupt:
            raise DownloadInterrupted(part.path, part.size()) from None


def fetch(url: str, part: str | os.PathLike, *, retries: int = RETRIES, backoff: float = BACKOFF,
          sleep: Callable[[float], None] | None = None, timeout: float = TIMEOUT, idle_timeout: float = IDLE_TIMEOUT,
          chunk_size: int = CHUNK_SIZE, max_bytes: int | None = None, progress: Progress | None = None) -> int:
    """Bring `part` up to the full content of `url`, resuming what is there. Returns its size.

    Transient failures are retried after backoff, 2*backoff, 4*backoff, ... seconds (capped); an
    attempt that added bytes resets the count, so a flaky but working link always finishes.
    """
    with _locked_part(Path(part)) as p:
        return _fetch(url, p, retries=retries, backoff=backoff, sleep=sleep, timeout=timeout, idle_timeout=idle_timeout,
                      chunk_size=chunk_size, max_bytes=max_bytes, progress=progress)[0]


class _BadGzip(Exception):
    pass


def _gunzip(part: _Part, dest: Path, progress: Progress | None, chunk_size: int, cap: int | None,
            cap_source: str) -> str:
    """Stream-decompress the verified .part into `dest` atomically; returns the sha256 of the output.

    The .part is kept on every failure except a corrupt gzip stream; a partial output never stays.
    """
    total = part.size()
    h = hashlib.sha256()
    written = 0
    try:
        with os.fdopen(os.dup(part.fd), "rb") as raw, gzip.GzipFile(fileobj=raw) as gz, atomic_write(dest, "wb") as out:
            while True:
                try:
                    chunk = gz.read(chunk_size)
                except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
                    raise _BadGzip(str(e)) from None
                if not chunk:
                    break
                written += len(chunk)
                if cap is not None and written > cap:
                    raise UserError(f"unpacking {part.path.name} exceeds {cap} bytes ({cap_source}); stopped and removed "
                                    f"the partial output, the verified download stays in {part.path.name}",
                                    "the source may be a gzip bomb; if it really is that large, rerun with a larger --max-bytes")
                out.write(chunk)
                h.update(chunk)
                if progress:
                    progress("decompress", raw.tell(), total)
    except _BadGzip as e:
        part.remove()
        raise UserError(f"{part.path.name} is not a valid gzip file ({e}); it was removed", "rerun to download it again") from None
    except OSError as e:
        if _disk_full(e):
            raise UserError(f"disk full while unpacking into {dest}: {e.strerror or e}; the partial output was removed, "
                            f"the verified download stays in {part.path.name}",
                            f"free at least {written} bytes more and rerun the same command") from None
        raise
    return h.hexdigest()


def download_url(url: str, out: str | os.PathLike, sha256: str | None = None, *, size: int | None = None,
                 gunzip: bool = False, force: bool = False, progress: Progress | None = None,
                 retries: int = RETRIES, backoff: float = BACKOFF, sleep: Callable[[float], None] | None = None,
                 timeout: float = TIMEOUT, idle_timeout: float = IDLE_TIMEOUT, chunk_size: int = CHUNK_SIZE,
                 max_bytes: int | None = None, max_unpacked: int | None = None) -> DownloadResult:
    """Download `url` to `out`: resumable, verified, atomic; skipped when already complete.

    `sha256`/`size` are the expected values of the bytes as served (None: computed and recorded).
    With `gunzip`, the served bytes are gzip and `out` receives the decompressed content, at most
    `max_bytes` (else `max_unpacked`, the registry's cap) bytes of it. `max_bytes` also caps the
    download. `force` downloads again, replacing `out` only once the new file is verified.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()); (d / "src.txt").write_text("hello")
    5
    >>> r = download_url((d / "src.txt").as_uri(), d / "copy.txt")
    >>> r.status, r.size, (d / "copy.txt").read_text(), r.sha256[:12]
    ('downloaded', 5, 'hello', '2cf24dba5fb0')
    >>> download_url((d / "src.txt").as_uri(), d / "copy.txt").status
    'skipped'
    """
    out = Path(out)
    if sha256 is not None:
        sha256 = sha256.strip().lower()
        if not _HEX64.fullmatch(sha256):
            raise UserError(f"--sha256 must be 64 hex digits, got {sha256!r}")
    if max_bytes is not None and max_bytes <= 0:
        raise UserError(f"--max-bytes must be positive, got {max_bytes}")
    if idle_timeout <= 0:
        raise UserError(f"the idle timeout must be positive, got {idle_timeout}")
    part = part_path(out)
    if os.path.islink(out):
        check_complete(out)  # raises the one-line refusal
    if out.is_dir():
        raise UserError(f"output {out} is a directory", "pass a file path")
    try:
        if not force:
            done = check_complete(out, sha256, progress, url=url)
            if done is not None:
                _tidy_after_skip(out)
                return done
        with _locked_part(part) as p:
            _remove_stale_temps(out)
            resumed_from = p.size()
            try:
                return _download_part(url, out, p, sha256, size, gunzip, progress, resumed_from, retries=retries,
                                      backoff=backoff, sleep=sleep, timeout=timeout, idle_timeout=idle_timeout,
                                      chunk_size=chunk_size, max_bytes=max_bytes, max_unpacked=max_unpacked)
            except DownloadInterrupted:
                raise
            except KeyboardInterrupt:  # while verifying or decompressing: the verified .part is still there
                raise DownloadInterrupted(part, p.size()) from None
            finally:
                if os.path.lexists(part) and p.size() == 0:
                    p.remove()  # an empty .part holds nothing to resume: leave no litter
    except OSError as e:
        if _disk_full(e):
            raise _disk_full_error(url, part, e) from None
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise UserError(f"cannot write next to {out}: {e.strerror}", "check the directory's permissions") from None
        if e.filename is not None:  # e.g. a directory where the .part's origin file goes
            raise UserError(f"cannot write {e.filename}: {e.strerror or e}", "move it away and rerun") from None
        raise


def _tidy_after_skip(out: Path) -> None:
    """A complete file with a leftover .part: a run stopped after the record. Remove its .part and temps."""
    part = part_path(out)
    if not os.path.lexists(part):
        return
    try:
        with _locked_part(part, create=False) as p:
            _remove_stale_temps(out)
            p.remove()
    except (UserError, OSError):
        pass  # locked by another download, or not ours to touch: leave it


def _download_part(url: str, out: Path, part: _Part, sha256: str | None, size: int | None, gunzip: bool,
                   progress: Progress | None, resumed_from: int, *, chunk_size: int, max_unpacked: int | None,
                   max_bytes: int | None, **fetch_kwargs) -> DownloadResult:
    n, origin = _fetch(url, part, chunk_size=chunk_size, progress=progress, max_bytes=max_bytes, **fetch_kwargs)
    for expected, what in ((size, "expected"), (origin.size, "announced by the server")):
        if expected is not None and n != expected:
            part.remove()
            raise UserError(f"{url}: got {n} bytes, {what} {expected}; the partial file was removed",
                            "rerun to download it again, or check --endpoint")
    source_sha = part.sha256(progress)
    for expected, what in ((sha256, "expected"), (origin.sha256, "published by the server")):
        if expected is not None and source_sha != expected:
            part.remove()
            raise UserError(f"sha256 mismatch for {url}: {what} {expected}, got {source_sha}; nothing was kept",
                            "check the --sha256 value or the source" if what == "expected" else "rerun; if it persists, check --endpoint")
    verified = sha256 is not None or origin.sha256 is not None
    record = dict(source_sha256=source_sha, source_size=n, url=url, verified=verified)
    if gunzip:
        cap, cap_source = (max_bytes, "--max-bytes") if max_bytes is not None else (max_unpacked, "the registry's limit")
        out_sha = _gunzip(part, out, progress, chunk_size, cap, cap_source)
        fsync_dir(out.parent)
        _write_record(out, sha256=out_sha, **record)
        part.remove()  # last: until the record exists, the .part marks the download as unfinished
    else:
        out_sha = source_sha
        _write_record(out, sha256=out_sha, st=os.fstat(part.fd), **record)
        os.replace(part.path, out)  # same directory: atomic; replaces a directory entry, never follows a link
        origin_path(part.path).unlink(missing_ok=True)
    fsync_dir(out.parent)
    return DownloadResult(out, out_sha, out.stat().st_size, source_sha, "downloaded", verified, resumed_from)


def download_planned(pf: PlannedFile, **kwargs) -> DownloadResult:
    kwargs.setdefault("max_unpacked", pf.max_unpacked)
    return download_url(pf.url, pf.dest, pf.sha256, size=pf.size, gunzip=pf.gunzip, **kwargs)


def download_dataset(name: str, split: str = "all", root: str | os.PathLike | None = None,
                     endpoint: str | None = None, progress_for: Callable[[PlannedFile], Progress | None] | None = None,
                     **kwargs) -> list[DownloadResult]:
    """Download every file of a registry entry (e.g. for `tslm quickstart`); see `download_url`."""
    return [download_planned(pf, progress=progress_for(pf) if progress_for else None, **kwargs)
            for pf in plan_dataset(name, split, root, endpoint)]


# ----------------------------------------------------------------------------- Hugging Face model repos

# (file, required). Small files first: a repo without a usable tokenizer is refused before the weights.
HF_MODEL_FILES: tuple[tuple[str, bool], ...] = (
    ("config.json", True),
    ("tokenizer.json", False),
    ("tokenizer_config.json", False),
    ("vocab.json", False),
    ("merges.txt", False),
    ("model.safetensors", True),
)
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?")


def check_repo(repo: str) -> str:
    """A Hugging Face repo id: `name` or `owner/name`; no `..` or `--` (they would break the directory name).

    >>> check_repo("openai-community/gpt2")
    'openai-community/gpt2'
    """
    if not _REPO.fullmatch(repo) or ".." in repo or "--" in repo or repo.endswith((".", "-")):
        raise UserError(f"invalid Hugging Face repo id {repo!r}", "pass OWNER/NAME, e.g. openai-community/gpt2")
    return repo


def hf_model_dir(repo: str, root: str | os.PathLike | None = None) -> Path:
    """data/hf/<owner>--<name>/ (the Hub's own cache uses "--" the same way; repo ids cannot contain it)."""
    return paths.dataset_dir("hf", Path(root) if root is not None else None) / check_repo(repo).replace("/", "--")


def plan_hf_model(repo: str, out_dir: str | os.PathLike | None = None, root: str | os.PathLike | None = None,
                  endpoint: str | None = None) -> list[tuple[PlannedFile, bool]]:
    """(planned file, required) for each file `tslm download hf-model REPO` tries."""
    check_repo(repo)
    ep = resolve_endpoint(endpoint)
    d = Path(out_dir) if out_dir is not None else hf_model_dir(repo, root)
    ds = Dataset(repo, repo, "model", (), "")
    return [(PlannedFile(url_for(ds, name, ep), d / name), required) for name, required in HF_MODEL_FILES]


# Every file of a model repo but the weights is small (Llama 3's tokenizer.json: 9 MB): a server streaming more
# is stopped at this many bytes, not downloaded in full.
HF_SMALL_FILE_CAP = 50 << 20


def _small_file_cap(name: str, kwargs: dict) -> dict:
    if name == "model.safetensors":
        return kwargs
    given = kwargs.get("max_bytes")
    return {**kwargs, "max_bytes": HF_SMALL_FILE_CAP if given is None else min(given, HF_SMALL_FILE_CAP)}


@dataclass
class HFModelResult:
    dir: Path
    results: list[DownloadResult] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)   # optional files the repo does not have


def download_hf_model(repo: str, out_dir: str | os.PathLike | None = None, root: str | os.PathLike | None = None,
                      endpoint: str | None = None,
                      progress_for: Callable[[PlannedFile], contextlib.AbstractContextManager] | None = None,
                      on_missing: Callable[[str], None] | None = None,
                      on_done: Callable[[PlannedFile, DownloadResult], None] | None = None, **kwargs) -> HFModelResult:
    """Fetch a model repo's config, safetensors weights and tokenizer files into one directory.

    Optional files that are not there (HTTP 404) are skipped (`on_missing(name)`); a missing
    required file, or neither `tokenizer.json` nor `vocab.json` + `merges.txt`, is a UserError.
    """
    plan = plan_hf_model(repo, out_dir, root, endpoint)
    res = HFModelResult(plan[0][0].dest.parent)
    if os.path.lexists(res.dir) and (os.path.islink(res.dir) or not res.dir.is_dir()):
        raise UserError(f"{res.dir} exists and is not a directory", "pass another --out DIR, or move it away")
    force = bool(kwargs.get("force"))
    foreign = [(pf, rec) for pf, _ in plan
               if (rec := _read_record(pf.dest)) is not None and not same_source(rec.get("source"), pf.url)]
    if foreign and not force:
        pf, rec = foreign[0]
        raise UserError(f"{res.dir} holds files downloaded from another source ({pf.dest.name} from {rec.get('source')}, "
                        f"not {pf.url})", "pass another --out DIR, or --force to replace them with this repo's files")
    have: set[str] = set()
    for pf, required in plan:
        name = pf.dest.name
        if name == "model.safetensors" and not ("tokenizer.json" in have or {"vocab.json", "merges.txt"} <= have):
            raise UserError(f"{repo} has neither tokenizer.json nor vocab.json + merges.txt at {pf.url.rsplit('/', 1)[0]}",
                            "check the repo id; only repos with a Hugging Face tokenizer can be imported")
        try:
            with (progress_for(pf) if progress_for else contextlib.nullcontext()) as progress:
                r = download_planned(pf, progress=progress, **_small_file_cap(name, kwargs))
        except NotFound:
            if required:
                raise UserError(f"{repo} has no {name} ({pf.url}: not found)",
                                "check the repo id and --endpoint; only single-file safetensors weights (model.safetensors) are supported") from None
            res.missing.append(name)
            if any(f is pf for f, _ in foreign):  # another repo's file that this one lacks: never mixed in
                pf.dest.unlink(missing_ok=True)
                record_path(pf.dest).unlink(missing_ok=True)
            if on_missing:
                on_missing(name)
            continue
        have.add(name)
        res.results.append(r)
        if on_done:
            on_done(pf, r)
    return res
