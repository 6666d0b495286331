"""nydusd processes and their mounts, as the snapshotter sees them from outside: is the
pid still that daemon, is its mount live, stop it, detach its mount."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

from nydus_py import mountinfo, pidwait
from nydus_py.snapshotter.remote import RemoteConfig, RemoteError

log = logging.getLogger("nydus_py.snapshotter.remote")

is_mounted = mountinfo.is_mounted


def is_live_mount(path: str | Path) -> bool:
    """Mounted, and a daemon answers for it. statfs, not stat: the kernel always asks the
    daemon for statfs, while nydusd's day-long attribute timeouts let a stat of a dead
    mount be answered from the kernel's cache (as nydus_py/daemon/mount.py's is_stale)."""
    if not is_mounted(path):
        return False
    try:
        os.statvfs(path)
        return True
    except OSError:
        return False           # ENOTCONN: the daemon behind it is gone


def pid_alive(pid: int, mountpoint: str | None = None) -> bool:
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                return False
        if mountpoint is not None:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return mountpoint.encode() in f.read().split(b"\0")
        return True
    except (OSError, IndexError):
        return False


def unmount(path: str | Path) -> None:
    """Lazy unmount, whoever's mount it is; no error when nothing is mounted there."""
    if not is_mounted(path):
        return
    mountinfo.lazy_unmount(path)
    if is_mounted(path):
        raise RemoteError(f"cannot unmount {path}")


def nydusd_env(config: RemoteConfig) -> dict[str, str]:
    """nydusd's environment: ours (IMAGE_PULL_AUTH, DOCKER_CONFIG, HOME pass through), and
    with --docker-config DIR/config.json, DOCKER_CONFIG=DIR so a daemon that resolves
    credentials itself (identity tokens) reads the same file."""
    env = dict(os.environ)
    if config.docker_config and Path(config.docker_config).name == "config.json":
        env["DOCKER_CONFIG"] = str(Path(config.docker_config).absolute().parent)
    return env


def terminate(pid: int, marker: str, timeout: float) -> None:
    """SIGTERM, then SIGKILL after `timeout`; only while `pid` still runs with `marker` on its
    command line (never a recycled pid). Returns when the daemon has exited, not when init has
    reaped it (nydus_py/pidwait.py: that can take init 1.5 s more)."""
    def ours() -> bool:
        return pid_alive(pid, marker)
    if pidwait.stop(pid, timeout, verify=ours):
        return
    if ours():
        log.warning("nydusd pid %d ignored SIGTERM for %.0fs; killing it", pid, timeout)
        pidwait.stop(pid, 0, signal.SIGKILL, verify=ours)


def read_pid(path: Path) -> int:
    for _ in range(50):
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            time.sleep(0.02)
    raise RemoteError(f"nydusd wrote no pid to {path}")
