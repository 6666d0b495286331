"""The FUSE connection as a file descriptor that outlives any one daemon process.

A FUSE mount lives as long as some process holds its `/dev/fuse` fd; the daemon that answers
requests is replaceable. This module owns the kernel side of that:

    mount_connection   open /dev/fuse, mount(2) it (what libfuse's fuse_mount_sys does as
                       root), and read the kernel's FUSE_INIT request ourselves, keeping its bytes
    attach             hand a connection to pyfuse3 so that libfuse handles that INIT, on the first
                       mount and on every takeover alike (below)
    send_resend        FUSE_NOTIFY_RESEND: the kernel queues again every request a dead daemon
                       had read but not answered (kernel >= 6.9)
    send_fds/recv_fds  SCM_RIGHTS over a unix socket

Why the INIT replay. libfuse answers every request with EIO until it has processed a FUSE_INIT
(`se->got_init`), and the kernel sends INIT once per connection. pyfuse3 calls
`fuse_session_mount(se, mountpoint)`, and libfuse takes a mountpoint `/dev/fd/N` as "already
open connection on fd N" (no mount). `attach` gives it the number N of one end of a
SOCK_SEQPACKET socketpair whose other end has the saved INIT queued: pyfuse3's first read gets
exactly that message, and while libfuse processes it (`do_init` calls pyfuse3's init handler,
which calls `Operations.init`, before it writes the reply) we `dup2` the real /dev/fuse fd over
N. From then on every read and reply of the session goes to the kernel directly: no extra
process or copy in the request path. The INIT reply itself goes to the kernel too: on the first
mount the kernel is waiting for it (the handshake completes); on a takeover it names a request
the kernel no longer has, and the kernel answers ENOENT, which libfuse ignores by design.

The dup2 happens while no trio task waits on fd N (it runs inside fuse_session_process_buf,
called synchronously by pyfuse3's worker after its wait finished). trio's epoll registration for
N still names the socket; dup2 drops the socket's last reference, the kernel removes it from
the epoll set, and trio's next EPOLL_CTL_MOD fails and falls back to EPOLL_CTL_ADD on the new
file (trio/_core/_io_epoll.py `_update_registrations`).
"""

from __future__ import annotations

import array
import ctypes
import ctypes.util
import errno
import os
import socket
import stat
import struct
from dataclasses import dataclass

from nydus_py.errors import NydusError

FUSE_INIT = 26
FUSE_NOTIFY_RESEND = 7
FUSE_HAS_RESEND = 1 << 39           # INIT flags (flags | flags2 << 32): kernel accepts RESEND
FUSE_INIT_EXT = 1 << 30
IN_HEADER = struct.Struct("<IIQQIIIHH")     # len opcode unique nodeid uid gid pid extlen pad
INIT_IN = struct.Struct("<IIIII")            # major minor max_readahead flags flags2
OUT_HEADER = struct.Struct("<IiQ")           # len error unique
READ_BUFFER = 2 << 20               # >= any request the kernel can queue before INIT

MS_RDONLY, MS_NOSUID, MS_NODEV = 1, 2, 4
MNT_DETACH = 2


class FuseFdError(NydusError):
    """The FUSE connection could not be opened, mounted, passed or taken over."""


@dataclass(frozen=True)
class Connection:
    fd: int             # /dev/fuse, O_CLOEXEC
    init: bytes         # the kernel's FUSE_INIT request, as read from fd
    mountpoint: str

    @property
    def init_flags(self) -> int:
        return init_flags(self.init)


def init_flags(msg: bytes) -> int:
    """The kernel's INIT capability flags (flags2 counts only with FUSE_INIT_EXT)."""
    if len(msg) < IN_HEADER.size + INIT_IN.size:
        raise FuseFdError(f"saved FUSE_INIT is {len(msg)} bytes, too short")
    length, opcode = IN_HEADER.unpack_from(msg)[:2]
    if opcode != FUSE_INIT or length != len(msg):
        raise FuseFdError(f"saved message is not a FUSE_INIT (opcode {opcode}, len {length})")
    _, _, _, flags, flags2 = INIT_IN.unpack_from(msg, IN_HEADER.size)
    return flags | (flags2 << 32 if flags & FUSE_INIT_EXT else 0)


def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _mount_args(fd: int, mountpoint: str, options: set[str]) -> tuple[str, str, int, str]:
    """(source, fstype, flags, data) as libfuse's fuse_mount_sys builds them for root."""
    flags = MS_NOSUID | MS_NODEV        # libfuse's defaults; "suid"/"dev" clear them
    source, subtype = "", ""
    data = [f"fd={fd}", f"rootmode={stat.S_IFMT(os.stat(mountpoint).st_mode):o}",
            f"user_id={os.geteuid()}", f"group_id={os.getegid()}"]
    for opt in sorted(options):
        key, _, value = opt.partition("=")
        if key == "ro":
            flags |= MS_RDONLY
        elif key == "nosuid":
            flags |= MS_NOSUID
        elif key == "suid":
            flags &= ~MS_NOSUID
        elif key == "nodev":
            flags |= MS_NODEV
        elif key == "fsname":
            source = value
        elif key == "subtype":
            subtype = value
        elif key in ("default_permissions", "allow_other"):
            data.append(key)
        else:
            raise FuseFdError(f"mount option {opt!r} is not supported with a kept connection")
    fstype = f"fuse.{subtype}" if subtype else "fuse"
    return source or subtype or "/dev/fuse", fstype, flags, ",".join(data)


