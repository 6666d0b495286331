"""`nydusd mount --failover`: the FUSE session survives kill -9 and hot upgrades of its daemon.

A reader thread reads a large file of the mount in a loop and checks every byte, dropping the
file's page cache after each pass so that every pass goes to the daemon. While it runs, the
daemon is killed (SIGKILL) or upgraded (SIGHUP to the supervisor) several times; the reader
must see no error and no wrong byte, and the mount must stay the same mount (same device).
With a slow backend (a delaying proxy in front of a real docker-registry) the kill lands while
the daemon's inflight API shows a read: the kernel resends it to the new daemon.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests

from nydus_py import pidwait
from nydus_py.daemon.api import get_json
from tests.fixtures import daemon as daemon_fixtures
from tests.fixtures.nydus_build import build
from tests.fixtures.registry import Fault, FaultProxy, RegistryServer

pytestmark = pytest.mark.e2e

BIG = 16 << 20
CHUNK = 64 << 10
TIMEOUT = 30.0
BIN = Path(sys.executable).parent


def wait_for(cond, what: str, timeout: float = TIMEOUT, log: Path | None = None):
    """tests/fixtures/daemon.py's wait_for with this module's longer default (takeovers)."""
    return daemon_fixtures.wait_for(cond, what, timeout, log)


def mount_entry(mnt: Path) -> tuple[str, str] | None:
    """(major:minor, fstype) of the mount at `mnt`, from mountinfo (no FUSE request)."""
    target = os.path.realpath(mnt)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            parts = left.split()
            if parts[4] == target:
                return parts[2], right.split()[0]
    return None


def abort_connection(dev: str) -> None:
    """Fail every request of the connection (unblocks a reader if a test went wrong)."""
    minor = dev.split(":")[1]
    try:
        with open(f"/sys/fs/fuse/connections/{minor}/abort", "w") as f:
            f.write("1")
    except OSError:
        pass


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    root = tmp_path_factory.mktemp("failover-img")
    data = random.Random(12).randbytes(BIG)
    b = build({"big": data, "etc/hello": b"hello\n"}, chunk_size=CHUNK)
    b.write(root / "blobs", root / "bootstrap")
    return root, b, data


class Reader(threading.Thread):
    """Reads `path` in 1 MiB preads in a loop, checking each against `data`."""

    def __init__(self, path: Path, data: bytes):
        super().__init__(daemon=True)
        self.path, self.data = path, data
        self.errors: list[str] = []
        self.bytes_ok = 0
        self.passes = 0
        self.stop_ev = threading.Event()

    def run(self) -> None:
        while not self.stop_ev.is_set():
            try:
                fd = os.open(self.path, os.O_RDONLY)
                try:
                    off = 0
                    while off < len(self.data) and not self.stop_ev.is_set():
                        got = os.pread(fd, 1 << 20, off)
                        if got != self.data[off:off + len(got)] or not got:
                            self.errors.append(f"wrong bytes at {off} (pass {self.passes})")
                            return
                        off += len(got)
                        self.bytes_ok += len(got)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
                self.passes += 1
            except OSError as e:
                self.errors.append(f"{e!r} (pass {self.passes}, {self.bytes_ok} bytes ok)")
                return

    def progress(self, nbytes: int) -> None:
        """Wait until `nbytes` more bytes were read and checked."""
        target = self.bytes_ok + nbytes
        wait_for(lambda: self.bytes_ok >= target or self.errors or not self.is_alive(),
                 f"reader progress to {target}")
        assert not self.errors, self.errors

    def finish(self) -> None:
        self.stop_ev.set()
        self.join(TIMEOUT)
        assert not self.is_alive(), "reader hangs"
        assert not self.errors, self.errors


class Supervised:
    """`nydusd mount --failover --daemon`: the supervisor (pid file) and its daemon (API)."""

    def __init__(self, tmp: Path, *src: str, name: str = "fo"):
        self.mnt = tmp / f"mnt-{name}"
        self.sup = tmp / f"{name}.sup"
        self.sock = tmp / f"{name}.sock"
        self.log = tmp / f"{name}.log"
        self.pid_file = tmp / f"{name}.pid"
        self.args = [str(BIN / "nydusd"), "mount", *src, "--failover", "--supervisor", str(self.sup),
                     "--apisock", str(self.sock), "--daemon", "--pid-file", str(self.pid_file),
                     "--log-file", str(self.log), "--id", name, str(self.mnt)]
        self.dev = ""

    def __enter__(self) -> Supervised:  # noqa: PYI034
        self.mnt.mkdir(exist_ok=True)
        r = subprocess.run(self.args, check=False, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr + (self.log.read_text() if self.log.exists() else "")
        entry = mount_entry(self.mnt)
        assert entry is not None and entry[1] == "fuse.nydus-py", entry
        self.dev = entry[0]
        return self

    @property
    def supervisor_pid(self) -> int:
        return int(self.pid_file.read_text())

    def api(self, target: str):
        status, doc = get_json(str(self.sock), target)
        assert status == 200, (status, doc)
        return doc

    def daemon_pid(self) -> int:
        def answer():
            try:
                return self.api("/api/v1/daemon")["pid"]
            except OSError:
                return None
        return wait_for(answer, "daemon API", log=self.log)

    def replaced(self, old: int) -> int:
        """Wait until a daemon other than `old` serves (its API answers) and return its pid."""
        def new():
            try:
                pid = self.api("/api/v1/daemon")["pid"]
            except OSError:
                return None
            return pid if pid != old else None
        return wait_for(new, f"a daemon replacing pid {old}", log=self.log)

    def __exit__(self, *exc) -> None:
        try:
            pid = self.supervisor_pid
            if not pidwait.stop(pid, 20):   # exited, not reaped (nydus_py/pidwait.py)
                pytest.fail(f"supervisor did not exit\n{self.log.read_text()}")
        except (OSError, ValueError):
            pass
        if self.dev and mount_entry(self.mnt) is not None:
            abort_connection(self.dev)
            subprocess.run(["umount", "-l", str(self.mnt)], check=False, capture_output=True)
        assert mount_entry(self.mnt) is None


def test_reader_survives_kill9_and_hot_upgrades_of_its_daemon(tmp_path, image):
    root, _, data = image
    with Supervised(tmp_path, "--bootstrap", str(root / "bootstrap"), "--blob-dir",
                    str(root / "blobs"), "--cache-dir", str(tmp_path / "cache")) as m:
        reader = Reader(m.mnt / "big", data)
        reader.start()
        try:
            reader.progress(BIG // 2)
            pids = {m.daemon_pid()}
            for _ in range(3):                  # crash: kill -9 of the daemon
                old = m.daemon_pid()
                os.kill(old, signal.SIGKILL)
                pids.add(m.replaced(old))
                reader.progress(BIG // 2)
            for _ in range(3):                  # hot upgrade: SIGHUP to the supervisor
                old = m.daemon_pid()
                os.kill(m.supervisor_pid, signal.SIGHUP)
                pids.add(m.replaced(old))
                reader.progress(BIG // 2)
            assert len(pids) == 7
            assert os.path.exists(f"/proc/{m.supervisor_pid}")
        finally:
            reader.finish()
        assert mount_entry(m.mnt)[0] == m.dev       # the same mount all along
        assert reader.passes >= 3
        log = m.log.read_text()
        assert log.count("failover: a new daemon takes over") == 3
        assert log.count("SIGHUP: hot upgrade") == 3
    assert "unmounted" in m.log.read_text()


def _push_blobs(host: str, repo: str, blob_dir: Path) -> None:
    for blob in blob_dir.iterdir():
        r = requests.post(f"http://{host}/v2/{repo}/blobs/uploads/", timeout=30)
        assert r.status_code == 202, r.text
        loc = r.headers["Location"]
        loc = loc if loc.startswith("http") else f"http://{host}{loc}"
        sep = "&" if "?" in loc else "?"
        r = requests.put(f"{loc}{sep}digest=sha256:{blob.name}", data=blob.read_bytes(),
                         headers={"Content-Type": "application/octet-stream"}, timeout=30)
        assert r.status_code == 201, r.text


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    with RegistryServer(tmp_path_factory.mktemp("failover-registry")) as reg:
        yield reg


def test_read_in_flight_at_the_kill_is_resent_to_the_new_daemon(tmp_path, image, registry):
    """A delaying proxy makes every backend read take 0.4 s; the daemon is killed while its
    inflight API lists a read. The reader blocked in that read gets the right bytes."""
    root, _, data = image
    _push_blobs(registry.host, "failover/app", root / "blobs")
    proxy = FaultProxy(registry.host)
    try:
        proxy.add(Fault.delay(0.4), method="GET", path=r"/blobs/sha256:", times=None)
        cfg = tmp_path / "nydusd.json"
        cfg.write_text(json.dumps({"device": {
            "backend": {"type": "registry", "config": {
                "host": proxy.host, "repo": "failover/app", "scheme": "http", "timeout": 30}},
            "cache": {"type": "blobcache"}}, "amplify_io": 131072}))
        with Supervised(tmp_path, "--bootstrap", str(root / "bootstrap"), "--config", str(cfg),
                        "--cache-dir", str(tmp_path / "cache")) as m:
            reader = Reader(m.mnt / "big", data)
            reader.start()
            try:
                for _ in range(3):
                    old = m.daemon_pid()
                    wait_for(lambda: m.api("/api/v1/metrics/inflight")["values"],
                             "a read in flight", log=m.log)
                    os.kill(old, signal.SIGKILL)
                    m.replaced(old)
                    reader.progress(1 << 20)
            finally:
                reader.finish()
            assert mount_entry(m.mnt)[0] == m.dev
            assert proxy.count("GET", r"/blobs/sha256:") > 3
    finally:
        proxy.close()


def test_failover_needs_a_supervisor_socket(tmp_path, image):
    root, _, _ = image
    r = subprocess.run([str(BIN / "nydusd"), "mount", "--bootstrap", str(root / "bootstrap"),
                        "--blob-dir", str(root / "blobs"), "--failover", str(tmp_path)],
                       check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        "nydusd: error: --upgrade and --failover need --supervisor SOCK"]


def test_a_bad_image_is_one_error_line_and_no_mount(tmp_path):
    (tmp_path / "bootstrap").write_bytes(b"not a bootstrap")
    (tmp_path / "mnt").mkdir()
    (tmp_path / "blobs").mkdir()
    r = subprocess.run([str(BIN / "nydusd"), "mount", "--bootstrap", str(tmp_path / "bootstrap"),
                        "--blob-dir", str(tmp_path / "blobs"), "--failover", "--supervisor",
                        str(tmp_path / "s.sup"), "--daemon", str(tmp_path / "mnt")],
                       check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nydusd: error: "), r.stderr
    assert mount_entry(tmp_path / "mnt") is None
    assert not (tmp_path / "s.sup").exists()
