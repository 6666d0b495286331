"""Running containers survive kill -9 and hot upgrades of their nydusd, and kill -9 of the
snapshotter, with `--recover-policy failover` (real containerd + runc + docker-registry).

The container reads /data/big.bin (24 MiB, lazily fetched) in a loop with O_DIRECT, so every
pass goes through the FUSE daemon rather than the page cache, and checks its md5 each time. It
writes the number of good passes to /tmp/passes and stops at the first bad one. Between the
rounds, the test waits for the pass counter to move (an event, not a sleep).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from nydus_py.daemon.api import get_json
from tests.fixtures.containerd import (SNAPSHOTTER, ContainerdEnv, big_md5, kill_task, nydusd_processes_under,
                                       remove_image_and_check_clean, rpull)
from tests.fixtures.registry import Fault, FaultProxy

pytestmark = pytest.mark.e2e
BIG = 24 << 20
TIMEOUT = 60.0

READER = """\
exp={md5}; n=0; echo 0 > /tmp/passes
while true; do
  s=$(dd if=/data/big.bin bs=1048576 iflag=direct 2>/tmp/dd.err | md5sum | cut -d' ' -f1)
  if [ "$s" != "$exp" ]; then echo "BAD pass $n: $s $(cat /tmp/dd.err)" > /tmp/status; exit 1; fi
  n=$((n+1)); echo $n > /tmp/passes
done
"""


def wait_for(cond, what: str, env: ContainerdEnv, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}\n{env.log_tail('snapshotter', 40)}")


class Watched:
    """The reader container's progress, read from its overlay upper dir on the host."""

    def __init__(self, env: ContainerdEnv):
        self.env = env

    def _file(self, name: str) -> Path | None:
        hits = list((self.env.snap_root / "snapshots").glob(f"*/fs/tmp/{name}"))
        return hits[0] if hits else None

    def passes(self) -> int:
        f = self._file("passes")
        try:
            return int(f.read_text()) if f else -1
        except ValueError:
            return -1

    def status(self) -> str:
        f = self._file("status")
        return f.read_text() if f else ""

    def advance(self, n: int = 1) -> None:
        start = self.passes()
        wait_for(lambda: self.passes() >= start + n or self.status(), f"{n} more good passes",
                 self.env)
        assert not self.status(), self.status()


def image_mount(env: ContainerdEnv) -> tuple[Path, str]:
    """The nydusd mountpoint of the (one) image and its device number, from mountinfo."""
    (mnt,) = (env.snap_root / "mnt").iterdir()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if parts[4] == str(mnt):
                return mnt, parts[2]
    pytest.fail(f"{mnt} is not mounted")


def daemons(env: ContainerdEnv) -> list[int]:
    """The processes that serve FUSE: started with --supervisor, and not supervisors."""
    out = []
    for pid in nydusd_processes_under(env.dir):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--supervisor" in args and b"--failover" not in args:
            out.append(pid)
    return out


def the_daemon(env: ContainerdEnv, not_pid: int = 0) -> int:
    """The one daemon serving the image, once it is not `not_pid` and its API answers."""
    def one():
        ds = [d for d in daemons(env) if d != not_pid]
        if len(ds) != 1:
            return None
        for sock in env.snap_root.rglob("*.sock"):
            try:
                status, doc = get_json(str(sock), "/api/v1/daemon")
            except OSError:
                continue
            if status == 200 and isinstance(doc, dict) and doc.get("pid") == ds[0]:
                return ds[0]
        return None
    return wait_for(one, f"a serving daemon other than {not_pid}", env)


def daemon_api(env: ContainerdEnv, pid: int) -> str:
    for sock in env.snap_root.rglob("*.sock"):
        try:
            status, doc = get_json(str(sock), "/api/v1/daemon")
        except OSError:
            continue
        if status == 200 and isinstance(doc, dict) and doc.get("pid") == pid:
            return str(sock)
    pytest.fail(f"no API socket of daemon {pid}")


def upgrade_target(env: ContainerdEnv, mode: str) -> int:
    """Who gets SIGHUP for a hot upgrade: the image's supervisor (dedicated), or the shared
    nydusd, which passes it to every mount."""
    pid_file = env.snap_root / ("shared" if mode == "shared" else next(
        (env.snap_root / "images").iterdir()).relative_to(env.snap_root)) / "nydusd.pid"
    return int(pid_file.read_text())


