"""Stopping and waiting for a process that is not our child (a `nydusd mount --daemon`).

A daemonized nydusd is nobody's child: when it exits it stays a zombie until init (or a
subreaper) reaps it, and kill(pid, 0) and /proc/PID keep finding it meanwhile. How soon init
reaps is up to init: systemd does it at once, but the init of the VMs these tests and benchmarks
run in (firecracker's process_api) reaps an orphan 1.5-1.8 s after it died — a `sleep` as much
as a nydusd, which itself is gone (mount detached, cache closed, pid file removed, every thread
ended) 5-50 ms after SIGTERM. A waiter that asks "is the pid still there" counts init's delay
as nydusd's; one that asks "has it exited" does not:

    stop(pid, timeout)       SIGTERM through a pidfd, wait for the exit; True once it exited
    wait_exit(pid, timeout)  wait for the exit (someone else sent the signal)
    exited(pid)              non-blocking: gone, or a zombie

A pidfd (Linux >= 5.3) becomes readable when the process exits, not when it is reaped, and it
names that one process: a pid recycled meanwhile is never signalled or waited for. Without
pidfds (ENOSYS, a seccomp filter) the state letter of /proc/PID/stat is polled (Z = exited).
"""

from __future__ import annotations

import errno
import os
import select
import signal
import time
from typing import Callable

POLL_FALLBACK = 0.01    # seconds between /proc looks when pidfds are not available


def exited(pid: int) -> bool:
    """Gone, or a zombie (dead, waiting for its parent or init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return True


def _pidfd(pid: int) -> int | None:
    """A pidfd of `pid`; -1 when there is no such process; None when pidfds are unavailable."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return -1
    except (AttributeError, OSError) as e:
        if isinstance(e, OSError) and e.errno not in (errno.ENOSYS, errno.EPERM, errno.EINVAL):
            raise
        return None


def _wait_fd(fd: int, timeout: float | None) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(None if timeout is None else max(0, int(timeout * 1000))))


def _poll_proc(pid: int, timeout: float | None) -> bool:
    deadline = None if timeout is None else time.monotonic() + timeout
    while not exited(pid):
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(POLL_FALLBACK)
    return True


def wait_exit(pid: int, timeout: float | None) -> bool:
    """Blocking: True once `pid` has exited (reaped or not), False after `timeout` seconds."""
    fd = _pidfd(pid)
    if fd == -1:
        return True
    if fd is None:
        return _poll_proc(pid, timeout)
    try:
        return _wait_fd(fd, timeout)
    finally:
        os.close(fd)


def stop(pid: int, timeout: float | None, sig: int = signal.SIGTERM, *,
         verify: Callable[[], bool] | None = None) -> bool:
    """Send `sig` to `pid` and wait for it to exit: True once it has, False after `timeout`
    (it still runs). A process that is already gone counts as stopped. `verify` is asked once
    the pidfd pins the process: False (not the process meant: a recycled pid) sends nothing
    and returns True."""
    fd = _pidfd(pid)
    if fd == -1:
        return True
    if verify is not None and not verify():
        if fd is not None:
            os.close(fd)
        return True
    if fd is None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        return _poll_proc(pid, timeout)
    try:
        try:
            signal.pidfd_send_signal(fd, sig)
        except ProcessLookupError:      # exited (a zombie) since the pidfd was opened
            return True
        return _wait_fd(fd, timeout)
    finally:
        os.close(fd)
