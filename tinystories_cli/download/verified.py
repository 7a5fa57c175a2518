"""One URL to one verified file: fetch into the .part, check size and sha256, unpack a .gz source, rename
into place and write the .sha256 record; a complete file is skipped."""

from __future__ import annotations

import errno
import gzip
import hashlib
import os
import zlib
from collections.abc import Callable
from pathlib import Path

from tinystories_cli.download.records import (
    CHUNK_SIZE,
    HEX64,
    DownloadResult,
    Part,
    Progress,
    check_complete,
    locked_part,
    origin_path,
    part_path,
    remove_stale_temps,
    write_record,
)
from tinystories_cli.download.registry import PlannedFile, plan_dataset
from tinystories_cli.download.transfer import (
    BACKOFF,
    IDLE_TIMEOUT,
    RETRIES,
    TIMEOUT,
    DownloadInterrupted,
    disk_full,
    disk_full_error,
    fetch_into,
)
from tinystories_cli.errors import UserError
from tinystories_cli.fileio import atomic_write, fsync_dir


class _BadGzip(Exception):
    pass


def _gunzip(part: Part, dest: Path, progress: Progress | None, chunk_size: int, cap: int | None,
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
                    raise UserError(
                        f"unpacking {part.path.name} exceeds {cap} bytes ({cap_source}); stopped and removed "
                        f"the partial output, the verified download stays in {part.path.name}",
                        "the source may be a gzip bomb; if it really is that large, rerun with a larger `max_bytes`",
                    )
                out.write(chunk)
                h.update(chunk)
                if progress:
                    progress("decompress", raw.tell(), total)
    except _BadGzip as e:
        part.remove()
        raise UserError(f"{part.path.name} is not a valid gzip file ({e}); it was removed",
                        "rerun to download it again") from None
    except OSError as e:
        if disk_full(e):
            raise UserError(
                f"disk full while unpacking into {dest}: {e.strerror or e}; the partial output was removed, "
                f"the verified download stays in {part.path.name}",
                f"free at least {written} bytes more and rerun the same command",
            ) from None
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
    sha256 = _checked_sha256(sha256)
    if max_bytes is not None and max_bytes <= 0:
        raise UserError(f"`max_bytes` must be positive, got {max_bytes}")
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
        with locked_part(part) as p:
            remove_stale_temps(out)
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
        err = _write_error(url, out, part, e)
        if err is e:
            raise
        raise err from None


def _checked_sha256(sha256: str | None) -> str | None:
    """An expected sha256 as lowercase hex (None stays None)."""
    if sha256 is not None:
        sha256 = sha256.strip().lower()
        if not HEX64.fullmatch(sha256):
            raise UserError(f"`sha256` must be 64 hex digits, got {sha256!r}")
    return sha256


def _write_error(url: str, out: Path, part: Path, e: OSError) -> Exception:
    """The one-line error for an OSError while writing next to `out`; `e` itself when there is none."""
    if disk_full(e):
        return disk_full_error(url, part, e)
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"cannot write next to {out}: {e.strerror}", "check the directory's permissions")
    if e.filename is not None:  # e.g. a directory where the .part's origin file goes
        return UserError(f"cannot write {e.filename}: {e.strerror or e}", "move it away and rerun")
    return e


def _tidy_after_skip(out: Path) -> None:
    """A complete file with a leftover .part: a run stopped after the record. Remove its .part and temps."""
    part = part_path(out)
    if not os.path.lexists(part):
        return
    try:
        with locked_part(part, create=False) as p:
            remove_stale_temps(out)
            p.remove()
    except (UserError, OSError):
        pass  # locked by another download, or not ours to touch: leave it


def _download_part(url: str, out: Path, part: Part, sha256: str | None, size: int | None, gunzip: bool,
                   progress: Progress | None, resumed_from: int, *, chunk_size: int, max_unpacked: int | None,
                   max_bytes: int | None, **fetch_kwargs) -> DownloadResult:
    n, origin = fetch_into(url, part, chunk_size=chunk_size, progress=progress, max_bytes=max_bytes, **fetch_kwargs)
    for expected, what in ((size, "expected"), (origin.size, "announced by the server")):
        if expected is not None and n != expected:
            part.remove()
            raise UserError(f"{url}: got {n} bytes, {what} {expected}; the partial file was removed",
                            "rerun to download it again, or check `endpoint`")
    source_sha = part.sha256(progress)
    for expected, what in ((sha256, "expected"), (origin.sha256, "published by the server")):
        if expected is not None and source_sha != expected:
            part.remove()
            raise UserError(
                f"sha256 mismatch for {url}: {what} {expected}, got {source_sha}; nothing was kept",
                "check the `sha256` value or the source"
                if what == "expected"
                else "rerun; if it persists, check `endpoint`",
            )
    verified = sha256 is not None or origin.sha256 is not None
    record = dict(source_sha256=source_sha, source_size=n, url=url, verified=verified)
    if gunzip:
        cap, cap_source = ((max_bytes, "`max_bytes`") if max_bytes is not None
                           else (max_unpacked, "the registry's limit"))
        out_sha = _gunzip(part, out, progress, chunk_size, cap, cap_source)
        fsync_dir(out.parent)
        write_record(out, sha256=out_sha, **record)
        part.remove()  # last: until the record exists, the .part marks the download as unfinished
    else:
        out_sha = source_sha
        write_record(out, sha256=out_sha, st=os.fstat(part.fd), **record)
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