def kill_snapshotter(env: ContainerdEnv) -> None:
    env.snapshotter.kill()
    env.snapshotter.wait()
    env.snapshotter = None
    env.start_snapshotter()


@pytest.mark.parametrize("mode", ["dedicated", "shared"])
def test_running_container_reads_on_across_daemon_kills_snapshotter_kills_and_upgrades(mode, reg, nydus_image):
    with ContainerdEnv(snapshotter_args=("--daemon-mode", mode, "--recover-policy", "failover",
                                         "--recover-interval", "1")) as env:
        env.start_snapshotter()
        env.start_containerd()
        ref = nydus_image["ref"]
        rpull(env, ref)
        env.ctr("run", "-d", "--snapshotter", SNAPSHOTTER, ref, "reader", "/bin/sh", "-c",
                READER.format(md5=big_md5(BIG)))
        try:
            w = Watched(env)
            w.advance(1)
            mnt, dev = image_mount(env)
            pid = the_daemon(env)
            seen = {pid}
            steps = ["kill", "snapshotter", "upgrade", "kill", "upgrade", "snapshotter", "kill"]
            if mode == "shared":
                steps += ["serve", "kill", "upgrade"]
            for step in steps:
                if step == "serve":
                    # kill -9 of the shared nydusd: the mount lives on in its supervisor, and
                    # the snapshotter's monitor starts a new shared nydusd that adopts it
                    serve = upgrade_target(env, mode)
                    os.kill(serve, signal.SIGKILL)
                    wait_for(lambda serve=serve: upgrade_target(env, mode) != serve and
                             "adopted the running failover mount" in
                             (env.snap_root / "shared/nydusd.log").read_text(), "adoption", env)
                    assert the_daemon(env) == pid
                elif step == "kill":
                    os.kill(pid, signal.SIGKILL)
                    pid = the_daemon(env, not_pid=pid)
                elif step == "upgrade":
                    os.kill(upgrade_target(env, mode), signal.SIGHUP)
                    pid = the_daemon(env, not_pid=pid)
                else:
                    kill_snapshotter(env)
                    env.wait_reconnected("reader")
                    assert the_daemon(env) == pid       # the daemons are not the snapshotter's
                seen.add(pid)
                w.advance(1)
                assert image_mount(env) == (mnt, dev), step   # the same mount all along
            assert len(seen) == (6 if mode == "dedicated" else 8)
            assert "RUNNING" in env.ctr("tasks", "ls").stdout
            if mode == "dedicated":
                assert "restarting" not in env.log_tail("snapshotter", 400)
        finally:
            kill_task(env, "reader")
        remove_image_and_check_clean(env, ref)      # daemons stop too; an idle shared one stays
        env.stop_snapshotter()                      # and stops with the snapshotter
        assert nydusd_processes_under(env.dir) == []


@pytest.mark.parametrize("mode", ["dedicated", "shared"])
def test_read_in_flight_when_the_daemon_is_killed_is_answered(mode, reg, nydus_image):
    """Blob GETs through a proxy that delays each by 0.5 s: the cold first pass is slow, and the
    daemon is killed while its API lists a read in flight, twice. The reader never sees it."""
    proxy = FaultProxy(reg.host)
    try:
        proxy.add(Fault.delay(0.5), method="GET", path=r"/blobs/sha256:", times=None)
        with ContainerdEnv(snapshotter_args=("--daemon-mode", mode, "--recover-policy", "failover",
                                             "--plain-http", proxy.host)) as env:
            env.start_snapshotter()
            env.start_containerd()
            ref = nydus_image["ref"].replace(reg.host, proxy.host)
            rpull(env, ref)
            env.ctr("run", "-d", "--snapshotter", SNAPSHOTTER, ref, "reader", "/bin/sh", "-c",
                    READER.format(md5=big_md5(BIG)))
            try:
                w = Watched(env)
                pid = the_daemon(env)
                for _ in range(2):
                    sock = daemon_api(env, pid)

                    def inflight(sock=sock):
                        status, doc = get_json(sock, "/api/v1/metrics/inflight")
                        return status == 200 and bool(doc["values"])
                    wait_for(inflight, "a read in flight", env)
                    assert w.passes() <= 0          # still starting or in the cold first pass
                    os.kill(pid, signal.SIGKILL)
                    pid = the_daemon(env, not_pid=pid)
                w.advance(2)
                assert proxy.count("GET", r"/blobs/sha256:") >= 2
            finally:
                kill_task(env, "reader")
    finally:
        proxy.close()

