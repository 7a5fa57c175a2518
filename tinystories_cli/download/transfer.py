"""HTTP(S) and file:// fetching into a .part: resume with Range/If-Range, retries with backoff, stall
detection, redirect and header-deadline guards."""

from __future__ import annotations

import contextlib
import errno
import http.client
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tinystories_cli import __version__
from tinystories_cli.download.records import (
    CHUNK_SIZE,
    HEX64,
    Origin,
    Part,
    Progress,
    locked_part,
    origin_path,
    read_origin,
)
from tinystories_cli.errors import UserError

RETRIES = 5          # attempts after the first one, per stretch without progress
BACKOFF = 1.0        # seconds before the first retry; doubles each time
MAX_BACKOFF = 60.0
TIMEOUT = 30.0       # seconds a connect or a read may stall before it counts as a network error
IDLE_TIMEOUT = 60.0  # a window of this many seconds ...
IDLE_MIN_BYTES = 4096  # ... in which fewer bytes than this arrive is a stall (retried like a network error)
SLEEP = time.sleep   # the backoff pause when no `sleep` is passed (tests replace it)
DISK_FULL = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


class _Retry(Exception):
    """A transient failure: worth another attempt after a pause."""


class _Stalled(_Retry):
    """Too few bytes in an idle window: retried, but never counted as progress (a trickle must end)."""


class _NoRoute(_Retry):
    """The host cannot be reached at all: its name does not resolve, or the connection is refused or has
    no route. Retried only while resuming (a blip in the middle of a download); a download that has not
    started fails at once with `Unreachable`."""


OFFLINE_FIX = ("no network? a plain path or a file:// URL downloads a local copy (`out` FILE); a mirror is set "
               "with `endpoint` URL (or HF_ENDPOINT)")  # the CLI says more: which commands work offline


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
    return v if HEX64.fullmatch(v) else None


def _strong_etag(headers) -> str | None:
    v = (headers.get("ETag") or "").strip()
    return v if v and not v.startswith("W/") and len(v) <= 1024 else None


class RedirectGuard(urllib.request.HTTPRedirectHandler):
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
            raise UserError(
                f"refusing the redirect from {req.full_url} to {newurl}: "
                f"it downgrades https to {new or 'a relative URL'}",
                "use a mirror that stays on https (`endpoint`)",
            )
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
    guard = RedirectGuard()
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
            raise NotFound(url, f"{url}: HTTP 404 {e.reason}",
                           "check the URL (or `endpoint`); the file may have moved") from None
        else:
            fix = ("check the URL (or `endpoint`); the file may have moved or need a login" if e.code in (401, 403)
                   else None)
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


def disk_full(e: OSError) -> bool:
    return e.errno in DISK_FULL


def _fetch_once(url: str, part: Part, timeout: float, idle_timeout: float, chunk_size: int,
                max_bytes: int | None, progress: Progress | None) -> tuple[int, Origin]:
    """One attempt: append the rest of `url` to `part` (or restart it). Returns (total size, origin).

    Raises _Retry when the connection failed, stalled or ended early; the bytes received so far stay
    in `part`, with their origin, for the next attempt.
    """
    have, origin = _resumable(url, part)
    resp, published, linked_size = _open(url, have, origin, min(timeout, idle_timeout), idle_timeout)
    with contextlib.closing(resp):
        status = getattr(resp, "status", None) or getattr(resp, "code", None)
        headers = resp.headers
        if status == 416:
            return _range_past_end(part, headers, have, origin)
        length = _int_header(headers, "Content-Length")
        if status == 206:
            offset, total = _resumed_range(part, headers, have, origin, published, length)
        else:
            offset, total, origin = _whole_file(url, part, headers, have, length, linked_size, published)
        if max_bytes is not None and total is not None and total > max_bytes:
            part.remove()
            raise UserError(f"{url} is {total} bytes, over the limit of {max_bytes}",
                            "raise `max_bytes` if the file is expected")
        got = _receive(resp, part, url, offset, total, idle_timeout, chunk_size, max_bytes, progress)
        if length is not None and got < length:
            raise _Retry(f"connection closed after {offset + got} of {offset + length} bytes")
        if length is not None and got > length:
            part.discard()
            raise _Retry(f"server sent {got} bytes, announced {length}; starting over")
        return offset + got, origin


def _resumable(url: str, part: Part) -> tuple[int, Origin | None]:
    """The bytes in `part` a resume may append to, and their origin; bytes of unknown or foreign origin are
    discarded (never spliced)."""
    have = part.size()
    origin = read_origin(part.path)
    if have and (origin is None or origin.url != url or (origin.size is not None and have > origin.size)):
        part.discard()
        have, origin = 0, None
    return have, origin


def _range_past_end(part: Part, headers, have: int, origin: Origin | None) -> tuple[int, Origin]:
    """HTTP 416 to a resume: the .part may already be complete (e.g. interrupted before the rename)."""
    m = re.search(r"/(\d+)", headers.get("Content-Range", "") or "")
    if m and int(m.group(1)) == have and origin and origin.size in (None, have):
        return have, origin  # everything was already here
    part.discard()
    raise _Retry("the server refused to resume; starting over")


