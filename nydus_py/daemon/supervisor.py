"""`nydusd serve`: one daemon, several mounts, driven by the HTTP API.

pyfuse3 keeps its FUSE session in module globals: one mount per process. So this daemon does
not mount anything itself. Each `POST /api/v1/mount?mountpoint=M` starts a child
`nydusd mount ... --apisock STATE/N.sock M` that shares the daemon's cache directory (the
cache's per-blob locks make that safe, see cache/gc.py) and serves its own FUSE loop; the
supervisor waits until the child's API says RUNNING, then answers. Why processes and not
threads: see docs/operations.md ("One daemon, several mounts").

    POST   /api/v1/mount?mountpoint=M   {"source": "oci:DIR[:TAG]"} or {"bootstrap": F,
                                        "blob_dir": D} or {"bootstrap": F, "config": {...}};
                                        optional "config" (nydusd JSON, e.g. fs_prefetch),
                                        "prefetch_files": [paths]
    DELETE /api/v1/mount?mountpoint=M   graceful unmount (SIGTERM to the child), 204
    GET    /api/v1/mount                the mounts, their state and child pid
    GET    /api/v1/daemon               id, version, state, mounts
    GET    /api/v1/metrics[/*]          ?mountpoint=M: that mount's answer (proxied);
                                        without: numbers summed over mounts (pattern, files,
                                        inflight: a map by mountpoint)
    GET    /metrics                     every mount's Prometheus text, labelled mountpoint="M"
    PUT    /api/v1/daemon/exit          unmount everything and exit 0 (as SIGTERM/SIGINT)

A child that dies on its own (crash, kill -9) is restarted (its stale mountpoint is cleared by
the new child) up to RESTART_LIMIT times; its cache stays valid. When the supervisor itself is
killed, the children get SIGTERM (PR_SET_PDEATHSIG) and unmount.

With `--failover` each child is a `nydusd mount --failover` (it keeps its FUSE fd and replaces
its own daemon; daemon/takeover.py): children outlive a killed `serve`, a new one adopts a
running child when asked to mount its mountpoint again, and SIGHUP hot-upgrades every mount.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from nydus_py import prometheus
from nydus_py.cache import safedir
from nydus_py.daemon import api as api_mod
from nydus_py.daemon import forkserver
from nydus_py.daemon.api import ApiError, Request, Response, json_response
from nydus_py.daemon.watchdog import MOUNT_GRACE, StopWatchdog
from nydus_py.errors import ConfigError

if TYPE_CHECKING:
    from nydus_py.daemon.fdsupervisor import AdoptedProcess

log = logging.getLogger(__name__)

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
# From SIGTERM (or PUT /api/v1/daemon/exit) to a forced exit: each mount child first gets its
# own grace to stop (it bounds itself the same way), then we kill what is left and detach it.
STOP_GRACE = MOUNT_GRACE + 3.0
RESTART_LIMIT = 3
PR_SET_PDEATHSIG = 1


def _create(path: str) -> int:
    """A state file, 0600, never through a symlink planted under its name."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def _die_with_parent() -> None:  # preexec_fn: runs in the child between fork and exec
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except Exception:
        pass


class _ChildProcess:
    """A child forked by the trio thread itself. PR_SET_PDEATHSIG fires when the *thread* that
    forked the child exits; trio.lowlevel.open_process forks in a worker thread, and trio ends
    idle worker threads after 10 s, which sent SIGTERM to every mount 10 s after it started.
    The subset of trio.Process the supervisor uses; wait() polls a pidfd, as trio does."""

    def __init__(self, argv: list[str], **kw):
        self._popen = subprocess.Popen(argv, **kw)
        self.pid = self._popen.pid
        self._pidfd = os.pidfd_open(self.pid)

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    async def wait(self) -> int:
        if self._popen.poll() is None and self._pidfd >= 0:
            await trio.lowlevel.wait_readable(self._pidfd)
        code = self._popen.wait()
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        return code

    def send_signal(self, sig: int) -> None:
        self._popen.send_signal(sig)          # a no-op once reaped: never hits a reused pid

    def terminate(self) -> None:
        self._popen.terminate()

    def kill(self) -> None:
        self._popen.kill()


