"""The snapshotter's live-mount check (process.is_live_mount) through a real nydusd mount:
live while the daemon serves it, dead once the daemon is killed with SIGKILL, although the
kernel still holds the mount root's attributes (nydusd's attribute timeout is a day), so a
stat of the mountpoint still succeeds."""

from __future__ import annotations

import os
import signal

import pytest

from nydus_py.snapshotter.process import is_live_mount
from tests.fixtures.daemon import Daemon, force_unmount
from tests.fixtures.nydus_build import build

pytestmark = pytest.mark.e2e


def test_a_killed_daemon_s_mount_is_dead_although_stat_answers_from_cache(tmp_path):
    b = build({"a/hello": b"hello\n"}, chunk_size=4096, compressor="none")
    b.write(tmp_path / "blobs", tmp_path / "bootstrap")
    d = Daemon(tmp_path, "--bootstrap", str(tmp_path / "bootstrap"), "--blob-dir", str(tmp_path / "blobs"),
               "--cache-dir", str(tmp_path / "cache"))
    try:
        d.start()
        assert (d.mnt / "a/hello").read_bytes() == b"hello\n"
        os.stat(d.mnt)                      # the root's attributes are now in the kernel's cache
        assert is_live_mount(d.mnt)
        d.stop(signal.SIGKILL)
        os.stat(d.mnt)                      # still answered: why the check must not rely on stat
        assert not is_live_mount(d.mnt)
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
        force_unmount(d.mnt)