def _resumed_range(part: Part, headers, have: int, origin: Origin | None, published: str | None,
                   length: int | None) -> tuple[int, int | None]:
    """HTTP 206: (offset, total size) when the range continues the .part's bytes of the same file."""
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
    if total is None and length is not None:
        total = have + length
    return have, total


def _whole_file(url: str, part: Part, headers, have: int, length: int | None, linked_size: int | None,
                published: str | None) -> tuple[int, int | None, Origin]:
    """HTTP 200 (or file://, which has no status): the whole file, recorded as the .part's new origin.

    When we asked for a range with If-Range, a 200 means the validators changed (or no Range support):
    start over. Returns (offset 0, total size, origin).
    """
    if have:
        part.discard()
    total = length
    if linked_size is not None and total is not None and linked_size != total:
        raise UserError(f"{url}: the server announces {total} bytes but publishes a size of {linked_size}",
                        "check `endpoint`; the mirror may serve another file")
    origin = Origin(url, _strong_etag(headers), (headers.get("Last-Modified") or None) if headers else None,
                    total if total is not None else linked_size, published)
    if origin.last_modified is not None and len(origin.last_modified) > 1024:
        origin.last_modified = None
    part.set_origin(origin)  # before the first byte: every byte in a .part has a known origin
    return 0, total, origin


def _receive(resp, part: Part, url: str, offset: int, total: int | None, idle_timeout: float, chunk_size: int,
             max_bytes: int | None, progress: Progress | None) -> int:
    """Write the response body into `part` from `offset`; returns the bytes received.

    An idle window of `idle_timeout` seconds with fewer than IDLE_MIN_BYTES is a stall (_Stalled); what
    arrived is fsync'ed in any case, so a resume can trust it.
    """
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
            if not chunk:
                return got
            if max_bytes is not None and offset + got + len(chunk) > max_bytes:
                part.remove()
                raise UserError(f"{url} sent more than the limit of {max_bytes} bytes",
                                "raise `max_bytes` if the file is expected")
            _write_chunk(part, offset + got, chunk)
            got += len(chunk)
            window_bytes += len(chunk)
            if progress:
                progress("download", offset + got, total)
            if now - window_start >= idle_timeout:
                if window_bytes < IDLE_MIN_BYTES:
                    raise _Stalled(f"stalled: {window_bytes} bytes in {now - window_start:.1f} s "
                                   f"(under {IDLE_MIN_BYTES} per {idle_timeout:g} s) after {offset + got} bytes")
                window_start, window_bytes = now, 0
    finally:
        with contextlib.suppress(OSError):
            os.fsync(part.fd)  # what we keep for a resume must really be on disk


def _write_chunk(part: Part, pos: int, chunk: bytes) -> None:
    try:
        part.write_at(pos, chunk)
    except OSError as e:
        if disk_full(e):
            raise _DiskFull(e) from None
        raise UserError(f"cannot write {part.path}: {e.strerror or e}", "check the directory's permissions") from None


class _DiskFull(Exception):
    def __init__(self, err: OSError):
        self.err = err


def disk_full_error(url: str, part: Path, e: OSError, have: int | None = None) -> UserError:
    if have is None:
        with contextlib.suppress(OSError):
            have = os.lstat(part).st_size
    kept = f"kept {have} bytes in {part.name} and its origin in {origin_path(part).name} to resume" if have \
        else "nothing was kept"
    return UserError(f"disk full while downloading {url}: {e.strerror or e}; {kept}",
                     "free some disk space and rerun the same command")


def fetch_into(url: str, part: Part, *, retries: int, backoff: float, sleep: Callable[[float], None] | None,
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
                       else "check the network or `endpoint`, then rerun")
                raise UserError(f"download of {url} failed after {retries + 1} attempts: {e}", fix) from None
            (sleep or SLEEP)(min(backoff * 2 ** (failures - 1), MAX_BACKOFF))
        except _DiskFull as e:
            raise disk_full_error(url, part.path, e.err, part.size()) from None  # a short write kept some bytes too
        except KeyboardInterrupt:
            raise DownloadInterrupted(part.path, part.size()) from None


def fetch(url: str, part: str | os.PathLike, *, retries: int = RETRIES, backoff: float = BACKOFF,
          sleep: Callable[[float], None] | None = None, timeout: float = TIMEOUT, idle_timeout: float = IDLE_TIMEOUT,
          chunk_size: int = CHUNK_SIZE, max_bytes: int | None = None, progress: Progress | None = None) -> int:
    """Bring `part` up to the full content of `url`, resuming what is there. Returns its size.

    Transient failures are retried after backoff, 2*backoff, 4*backoff, ... seconds (capped); an
    attempt that added bytes resets the count, so a flaky but working link always finishes.
    """
    with locked_part(Path(part)) as p:
        return fetch_into(
            url,
            p,
            retries=retries,
            backoff=backoff,
            sleep=sleep,
            timeout=timeout,
            idle_timeout=idle_timeout,
            chunk_size=chunk_size,
            max_bytes=max_bytes,
            progress=progress,
        )[0]
