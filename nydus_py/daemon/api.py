"""nydusd's HTTP API on a unix socket, served from the daemon's trio loop.

A deliberately small HTTP/1.1 server (no dependency): one request per connection
(`Connection: close`), request line + headers up to 64 KiB, a `Content-Length` body up to
1 MiB, 10 s to send them. Everything is trio I/O; the handlers only read in-memory state, so
nothing blocks the loop that also serves FUSE.

Endpoints of one mount (`DaemonApi`; field reference in docs/operations.md):

    GET  /api/v1/daemon                 id, version, state, mountpoint, image, pid, uptime
    GET  /api/v1/metrics                fs: reads, bytes, errors, latency histogram
    GET  /api/v1/metrics/backend        requests, bytes, errors, retries, latency
    GET  /api/v1/metrics/blobcache      hits, misses, sizes, evictions, prefetch progress
    GET  /api/v1/metrics/prefetch       prefetch progress alone
    GET  /api/v1/metrics/files          per-file read counts (iostats_files/access_pattern)
    GET  /api/v1/metrics/pattern        first-read order (JSON; ?format=text: paths, one a line)
    GET  /api/v1/metrics/inflight       reads being served now
    GET  /api/v1/prefetch               learned prefetch: list found at mount, recording
    PUT  /api/v1/prefetch/push          end recording; keep the learned list and push it
    PUT  /api/v1/daemon/exit            unmount and exit 0
    GET  /metrics                       Prometheus text format

Errors are JSON `{"code": ..., "message": ...}` with 400/404/405/409/500/501, as nydusd does.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import time
import urllib.parse
from dataclasses import dataclass, field
from importlib import metadata
from typing import Awaitable, Callable

import trio

log = logging.getLogger(__name__)

MAX_HEAD = 64 << 10
MAX_BODY = 1 << 20
REQUEST_TIMEOUT = 10.0
REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 404: "Not Found",
           405: "Method Not Allowed", 409: "Conflict", 413: "Payload Too Large",
           500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable"}


def version() -> str:
    try:
        return metadata.version("nydus-py")
    except metadata.PackageNotFoundError:
        return "unknown"


def version_info() -> dict:
    return {"package_ver": version(), "implementation": "nydus-py",
            "python": platform.python_version(), "profile": "release"}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes = b""

    def json(self) -> object:
        if not self.body:
            return {}
        try:
            return json.loads(self.body)
        except ValueError as e:
            raise ApiError(400, "BadRequest", f"body is not JSON: {e}") from None


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    after: Callable[[], None] | None = field(default=None, repr=False)  # run once sent


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


def json_response(obj: object, status: int = 200) -> Response:
    return Response(status, json.dumps(obj, indent=None, default=str).encode() + b"\n")


def error_response(status: int, code: str, message: str) -> Response:
    return json_response({"code": code, "message": message}, status)


Handler = Callable[[Request], Awaitable[Response]]


# -- server ---------------------------------------------------------------------------------------
async def serve_unix(path: str, handler: Handler, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Listens on `path` (a stale socket file is replaced) until cancelled; removes it then."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    listener = trio.SocketListener(sock)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, lambda s: _connection(s, handler), [listener])
            task_status.started(path)
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


async def _read_request(stream: trio.abc.ReceiveStream) -> Request | Response:
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_HEAD:
            return error_response(413, "TooLarge", "request head too large")
        data = await stream.receive_some(65536)
        if not data:
            raise EOFError
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, _version = lines[0].split(" ", 2)
    except ValueError:
        return error_response(400, "BadRequest", "malformed request line")
    headers = {}
    for ln in lines[1:]:
        k, sep, v = ln.partition(":")
        if sep:
            headers[k.strip().lower()] = v.strip()
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        return error_response(400, "BadRequest", "bad Content-Length")
    if length > MAX_BODY or length < 0:
        return error_response(413, "TooLarge", "body too large")
    body = bytearray(rest)
    while len(body) < length:
        data = await stream.receive_some(length - len(body))
        if not data:
            raise EOFError
        body += data
    url = urllib.parse.urlsplit(target)
    query = dict(urllib.parse.parse_qsl(url.query))
    return Request(method.upper(), url.path, query, headers, bytes(body[:length]))


async def _connection(stream: trio.SocketStream, handler: Handler) -> None:
    async with stream:
        resp: Response
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                req = await _read_request(stream)
        except (EOFError, trio.TooSlowError, trio.BrokenResourceError):
            return
        if isinstance(req, Response):
            resp = req
        else:
            try:
                resp = await handler(req)
            except ApiError as e:
                resp = error_response(e.status, e.code, str(e))
            except Exception as e:
                log.exception("api: %s %s failed", req.method, req.path)
                resp = error_response(500, "InternalError", f"{type(e).__name__}: {e}")
        head = (f"HTTP/1.1 {resp.status} {REASONS.get(resp.status, 'Unknown')}\r\n"
                f"Content-Type: {resp.content_type}\r\nContent-Length: {len(resp.body)}\r\n"
                "Connection: close\r\n\r\n").encode()
        try:
            await stream.send_all(head + resp.body)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        if resp.after is not None:
            resp.after()


# -- clients --------------------------------------------------------------------------------------
def _build(method: str, target: str, body: bytes | None) -> bytes:
    body = body or b""
    return (f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


def _parse_response(raw: bytes) -> tuple[int, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body


async def call(sock_path: str, method: str, target: str, body: bytes | None = None,
               timeout: float = 10.0) -> tuple[int, bytes]:
    """One request to a unix-socket API from trio: (status, body)."""
    with trio.fail_after(timeout):
        stream = await trio.open_unix_socket(sock_path)
        async with stream:
            await stream.send_all(_build(method, target, body))
            parts = []
            while data := await stream.receive_some(65536):
                parts.append(data)
    return _parse_response(b"".join(parts))


def call_sync(sock_path: str, method: str, target: str, body: bytes | None = None,
              timeout: float = 10.0) -> tuple[int, bytes]:
    """The same, blocking (CLI tools and tests)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(sock_path)
        s.sendall(_build(method, target, body))
        parts = []
        while data := s.recv(65536):
            parts.append(data)
    return _parse_response(b"".join(parts))


