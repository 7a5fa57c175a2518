"""The local HTTP server the download tests talk to (127.0.0.1, an ephemeral port), and their helpers.

The handler's behaviour per path is set by a test through `Route`: drop the connection half way, ignore
Range, fail with 5xx a few times, redirect, trickle, 404. The `server` and `sleeps` fixtures (tests/conftest.py)
use it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.server
import json
import threading
import time
from collections.abc import Iterator

from tinystories_cli import download as dl

BODY = b"".join(b"Once upon a time there was story number %d.\n<|endoftext|>\n" % i for i in range(3000))  # ~170 KB
SHA = hashlib.sha256(BODY).hexdigest()


@dataclasses.dataclass
class Route:
    body: bytes
    status: int = 200
    ranges: bool = True        # honour Range requests with 206
    drop_first: int = 0        # the first N GETs send half the body, then close the connection
    fail_first: int = 0        # the first N GETs answer 500
    redirect: str | None = None  # answer 302 to this path (as the Hub does for large files)
    etag: str | None = "auto"  # strong ETag sent (and checked against If-Range); "auto": derived from the body
    headers: dict = dataclasses.field(default_factory=dict)  # extra headers on every answer (e.g. X-Linked-Etag)
    trickle: float = 0.0       # send one byte every `trickle` seconds (at most 200 bytes), like a stalled server
    throttle: float = 0.0      # pause this long after every 8 KB (slow but steady)
    slow_headers: float = 0.0  # send the status line and headers one byte every `slow_headers` seconds
    if_range: bool = True      # honour If-Range (False: a server that ignores it and answers Range anyway)

    def current_etag(self) -> str | None:
        return f'"{hashlib.sha256(self.body).hexdigest()[:20]}"' if self.etag == "auto" else self.etag


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        srv = self.server
        srv.log.append((self.path, self.headers.get("Range")))
        srv.if_range_log.append(self.headers.get("If-Range"))
        route = srv.routes.get(self.path)
        if route is None or route.status == 404:
            self.send_error(404, "Not Found")
            return
        if route.redirect:
            self.send_response(302)
            for k, v in route.headers.items():
                self.send_header(k, v)
            self.send_header("Location", route.redirect)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if route.slow_headers:
            try:
                for b in b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\nX-Padding: " + b"x" * 200:
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                    time.sleep(route.slow_headers)
            except OSError:
                pass
            self.close_connection = True
            return
        if route.fail_first > 0:
            route.fail_first -= 1
            self.send_error(500, "Internal Server Error")
            return
        body, start = route.body, 0
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if route.if_range and if_range is not None and if_range != route.current_etag():
            rng = None  # RFC 9110: a validator that does not match means "send the whole, current file"
        if rng and route.ranges:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        if route.current_etag():
            self.send_header("ETag", route.current_etag())
        for k, v in route.headers.items():
            self.send_header(k, v)
        self.end_headers()
        if route.trickle:
            try:
                for i in range(min(len(payload), 200)):
                    self.wfile.write(payload[i:i + 1])
                    self.wfile.flush()
                    time.sleep(route.trickle)
            except OSError:
                pass
            self.close_connection = True
            return
        if route.throttle:
            try:
                for i in range(0, len(payload), 8192):
                    self.wfile.write(payload[i:i + 8192])
                    self.wfile.flush()
                    time.sleep(route.throttle)
            except OSError:
                pass
            return
        if route.drop_first > 0:
            route.drop_first -= 1
            self.wfile.write(payload[: len(payload) // 2])
            self.close_connection = True  # HTTP/1.0 anyway: the socket closes with half the body sent
            return
        self.wfile.write(payload)


def write_origin(out, url, etag=None, size=None, sha256=None):
    """The sidecar a download writes beside its .part (as if an earlier run had stopped)."""
    origin = {"version": 1, "url": url, "etag": etag, "last_modified": None, "size": size, "sha256": sha256}
    dl.origin_path(dl.part_path(out)).write_text(json.dumps(origin))


def interrupt_at(n_bytes: int = 40_000):
    """A `progress` callback for `download_url` that stops it as Ctrl-C would (KeyboardInterrupt) once
    `n_bytes` have been downloaded."""
    def progress(stage, done, total):
        if stage == "download" and done >= n_bytes:
            raise KeyboardInterrupt

    return progress


def leftovers(path):
    """The names beside `path` that start with its name (the file, its .part, its sidecars)."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name))


@contextlib.contextmanager
def serve() -> Iterator[http.server.ThreadingHTTPServer]:
    """A running server with no routes yet (`srv.routes[path] = Route(...)`), its requests in `srv.log`."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.routes, srv.log, srv.if_range_log = {}, [], []
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(timeout=5)
