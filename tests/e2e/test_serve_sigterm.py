"""`nydusd serve` ends within a few seconds of SIGTERM, its mounts detached, even when a mount
has reads stuck in a backend that never answers (the blob is a FIFO nobody writes), and even
when a mount child cannot act on the SIGTERM it is sent (stopped here; stuck in the kernel on
a hung NFS backend alike): the supervisor's own stop watchdog (daemon/watchdog.py, the one
`nydusd mount` uses) kills and detaches what is left after supervisor.STOP_GRACE."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from nydus_py.daemon import supervisor
from nydus_py.daemon.api import get_json
from tests.fixtures.daemon import force_unmount, mounted, nydusd_cmd, read_errno, wait_for
from tests.fixtures.nydus_build import build

pytestmark = pytest.mark.e2e

CS = 4096


def _stuck_serve(tmp_path: Path, stop_child: bool) -> tuple[float, dict, str]:
    """A serve with one mount, two reads stuck in its backend (and the child SIGSTOPped if
    `stop_child`); SIGTERM to the supervisor. Returns (seconds to exit, read errnos, log)."""
    files = {f"d/f{i}": os.urandom(2 * CS) for i in range(4)}
    b = build(files, chunk_size=CS, compressor="none")
    (bid, _), = b.blobs.items()
    (tmp_path / "blobs").mkdir()
    os.mkfifo(tmp_path / "blobs" / bid.split(":")[1])
    (tmp_path / "bootstrap").write_bytes(b.bootstrap)
    sock, log, mnt = tmp_path / "sup.sock", tmp_path / "sup.log", tmp_path / "m"
    mnt.mkdir()
    with open(log, "wb") as out:
        sup = subprocess.Popen([*nydusd_cmd(), "serve", "--apisock", str(sock), "--cache-dir",
                                str(tmp_path / "cache"), "--state-dir", str(tmp_path / "state")],
                               stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    readers: list[threading.Thread] = []
    outcome: dict[str, int | None] = {}
    child = 0
    try:
        wait_for(sock.exists, "supervisor socket", log=log)
        st, info = get_json(str(sock), f"/api/v1/mount?mountpoint={mnt}", "POST",
                            {"bootstrap": str(tmp_path / "bootstrap"), "blob_dir": str(tmp_path / "blobs")})
        assert st == 200 and info["state"] == "RUNNING", info
        child = info["pid"]
        for name in ("f1", "f2"):
            t = threading.Thread(target=lambda n=name: outcome.__setitem__(n, read_errno(mnt / "d" / n)),
                                 daemon=True)
            t.start()
            readers.append(t)
        wait_for(lambda: len(get_json(str(sock), f"/api/v1/metrics/inflight?mountpoint={mnt}")[1]
                             .get("values", [])) >= 2, "two reads in flight", log=log)
        if stop_child:
            os.kill(child, signal.SIGSTOP)
        t0 = time.monotonic()
        sup.send_signal(signal.SIGTERM)
        try:
            sup.wait(supervisor.STOP_TIMEOUT + 20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"nydusd serve still running long after SIGTERM: {log.read_text()}")
        took = time.monotonic() - t0
        assert not mounted(mnt)
        for t in readers:
            t.join(30)
            assert not t.is_alive()
        return took, outcome, log.read_text()
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
        if child:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        force_unmount(mnt)


def test_serve_ends_soon_after_sigterm_with_reads_stuck_in_the_backend(tmp_path):
    took, outcome, log = _stuck_serve(tmp_path, stop_child=False)
    assert took < supervisor.STOP_GRACE, (took, log)     # the child's own grace ended it
    assert all(v is not None for v in outcome.values()), outcome      # failed, never data


def test_serve_ends_soon_after_sigterm_when_a_mount_child_cannot_stop(tmp_path):
    """Before: the supervisor waited STOP_TIMEOUT (20 s) for the child, then killed it."""
    took, outcome, log = _stuck_serve(tmp_path, stop_child=True)
    assert took < (supervisor.STOP_GRACE + supervisor.STOP_TIMEOUT) / 2, (took, log)
    assert all(v is not None for v in outcome.values()), outcome      # failed, never data
    assert "did not finish" in log
