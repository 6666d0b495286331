"""nydus_py/pidwait.py: a stopped process counts as gone when it exits, not when it is reaped.

The processes here are our own children and are deliberately not reaped until the end: an
unreaped child is exactly what a daemonized nydusd is to this VM's init for 1.5 s after it
exited (kill(pid, 0) and /proc/PID still find it). A waiter asking "is the pid still there"
would wait for these zombies forever; the timeouts below are guards, never what is measured."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys

import pytest

from nydus_py import pidwait
from nydus_py.snapshotter import process as snap_process

GUARD = 60.0


def _child(*args: str) -> subprocess.Popen:
    """A child that says "ready" once it runs (its signal set-up done), then waits on stdin."""
    code = "import signal, sys\n" + "".join(f"{a}\n" for a in args) + \
        "print('ready', flush=True)\nsys.stdin.read()\n"
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert p.stdout.readline() == b"ready\n"
    return p


def _is_zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"


@pytest.fixture()
def no_pidfd(monkeypatch):
    def enosys(pid, flags=0):
        raise OSError(errno.ENOSYS, "pidfd_open")
    monkeypatch.setattr(os, "pidfd_open", enosys)


@pytest.mark.parametrize("pidfds", [True, False], ids=["pidfd", "proc-fallback"])
def test_stop_returns_at_the_exit_not_at_the_reap(pidfds, request):
    if not pidfds:
        request.getfixturevalue("no_pidfd")
    p = _child()
    try:
        assert pidwait.stop(p.pid, GUARD)
        # still unreaped: the old waiters (kill(pid, 0), /proc/PID exists) would still wait here
        assert _is_zombie(p.pid)
        os.kill(p.pid, 0)
        assert pidwait.exited(p.pid)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == -signal.SIGTERM
    assert pidwait.stop(p.pid, GUARD) and pidwait.wait_exit(p.pid, GUARD)    # reaped: gone


def test_wait_exit_sees_an_exit_someone_else_caused():
    p = _child()
    try:
        assert not pidwait.exited(p.pid)
        p.stdin.close()                 # the child's read returns: it exits on its own
        assert pidwait.wait_exit(p.pid, GUARD)
        assert _is_zombie(p.pid)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == 0


def test_a_process_that_ignores_the_signal_is_reported_as_running():
    p = _child("signal.signal(signal.SIGTERM, signal.SIG_IGN)")
    try:
        assert not pidwait.stop(p.pid, 0.2)
        assert not pidwait.exited(p.pid)
        assert pidwait.stop(p.pid, GUARD, signal.SIGKILL)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == -signal.SIGKILL


def test_verify_false_sends_nothing():
    """A pid that is no longer the process meant (recycled): left alone."""
    p = _child()
    try:
        assert pidwait.stop(p.pid, GUARD, verify=lambda: False)
        assert not pidwait.exited(p.pid)
        p.stdin.close()
        assert p.wait(GUARD) == 0
    finally:
        p.kill()
        p.wait()


def test_snapshotter_terminate_returns_at_the_exit(monkeypatch):
    """The snapshotter's stop of a dedicated nydusd (marker: the mountpoint on its command
    line) returns once the daemon exited, before anybody reaped it."""
    marker = "/nonexistent/mnt-of-this-test"
    p = subprocess.Popen([sys.executable, "-c", "import sys; print('ready', flush=True); sys.stdin.read()",
                          marker], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"ready\n"
        assert snap_process.pid_alive(p.pid, marker)
        snap_process.terminate(p.pid, marker, GUARD)
        assert _is_zombie(p.pid)
        assert not snap_process.pid_alive(p.pid, marker)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == -signal.SIGTERM
