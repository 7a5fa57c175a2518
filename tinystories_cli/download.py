"""Verified, resumable downloads: the dataset registry behind `tslm download`.

One file at a time, the life of a download is:

    <dest>.part    bytes arrive here; after an interruption the next run asks the server for the
                   rest with an HTTP Range request (and starts over if the server ignores Range)
    verify         size against Content-Length (and the registry), sha256 against the registry or
                   --sha256; on a mismatch the .part is deleted, so nothing that looks complete stays
    <dest>         renamed into place only when complete and verified (for .gz sources the
                   verified compressed .part is decompressed, streaming, into a temp file + rename)
    <dest>.sha256  a small JSON record beside the file: its sha256, size and mtime, and where it
                   came from. A later run trusts the file without re-reading it while size and
                   mtime are unchanged (hashing 2 GB is not instant); when either changed, it
                   re-hashes and reports a corrupted file instead of silently using it.

Network errors, timeouts and HTTP 5xx/408/429 are retried with exponential backoff (1, 2, 4, ...
seconds; a retry that made progress resets the count). Other HTTP 4xx are a `UserError` at once.
`file://` URLs and local directories work as sources/endpoints for offline copies.

Nothing here prints: callers pass a `progress(stage, done, total)` callback.

>>> url_for(DATASETS["tinystories"], "TinyStoriesV2-GPT4-valid.txt", "https://huggingface.co")
'https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-valid.txt'
>>> url_for(DATASETS["gpt2-tokenizer"], "vocab.json", "https://hf-mirror.example/")
'https://hf-mirror.example/openai-community/gpt2/resolve/main/vocab.json'
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

from tinystories_cli import __version__, paths
from tinystories_cli.errors import UserError
from tinystories_cli.fileio import atomic_write, atomic_write_text, sha256_file

DEFAULT_ENDPOINT = "https://huggingface.co"
CHUNK_SIZE = 1 << 20
RETRIES = 5          # attempts after the first one, per stretch without progress
BACKOFF = 1.0        # seconds before the first retry; doubles each time
MAX_BACKOFF = 60.0
TIMEOUT = 30.0       # seconds a connect or a read may stall before it counts as a network error
SLEEP = time.sleep   # the backoff pause when no `sleep` is passed (tests replace it)

# progress(stage, done, total): stage is "download", "verify" or "decompress"; done/total in bytes
# (total None when the server does not say). For "download", done counts bytes already in the .part.
Progress = Callable[[str, int, Optional[int]], None]


# ----------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class RemoteFile:
    """One file of a registry entry.

    `sha256`/`size` describe the bytes as served (the compressed bytes for a .gz source). They are
    recorded only when known from a trustworthy source; None means "compute, print and record".
    """

    source: str                     # file name in the Hugging Face repo
    dest: str                       # file name under data/<dataset>/
    split: str | None = None        # "train" / "valid", or None: part of every --split
    sha256: str | None = None
    size: int | None = None
    gunzip: bool = False


@dataclass(frozen=True)
class Dataset:
    name: str
    repo: str
    repo_type: Literal["dataset", "model"]
    files: tuple[RemoteFile, ...]
    description: str


# Expected sizes/hashes: none recorded yet. This registry was written without network access, so no
# value could be checked against the files as Hugging Face serves them today, and a wrong value
# would make every download fail. Candidates, once verified on a real download:
#   gpt2 vocab.json: 1,042,301 bytes; the copy in stanford-cs336/assignment1-basics tests/fixtures has
#   that size and sha256 196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783.
#   (That repo's merges.txt has no "#version" header, so it is not byte-identical to the Hub file.)
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
                RemoteFile("owt_train.txt.gz", "train.txt", "train", gunzip=True),  # ~11.9 GB unpacked
                RemoteFile("owt_valid.txt.gz", "valid.txt", "valid", gunzip=True),  # ~290 MB unpacked
            ),
            "OpenWebText sample (CS336), gunzipped on the fly",
        ),
        Dataset(
            "gpt2-tokenizer", "openai-community/gpt2", "model",
            (RemoteFile("vocab.json", "vocab.json"), RemoteFile("merges.txt", "merges.txt")),
            "GPT-2's vocab.json + merges.txt (for Tokenizer.from_files)",
        ),
    )
}
SPLIT_CHOICES = ("train", "valid", "all")


@dataclass(frozen=True)
class PlannedFile:
    """One concrete download: where from, where to, and what to expect."""

    url: str
    dest: Path
    sha256: str | None = None
    size: int | None = None
    gunzip: bool = False


def get_dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}", f"choose one of: {', '.join(DATASETS)}; or pass a URL with --out FILE")
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
        PlannedFile(url_for(ds, f.source, ep), out_dir / f.dest, f.sha256, f.size, f.gunzip)
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


def record_path(dest: str | os.PathLike) -> Path:
    dest = Path(dest)
    return dest.with_name(dest.name + ".sha256")


def _write_record(dest: Path, *, sha256: str, source_sha256: str, source_size: int, url: str, verified: bool,
                  stat_of: Path | None = None) -> None:
    # os.replace keeps size and mtime, so the record of a plain download is written from the .part
    # *before* its rename: a crash in between leaves a record without a file, which is harmless.
    st = (stat_of or dest).stat()
    rec = {
        "sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
        "source": url, "source_sha256": source_sha256, "source_size": source_size, "verified": verified,
    }
    atomic_write_text(record_path(dest), json.dumps(rec, indent=1) + "\n")


def _read_record(dest: Path) -> dict | None:
    try:
        rec = json.loads(record_path(dest).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError, UnicodeDecodeError):
        return None
    ok = (isinstance(rec, dict) and isinstance(rec.get("sha256"), str) and isinstance(rec.get("size"), int)
          and isinstance(rec.get("mtime_ns"), int) and isinstance(rec.get("source_sha256"), str))
    return rec if ok else None


def check_complete(dest: str | os.PathLike, expected_sha256: str | None = None,
                   progress: Progress | None = None) -> DownloadResult | None:
    """A result when `dest` is a complete, verified download; None when it has to be fetched.

    Fast path: size and mtime equal to the record -> trusted without reading the file. Otherwise the
    file is re-hashed; the same hash -> trusted (the record's mtime is refreshed), a different one
    -> UserError (the file was changed or corrupted; --force downloads it again).
    """
    dest = Path(dest)
    if not dest.exists():
        return None
    rec = _read_record(dest)
    if rec is None and part_path(dest).exists():
        return None  # a .gz download stopped between decompression and its record: finish it
    if rec is None:
        raise UserError(f"{dest} exists but has no download record ({record_path(dest).name})",
                        "pass --force to download it again, or move the file away")
    if expected_sha256 and rec["source_sha256"] != expected_sha256.lower():
        raise UserError(f"{dest} was downloaded with sha256 {rec['source_sha256']}, expected {expected_sha256.lower()}",
                        "pass --force to download it again")
    st = dest.stat()
    if st.st_size != rec["size"]:
        raise UserError(f"{dest} is corrupted: {st.st_size} bytes, {rec['size']} recorded in {record_path(dest).name}",
                        "pass --force to download it again")
    if st.st_mtime_ns != rec["mtime_ns"]:
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


# ----------------------------------------------------------------------------- fetching

class _Retry(Exception):
    """A transient failure: worth another attempt after a pause."""


class DownloadInterrupted(KeyboardInterrupt):
    """Ctrl-C during a download; the .part is kept for the next run to resume."""

    def __init__(self, part: Path, have: int):
        self.part, self.have = part, have
        super().__init__(f"interrupted; {have} bytes kept in {part}")


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def _int_header(headers, name: str) -> int | None:
    v = headers.get(name) if headers is not None else None
    return int(v) if v is not None and str(v).strip().isdigit() else None


def _open(url: str, have: int, timeout: float):
    """urlopen with a Range header when resuming; maps failures to _Retry / UserError."""
    req = urllib.request.Request(url, headers={"User-Agent": f"tslm/{__version__}", "Accept-Encoding": "identity"})
    if have:
        req.add_header("Range", f"bytes={have}-")
    is_file = urllib.parse.urlsplit(url).scheme == "file"
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and have:
            return e  # the caller inspects Content-Range: maybe the .part is already complete
        if e.code >= 500 or e.code in (408, 429):
            raise _Retry(f"HTTP {e.code} {e.reason}") from None
        fix = "check the URL (or --endpoint); the file may have moved or need a login" if e.code in (401, 403, 404) else None
        raise UserError(f"{url}: HTTP {e.code} {e.reason}", fix) from None
    except urllib.error.URLError as e:
        if is_file or isinstance(e.reason, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise UserError(f"cannot read {url}: {e.reason}", "check the path") from None
        raise _Retry(f"network error: {e.reason}") from None
    except (OSError, http.client.HTTPException) as e:  # timeouts, resets, bad status lines
        raise _Retry(f"network error: {type(e).__name__}: {e}") from None


def _fetch_once(url: str, part: Path, timeout: float, chunk_size: int, progress: Progress | None) -> int:
    """One attempt: append the rest of `url` to `part` (or restart it). Returns the total size.

    Raises _Retry when the connection failed or ended early; the bytes received so far stay in `part`.
    """
    have = part.stat().st_size if part.exists() else 0
    resp = _open(url, have, timeout)
    with contextlib.closing(resp):
        status = getattr(resp, "status", None) or getattr(resp, "code", None)
        headers = resp.headers
        if status == 416:
            m = re.search(r"/(\d+)", headers.get("Content-Range", "") or "")
            if m and int(m.group(1)) == have:
                return have  # everything was already here (e.g. interrupted during decompression)
            part.unlink()
            raise _Retry("the server refused to resume; starting over")
        length = _int_header(headers, "Content-Length")
        if status == 206:
            m = _CONTENT_RANGE.match(headers.get("Content-Range", "") or "")
            if not m or int(m.group(1)) != have:
                # A range we did not ask for: the bytes cannot be appended. Start from scratch.
                part.unlink(missing_ok=True)
                raise _Retry(f"unexpected Content-Range {headers.get('Content-Range')!r}; starting over")
            offset, total = have, (int(m.group(3)) if m.group(3) != "*" else None)
            mode = "ab"
        else:
            # 200 (or file://, which has no status): the whole file, even if we asked for a range.
            offset, total, mode = 0, length, "wb"
        if total is None and length is not None:
            total = offset + length
        got = 0
        part.parent.mkdir(parents=True, exist_ok=True)
        with open(part, mode) as f:
            if progress:
                progress("download", offset, total)
            try:
                while True:
                    try:
                        chunk = resp.read(chunk_size)
                    except (OSError, http.client.HTTPException) as e:  # reset, timeout, IncompleteRead
                        raise _Retry(f"connection lost after {offset + got} bytes: {type(e).__name__}") from None
                    if not chunk:
                        break
                    try:
                        f.write(chunk)
                    except OSError as e:  # disk full, permissions: retrying would not help
                        raise UserError(f"cannot write {part}: {e.strerror or e}",
                                        "free some disk space and rerun; the download resumes") from None
                    got += len(chunk)
                    if progress:
                        progress("download", offset + got, total)
            finally:
                f.flush()
                os.fsync(f.fileno())  # what we keep for a resume must really be on disk
        if length is not None and got < length:
            raise _Retry(f"connection closed after {offset + got} of {offset + length} bytes")
        if length is not None and got > length:
            part.unlink()
            raise _Retry(f"server sent {got} bytes, announced {length}; starting over")
        return offset + got


def fetch(url: str, part: str | os.PathLike, *, retries: int = RETRIES, backoff: float = BACKOFF,
          sleep: Callable[[float], None] | None = None, timeout: float = TIMEOUT, chunk_size: int = CHUNK_SIZE,
          progress: Progress | None = None) -> int:
    """Bring `part` up to the full content of `url`, resuming what is there. Returns its size.

    Transient failures are retried after backoff, 2*backoff, 4*backoff, ... seconds (capped); an
    attempt that added bytes resets the count, so a flaky but working link always finishes.
    """
    part = Path(part)
    failures = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            return _fetch_once(url, part, timeout, chunk_size, progress)
        except _Retry as e:
            now = part.stat().st_size if part.exists() else 0
            failures = 1 if now > before else failures + 1
            if failures > retries:
                raise UserError(f"download of {url} failed after {retries + 1} attempts: {e}",
                                f"rerun the same command to resume from {part.name}") from None
            (sleep or SLEEP)(min(backoff * 2 ** (failures - 1), MAX_BACKOFF))
        except KeyboardInterrupt:
            raise DownloadInterrupted(part, part.stat().st_size if part.exists() else 0) from None


def _gunzip(src: Path, dest: Path, progress: Progress | None, chunk_size: int) -> str:
    """Stream-decompress `src` into `dest` atomically; returns the sha256 of the decompressed bytes."""
    total = src.stat().st_size
    h = hashlib.sha256()
    try:
        with open(src, "rb") as raw, gzip.GzipFile(fileobj=raw) as gz, atomic_write(dest, "wb") as out:
            while chunk := gz.read(chunk_size):
                out.write(chunk)
                h.update(chunk)
                if progress:
                    progress("decompress", raw.tell(), total)
    except (OSError, EOFError, zlib.error) as e:
        src.unlink(missing_ok=True)
        raise UserError(f"{src.name} is not a valid gzip file ({e}); it was removed", "rerun to download it again") from None
    return h.hexdigest()


def download_url(url: str, out: str | os.PathLike, sha256: str | None = None, *, size: int | None = None,
                 gunzip: bool = False, force: bool = False, progress: Progress | None = None,
                 retries: int = RETRIES, backoff: float = BACKOFF, sleep: Callable[[float], None] | None = None,
                 timeout: float = TIMEOUT, chunk_size: int = CHUNK_SIZE) -> DownloadResult:
    """Download `url` to `out`: resumable, verified, atomic; skipped when already complete.

    `sha256`/`size` are the expected values of the bytes as served (None: computed and recorded).
    With `gunzip`, the served bytes are gzip and `out` receives the decompressed content.

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
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise UserError(f"--sha256 must be 64 hex digits, got {sha256!r}")
    part = part_path(out)
    if force:
        for p in (out, record_path(out), part):
            p.unlink(missing_ok=True)
    done = check_complete(out, sha256, progress)
    if done is not None:
        return done
    if out.is_dir():
        raise UserError(f"output {out} is a directory", "pass a file path")
    resumed_from = part.stat().st_size if part.exists() else 0
    try:
        return _download_part(url, out, part, sha256, size, gunzip, progress, resumed_from, retries=retries,
                              backoff=backoff, sleep=sleep, timeout=timeout, chunk_size=chunk_size)
    except DownloadInterrupted:
        raise
    except KeyboardInterrupt:  # while verifying or decompressing: the verified .part is still there
        if part.exists():
            raise DownloadInterrupted(part, part.stat().st_size) from None
        raise


def _download_part(url: str, out: Path, part: Path, sha256: str | None, size: int | None, gunzip: bool,
                   progress: Progress | None, resumed_from: int, *, chunk_size: int, **fetch_kwargs) -> DownloadResult:
    n = fetch(url, part, chunk_size=chunk_size, progress=progress, **fetch_kwargs)
    if size is not None and n != size:
        part.unlink(missing_ok=True)
        raise UserError(f"{url}: got {n} bytes, expected {size}; the partial file was removed",
                        "rerun to download it again, or check --endpoint")
    if progress:
        progress("verify", 0, n)
    source_sha = sha256_file(part)
    if progress:
        progress("verify", n, n)
    if sha256 is not None and source_sha != sha256:
        part.unlink(missing_ok=True)
        raise UserError(f"sha256 mismatch for {url}: expected {sha256}, got {source_sha}; nothing was kept",
                        "check the --sha256 value or the source")

    record = dict(source_sha256=source_sha, source_size=n, url=url, verified=sha256 is not None)
    if gunzip:
        out_sha = _gunzip(part, out, progress, chunk_size)
        _write_record(out, sha256=out_sha, **record)
        part.unlink()  # last: until the record exists, the .part marks the download as unfinished
    else:
        out_sha = source_sha
        _write_record(out, sha256=out_sha, stat_of=part, **record)
        os.replace(part, out)  # same directory: atomic
    return DownloadResult(out, out_sha, out.stat().st_size, source_sha, "downloaded", sha256 is not None, resumed_from)


def download_planned(pf: PlannedFile, **kwargs) -> DownloadResult:
    return download_url(pf.url, pf.dest, pf.sha256, size=pf.size, gunzip=pf.gunzip, **kwargs)


def download_dataset(name: str, split: str = "all", root: str | os.PathLike | None = None,
                     endpoint: str | None = None, progress_for: Callable[[PlannedFile], Progress | None] | None = None,
                     **kwargs) -> list[DownloadResult]:
    """Download every file of a registry entry (e.g. for `tslm quickstart`); see `download_url`."""
    return [download_planned(pf, progress=progress_for(pf) if progress_for else None, **kwargs)
            for pf in plan_dataset(name, split, root, endpoint)]