def get_json(sock_path: str, target: str, method: str = "GET", body: object = None,
             timeout: float = 10.0) -> tuple[int, object]:
    status, raw = call_sync(sock_path, method, target,
                            json.dumps(body).encode() if body is not None else None, timeout)
    try:
        return status, json.loads(raw) if raw.strip() else None
    except ValueError:
        return status, raw.decode("utf-8", "replace")


# -- the endpoints of one mount -------------------------------------------------------------------
class DaemonApi:
    """Routes for a daemon serving one mount. `fs` is mount.Filesystem; `stop()` ends it."""

    def __init__(self, *, daemon_id: str, mountpoint: str, fs, stop: Callable[[], None],
                 prefetcher=None, access_pattern: bool = False, iostats_files: bool = False,
                 learned=None):
        self.id = daemon_id
        self.mountpoint = mountpoint
        self.fs = fs
        self.stop = stop
        self.prefetcher = prefetcher
        self.learned = learned          # daemon/learned.LearnedPrefetch or None
        self.access_pattern = access_pattern
        self.iostats_files = iostats_files
        self.state = "RUNNING"
        self.started = time.time()

    def info(self) -> dict:
        return {"id": self.id, "version": version_info(), "state": self.state,
                "pid": os.getpid(), "mountpoint": self.mountpoint, "image": self.fs.description,
                "uptime_secs": round(time.time() - self.started, 3), "supervisor": None}

    def fs_metrics(self) -> dict:
        fs = self.fs.metrics.fs.snapshot()
        return {"id": self.id,
                "files_account_enabled": self.iostats_files,
                "access_pattern_enabled": self.access_pattern,
                "measure_latency": True,
                "data_read": fs.get("read_bytes", 0),
                "fop_hits": {"read": fs.get("read_count", 0)},
                "fop_errors": {"read": fs.get("read_errors", 0)},
                "read_latency": fs.get("read_latency"),
                "nr_opens": 0,
                **fs}

    def backend_metrics(self) -> dict:
        b = self.fs.metrics.backend.snapshot()
        return {"id": self.id, "backend_type": getattr(self.fs, "backend_type", ""),
                "read_count": b.get("read_count", 0), "read_errors": b.get("read_errors", 0),
                "read_amount_total": b.get("read_amount_total", 0), **b}

    def prefetch_metrics(self) -> dict:
        return self.fs.metrics.group("prefetch").snapshot()

    def blobcache_metrics(self) -> dict:
        c = self.fs.metrics.blobcache.snapshot()
        p = self.prefetch_metrics()
        return {"id": self.id, "hits": c.get("hits", 0), "misses": c.get("misses", 0),
                "size": c.get("total_bytes", c.get("used_bytes", 0)),
                "underlying_files": self.fs.cache_dir,
                "prefetch_data_amount": p.get("fetched_bytes", 0),
                "prefetch_requests_count": p.get("fetched_chunks", 0),
                "prefetch": p, **c}

    async def handle(self, req: Request) -> Response:
        route = (req.method, req.path.rstrip("/") or "/")
        vfs = self.fs.vfs
        if route == ("GET", "/api/v1/daemon"):
            return json_response(self.info())
        if route == ("GET", "/api/v1/metrics"):
            return json_response(self.fs_metrics())
        if route == ("GET", "/api/v1/metrics/backend"):
            return json_response(self.backend_metrics())
        if route == ("GET", "/api/v1/metrics/blobcache"):
            return json_response(self.blobcache_metrics())
        if route == ("GET", "/api/v1/metrics/prefetch"):
            return json_response(self.prefetch_metrics())
        if route == ("GET", "/api/v1/metrics/files"):
            if vfs.access is None:
                raise ApiError(400, "Disabled", "per-file metrics are off (iostats_files)")
            return json_response(vfs.access.files())
        if route == ("GET", "/api/v1/metrics/pattern"):
            if vfs.access is None:
                raise ApiError(400, "Disabled", "access pattern recording is off (access_pattern)")
            if req.query.get("format") == "text":
                return Response(200, vfs.access.paths().encode("utf-8", "surrogateescape"),
                                "text/plain; charset=utf-8")
            return json_response(vfs.access.pattern())
        if route == ("GET", "/api/v1/metrics/inflight"):
            return json_response({"values": vfs.inflight.snapshot(vfs.bootstrap.path_of)})
        if route == ("GET", "/api/v1/prefetch"):
            return json_response(self.learned.status() if self.learned is not None
                                 else {"enable": False})
        if route == ("PUT", "/api/v1/prefetch/push"):
            if self.learned is None or self.learned.recorder is None:
                raise ApiError(400, "Disabled", "learned prefetch recording is off")
            return json_response(await trio.to_thread.run_sync(
                lambda: self.learned.finish(push=True)))
        if route == ("PUT", "/api/v1/daemon/exit"):
            self.state = "STOPPING"
            return Response(204, after=self.stop)
        if route == ("GET", "/metrics"):
            return Response(200, self.fs.metrics.render_prometheus().encode(),
                            "text/plain; version=0.0.4")
        if req.path.startswith("/api/v1/mount"):
            raise ApiError(501, "NotSupported", "this daemon serves one mount; run `nydusd serve` "
                           "to mount several images from one daemon")
        known = {"/api/v1/daemon", "/api/v1/daemon/exit", "/metrics", "/api/v1/prefetch",
                 "/api/v1/prefetch/push"}
        if req.path in known or req.path.startswith("/api/v1/metrics"):
            raise ApiError(405, "MethodNotAllowed", f"{req.method} {req.path}")
        raise ApiError(404, "NotFound", f"no endpoint {req.path}")