def mount_connection(mountpoint: str, options: set[str]) -> Connection:
    """Mount a new FUSE connection at `mountpoint` and read its FUSE_INIT (not answered yet:
    `attach` makes libfuse answer it)."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        source, fstype, flags, data = _mount_args(fd, mountpoint, options)
        libc = _libc()
        if libc.mount(source.encode(), mountpoint.encode(), fstype.encode(), flags,
                      data.encode()) != 0:
            e = ctypes.get_errno()
            raise FuseFdError(f"{mountpoint}: mount failed ({os.strerror(e)})")
        try:
            msg = os.read(fd, READ_BUFFER)
            init_flags(msg)
        except Exception:
            libc.umount2(mountpoint.encode(), MNT_DETACH)
            raise
    except BaseException:
        os.close(fd)
        raise
    return Connection(fd, msg, mountpoint)


def unmount(mountpoint: str) -> bool:
    """umount2(MNT_DETACH): the mount disappears now, the connection when its last user goes."""
    return _libc().umount2(mountpoint.encode(), MNT_DETACH) == 0


def is_alive(fd: int) -> bool:
    """False once the connection is gone (unmounted, or aborted via /sys/fs/fuse/connections):
    /dev/fuse then polls POLLERR."""
    import select
    p = select.poll()
    p.register(fd, 0)
    return not any(ev & (select.POLLERR | select.POLLNVAL) for _, ev in p.poll(0))


def send_resend(fd: int) -> None:
    """Ask the kernel to queue again every request read from this connection and not answered
    (they come back with bit 63 set in `unique`, which the reply simply echoes)."""
    os.write(fd, OUT_HEADER.pack(OUT_HEADER.size, FUSE_NOTIFY_RESEND, 0))


class Session:
    """The attached connection as pyfuse3 uses it: `fd` is the session's fd number, which is
    /dev/fuse once libfuse has processed the replayed INIT (`switched`)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.switched = False


def attach(conn: Connection, ops, options: set[str], *, resend: bool) -> Session:
    """pyfuse3.init on `conn` with INIT replayed (module docstring); takes ownership of
    `conn.fd` (closed once it has been moved to the session's fd number). With `resend`,
    requests that a previous daemon left unanswered are queued again right after the takeover.
    Returns at once: the switch happens when pyfuse3.main processes the INIT."""
    import pyfuse3

    if resend and not conn.init_flags & FUSE_HAS_RESEND:
        raise FuseFdError("the kernel has no FUSE_NOTIFY_RESEND (needs Linux >= 6.9): requests "
                          "in flight at a takeover could never be answered")
    ours, feeder = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        feeder.send(conn.init)
    finally:
        feeder.close()
    session = Session(ours.detach())
    orig_init = ops.init

    def init() -> None:
        # Inside libfuse's do_init, before it writes the INIT reply: the session's fd number
        # becomes /dev/fuse (dup2 closes the socket end atomically).
        os.dup2(conn.fd, session.fd, inheritable=False)
        os.close(conn.fd)
        session.switched = True
        if resend:
            send_resend(session.fd)
        orig_init()
    ops.init = init
    try:
        pyfuse3.init(ops, f"/dev/fd/{session.fd}", options)
    except BaseException:
        os.close(session.fd)
        raise
    return session


# ---- SCM_RIGHTS ---------------------------------------------------------------------------

MAX_MSG = 1 << 20


def send_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """One message: a 4-byte length, the payload, the fds attached to the first byte."""
    payload = struct.pack("<I", len(data)) + data
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sent = sock.sendmsg([payload[:1]], anc)
    if sent != 1:
        raise FuseFdError("short send on supervisor socket")
    sock.sendall(payload[1:])


def recv_fds(sock: socket.socket, max_fds: int = 4) -> tuple[bytes, list[int]]:
    """The message `send_fds` sent: (payload, fds). The fds are new, O_CLOEXEC."""
    fds = array.array("i")
    first, anc, flags, _ = sock.recvmsg(1, socket.CMSG_SPACE(max_fds * fds.itemsize),
                                        socket.MSG_CMSG_CLOEXEC)
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise FuseFdError("supervisor message carried too many fds")
    if not first:
        raise FuseFdError("supervisor socket closed before a message")
    rest = _recv_exact(sock, 3)
    (length,) = struct.unpack("<I", first + rest)
    if length > MAX_MSG:
        for fd in fds:
            os.close(fd)
        raise FuseFdError(f"supervisor message of {length} bytes is too large")
    return _recv_exact(sock, length), list(fds)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise FuseFdError("supervisor socket closed mid-message")
        buf += chunk
    return bytes(buf)


__all__ = ["Connection", "FuseFdError", "Session", "attach", "errno", "is_alive", "mount_connection",
           "recv_fds", "send_fds", "send_resend", "unmount"]
