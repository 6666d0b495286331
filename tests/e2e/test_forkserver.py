"""`nydusd serve` forks its mounts from a pre-imported process (daemon/forkserver.py): the
mount runs without a new interpreter, behaves like one started with exec, and dies with its
daemon."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from nydus_py import pidwait
from nydus_py.daemon.api import call_sync, get_json
from tests.fixtures.daemon import (
    exit_serve,
    force_unmount,
    mounted,
    nydusd_cmd,
    read_all,
    reap,
    wait_for,
)

pytestmark = pytest.mark.e2e


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def _children(pid: int) -> set[int]:
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if _ppid(int(d)) == pid:
                    out.add(int(d))
            except (OSError, IndexError):
                pass                    # ended meanwhile
    return out


def _serve(tmp_path: Path, env: dict | None = None,
           *extra: str) -> tuple[subprocess.Popen, Path, Path]:
    sock, log = tmp_path / "sup.sock", tmp_path / "sup.log"
    with open(log, "wb") as out:
        sup = subprocess.Popen([*nydusd_cmd(), "serve", "--apisock", str(sock), "--cache-dir",
                                str(tmp_path / "cache"), "--state-dir", str(tmp_path / "state"),
                                *extra],
                               stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env={**os.environ, **(env or {})})
    wait_for(sock.exists, "supervisor socket", log=log)
    return sup, sock, log


def _mount(sock: Path, mnt: Path, root: Path) -> dict:
    mnt.mkdir()
    st, info = get_json(str(sock), f"/api/v1/mount?mountpoint={mnt}", "POST",
                        {"bootstrap": str(root / "bootstrap"), "blob_dir": str(root / "blobs")})
    assert st == 200 and info["state"] == "RUNNING", info
    return info


def test_serve_forks_mounts_from_the_fork_server_and_they_die_with_the_daemon(tmp_path, image):
    root, built = image
    sup, sock, log = _serve(tmp_path)
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    try:
        info = _mount(sock, m1, root)
        info2 = _mount(sock, m2, root)
        pid = info["pid"]
        server = _ppid(pid)
        assert server != sup.pid and _ppid(server) == sup.pid      # forked by the server
        assert _ppid(info2["pid"]) == server
        assert _comm(pid) == "nydusd-mount"
        read_all(m1, built)
        read_all(m2, built)
        # a failing mount reports its own error line through the server, as an exec'd one does
        st, bad = get_json(str(sock), f"/api/v1/mount?mountpoint={tmp_path / 'm3'}", "POST",
                           {"source": f"oci:{tmp_path}/none:v1"})
        assert st == 500 and "none" in bad["message"], bad
        # exit codes come back through the server: a killed mount is restarted
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: any(x["state"] == "RUNNING" and x["restarts"] == 1 and x["pid"] != pid
                             for x in get_json(str(sock), "/api/v1/mount")[1]
                             if x["mountpoint"] == str(m1)), "restart", log=log)
        read_all(m1, built)
        assert call_sync(str(sock), "DELETE", f"/api/v1/mount?mountpoint={m2}")[0] == 204
        assert not mounted(m2)
        # the daemon killed outright: server and mounts follow (parent-death signals)
        sup.kill()
        sup.wait(30)
        wait_for(lambda: not mounted(m1), "mount to go away with its daemon", log=log)
        assert pidwait.wait_exit(server, 30), "fork server did not exit"     # orphaned: not reaped at once
    finally:
        reap(sup)
        force_unmount(m1)
        force_unmount(m2)


def test_without_the_fork_server_mounts_are_new_interpreters(tmp_path, image):
    root, built = image
    sup, sock, _ = _serve(tmp_path, {"NYDUS_PY_NO_FORKSERVER": "1"})
    m1 = tmp_path / "m1"
    try:
        info = _mount(sock, m1, root)
        assert _ppid(info["pid"]) == sup.pid
        read_all(m1, built)
        exit_serve(sock, sup)
        assert not mounted(m1)
    finally:
        reap(sup)
        force_unmount(m1)


def test_serve_failover_starts_no_fork_server(tmp_path, image):
    """`serve --failover` execs its mount children (they must outlive it and be found again by
    their command line), so it must not fork a server it never uses: its only children are
    the mounts' own `nydusd mount --failover` supervisors."""
    root, built = image
    sup, sock, log = _serve(tmp_path, None, "--failover")
    m1 = tmp_path / "m1"
    try:
        assert _children(sup.pid) == set(), "a process nobody uses"
        info = _mount(sock, m1, root)
        assert _children(sup.pid) == {info["pid"]}
        with open(f"/proc/{info['pid']}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        assert b"mount" in argv and b"--failover" in argv, argv
        read_all(m1, built)
        assert call_sync(str(sock), "DELETE", f"/api/v1/mount?mountpoint={m1}")[0] == 204
        assert not mounted(m1)
        exit_serve(sock, sup)
    finally:
        reap(sup)
        force_unmount(m1)
