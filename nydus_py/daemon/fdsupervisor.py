"""The supervisor side of session handover (takeover.py has the protocol and the daemon side).

    FdSupervisor      `nydusd mount --failover`: keeps the /dev/fuse fd and session state, runs
                      the daemon as a child, replaces it on the same connection when it dies
                      (failover), hands the session to a new daemon on SIGHUP (hot upgrade)
    find_supervisor,  `nydusd serve --failover` restarted after a crash finds the failover
    AdoptedProcess    mount supervisors of its predecessor and adopts them
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable

import trio

from nydus_py.daemon import fusefd
from nydus_py.daemon.takeover import (
    SessionState,
    TakeoverError,
    recv_msg,
    send_msg,
    sun_path,
)
from nydus_py.errors import NydusError

log = logging.getLogger(__name__)

STOP_TIMEOUT = 30.0         # old daemon finishing its requests before an upgrade takeover
FAILURE_WINDOW = 60.0       # this many restarts within the window: give up (a crash loop)
MAX_FAILURES = 5


class _Child:
    def __init__(self, argv: list[str], **kw):
        self.popen = subprocess.Popen(argv, **kw)
        self.pid = self.popen.pid
        self._pidfd = os.pidfd_open(self.pid)
        self.exited = trio.Event()
        self.code: int | None = None
        self.channel: socket.socket | None = None
        self.last_error = ""        # last stderr line ("nydusd: error: ...")
        self.took_over = False
        self.handing_over = False   # asked to exit for an upgrade
        self.released = trio.Event()  # stopped serving (sent "released", or exited)

    async def watch(self) -> None:
        await trio.lowlevel.wait_readable(self._pidfd)
        self.code = self.popen.wait()
        os.close(self._pidfd)
        self.exited.set()


def _peer_cred(sock) -> tuple[int, int]:
    """(pid, uid) of the peer (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", creds)
    return pid, uid


class FdSupervisor:
    """`nydusd mount --failover`: holds the fd, restarts or upgrades the daemon (module doc).

    `child_argv(upgrade)` is the daemon's command line; `on_ready` runs once the first daemon
    serves. run() returns the exit code: 0 once the mount is gone (unmounted by the daemon on
    SIGTERM, or from outside), 1 when the first daemon failed or a crash loop gave up."""

    def __init__(self, sock_path: str, mountpoint: str, child_argv: Callable[[bool], list[str]],
                 *, on_ready: Callable[[], None] | None = None,
                 on_error: Callable[[str], None] | None = None):
        self.sock_path = sock_path
        self.mountpoint = mountpoint
        self.child_argv = child_argv
        self.on_ready = on_ready
        self.on_error = on_error
        self.fd = -1
        self.state: SessionState | None = None
        self.current: _Child | None = None
        self.children: list[_Child] = []
        self.stopping = False
        self.ready = False
        self.failures: list[float] = []
        self.upgrades = 0
        self.restarts = 0
        self._changed = trio.Event()

    def run(self) -> int:
        return trio.run(self._main)

    async def _main(self) -> int:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                os.unlink(self.sock_path)
            except FileNotFoundError:
                pass
            old = os.umask(0o177)
            try:
                with sun_path(self.sock_path) as name:
                    await listener.bind(name)
            finally:
                os.umask(old)
            listener.listen(8)
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._accept, listener)
                    nursery.start_soon(self._signals, sigs)
                    code = await self._supervise()
                    nursery.cancel_scope.cancel()
                return code
            finally:
                listener.close()
                try:
                    os.unlink(self.sock_path)
                except OSError:
                    pass
                if self.fd >= 0:
                    os.close(self.fd)

    def _spawn(self, upgrade: bool) -> _Child:
        # stderr through a pipe: forwarded to ours (which --daemon points at /dev/null once
        # ready, so no child keeps the caller's terminal), last line kept as the error message
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            child = _Child(self.child_argv(upgrade), stdin=subprocess.DEVNULL, stderr=w)
        finally:
            os.close(w)
        self.children.append(child)
        self._nursery.start_soon(self._forward_stderr, child, r)
        self._nursery.start_soon(self._reap, child)
        log.info("started daemon pid %d%s", child.pid, " (takeover)" if upgrade else "")
        return child

    async def _forward_stderr(self, child: _Child, r: int) -> None:
        stream = trio.lowlevel.FdStream(r)
        async with stream:
            while data := await stream.receive_some(65536):
                try:
                    os.write(2, data)
                except OSError:
                    pass
                lines = data.decode("utf-8", "replace").strip().splitlines()
                if lines:
                    child.last_error = lines[-1].removeprefix("nydusd: error: ")

    async def _reap(self, child: _Child) -> None:
        await child.watch()
        child.released.set()
        self.children.remove(child)
        self._kick()

    def _kick(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _supervise(self) -> int:
        self.current = self._spawn(upgrade=False)
        while True:
            changed = self._changed
            cur = self.current
            if cur is not None and cur.exited.is_set():
                self.current = None
                if self.fd < 0:
                    await trio.lowlevel.checkpoint()     # let the stderr forwarder take the last line
                    msg = cur.last_error or f"daemon exited with code {cur.code} before the " \
                        "mount was ready"
                    if self.on_error:
                        self.on_error(msg)
                    return 1
                if not (cur.handing_over or self.stopping) and fusefd.is_alive(self.fd):
                    log.warning("daemon pid %d died (code %s) while the mount is alive; "
                                "failover: a new daemon takes over the FUSE session",
                                cur.pid, cur.code)
            if self.stopping:
                if not self.children:
                    if self.fd >= 0 and fusefd.is_alive(self.fd):
                        fusefd.unmount(self.mountpoint)
                    return 0
            elif self.current is None and not self.children:
                if not fusefd.is_alive(self.fd):
                    log.info("the mount %s is gone; supervisor exits", self.mountpoint)
                    return 0
                now = time.monotonic()
                self.failures = [t for t in self.failures if now - t < FAILURE_WINDOW] + [now]
                if len(self.failures) > MAX_FAILURES:
                    log.error("daemon died %d times in %ds; giving up: unmounting %s (requests "
                              "fail instead of waiting)", len(self.failures), FAILURE_WINDOW,
                              self.mountpoint)
                    fusefd.unmount(self.mountpoint)
                    return 1
                self.restarts += 1
                self.current = self._spawn(upgrade=True)
            await changed.wait()

    async def _signals(self, sigs) -> None:
        async for signum in sigs:
            if signum == signal.SIGHUP:
                # (an old daemon still tearing down after a handover does not count)
                pending = [c for c in self.children
                           if c is not self.current and not c.handing_over]
                if self.stopping or self.fd < 0 or self.current is None or pending:
                    log.warning("SIGHUP: no running session to upgrade (or an upgrade is "
                                "already under way)")
                    continue
                log.info("SIGHUP: hot upgrade of %s", self.mountpoint)
                self.upgrades += 1
                self._spawn(upgrade=True)       # becomes current when it takes over
                continue
            log.info("received %s: stopping the daemon and unmounting %s",
                     signal.Signals(signum).name, self.mountpoint)
            self.stopping = True
            for child in list(self.children):
                child.popen.send_signal(signal.SIGTERM)
            self._kick()

    async def _accept(self, listener) -> None:
        while True:
            sock, _ = await listener.accept()
            self._nursery.start_soon(self._client, sock)

    def _child_of(self, pid: int) -> _Child | None:
        return next((c for c in self.children if c.pid == pid), None)

    async def _client(self, tsock) -> None:
        sock = socket.socket(fileno=tsock.detach())
        sock.setblocking(True)
        keep = False
        try:
            pid, uid = _peer_cred(sock)
            if uid != os.geteuid():     # the socket is 0600; belt and braces
                raise TakeoverError(f"refused a connection from uid {uid}")
            await trio.lowlevel.wait_readable(sock)
            obj, fds = recv_msg(sock)
            op = obj.get("op")
            if op == "sendfd":
                keep = await self._on_sendfd(sock, pid, obj, fds)
            elif op == "takeover":
                for fd in fds:
                    os.close(fd)
                keep = await self._on_takeover(sock, pid)
            else:
                for fd in fds:
                    os.close(fd)
                send_msg(sock, {"ok": False, "error": f"unknown op {op!r}"})
        except (OSError, NydusError) as e:
            log.warning("supervisor connection: %s", e)
        finally:
            if not keep:
                sock.close()

    async def _on_sendfd(self, sock, pid, obj, fds) -> bool:
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            send_msg(sock, {"ok": False, "error": "sendfd needs exactly one fd"})
            return False
        state = SessionState.from_json(obj.get("state") or {})
        if self.state is not None and state.mountpoint != self.state.mountpoint:
            os.close(fds[0])
            send_msg(sock, {"ok": False, "error": f"this supervisor keeps {self.state.mountpoint}"})
            return False
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.state = fds[0], state
        send_msg(sock, {"ok": True})
        child = self._child_of(pid)
        if child is not None:
            child.took_over = True
            await self._serve_channel(child, sock)
            return True
        return False

    async def _on_takeover(self, sock, pid) -> bool:
        if self.fd < 0 or self.state is None:
            send_msg(sock, {"ok": False, "error": "no session to take over"})
            return False
        child = self._child_of(pid)
        if child is None:
            send_msg(sock, {"ok": False, "error": "takeover is for daemons this supervisor started"})
            return False
        old = self.current
        if old is not None and old is not child and not old.exited.is_set():
            # hot upgrade: the old daemon finishes what it holds and exits without unmounting
            await self._stop_for_upgrade(old)
        if self.stopping:
            send_msg(sock, {"ok": False, "error": "the supervisor is stopping"})
            return False
        send_msg(sock, {"ok": True, "state": self.state.to_json()}, [self.fd])
        child.took_over = True
        self.current = child
        self._kick()
        log.info("daemon pid %d took over %s", child.pid, self.mountpoint)
        await self._serve_channel(child, sock)
        return True

    async def _stop_for_upgrade(self, old: _Child) -> None:
        old.handing_over = True
        try:
            if old.channel is not None:
                send_msg(old.channel, {"op": "exit"})
            else:
                raise OSError("no control channel")
        except OSError:
            old.popen.send_signal(signal.SIGKILL)   # cannot ask it: resend covers its requests
        with trio.move_on_after(STOP_TIMEOUT):
            await old.released.wait()
            return
        log.error("daemon pid %d did not hand over in %ss; killing it", old.pid, STOP_TIMEOUT)
        old.popen.kill()
        await old.exited.wait()

    async def _serve_channel(self, child: _Child, sock: socket.socket) -> None:
        """Read the daemon's control messages (ready) until it goes away."""
        child.channel = sock
        while True:
            try:
                await trio.lowlevel.wait_readable(sock)
                obj, fds = recv_msg(sock)
            except (OSError, NydusError):
                if child.channel is sock:
                    child.channel = None
                sock.close()
                return
            for fd in fds:
                os.close(fd)
            if obj.get("op") == "released":
                child.released.set()
            if obj.get("op") == "ready" and not self.ready:
                self.ready = True
                if self.on_ready:
                    self.on_ready()


# ---- adoption (nydusd serve --failover restarted) ------------------------------------------

def find_supervisor(mountpoint: str) -> tuple[int, str | None] | None:
    """(pid, --apisock) of a live `nydusd mount --failover` process serving `mountpoint`,
    found by its command line; None if there is none."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = [a.decode("utf-8", "surrogateescape") for a in f.read().split(b"\0")]
        except OSError:
            continue
        while args and not args[-1]:
            args.pop()          # the trailing NUL
        if not args or args[-1] != mountpoint or "--failover" not in args or "mount" not in args:
            continue
        sock = next((a.split("=", 1)[1] for a in args if a.startswith("--apisock=")), None)
        if sock is None and "--apisock" in args[:-1]:
            sock = args[args.index("--apisock") + 1]
        return int(entry), sock
    return None


class AdoptedProcess:
    """A process this one did not start (a mount supervisor left by a previous `nydusd serve`),
    with the part of the child-process interface `nydusd serve` uses: wait() polls a pidfd."""

    def __init__(self, pid: int):
        self.pid = pid
        self._pidfd = os.pidfd_open(pid)
        self._done = False

    @property
    def returncode(self) -> int | None:
        if self._done:
            return 0
        import select
        if select.select([self._pidfd], [], [], 0)[0]:
            self._done = True
            return 0        # not our child: its exit status is not ours to read
        return None

    async def wait(self) -> int:
        if not self._done:
            await trio.lowlevel.wait_readable(self._pidfd)
            self._done = True
            os.close(self._pidfd)
            self._pidfd = -1
        return 0

    def send_signal(self, sig: int) -> None:
        if not self._done:
            signal.pidfd_send_signal(self._pidfd, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
