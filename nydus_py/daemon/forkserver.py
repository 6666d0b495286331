"""A pre-imported process that forks `nydusd mount` children for `nydusd serve`.

A mount added to a running `nydusd serve` used to start a new interpreter: ~0.2 s of CPU for
the interpreter and imports (trio and pyfuse3 alone ~0.15 s) before the bootstrap was even
opened. pyfuse3 keeps its FUSE session in module globals (one mount per process), so mounts
cannot be served in the supervisor itself; instead the supervisor forks this server once, at
start-up, before trio or any thread exists. The server imports everything a mount needs and
then, per request, forks a child that runs the entry point it was started with (`nydusd`'s
`main(argv)`, handed in by the CLI so that this module imports no CLI): the child starts with every
module already imported, so mount-ready is bootstrap load + FUSE INIT.

Why a separate process and not `os.fork()` in the supervisor: the supervisor runs trio, with
worker threads and an epoll loop; forking a threaded process leaves locks held by threads that
do not exist in the child. The server never starts a thread or an event loop: it blocks in
`select` on its socket and on a SIGCHLD wake-up pipe.

Protocol (AF_UNIX SOCK_SEQPACKET socketpair, one JSON object per message):
    supervisor -> server   {"id": N, "argv": [...]} + SCM_RIGHTS [fd for stdout and stderr]
    server -> supervisor   {"id": N, "pid": P} or {"id": N, "error": "..."}
                           {"exit": P, "code": C}      (child P ended; C as Popen.returncode)

Lifetime: the server gets SIGTERM when the supervisor dies (PR_SET_PDEATHSIG, set by the
thread that lives as long as the supervisor: its main thread), and each child gets SIGTERM
when the server dies, so no mount outlives its daemon. When the server is gone, the supervisor
falls back to starting children with a new interpreter.
"""

from __future__ import annotations

import array
import ctypes
import gc
import json
import logging
import os
import select
import signal
import socket
import sys
from typing import Callable, cast

import trio

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
MAX_MSG = 1 << 16       # argv of a mount request: paths and flags, far below this
# Imported by the server before it serves: everything `nydusd mount` imports up to mount-ready.
PRELOAD = ("pyfuse3", "trio", "nydus_py.daemon.cli", "nydus_py.daemon.mount", "nydus_py.daemon.api",
           "nydus_py.image_source", "nydus_py.cache.chunk_cache", "nydus_py.io.reader",
           "nydus_py.io.prefetch", "nydus_py.storage.localfs", "nydus_py.format.compression",
           "nydus_py.daemon.learned", "nydus_py.fs.ops", "nydus_py.oci.registry")


PR_SET_NAME = 15
CHILD_NAME = b"nydusd-mount"   # comm of a forked mount (its cmdline is still the supervisor's)


def die_with_parent(name: bytes | None = None) -> None:
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if name:
            libc.prctl(PR_SET_NAME, ctypes.c_char_p(name))
    except (OSError, AttributeError) as e:  # not Linux: no parent-death signal, no name
        log.debug("prctl: %s", e)


Entry = Callable[[list[str]], int]       # what a forked child runs: main(argv) -> exit code


