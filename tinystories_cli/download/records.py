"""What a download keeps on disk: the .part and its origin (.part.json), and the .sha256 record of a
complete file (see the package docstring for their life cycle)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import stat
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tinystories_cli.errors import UserError
from tinystories_cli.fileio import atomic_write_text, sha256_file

CHUNK_SIZE = 1 << 20
ORIGIN_VERSION = 1

# progress(stage, done, total): stage is "download", "verify" or "decompress"; done/total in bytes
# (total None when the server does not say). For "download", done counts bytes already in the .part.
Progress = Callable[[str, int, int | None], None]


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


HEX64 = re.compile(r"[0-9a-f]{64}")


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


def write_record(dest: Path, *, sha256: str, source_sha256: str, source_size: int, url: str, verified: bool,
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


def read_record(dest: Path) -> dict | None:
    rec = _read_small_json(record_path(dest))
    ok = (
        isinstance(rec, dict)
        and isinstance(rec.get("sha256"), str)
        and bool(HEX64.fullmatch(rec["sha256"]))
        and _is_int(rec.get("size"))
        and isinstance(rec.get("mtime_ns"), int)
        and not isinstance(rec.get("mtime_ns"), bool)
        and isinstance(rec.get("source_sha256"), str)
        and bool(HEX64.fullmatch(rec["source_sha256"]))
    )
    return rec if ok else None


def check_complete(dest: str | os.PathLike, expected_sha256: str | None = None,
                   progress: Progress | None = None, url: str | None = None) -> DownloadResult | None:
    """A result when `dest` is a complete, verified download; None when it has to be fetched.

    Fast path: size and mtime equal to the record -> trusted without reading the file. Otherwise the
    file is re-hashed; the same hash -> trusted (the record's mtime is refreshed), a different one
    -> UserError (the file was changed or corrupted; `force` downloads it again). While a .part
    exists, a file that does not match its record is an unfinished replacement: None (finish it).
    """
    dest = Path(dest)
    if os.path.islink(dest):
        raise UserError(f"{dest} is a symbolic link; a download never writes through or replaces a link",
                        "download to the link's target path instead (e.g. `root` on that disk), or remove the link")
    if not dest.exists():
        return None
    pending = os.path.lexists(part_path(dest))
    rec = read_record(dest)
    if rec is None and pending:
        return None  # stopped between decompression/rename and the record: finish it
    if rec is None:
        raise UserError(f"{dest} exists but has no valid download record ({record_path(dest).name})",
                        "pass `force` to download it again, or move the file away")
    if url is not None and not same_source(rec.get("source"), url):
        raise UserError(f"{dest} was downloaded from {rec.get('source')}, not from {url}",
                        "pass `force` to replace it with this source's file, or choose another output")
    if expected_sha256 and rec["source_sha256"] != expected_sha256.lower():
        raise UserError(f"{dest} was downloaded with sha256 {rec['source_sha256']}, expected {expected_sha256.lower()}",
                        "pass `force` to download it again")
    st = dest.stat()
    if st.st_size != rec["size"]:
        if pending:
            return None
        raise UserError(f"{dest} is corrupted: {st.st_size} bytes, {rec['size']} recorded in {record_path(dest).name}",
                        "pass `force` to download it again")
    if st.st_mtime_ns != rec["mtime_ns"]:
        if pending:
            return None
        if progress:
            progress("verify", 0, st.st_size)
        actual = sha256_file(dest)
        if progress:
            progress("verify", st.st_size, st.st_size)
        if actual != rec["sha256"]:
            raise UserError(
                f"{dest} is corrupted: sha256 {actual}, {rec['sha256']} recorded in {record_path(dest).name}",
                "pass `force` to download it again",
            )
        rec["mtime_ns"] = st.st_mtime_ns
        atomic_write_text(record_path(dest), json.dumps(rec, indent=1) + "\n")
    verified = bool(rec.get("verified")) or expected_sha256 is not None  # checked against it just above
    return DownloadResult(dest, rec["sha256"], rec["size"], rec["source_sha256"], "skipped", verified)


@dataclass
class Origin:
    """Where a .part's bytes came from; a resume must come from the same URL with the same validators."""

    url: str
    etag: str | None = None           # a strong ETag of the response the bytes came from
    last_modified: str | None = None
    size: int | None = None           # total size the server announced
    sha256: str | None = None         # sha256 the server published for the file (Hugging Face LFS)

    def to_json(self) -> str:
        return (
            json.dumps(
                {
                    "version": ORIGIN_VERSION,
                    "url": self.url,
                    "etag": self.etag,
                    "last_modified": self.last_modified,
                    "size": self.size,
                    "sha256": self.sha256,
                },
                indent=1,
            )
            + "\n"
        )


def read_origin(part: str | os.PathLike) -> Origin | None:
    """The validated origin of `part`, or None (absent, malformed, wrong types or ranges)."""
    raw = _read_small_json(origin_path(part))
    if not isinstance(raw, dict) or raw.get("version") != ORIGIN_VERSION:
        return None

    def opt_str(v, n=1024):
        return v is None or (isinstance(v, str) and 0 < len(v) <= n)

    url, size, sha = raw.get("url"), raw.get("size"), raw.get("sha256")
    if not (isinstance(url, str) and 0 < len(url) <= 8192 and opt_str(raw.get("etag"))
            and opt_str(raw.get("last_modified"))
            and (size is None or _is_int(size))
            and (sha is None or (isinstance(sha, str) and HEX64.fullmatch(sha)))):
        return None
    return Origin(url, raw.get("etag"), raw.get("last_modified"), size, sha)


class Part:
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
                raise UserError(
                    f"{path} has {st.st_nlink} hard links; refusing to write into a file shared with another name",
                    "remove it and rerun (the download starts over)",
                )
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(f"another tslm download is writing {path}",
                                "wait for it to finish, then rerun") from None
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
def locked_part(path: Path, create: bool = True) -> Iterator[Part]:
    path.parent.mkdir(parents=True, exist_ok=True)
    p = Part(path, create)
    try:
        yield p
    finally:
        p.close()


_TMP_NAME = re.compile(r"\.(?P<name>.+?)(?:\.p\d{1,10})?\.[a-z0-9_]{8}\.tmp")  # with the owner PID or not


def remove_stale_temps(dest: Path) -> None:
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
