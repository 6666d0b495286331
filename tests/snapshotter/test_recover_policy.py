"""--recover-policy wiring without containerd: which nydusd command an image gets, and when
the monitor considers a daemon in need of a restart."""

from __future__ import annotations

import pytest

from nydus_py.snapshotter.daemons import DaemonManager
from nydus_py.snapshotter.remote import RemoteConfig
from nydus_py.snapshotter.resolver import Resolver
from nydus_py.snapshotter.store import ImageRecord, Store


@pytest.fixture()
def manager(tmp_path, request):
    cfg = RemoteConfig(root=tmp_path, nydusd=("nydusd",), recover_policy=request.param)
    store = Store(tmp_path / "m.db")
    yield DaemonManager(cfg, store, Resolver(cfg))
    store.close()


def record(tmp_path, image_id: str = "ab" * 32) -> ImageRecord:
    return ImageRecord(id=image_id, ref="r/x:1", manifest_digest="sha256:" + image_id,
                       bootstrap_digest="sha256:" + "cd" * 32, mountpoint=str(tmp_path / "mnt"),
                       pid=2 ** 22 + 7,      # no such process
                       state={"bootstrap": "/b", "config": "/c"})


@pytest.mark.parametrize("manager", ["failover"], indirect=True)
def test_failover_runs_each_dedicated_daemon_under_a_supervisor(manager, tmp_path):
    cmd = manager._command(record(tmp_path))
    assert cmd[cmd.index("--supervisor") + 1].endswith("/supervisor.sock") and "--failover" in cmd
    assert cmd.count("--apisock") == 1      # the daemon's socket is the one Cleanup knows
    sock = cmd[cmd.index("--apisock") + 1]
    assert len(sock.encode()) < 108 and sock == str(manager.api_sock(record(tmp_path).id))
    assert cmd[-1] == str(tmp_path / "mnt")


@pytest.mark.parametrize("manager", ["restart"], indirect=True)
def test_restart_policy_runs_plain_daemons_and_restarts_dead_ones(manager, tmp_path):
    cmd = manager._command(record(tmp_path))
    assert "--failover" not in cmd and "--supervisor" not in cmd
    assert not manager._healthy(record(tmp_path))


@pytest.mark.parametrize("manager", ["none"], indirect=True)
def test_none_policy_never_restarts(manager, tmp_path):
    assert manager._healthy(record(tmp_path))