def start(entry: Entry) -> tuple[socket.socket, int]:
    """Forks the server; returns (the supervisor's end of the socket, the server's pid).
    Call before any thread exists."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        child.close()
        parent.set_inheritable(False)
        return parent, pid
    code = 1
    try:
        parent.close()
        die_with_parent(b"nydusd-forksrv")
        code = _serve(child, entry)
    except BaseException:
        log.exception("fork server failed")
    finally:
        os._exit(code)


def _serve(sock: socket.socket, entry: Entry) -> int:
    import importlib
    for name in PRELOAD:
        try:
            module = importlib.import_module(name)
        except ImportError as e:  # a child would fail the same way and report it itself
            log.warning("fork server: cannot preload %s: %s", name, e)
            continue
        # what every child would build alike, built once here (cli: its argparse parser)
        warm = getattr(module, "prefork_warm", None)
        if warm is not None:
            warm()
    # Everything imported so far lives as long as the children: out of the collector's sight,
    # so that a child's collections neither walk it nor write to (copy) its shared pages.
    gc.collect()
    gc.freeze()
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the supervisor stops us (EOF or SIGTERM)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    children: set[int] = set()
    while True:
        ready, _, _ = select.select([sock.fileno(), wake_r], [], [])
        if wake_r in ready:
            while True:
                try:
                    if not os.read(wake_r, 512):
                        break
                except BlockingIOError:
                    break
        _reap(sock, children)
        if sock.fileno() in ready:
            try:
                msg, fds, _, _ = socket.recv_fds(sock, MAX_MSG, 2)
            except OSError:
                return 0
            if not msg:             # supervisor gone: our children get SIGTERM as we exit
                return 0
            reply = _fork_child(msg, fds, sock, (wake_r, wake_w), entry)
            for fd in fds:
                os.close(fd)
            if "pid" in reply:
                children.add(reply["pid"])
            _send(sock, reply)


def _send(sock: socket.socket, obj: dict) -> None:
    try:
        sock.send(json.dumps(obj).encode())
    except OSError:
        pass


def _reap(sock: socket.socket, children: set[int]) -> None:
    for pid in list(children):
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            children.discard(pid)
            continue
        if done:
            children.discard(pid)
            _send(sock, {"exit": pid, "code": _returncode(status)})


def _returncode(status: int) -> int:
    """As subprocess.Popen.returncode: the exit status, or -N for death by signal N."""
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _fork_child(msg: bytes, fds: list[int], sock: socket.socket, wake: tuple[int, int],
                entry: Entry) -> dict:
    try:
        req = json.loads(msg)
        rid, argv = req["id"], req["argv"]
        if not (isinstance(argv, list) and all(isinstance(a, str) for a in argv)) or len(fds) != 1:
            raise ValueError("bad request")
    except (ValueError, KeyError, TypeError) as e:
        return {"id": None, "error": f"bad request: {e}"}
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return {"id": rid, "pid": pid}
    code = 1
    try:
        die_with_parent(CHILD_NAME)
        signal.set_wakeup_fd(-1)
        for s in (signal.SIGCHLD, signal.SIGINT):
            signal.signal(s, signal.SIG_DFL)
        sock.close()
        for fd in wake:
            os.close(fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(fds[0], 1)
        os.dup2(fds[0], 2)
        os.close(devnull)
        os.close(fds[0])
        root = logging.getLogger()
        for h in list(root.handlers):   # the supervisor's log file is not the child's
            root.removeHandler(h)
            h.close()
        code = entry(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        logging.getLogger("nydusd").exception("internal error in forked mount")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# -- the supervisor's side (trio) -------------------------------------------------------------

class ForkedChild:
    """A mount child started by the server: the subset of trio.Process the supervisor uses.
    Signals go through a pidfd (never to a reused pid); the exit code comes from the server,
    which is the child's parent and reaps it."""

    def __init__(self, pid: int):
        self.pid = pid
        self._code: int | None = None
        self._done = trio.Event()
        try:
            self._pidfd = os.pidfd_open(pid)
        except OSError:       # already exited and reaped: its exit message is on its way
            self._pidfd = -1

    @property
    def returncode(self) -> int | None:
        return self._code

    def _exited(self, code: int) -> None:
        if self._code is None:
            self._code = code
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        self._done.set()

    async def wait(self) -> int:
        await self._done.wait()
        assert self._code is not None
        return self._code

    def send_signal(self, sig: int) -> None:
        if self._code is None and self._pidfd >= 0:
            try:
                signal.pidfd_send_signal(self._pidfd, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The supervisor's handle on the server. `run` (a trio task) reads its replies; `spawn`
    asks for a child. `alive` turns False when the server is gone (then spawn raises OSError
    and the supervisor starts children the old way)."""

    def __init__(self, sock: socket.socket, pid: int):
        self.pid = pid
        self.alive = True
        self._sock = trio.socket.from_stdlib_socket(sock)
        self._seq = 0
        self._waiting: dict[int, tuple[trio.Event, list]] = {}
        self._children: dict[int, ForkedChild] = {}
        self._early_exits: dict[int, int] = {}
        self._send_lock = trio.Lock()

    @classmethod
    def start(cls, entry: Entry) -> ForkServer:
        return cls(*start(entry))

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                msg = await self._sock.recv(MAX_MSG)
                if not msg:
                    break
                self._dispatch(json.loads(msg))
        except (OSError, ValueError) as e:
            log.warning("fork server: %s", e)
        finally:
            await self._lost()

    def _dispatch(self, m: dict) -> None:
        if "exit" in m:
            child = self._children.pop(m["exit"], None)
            if child is not None:
                child._exited(int(m["code"]))
            else:   # exited before spawn() registered it
                self._early_exits[m["exit"]] = int(m["code"])
            return
        entry = self._waiting.pop(m.get("id", -1), None)
        if entry is not None:
            entry[1].append(m)
            entry[0].set()

    async def _lost(self) -> None:
        """The server is gone: so are its children (SIGTERM by PR_SET_PDEATHSIG)."""
        self.alive = False
        with trio.CancelScope(shield=True):
            for ev, out in self._waiting.values():
                out.append({"error": "fork server exited"})
                ev.set()
            self._waiting.clear()
            for pid, child in list(self._children.items()):
                if child._pidfd >= 0:
                    with trio.move_on_after(5):
                        await trio.lowlevel.wait_readable(child._pidfd)
                child._exited(-signal.SIGTERM)
            self._children.clear()
        try:
            os.waitpid(self.pid, os.WNOHANG)  # noqa: ASYNC222 (WNOHANG never blocks)
        except ChildProcessError:
            pass
        self._sock.close()

    async def spawn(self, argv: list[str], out_fd: int) -> ForkedChild:
        """Forks a child running `nydusd` with `argv` (without the program name), its stdout
        and stderr on `out_fd`."""
        if not self.alive:
            raise OSError("fork server is not running")
        self._seq += 1
        rid = self._seq
        ev, out = trio.Event(), cast(list[dict], [])
        self._waiting[rid] = (ev, out)
        data = json.dumps({"id": rid, "argv": argv}).encode()
        async with self._send_lock:
            await self._sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                               array.array("i", [out_fd]))])
        await ev.wait()
        reply = out[0]
        if "pid" not in reply:
            raise OSError(reply.get("error", "fork server failed"))
        child = ForkedChild(reply["pid"])
        code = self._early_exits.pop(child.pid, None)
        if code is not None:
            child._exited(code)
        else:
            self._children[child.pid] = child
        return child

    def close(self) -> None:
        """Ends the server (EOF on its socket); children still running get SIGTERM."""
        self._sock.close()
