"""FUSE session handover: failover and hot upgrade of `nydusd mount`.

A mount outlives its daemon when a second process holds the `/dev/fuse` fd (fusefd.py). Nydus
names, kept here:

    supervisor   the process that holds the fd and the session state (`--supervisor SOCK`)
    sendfd       a daemon hands its fd and state to the supervisor (done right after the mount,
                 and again on `PUT /api/v1/daemon/fuse/sendfd`)
    takeover     a daemon started with `--upgrade` gets the fd and state from the supervisor and
                 serves the same connection (`PUT /api/v1/daemon/fuse/takeover` waits for it)
    failover policy `resend`: after a takeover the kernel is asked to resend every request the
                 old daemon had read and not answered (FUSE_NOTIFY_RESEND)

`FdSupervisor` (fdsupervisor.py) is nydus-py's supervisor (`nydusd mount --failover`): it
keeps the fd and runs the daemon as its child. When the child dies (crash, OOM, kill -9) while
the connection is alive, a new child is started with `--upgrade` and takes over. SIGHUP is a hot
upgrade: a new child (the code now installed) opens the image, then asks for the session; the
supervisor tells the old child to stop (it finishes the requests it holds, reports
"released" and exits without unmounting) and only then hands the fd over. Either way the kernel only queues requests while
no daemon reads: the container sees a pause, never an error.

The state passed with the fd is small because everything else is derivable: inode numbers
are the bootstrap's, file handles are inode numbers (fs/ops.py), the cache is on disk. What
the new daemon needs is the kernel's FUSE_INIT (to replay it to libfuse), the mountpoint and
the mount options (a takeover refuses a session mounted with other options).

Wire format on the supervisor socket (a unix stream socket, 0600): messages are fusefd.send_fds
frames carrying JSON, fds as SCM_RIGHTS. A daemon's connection stays open as its control
channel: the supervisor sends `{"op": "exit"}` on it to end the daemon for an upgrade; the
daemon sends `{"op": "ready"}` once it serves and `{"op": "released"}` once it no longer reads.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import socket
from dataclasses import dataclass

import trio
import trio.lowlevel

from nydus_py.daemon import fusefd
from nydus_py.errors import NydusError

log = logging.getLogger(__name__)

STATE_VERSION = 1


class TakeoverError(NydusError):
    """The session could not be handed over (no supervisor, no session, other options)."""


@dataclass(frozen=True)
class SessionState:
    daemon_id: str
    mountpoint: str
    init: bytes                 # the kernel's FUSE_INIT request
    options: tuple[str, ...]    # fuse mount options, sorted

    def to_json(self) -> dict:
        return {"version": STATE_VERSION, "id": self.daemon_id, "mountpoint": self.mountpoint,
                "init": base64.b64encode(self.init).decode(), "options": list(self.options)}

    @classmethod
    def from_json(cls, obj: dict) -> SessionState:
        try:
            if obj["version"] != STATE_VERSION:
                raise TakeoverError(f"session state version {obj['version']} is not supported")
            state = cls(str(obj["id"]), str(obj["mountpoint"]), base64.b64decode(obj["init"]),
                        tuple(str(o) for o in obj["options"]))
        except (KeyError, TypeError, ValueError) as e:
            raise TakeoverError(f"malformed session state ({e!r})") from None
        fusefd.init_flags(state.init)       # raises unless it is a FUSE_INIT
        return state


def send_msg(sock: socket.socket, obj: dict, fds: list[int] | None = None) -> None:
    fusefd.send_fds(sock, json.dumps(obj).encode(), fds or [])


def recv_msg(sock: socket.socket) -> tuple[dict, list[int]]:
    data, fds = fusefd.recv_fds(sock)
    try:
        obj = json.loads(data)
        if not isinstance(obj, dict):
            raise TypeError("not an object")
    except (TypeError, ValueError) as e:
        for fd in fds:
            os.close(fd)
        raise TakeoverError(f"malformed supervisor message ({e})") from None
    return obj, fds


SUN_PATH_MAX = 107


@contextlib.contextmanager
def sun_path(path: str):
    """A name for `path` that fits sockaddr_un: a long path (the snapshotter's image
    directories are) is reached through /proc/self/fd/N of its directory."""
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        yield path
        return
    dfd = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{dfd}/{os.path.basename(path)}"
    finally:
        os.close(dfd)


def _connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with sun_path(path) as name:
            s.connect(name)
    except OSError as e:
        s.close()
        raise TakeoverError(f"supervisor {path}: {e.strerror}") from None
    return s


def _reply(sock: socket.socket) -> tuple[dict, list[int]]:
    obj, fds = recv_msg(sock)
    if not obj.get("ok"):
        for fd in fds:
            os.close(fd)
        raise TakeoverError(f"supervisor refused: {obj.get('error', 'no reason given')}")
    return obj, fds


# ---- daemon side ---------------------------------------------------------------------------

class Handoff:
    """A daemon's side of the session: mount or take over, keep the control channel, and at
    the end unmount, unless the session was handed to a successor."""

    def __init__(self, *, supervisor: str, upgrade: bool, daemon_id: str, mountpoint: str,
                 options: set[str]):
        self.supervisor = supervisor
        self.upgrade = upgrade
        self.daemon_id = daemon_id
        self.mountpoint = mountpoint
        self.options = tuple(sorted(options))
        self.state: SessionState | None = None
        self.session: fusefd.Session | None = None
        self.channel: socket.socket | None = None
        self.handed_over = False        # told to exit by the supervisor: do not unmount
        self._channels: list[socket.socket] = []
        self._channel_changed = trio.Event()
        self._released = False

    def start(self, ops) -> None:
        """Before the trio loop: the session for pyfuse3, and the supervisor holds a copy."""
        if self.upgrade:
            sock = _connect(self.supervisor)
            try:
                send_msg(sock, {"op": "takeover", "id": self.daemon_id})
                obj, fds = _reply(sock)
                if len(fds) != 1:
                    raise TakeoverError(f"supervisor sent {len(fds)} fds, expected 1")
                state = SessionState.from_json(obj.get("state") or {})
                if state.mountpoint != self.mountpoint or state.options != self.options:
                    os.close(fds[0])
                    raise TakeoverError(
                        f"the session is mounted at {state.mountpoint} with options "
                        f"{','.join(state.options)}; this daemon is for {self.mountpoint} with "
                        f"{','.join(self.options)}")
            except BaseException:
                sock.close()
                raise
            conn = fusefd.Connection(fds[0], state.init, state.mountpoint)
            resend = True
        else:
            conn = fusefd.mount_connection(self.mountpoint, set(self.options))
            state = SessionState(self.daemon_id, self.mountpoint, conn.init, self.options)
            try:
                sock = self._sendfd(state, conn.fd)
            except BaseException:
                fusefd.unmount(self.mountpoint)
                os.close(conn.fd)
                raise
            resend = False
        self.state = state
        self.channel = sock
        self._channels.append(sock)
        try:
            self.session = fusefd.attach(conn, ops, set(self.options), resend=resend)
        except BaseException:
            if not self.upgrade:
                fusefd.unmount(self.mountpoint)
            raise
        log.info("%s %s (supervisor %s, failover policy resend)",
                 "took over the FUSE session of" if self.upgrade else "mounted", self.mountpoint,
                 self.supervisor)

    def _sendfd(self, state: SessionState, fd: int) -> socket.socket:
        sock = _connect(self.supervisor)
        try:
            send_msg(sock, {"op": "sendfd", "state": state.to_json()}, [fd])
            _reply(sock)
        except BaseException:
            sock.close()
            raise
        return sock

    async def sendfd(self) -> None:
        """PUT /api/v1/daemon/fuse/sendfd: hand the fd to the supervisor again (a restarted
        one); the new connection becomes the control channel."""
        if self.state is None or self.session is None or not self.session.switched:
            raise TakeoverError("the session is not established yet")
        sock = await trio.to_thread.run_sync(self._sendfd, self.state, self.session.fd)
        self.channel = sock
        self._channels.append(sock)
        self._channel_changed.set()
        self._channel_changed = trio.Event()

    def ready(self) -> None:
        if self.channel is not None:
            try:
                send_msg(self.channel, {"op": "ready", "pid": os.getpid()})
            except OSError as e:
                log.warning("supervisor %s: cannot report ready (%s)", self.supervisor, e)

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Watch the control channel: an `exit` hands the session over (stop without unmount)."""
        import pyfuse3

        task_status.started()
        while True:
            chan = self.channel
            if chan is None:
                await self._channel_changed.wait()
                continue
            try:
                await trio.lowlevel.wait_readable(chan)
                obj, fds = recv_msg(chan)      # a few bytes, already there
            except (OSError, NydusError):
                if chan is self.channel:
                    log.warning("supervisor %s went away: this mount has no failover until a "
                                "supervisor gets the fd again (PUT /api/v1/daemon/fuse/sendfd)",
                                self.supervisor)
                    self.channel = None
                continue
            for fd in fds:
                os.close(fd)
            if obj.get("op") == "exit":
                log.info("supervisor asks this daemon to exit for an upgrade; handing over %s",
                         self.mountpoint)
                self.handed_over = True
                pyfuse3.terminate()
                return

    def release(self) -> None:
        """Once handed over and pyfuse3.main has returned (we no longer read the connection and
        have answered all we read): the successor may start now, not only once this process
        has torn down. Idempotent; a no-op unless handed over."""
        if not self.handed_over or self._released or self.channel is None:
            return
        self._released = True
        try:
            send_msg(self.channel, {"op": "released"})
        except OSError:
            pass

    def finish(self) -> None:
        """After pyfuse3.close(unmount=False): unmount unless a successor has the session."""
        self.release()
        if not self.handed_over and fusefd.unmount(self.mountpoint):
            log.info("unmounted %s", self.mountpoint)
        for s in self._channels:
            s.close()
