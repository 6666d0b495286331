"""containerd + nydus-snapshotter end to end: real containerd, runc, docker-registry.

1. An ordinary OCI image behaves as with containerd's overlayfs snapshotter: pull, run, restart
   the snapshotter while a container runs, remove everything, no mounts left.
2. A nydus-py image (converted with `nydusify convert`) is pulled with `ctr-remote image rpull`
   without downloading its data blobs, runs, and fetches only part of its data.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from tests.fixtures import imagegen
from tests.fixtures.containerd import (SNAPSHOTTER, ContainerdEnv, convert_nydus_busybox, mounts_under,
                                       push_oci_layout, use_localfs_nydusd)
from tests.fixtures.registry import RegistryServer

pytestmark = pytest.mark.e2e
import grpc  # noqa: F401,E402  (a dependency: missing means a broken install, not a skip)


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    with RegistryServer(tmp_path_factory.mktemp("ctd-registry")) as r:
        yield r


@pytest.fixture(scope="module")
def busybox_ref(reg, tmp_path_factory):
    d = tmp_path_factory.mktemp("busybox-oci")
    imagegen.busybox_image(extra_budget=0).write_oci(d, "latest")
    push_oci_layout(d, "latest", reg.host, "test/busybox")
    return f"{reg.host}/test/busybox:latest", d


@pytest.fixture()
def env():
    with ContainerdEnv() as e:
        e.start_snapshotter()
        e.start_containerd()
        yield e


def _snapshots(env: ContainerdEnv) -> list[str]:
    out = env.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls").stdout.splitlines()[1:]
    return [line.split()[0] for line in out if line.strip()]


def test_ordinary_image_pulls_runs_and_cleans_up_like_overlayfs(env, busybox_ref):
    ref, _ = busybox_ref
    env.ctr("images", "pull", "--plain-http", "--snapshotter", SNAPSHOTTER, ref)
    assert _snapshots(env), "the unpacked layer should be a committed snapshot"
    out = env.ctr("run", "--snapshotter", SNAPSHOTTER, "--rm", ref, "c1", "/bin/busybox", "echo", "hi").stdout
    assert out.strip() == "hi"

    # the container's writes land in its own upperdir, not in the image
    out = env.ctr("run", "--snapshotter", SNAPSHOTTER, "--rm", ref, "c2", "/bin/sh", "-c",
                  "echo data > /tmp/f && cat /tmp/f && ls /bin/busybox").stdout
    assert out.split() == ["data", "/bin/busybox"]

    env.ctr("images", "rm", "--sync", ref)
    deadline = time.monotonic() + 10
    while _snapshots(env) and time.monotonic() < deadline:      # containerd's GC removes them
        time.sleep(0.2)
    assert _snapshots(env) == []
    assert mounts_under(env.dir) == []
    assert list((env.snap_root / "snapshots").iterdir()) == []


def test_snapshotter_restart_while_container_runs(env, busybox_ref):
    ref, _ = busybox_ref
    env.ctr("images", "pull", "--plain-http", "--snapshotter", SNAPSHOTTER, ref)
    env.ctr("run", "-d", "--snapshotter", SNAPSHOTTER, ref, "long", "/bin/sleep", "300")
    try:
        env.stop_snapshotter()
        env.start_snapshotter()
        env.wait_reconnected("long")
        # state survived: the running container's snapshot is still known, new containers work
        out = env.ctr("run", "--snapshotter", SNAPSHOTTER, "--rm", ref, "c3", "/bin/busybox", "echo", "again").stdout
        assert out.strip() == "again"
        assert env.ctr("tasks", "ls").stdout.count("RUNNING") == 1
        assert "long" in _snapshots(env)
    finally:
        env.ctr("tasks", "kill", "-s", "SIGKILL", "long", check=False)
        for _ in range(50):
            if env.ctr("tasks", "rm", "-f", "long", check=False).returncode == 0:
                break
            time.sleep(0.1)
        env.ctr("containers", "rm", "long", check=False)
    env.ctr("images", "rm", "--sync", ref)
    deadline = time.monotonic() + 10
    while _snapshots(env) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _snapshots(env) == []
    assert mounts_under(env.dir) == []


# ---------------------------------------------------------------------------- nydus-py images

@pytest.fixture(scope="module")
def nydus_image(reg, tmp_path_factory):
    """busybox + a 24 MiB file nobody reads, converted by nydusify and pushed to the registry;
    blobs also copied to a localfs dir for the localfs stand-in nydusd."""
    d = tmp_path_factory.mktemp("nydus-img")
    info = convert_nydus_busybox(d, blob_dir=d / "blobs")
    info["digest"] = push_oci_layout(d / "nydus", "latest", reg.host, "test/busybox-nydus")
    info["ref"] = f"{reg.host}/test/busybox-nydus:latest"
    info["blob_dir"] = d / "blobs"
    return info


def _blob_gets(reg: RegistryServer) -> list[str]:
    time.sleep(0.3)
    return [m.group(0) for line in reg.access_log()
            if (m := re.search(r'"GET \S*/blobs/(sha256:[0-9a-f]+)', line))]


def _rpull(env: ContainerdEnv, ref: str) -> None:
    out = env.ctr_remote("image", "rpull", "--plain-http", "--snapshotter", SNAPSHOTTER, ref)
    print(out.stdout)
    print("labels seen by Prepare:", *env.snapshot_labels_seen(), sep="\n  ")


def _remove_image_and_check_clean(env: ContainerdEnv, ref: str) -> None:
    env.ctr("images", "rm", "--sync", ref)
    deadline = time.monotonic() + 20
    while (_snapshots(env) or env.nydusd_pids()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _snapshots(env) == []
    assert env.nydusd_pids() == []
    assert mounts_under(env.dir) == []


@pytest.fixture()
def bare_env():
    with ContainerdEnv() as e:
        yield e


def test_nydus_image_runs_from_remote_snapshots_localfs_daemon(bare_env, reg, nydus_image):
    """The snapshotter side of the nydus path with nydusd reading blobs from a local dir:
    classification by labels, ALREADY_EXISTS for every layer, bootstrap fetched from the
    registry, overlay on the FUSE mount, snapshotter restart re-attaching, a killed nydusd
    restarted, and everything released on image removal."""
    env = bare_env
    use_localfs_nydusd(env, nydus_image["blob_dir"])
    env.start_snapshotter()
    env.start_containerd()
    ref = nydus_image["ref"]
    before = _blob_gets(reg)
    _rpull(env, ref)
    gets = _blob_gets(reg)[len(before):]
    print("blob GETs during rpull:", *gets, sep="\n  ")
    assert not any(b in g for g in gets for b in nydus_image["blobs"]), "data blobs must not be downloaded"
    assert sum(nydus_image["bootstrap"] in g for g in gets) == 1
    assert len(list((env.snap_root / "mnt").iterdir())) == 1
    (pid,) = env.nydusd_pids()
    keys = _snapshots(env)

    out = env.ctr("run", "--snapshotter", SNAPSHOTTER, "--rm", ref, "n1", "/bin/sh", "-c",
                  "echo lazy > /tmp/x && cat /tmp/x && ls /data").stdout
    assert out.split() == ["lazy", "big.bin"]

    # restart: same daemon re-attached
    env.stop_snapshotter()
    env.start_snapshotter()
    assert env.nydusd_pids() == [pid]
    assert "re-attached to nydusd pid" in env.log_tail("snapshotter", 50)

    # a dead daemon is restarted (and remounted) by the next snapshotter start
    env.stop_snapshotter()
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.3)
    env.start_snapshotter()
    (pid2,) = env.nydusd_pids()
    assert pid2 != pid
    env.wait_reconnected(keys[0])
    out = env.ctr("run", "--snapshotter", SNAPSHOTTER, "--rm", ref, "n2", "/bin/busybox", "echo", "back").stdout
    assert out.strip() == "back"
    _remove_image_and_check_clean(env, ref)


def test_nydus_image_rpull_runs_lazily_from_registry(env_registry_backend, reg, nydus_image):
    """Full path: nydusd reads chunks from the registry; only a small part of the image's data
    is fetched (the 24 MiB file is never read)."""
    env = env_registry_backend
    ref = nydus_image["ref"]
    before = len(_blob_gets(reg))
    _rpull(env, ref)
    out = env.ctr("run", "--snapshotter", SNAPSHOTTER, "--rm", ref, "n1", "/bin/busybox", "echo", "lazy").stdout
    assert out.strip() == "lazy"
    gets = _blob_gets(reg)[before:]
    print("blob GETs during rpull + run:", *gets, sep="\n  ")
    big_blob = nydus_image["blobs"][-1]   # the last source layer holds only big.bin
    assert not any(big_blob in g for g in gets), "the unread 24 MiB blob must not be fetched"
    _remove_image_and_check_clean(env, ref)


@pytest.fixture()
def env_registry_backend():
    with ContainerdEnv() as e:
        e.start_snapshotter()
        e.start_containerd()
        yield e
