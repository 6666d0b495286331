"""nydusd's HTTP API on a unix socket, served from the daemon's trio loop.

HTTP/1.1 is h11's (a sans-I/O parser: chunked bodies, keep-alive, pipelining rules); this
module only moves bytes with trio. Limits: request head 64 KiB, body 1 MiB, 10 s per request
(and per idle keep-alive wait). The handlers only read in-memory state, so nothing blocks the
loop that also serves FUSE. A socket path that a live daemon answers on is never taken over
(`ApiSocketBusy`); a stale one (nobody listening) is replaced.

Endpoints of one mount (`DaemonApi`; field reference in docs/operations.md):

    GET  /api/v1/daemon                 id, version, state, mountpoint, image, pid, uptime
    GET  /api/v1/metrics                fs: reads, bytes, errors, latency histogram
    GET  /api/v1/metrics/backend        requests, bytes, errors, retries, latency
    GET  /api/v1/metrics/blobcache      hits, misses, sizes, evictions, prefetch progress
    GET  /api/v1/metrics/prefetch       prefetch progress alone
    GET  /api/v1/metrics/files          per-file read counts (iostats_files/access_pattern)
    GET  /api/v1/metrics/pattern        first-read order (JSON; ?format=text: paths, one a line)
    GET  /api/v1/metrics/inflight       reads being served now
    PUT  /api/v1/daemon                 {"log_level": "debug"}: change the log level (204)
    GET  /api/v1/daemon/backend         the mount's backend: type and config (secrets left out)
    GET  /api/v1/daemon/events          recent warnings and errors of this daemon
    GET  /api/v1/prefetch               learned prefetch: list found at mount, recording
    PUT  /api/v1/prefetch/push          end recording; keep the learned list and push it
    PUT  /api/v1/daemon/exit            unmount and exit 0
    PUT  /api/v1/daemon/fuse/sendfd     hand the /dev/fuse fd to the --supervisor again
    PUT  /api/v1/daemon/fuse/takeover   (--upgrade) 204 once the session is taken over
    GET  /metrics                       Prometheus text format

Errors are JSON `{"code": ..., "message": ...}` with 400/404/405/409/500/501, as nydusd does.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import logging
import os
import platform
import secrets
import socket
import stat
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable, Protocol

import h11
import trio

from nydus_py.errors import ConfigError

if TYPE_CHECKING:
    from nydus_py.daemon.learned import LearnedPrefetch
    from nydus_py.daemon.takeover import Handoff
    from nydus_py.fs.vfs import Vfs
    from nydus_py.io.prefetch import Prefetcher
    from nydus_py.metrics import Metrics

log = logging.getLogger(__name__)

MAX_HEAD = 64 << 10
MAX_BODY = 1 << 20
REQUEST_TIMEOUT = 10.0
UNIX_PATH_MAX = 108             # sun_path, NUL included
REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 404: "Not Found",
           405: "Method Not Allowed", 409: "Conflict", 413: "Payload Too Large",
           500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable"}


def version() -> str:
    from nydus_py import __version__
    return __version__


def version_info() -> dict:
    return {"package_ver": version(), "implementation": "nydus-py",
            "python": platform.python_version()}


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
class ApiSocketBusy(ConfigError):
    """Another live daemon answers on the socket path."""


def claim_socket_path(path: str) -> None:
    """Makes `path` free for bind(): refuses if a daemon answers there (taking the path over
    would cut that daemon off from its clients) or if it is not a socket; removes a stale one."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"--apisock {path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ConfigError(f"--apisock {path}: cannot check it ({e.strerror})") from None
    else:
        raise ApiSocketBusy(f"--apisock {path}: another daemon is serving its API there; "
                            f"stop it first or choose another socket")
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


async def serve_unix(path: str, handler: Handler, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Listens on `path` until cancelled; removes it then. See claim_socket_path."""
    claim_socket_path(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bound under a temporary name and renamed into place once listening: a client (or a
    # daemon's claim_socket_path) that sees `path` can connect at once, never ECONNREFUSED on
    # a socket that is not listening yet, and nobody connects before the chmod.
    tmp = os.path.join(os.path.dirname(path), f".{os.getpid()}-{secrets.token_hex(3)}.sock")
    if len(os.fsencode(tmp)) >= UNIX_PATH_MAX:
        tmp = path                  # no room for another name: bind in place
    try:
        await sock.bind(tmp)
        os.chmod(tmp, 0o600)
        sock.listen(64)
        if tmp != path:
            os.rename(tmp, path)
    except OSError:
        sock.close()
        if tmp != path:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
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


class _Reject(Exception):
    def __init__(self, resp: Response):
        self.resp = resp


async def _next_event(conn: h11.Connection, stream: trio.abc.ReceiveStream):
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as e:
            raise _Reject(error_response(e.error_status_hint, "BadRequest", f"bad HTTP: {e}")) from None
        if event is not h11.NEED_DATA:
            return event
        data = await stream.receive_some(65536)
        conn.receive_data(bytes(data))  # b"" = the peer closed


async def _read_request(conn: h11.Connection, stream: trio.abc.ReceiveStream) -> Request | None:
    """The next request on the connection; None when the client closed it between requests."""
    event = await _next_event(conn, stream)
    if isinstance(event, h11.ConnectionClosed):
        return None
    if not isinstance(event, h11.Request):
        raise _Reject(error_response(400, "BadRequest", "expected a request"))
    target = event.target.decode("latin-1")
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in event.headers}
    body = bytearray()
    while True:
        ev = await _next_event(conn, stream)
        if isinstance(ev, h11.Data):
            body += ev.data
            if len(body) > MAX_BODY:
                raise _Reject(error_response(413, "TooLarge", "body too large"))
        elif isinstance(ev, h11.EndOfMessage):
            break
        else:
            raise _Reject(error_response(400, "BadRequest", "incomplete request"))
    url = urllib.parse.urlsplit(target)
    query = dict(urllib.parse.parse_qsl(url.query))
    return Request(event.method.decode("latin-1").upper(), url.path, query, headers, bytes(body))


async def _send(conn: h11.Connection, stream: trio.abc.SendStream, resp: Response) -> None:
    headers = [("Content-Type", resp.content_type), ("Content-Length", str(len(resp.body)))]
    if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
        headers.append(("Connection", "close"))
    data = conn.send(h11.Response(status_code=resp.status, headers=headers,
                                  reason=REASONS.get(resp.status, "Unknown")))
    if resp.body:
        data += conn.send(h11.Data(data=resp.body))
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)


async def _connection(stream: trio.SocketStream, handler: Handler) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    async with stream:
        while True:
            try:
                with trio.fail_after(REQUEST_TIMEOUT):
                    req = await _read_request(conn, stream)
            except _Reject as e:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    try:
                        await _send(conn, stream, e.resp)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
                        pass
                return
            except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if req is None:
                return
            resp: Response
            try:
                resp = await handler(req)
            except ApiError as e:
                resp = error_response(e.status, e.code, str(e))
            except Exception as e:
                log.exception("api: %s %s failed", req.method, req.path)
                resp = error_response(500, "InternalError", f"{type(e).__name__}: {e}")
            try:
                await _send(conn, stream, resp)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            finally:
                if resp.after is not None:
                    resp.after()
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return


# -- events and log level -------------------------------------------------------------------------
class EventLog(logging.Handler):
    """The daemon's recent warnings and errors, for GET /api/v1/daemon/events."""

    def __init__(self, capacity: int = 256):
        super().__init__(logging.WARNING)
        self._events: collections.deque[dict] = collections.deque(maxlen=capacity)
        self._lock2 = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except (TypeError, ValueError):  # a bad format call must not break logging
            msg = str(record.msg)
        with self._lock2:
            self._events.append({"timestamp": round(record.created, 3), "level": record.levelname,
                                 "logger": record.name, "message": msg})

    def snapshot(self) -> list[dict]:
        with self._lock2:
            return list(self._events)


_event_log: EventLog | None = None


def event_log() -> EventLog:
    """The process's EventLog, attached to the root logger on first use."""
    global _event_log
    if _event_log is None:
        _event_log = EventLog()
        logging.getLogger().addHandler(_event_log)
    return _event_log


LOG_LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
              "warn": logging.WARNING, "warning": logging.WARNING, "error": logging.ERROR}


def set_log_level(body: object) -> None:
    """PUT /api/v1/daemon with nydusd's body {"log_level": "debug"}."""
    if not isinstance(body, dict) or set(body) != {"log_level"}:
        raise ApiError(400, "BadRequest", "expected {\"log_level\": \"trace|debug|info|warn|error\"}")
    level = body["log_level"]
    if not isinstance(level, str) or level.lower() not in LOG_LEVELS:
        raise ApiError(400, "BadRequest", f"log_level: one of trace, debug, info, warn, error, not {level!r}")
    n = LOG_LEVELS[level.lower()]
    logging.getLogger().setLevel(n)
    logging.getLogger("pyfuse3").setLevel(max(n, logging.INFO))
    log.info("log level set to %s through the API", level.lower())


def backend_info(config, backend_type: str) -> dict:
    """A BackendConfig as JSON for GET /api/v1/daemon/backend, without secrets (the fields
    kept out of repr: auth, tokens, keys)."""
    import dataclasses
    if config is None:
        return {"type": backend_type}

    def plain(obj):
        if dataclasses.is_dataclass(obj):
            return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                    if f.repr and getattr(obj, f.name) is not None}
        if isinstance(obj, (list, tuple)):
            return [plain(x) for x in obj]
        return obj
    settings = config.settings
    return {"type": config.type, "retry_limit": config.retry_limit,
            "config": plain(settings) if settings is not None else {}}