@dataclass
class Child:
    mountpoint: str
    number: int
    argv: list[str]
    sock: str
    log_file: str
    err_file: str
    source: str
    proc: _ChildProcess | forkserver.ForkedChild | AdoptedProcess | None = None
    state: str = "STARTING"       # STARTING, RUNNING, RESTARTING, STOPPING, FAILED
    restarts: int = 0
    started: float = field(default_factory=time.time)
    stopping: bool = False
    exited: trio.Event = field(default_factory=trio.Event)

    def info(self) -> dict:
        return {"mountpoint": self.mountpoint, "source": self.source, "state": self.state,
                "pid": self.proc.pid if self.proc else None, "apisock": self.sock,
                "log_file": self.log_file, "restarts": self.restarts}


class Supervisor:
    def __init__(self, *, apisock: str, daemon_id: str = "", cache_dir: str | None = None,
                 cache_max_size: int | None = None, state_dir: str | None = None,
                 log_level: str = "info", failover: bool = False,
                 metrics_address: str | None = None, mount_entry: forkserver.Entry | None = None):
        """`mount_entry` is `nydusd`'s main(argv), run by forked mount children (the CLI hands
        it in: this module imports no CLI); None starts every child as a new process.
        Failover children are never forked (see _start_process)."""
        api_mod.claim_socket_path(apisock)      # a live daemon's socket is never taken over
        self.apisock = apisock
        self.failover = failover      # each mount child keeps its FUSE fd (daemon/takeover.py)
        self.metrics_address = metrics_address
        if metrics_address:
            try:
                prometheus.split_address(metrics_address)     # a bad address fails before any fork
            except ValueError as e:
                raise ConfigError(str(e)) from None
        self.id = daemon_id or f"nydusd-{os.getpid()}"
        self.cache_max_size = cache_max_size
        self._own_state = state_dir is None
        self.state_dir = state_dir or tempfile.mkdtemp(prefix="nydusd-serve-")
        # 0700 whatever the umask; as root, refused if a non-root user owns or can write to it
        safedir.ensure_dir(self.state_dir, what="state directory")
        self.cache_dir = cache_dir or os.path.join(self.state_dir, "cache")
        safedir.ensure_dir(self.cache_dir, what="cache directory")
        self.log_level = log_level
        self.mounts: dict[str, Child] = {}
        self.state = "RUNNING"
        self.started = time.time()
        self._seq = 0
        self._exit = trio.Event()
        self._nursery: trio.Nursery | None = None
        # Mount children are forked from a pre-imported process (daemon/forkserver.py) unless
        # NYDUS_PY_NO_FORKSERVER=1; they start ~0.2 s sooner than a new interpreter. Not with
        # --failover: those children are exec'd (see _start_process), so a server would only
        # cost a process and its imports.
        self._mount_entry = mount_entry
        self.use_forkserver = (mount_entry is not None and not failover
                               and os.environ.get("NYDUS_PY_NO_FORKSERVER", "") != "1")
        self._forkserver: forkserver.ForkServer | None = None
        self._metrics_server: Any = None
        self._watchdog = StopWatchdog(lambda: list(self.mounts), STOP_GRACE, before_exit=self._kill_children)

    # -- lifecycle ------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            if self.use_forkserver and self._mount_entry is not None:
                # before trio: the server must be forked thread-free
                self._forkserver = forkserver.ForkServer.start(self._mount_entry)
            trio.run(self._main)
        finally:
            if self._metrics_server is not None:
                self._metrics_server.shutdown()
                self._metrics_server.server_close()
            if self._forkserver is not None:
                self._forkserver.close()
                try:
                    os.waitpid(self._forkserver.pid, 0)
                except ChildProcessError:
                    pass
            if self._own_state:
                shutil.rmtree(self.state_dir, ignore_errors=True)
            self._watchdog.cancel()

    def _kill_children(self) -> None:
        """The watchdog's last step (its thread): SIGKILL what is still running."""
        for child in list(self.mounts.values()):
            proc = child.proc
            if proc is not None and proc.returncode is None:
                try:
                    proc.kill()
                except OSError:
                    pass

    def _serve_metrics(self) -> None:
        """The TCP listener (a thread): started inside trio.run, after the fork server exists,
        which must be forked while the process has no thread."""
        if not self.metrics_address:
            return
        try:
            self._metrics_server = prometheus.serve_tcp(self.metrics_address, self.collect_metrics)
        except (ValueError, OSError) as e:
            raise ConfigError(f"--metrics-address {self.metrics_address}: {e}") from None
        log.info("Prometheus metrics on http://%s/metrics", self.metrics_address)

    async def _main(self) -> None:
        self._serve_metrics()
        self._exit = trio.Event()
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._forkserver is not None:
                    await nursery.start(self._forkserver.run)
                await nursery.start(api_mod.serve_unix, self.apisock, self.handle)
                log.info("nydusd %s serving API on %s (cache %s)", self.id, self.apisock,
                         self.cache_dir)
                nursery.start_soon(self._signals, signals)
                await self._exit.wait()
                self.state = "STOPPING"
                # a child that ignores SIGTERM or cannot exit (stopped, stuck in the kernel)
                # would keep _stop_child, and so us, waiting STOP_TIMEOUT or forever
                self._watchdog.arm()
                async with trio.open_nursery() as stops:
                    for child in list(self.mounts.values()):
                        stops.start_soon(self._stop_child, child)
                nursery.cancel_scope.cancel()
        log.info("nydusd %s: all mounts stopped, exiting", self.id)

    async def _signals(self, signals) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                # hot upgrade: every failover mount child hands its session to a new daemon
                if not self.failover:
                    log.warning("SIGHUP ignored: hot upgrade needs `nydusd serve --failover`")
                    continue
                log.info("SIGHUP: hot upgrade of every mount")
                for child in self.mounts.values():
                    if child.proc is not None and child.state == "RUNNING":
                        child.proc.send_signal(signal.SIGHUP)
                continue
            log.info("received %s: unmounting everything", signal.Signals(signum).name)
            self._exit.set()
            return

    # -- children -------------------------------------------------------------------------------
    def _argv(self, mountpoint: str, body: object, n: int) -> tuple[list[str], str]:
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "body must be a JSON object")
        unknown = set(body) - {"source", "bootstrap", "blob_dir", "config", "prefetch_files", "fs_type"}
        if unknown:
            raise ApiError(400, "BadRequest", f"unknown fields: {', '.join(sorted(unknown))}")
        if "fs_type" in body:
            body = _nydus_mount_body(body)
        sock = os.path.join(self.state_dir, f"mount-{n}.sock")
        argv = [sys.executable, "-m", "nydus_py.daemon.cli", "mount", "--apisock", sock,
                "--cache-dir", self.cache_dir, "--id", f"{self.id}/{n}",
                "--log-level", self.log_level,
                "--log-file", os.path.join(self.state_dir, f"mount-{n}.log")]
        if self.cache_max_size is not None:
            argv += ["--cache-max-size", str(self.cache_max_size)]
        if self.failover:
            argv += ["--failover", "--supervisor", os.path.join(self.state_dir, f"mount-{n}.sup")]
        source = body.get("source")
        if source:
            if not isinstance(source, str) or not source.startswith("oci:"):
                raise ApiError(400, "BadRequest", "source: expected \"oci:DIR[:TAG]\"")
            argv += ["--image", source]
        elif body.get("bootstrap"):
            argv += ["--bootstrap", str(body["bootstrap"])]
            source = str(body["bootstrap"])
            if body.get("blob_dir"):
                argv += ["--blob-dir", str(body["blob_dir"])]
        else:
            raise ApiError(400, "BadRequest", "name an image: \"source\" or \"bootstrap\"")
        if body.get("config") is not None:
            from nydus_py import config as config_mod
            try:
                config_mod.parse(body["config"])
            except ConfigError as e:
                raise ApiError(400, "BadConfig", f"config: {e}") from None
            path = os.path.join(self.state_dir, f"mount-{n}.json")
            with open(_create(path), "w") as f:  # may hold registry auth
                json.dump(body["config"], f)
            argv += ["--config", path]
        files = body.get("prefetch_files")
        if files:
            if not isinstance(files, list) or not all(isinstance(p, str) for p in files):
                raise ApiError(400, "BadRequest", "prefetch_files: expected a list of paths")
            path = os.path.join(self.state_dir, f"mount-{n}.prefetch")
            with open(_create(path), "w") as f:
                f.write("".join(p + "\n" for p in files))
            argv += ["--prefetch-files", path]
        argv.append(mountpoint)
        return argv, source

    async def _spawn(self, child: Child) -> None:
        """Starts the child and waits until its API answers RUNNING; raises ApiError if it
        exits first (with its one-line error) or takes too long."""
        for p in (child.sock,):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        err = await trio.to_thread.run_sync(lambda: open(_create(child.err_file), "wb"))
        try:
            child.proc = await self._start_process(child, err)
        finally:
            err.close()
        child.exited = trio.Event()
        assert self._nursery is not None          # set by _main before the API serves
        self._nursery.start_soon(self._watch, child, child.proc)
        deadline = trio.current_time() + READY_TIMEOUT
        while trio.current_time() < deadline:
            if child.proc.returncode is not None or child.exited.is_set():
                raise ApiError(500, "MountFailed", self._child_error(child))
            if os.path.exists(child.sock):
                try:
                    status, raw = await api_mod.call(child.sock, "GET", "/api/v1/daemon", timeout=2)
                    if status == 200 and json.loads(raw).get("state") == "RUNNING":
                        child.state = "RUNNING"
                        return
                except (OSError, trio.TooSlowError, ValueError):
                    pass
            # mount-ready is ~0.05-0.1 s with the fork server: poll finely at first (a poll
            # is a stat until the child's API socket exists, which it does only at ready)
            waited = trio.current_time() + READY_TIMEOUT - deadline
            await trio.sleep(0.001 if waited < 0.5 else 0.005 if waited < 1 else 0.05)
        child.proc.terminate()
        raise ApiError(500, "MountFailed", f"{child.mountpoint}: not ready after {READY_TIMEOUT}s")

    async def _start_process(self, child: Child, err) -> _ChildProcess | forkserver.ForkedChild:
        fs = self._forkserver
        # Failover mounts are exec'd, not forked: they must outlive us (no PDEATHSIG, they hold
        # their FUSE fd) and be found again by their command line (_adopt).
        if fs is not None and fs.alive and not self.failover and \
                child.argv[1:3] == ["-m", "nydus_py.daemon.cli"]:
            try:
                return await fs.spawn(child.argv[3:], err.fileno())
            except OSError as e:
                log.warning("fork server unavailable (%s); starting %s with a new interpreter",
                            e, child.mountpoint)
        return _ChildProcess(child.argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                             preexec_fn=None if self.failover else _die_with_parent)

    def _child_error(self, child: Child) -> str:
        try:
            with open(child.err_file, "rb") as f:
                lines = f.read().decode("utf-8", "replace").strip().splitlines()
        except OSError:
            lines = []
        msg = lines[-1].removeprefix("nydusd: error: ") if lines else "exited before it was ready"
        return f"mount of {child.source} at {child.mountpoint} failed: {msg}"

    async def _watch(self, child: Child,
                     proc: _ChildProcess | forkserver.ForkedChild | AdoptedProcess) -> None:
        code = await proc.wait()
        child.exited.set()
        if child.stopping or child.state == "STARTING" or self.state != "RUNNING":
            return
        log.error("mount %s (image %s) exited unexpectedly with code %s; see %s",
                  child.mountpoint, child.source, code, child.log_file)
        if child.restarts >= RESTART_LIMIT:
            child.state = "FAILED"
            return
        child.restarts += 1
        child.state = "RESTARTING"
        await trio.sleep(min(2 ** child.restarts * 0.25, 5))
        if child.stopping or self.mounts.get(child.mountpoint) is not child:
            return
        try:
            child.state = "STARTING"
            await self._spawn(child)
            log.info("mount %s restarted (%d/%d)", child.mountpoint, child.restarts, RESTART_LIMIT)
        except ApiError as e:
            child.state = "FAILED"
            log.error("%s", e)

    async def _stop_child(self, child: Child) -> None:
        child.stopping = True
        child.state = "STOPPING"
        proc = child.proc
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        with trio.move_on_after(STOP_TIMEOUT):
            await child.exited.wait()
            return
        log.error("mount %s did not stop in %ss; killing it", child.mountpoint, STOP_TIMEOUT)
        proc.kill()
        await child.exited.wait()
        from nydus_py.mountinfo import lazy_unmount
        await trio.to_thread.run_sync(lazy_unmount, child.mountpoint)

    # -- API ------------------------------------------------------------------------------------
    def _mountpoint(self, req: Request) -> str:
        mp = req.query.get("mountpoint")
        if not mp:
            raise ApiError(400, "BadRequest", "missing ?mountpoint=")
        return os.path.realpath(mp)

    async def handle(self, req: Request) -> Response:
        path = req.path.rstrip("/") or "/"
        if path == "/api/v1/mount":
            if req.method == "GET":
                return json_response([c.info() for c in self.mounts.values()])
            if req.method == "POST":
                return await self._mount(req)
            if req.method == "DELETE":
                mp = self._mountpoint(req)
                child = self.mounts.get(mp)
                if child is None:
                    raise ApiError(404, "NotFound", f"nothing mounted at {mp}")
                await self._stop_child(child)
                del self.mounts[mp]
                return Response(204)
            raise ApiError(405, "MethodNotAllowed", f"{req.method} {path}")
        if path == "/api/v1/daemon" and req.method == "GET":
            return json_response({"id": self.id, "version": api_mod.version_info(),
                                  "state": self.state, "pid": os.getpid(),
                                  "supervisor": True, "cache_dir": self.cache_dir,
                                  "uptime_secs": round(time.time() - self.started, 3),
                                  "mounts": [c.info() for c in self.mounts.values()]})
        if path == "/api/v1/daemon" and req.method == "PUT":
            body = req.json()
            api_mod.set_log_level(body)
            await self._each_child("PUT", "/api/v1/daemon", json.dumps(body).encode())
            return Response(204)
        if path == "/api/v1/daemon/backend" and req.method == "GET":
            merged: dict = {}
            for answer in (await self._each_child("GET", "/api/v1/daemon/backend")).values():
                merged.update(answer if isinstance(answer, dict) else {})
            return json_response(merged)
        if path == "/api/v1/daemon/events" and req.method == "GET":
            return json_response({"events": api_mod.event_log().snapshot(),
                                  "mounts": {mp: a.get("events", a) if isinstance(a, dict) else a
                                             for mp, a in (await self._each_child(
                                                 "GET", "/api/v1/daemon/events")).items()}})
        if path == "/api/v1/daemon/exit" and req.method == "PUT":
            return Response(204, after=self._exit.set)
        if path.startswith("/api/v1/metrics") and req.method == "GET":
            return await self._metrics(req, path)
        if path == "/metrics" and req.method == "GET":
            return await self._prometheus()
        raise ApiError(404, "NotFound", f"no endpoint {req.method} {path}")

    async def _each_child(self, method: str, target: str, body: bytes | None = None) -> dict:
        out = {}
        for mp, child in list(self.mounts.items()):
            try:
                status, raw = await api_mod.call(child.sock, method, target, body, timeout=5)
                out[mp] = json.loads(raw) if raw.strip() else {"status": status}
            except (OSError, trio.TooSlowError, ValueError) as e:
                out[mp] = {"error": str(e)}
        return out

    async def _mount(self, req: Request) -> Response:
        mp = self._mountpoint(req)
        if mp in self.mounts:
            raise ApiError(409, "AlreadyMounted", f"{mp} is already mounted by this daemon")
        self._seq += 1
        while any(os.path.exists(os.path.join(self.state_dir, f"mount-{self._seq}.{ext}"))
                  for ext in ("sock", "sup", "log")):
            self._seq += 1      # files of a mount a previous serve started (maybe adopted)
        n = self._seq
        body = req.json()
        try:
            argv, source = await trio.to_thread.run_sync(self._argv, mp, body, n)
        except BaseException:
            self._remove_mount_files(n)
            raise
        child = Child(mp, n, argv, os.path.join(self.state_dir, f"mount-{n}.sock"),
                      os.path.join(self.state_dir, f"mount-{n}.log"),
                      os.path.join(self.state_dir, f"mount-{n}.err"), source)
        self.mounts[mp] = child
        try:
            if not (self.failover and await self._adopt(child)):
                await self._spawn(child)
        except BaseException:
            child.stopping = True
            del self.mounts[mp]
            # a refused mount leaves no files (its config may hold registry auth); its error
            # line is in the answer
            self._remove_mount_files(n)
            raise
        log.info("mounted %s at %s (pid %d)", source, mp, child.proc.pid if child.proc else 0)
        if isinstance(body, dict) and "fs_type" in body:
            return Response(204)            # nydusd's answer to its own mount body
        return json_response(child.info())

    def _remove_mount_files(self, n: int) -> None:
        """A handful of unlinks in our state dir: not worth a thread hop."""
        for ext in ("sock", "sup", "log", "err", "json", "prefetch"):
            try:
                os.unlink(os.path.join(self.state_dir, f"mount-{n}.{ext}"))
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("cannot remove mount-%d.%s of a failed mount: %s", n, ext, e.strerror)

    async def _adopt(self, child: Child) -> bool:
        """A `mount --failover` supervisor of a previous serve still serving this mountpoint
        (we were killed and restarted) becomes our child again instead of a new mount."""
        from nydus_py.daemon.fdsupervisor import AdoptedProcess, find_supervisor
        found = await trio.to_thread.run_sync(find_supervisor, child.mountpoint)
        if found is None:
            return False
        pid, sock = found
        if sock is None:
            return False
        try:
            status, raw = await api_mod.call(sock, "GET", "/api/v1/daemon", timeout=5)
            if status != 200 or json.loads(raw).get("state") != "RUNNING":
                return False
            proc = AdoptedProcess(pid)
        except (OSError, ValueError, trio.TooSlowError):
            return False
        child.proc = proc
        child.sock = sock
        child.log_file = os.path.join(os.path.dirname(sock), os.path.basename(sock)[:-5] + ".log")
        child.exited = trio.Event()
        child.state = "RUNNING"
        assert self._nursery is not None          # set by _main before the API serves
        self._nursery.start_soon(self._watch, child, proc)
        log.info("adopted the running failover mount of %s (supervisor pid %d)",
                 child.mountpoint, pid)
        return True

    async def _ask(self, child: Child, target: str) -> tuple[int, bytes]:
        try:
            return await api_mod.call(child.sock, "GET", target, timeout=5)
        except (OSError, trio.TooSlowError) as e:
            return 503, json.dumps({"code": "Unavailable", "message": f"{child.mountpoint}: {e}"}).encode()

    async def _metrics(self, req: Request, path: str) -> Response:
        query = "&".join(f"{k}={v}" for k, v in req.query.items() if k != "mountpoint")
        target = path + (f"?{query}" if query else "")
        if "mountpoint" in req.query:
            child = self.mounts.get(self._mountpoint(req))
            if child is None:
                raise ApiError(404, "NotFound", f"nothing mounted at {req.query['mountpoint']}")
            status, body = await self._ask(child, target)
            ctype = "text/plain; charset=utf-8" if req.query.get("format") == "text" else "application/json"
            return Response(status, body, ctype)
        answers = {}
        for child in list(self.mounts.values()):
            status, body = await self._ask(child, target)
            if status == 200:
                try:
                    answers[child.mountpoint] = json.loads(body)
                except ValueError:
                    pass
        if path.rsplit("/", 1)[-1] in ("pattern", "files", "inflight"):
            return json_response(answers)
        total = None
        for a in answers.values():
            total = a if total is None else merge_sum(total, a)
        return json_response(total if total is not None else {})

    async def _prometheus(self) -> Response:
        text = await trio.to_thread.run_sync(self.render_metrics)
        return Response(200, text, prometheus.CONTENT_TYPE)

    def collect_metrics(self) -> list:
        """Every mount's metrics labelled mountpoint="M", and the supervisor's own. Runs in a
        thread (the API's via trio.to_thread, or the TCP listener's): blocking calls are fine."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        children = list(self.mounts.values())
        groups = []
        mounts = GaugeMetricFamily("nydusd_mounts", "mounts of this nydusd serve, by state", labels=["state"])
        by_state: dict[str, int] = {}
        restarts = CounterMetricFamily("nydusd_mount_restarts", "times a mount's child was restarted",
                                       labels=["mountpoint"])
        for child in children:
            by_state[child.state] = by_state.get(child.state, 0) + 1
            restarts.add_metric([child.mountpoint], child.restarts)
            try:
                status, body = api_mod.call_sync(child.sock, "GET", "/metrics", timeout=5)
            except OSError:
                continue
            if status == 200:
                try:
                    groups.append(prometheus.parse(body.decode(), {"mountpoint": child.mountpoint}))
                except ValueError as e:
                    log.warning("metrics of %s unreadable: %s", child.mountpoint, e)
        for state, n in sorted(by_state.items()):
            mounts.add_metric([state], n)
        return prometheus.merge([[mounts, restarts], *groups])

    def render_metrics(self) -> bytes:
        return prometheus.render(self.collect_metrics())


def _nydus_mount_body(body: dict) -> dict:
    """nydusd's mount body {"source": BOOTSTRAP, "fs_type": "rafs", "config": "<JSON string>"}
    → ours ({"bootstrap": ..., "config": {...}}; an oci: source stays a source)."""
    fs_type = body.get("fs_type")
    if fs_type != "rafs":
        raise ApiError(501, "NotSupported", f"fs_type {fs_type!r}: not supported by nydus-py "
                       f"(only \"rafs\", a nydus-py image; passthrough_fs is not implemented)")
    out = {k: v for k, v in body.items() if k not in ("fs_type", "source")}
    source = body.get("source")
    if not isinstance(source, str) or not source:
        raise ApiError(400, "BadRequest", "source: expected the bootstrap path or oci:DIR[:TAG]")
    out["source" if source.startswith("oci:") else "bootstrap"] = source
    config = body.get("config")
    if isinstance(config, str):       # nydusd takes the config as a JSON string (`jq tostring`)
        try:
            out["config"] = json.loads(config) if config.strip() else {}
        except ValueError as e:
            raise ApiError(400, "BadConfig", f"config: not JSON ({e})") from None
    return out


def merge_sum(a, b):
    """Numbers add up, dicts merge key by key, equal-length lists add element-wise (histogram
    counts); anything else keeps the first value."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a + b
    if isinstance(a, dict) and isinstance(b, dict):
        out = dict(a)
        for k, v in b.items():
            out[k] = merge_sum(out[k], v) if k in out else v
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in a + b):
            return [x + y for x, y in zip(a, b)]
    return a