# -- clients --------------------------------------------------------------------------------------
def _build(method: str, target: str, body: bytes | None) -> bytes:
    body = body or b""
    return (f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


def _parse_response(raw: bytes) -> tuple[int, bytes]:
    """(status, body). A daemon that closes the connection without a status line (it is
    exiting: stopped, killed, or handing its session over in a hot upgrade) is a
    ConnectionError, an OSError like a refused connect, so callers handle both alike."""
    head, _, body = raw.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise ConnectionError(f"no HTTP response ({len(raw)} bytes before the daemon closed "
                              "the connection)") from None
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
class ServedFilesystem(Protocol):
    """What DaemonApi reports on (daemon/mount.py's Filesystem)."""
    vfs: Vfs
    metrics: Metrics
    description: str
    cache_dir: str
    backend_type: str


class DaemonApi:
    """Routes for a daemon serving one mount. `fs` is mount.Filesystem; `stop()` ends it."""

    def __init__(self, *, daemon_id: str, mountpoint: str, fs: ServedFilesystem, stop: Callable[[], None],
                 prefetcher: Prefetcher | None = None, access_pattern: bool = False,
                 iostats_files: bool = False, backend_config=None, learned: LearnedPrefetch | None = None,
                 handoff: Handoff | None = None):
        self.backend_config = backend_config
        self.events = event_log()
        self.id = daemon_id
        self.mountpoint = mountpoint
        self.fs = fs
        self.stop = stop
        self.prefetcher = prefetcher
        self.learned = learned          # daemon/learned.LearnedPrefetch or None
        self.access_pattern = access_pattern
        self.iostats_files = iostats_files
        self.handoff = handoff          # takeover.Handoff when a supervisor keeps the session
        self.state = "RUNNING"
        self.started = time.time()

    def info(self) -> dict:
        return {"id": self.id, "version": version_info(), "state": self.state,
                "pid": os.getpid(), "mountpoint": self.mountpoint, "image": self.fs.description,
                "uptime_secs": round(time.time() - self.started, 3),
                "supervisor": self.handoff.supervisor if self.handoff else None}

    def fs_metrics(self) -> dict:
        fs = self.fs.metrics.fs.snapshot()
        return {"id": self.id,
                "files_account_enabled": self.iostats_files,
                "access_pattern_enabled": self.access_pattern,
                "measure_latency": True,      # every read's latency is measured (read_latency)
                "data_read": fs.get("read_bytes", 0),
                "fop_hits": {"read": fs.get("read_count", 0)},
                "fop_errors": {"read": fs.get("read_errors", 0)},
                "read_latency": fs.get("read_latency"),
                **fs}

    def backend_metrics(self) -> dict:
        b = self.fs.metrics.backend.snapshot()
        return {"id": self.id, "backend_type": self.fs.backend_type,
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
        if route == ("PUT", "/api/v1/daemon"):
            set_log_level(req.json())
            return Response(204)
        if route == ("GET", "/api/v1/daemon/backend"):
            return json_response({self.mountpoint: backend_info(
                self.backend_config, getattr(self.fs, "backend_type", ""))})
        if route == ("GET", "/api/v1/daemon/events"):
            return json_response({"events": self.events.snapshot()})
        if route == ("GET", "/api/v1/prefetch"):
            return json_response(self.learned.status() if self.learned is not None
                                 else {"enable": False})
        if route == ("PUT", "/api/v1/prefetch/push"):
            learned = self.learned
            if learned is None or learned.recorder is None:
                raise ApiError(400, "Disabled", "learned prefetch recording is off")
            return json_response(await trio.to_thread.run_sync(lambda: learned.finish(push=True)))
        if route == ("PUT", "/api/v1/daemon/exit"):
            self.state = "STOPPING"
            return Response(204, after=self.stop)
        if route in (("PUT", "/api/v1/daemon/fuse/sendfd"), ("PUT", "/api/v1/daemon/fuse/takeover")):
            return await self._fuse_handoff(route[1])
        if route == ("GET", "/metrics"):
            from nydus_py.prometheus import CONTENT_TYPE, text
            return Response(200, text(self.fs.metrics).encode(), CONTENT_TYPE)
        if req.path.startswith("/api/v1/mount"):
            raise ApiError(501, "NotSupported", "this daemon serves one mount; run `nydusd serve` "
                           "to mount several images from one daemon")
        known = {"/api/v1/daemon", "/api/v1/daemon/exit", "/api/v1/daemon/backend",
                 "/api/v1/daemon/events", "/metrics", "/api/v1/prefetch", "/api/v1/prefetch/push",
                 "/api/v1/daemon/fuse/sendfd", "/api/v1/daemon/fuse/takeover"}
        if req.path in known or req.path.startswith("/api/v1/metrics"):
            raise ApiError(405, "MethodNotAllowed", f"{req.method} {req.path}")
        raise ApiError(404, "NotFound", f"no endpoint {req.path}")

    async def _fuse_handoff(self, path: str) -> Response:
        """The API serves only once the session is established (a takeover happens before
        the loop starts), so takeover just confirms; sendfd gives a (restarted) supervisor
        the fd again."""
        from nydus_py.daemon.takeover import TakeoverError
        if self.handoff is None:
            raise ApiError(400, "NoSupervisor", "this daemon was started without --supervisor")
        if path.endswith("/sendfd"):
            try:
                await self.handoff.sendfd()
            except (TakeoverError, OSError) as e:
                raise ApiError(500, "SendFdFailed", str(e)) from None
        return Response(204)
