"""containerd + nydus-snapshotter end to end: real containerd, runc, docker-registry.

1. An ordinary OCI image behaves as with containerd's overlayfs snapshotter: pull, run, restart
   the snapshotter while a container runs, remove everything, no mounts left.
2. A nydus-py image (converted with `nydusify convert`) is pulled with `ctr-remote image rpull`
   without downloading its data blobs, runs, and fetches only part of its data.
"""

from __future__ import annotations

import json

import os
import signal
import time

import pytest

from nydus_py.oci import mediatypes as mt
from nydus_py.snapshotter.process import pid_alive
from tests.fixtures import imagegen
from tests.fixtures.containerd import (SNAPSHOTTER, ContainerdEnv, blob_gets, convert_nydus_busybox, kill_task,
                                       mounts_under, nydusd_processes_under, push_oci_layout, rpull,
                                       task_exec, use_localfs_nydusd)
from tests.fixtures.containerd import big_md5 as _big_md5
from tests.fixtures.containerd import remove_image_and_check_clean as _remove_image_and_check_clean
from tests.fixtures.containerd import snapshots as _snapshots

pytestmark = pytest.mark.e2e
import grpc  # noqa: F401,E402  (a dependency: missing means a broken install, not a skip)


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

def _wait_dead(pid: int, timeout: float = 10.0) -> None:
    """Until `pid` is gone or a zombie (its mount is then dead: the kernel closed /dev/fuse)."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} still alive {timeout}s after SIGKILL"
        time.sleep(0.02)


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
    before = blob_gets(reg)
    rpull(env, ref)
    gets = blob_gets(reg)[len(before):]
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
    _wait_dead(pid)
    env.start_snapshotter()
    (pid2,) = env.nydusd_pids()
    assert pid2 != pid
    env.wait_reconnected(keys[0])
    out = env.ctr("run", "--snapshotter", SNAPSHOTTER, "--rm", ref, "n2", "/bin/busybox", "echo", "back").stdout
    assert out.strip() == "back"
    _remove_image_and_check_clean(env, ref)


@pytest.mark.parametrize("mode", ["dedicated", "shared"])
def test_nydus_image_rpull_runs_lazily_from_registry(mode, reg, nydus_image):
    """Full path: nydusd reads chunks from the registry; only a small part of the image's data
    is fetched (the 24 MiB file is never read)."""
    with ContainerdEnv(snapshotter_args=("--daemon-mode", mode)) as env:
        env.start_snapshotter()
        env.start_containerd()
        ref = nydus_image["ref"]
        before = len(blob_gets(reg))
        rpull(env, ref)
        out = env.ctr("run", "--snapshotter", SNAPSHOTTER, "--rm", ref, "n1", "/bin/busybox", "echo", "lazy").stdout
        assert out.strip() == "lazy"
        gets = blob_gets(reg)[before:]
        print("blob GETs during rpull + run:", *gets, sep="\n  ")
        big_blob = nydus_image["blobs"][-1]   # the last source layer holds only big.bin
        assert not any(big_blob in g for g in gets), "the unread 24 MiB blob must not be fetched"
        if mode == "shared":
            assert (env.snap_root / "shared" / "nydusd.pid").exists()
            assert list((env.snap_root / "images").glob("*/nydusd.pid")) == []
        _remove_image_and_check_clean(env, ref)
        _stop_snapshotter_and_check_no_nydusd(env)


@pytest.mark.parametrize("mode", ["dedicated", "shared"])
def test_learned_list_pushed_through_one_snapshotter_is_used_by_another(mode, reg, nydus_image, tmp_path):
    """Learned prefetch through containerd: the snapshotter names the image's manifest in
    nydusd's config (it mounts a bootstrap file, not the image), so the list the first host's
    run records is pushed as a referrer of the image when the image is removed, and a second
    snapshotter with nothing local finds it and prefetches it before the container reads."""
    template = tmp_path / "nydusd-config.json"
    template.write_text(json.dumps({"learned_prefetch": {"push": True}}))
    args = ("--daemon-mode", mode, "--nydusd-config", str(template))
    ref = nydus_image["ref"]
    with ContainerdEnv(snapshotter_args=args) as env:
        env.start_snapshotter()
        env.start_containerd()
        rpull(env, ref)
        env.ctr("run", "--snapshotter", SNAPSHOTTER, "--rm", ref, "l1", "/bin/sh", "-c",
                "head -c 100000 /data/big.bin >/dev/null; ls /bin >/dev/null")
        _remove_image_and_check_clean(env, ref)          # the daemon pushes as it stops
    from nydus_py.oci.referrers import fallback_tag
    from nydus_py.oci.registry import RegistryClient, RegistryConfig
    with RegistryClient(config=RegistryConfig(host=reg.host, scheme="http")) as c:
        index = json.loads(c.get_manifest("test/busybox-nydus", fallback_tag(nydus_image["digest"]))[0])
    assert any(m.get("artifactType") == mt.NYDUS_PY_PREFETCH_ARTIFACT for m in index["manifests"]), index
    with ContainerdEnv(snapshotter_args=("--daemon-mode", mode)) as env:
        env.start_snapshotter()
        env.start_containerd()
        rpull(env, ref)
        env.ctr("run", "--snapshotter", SNAPSHOTTER, "--rm", ref, "l2", "/bin/busybox", "true")
        logs = "\n".join(p.read_text(errors="replace") for p in env.snap_root.rglob("*.log")
                         if p.name != "snapshotter.log")
        assert "from referrer" in logs and "learned prefetch list of" in logs, logs[-2000:]
        _remove_image_and_check_clean(env, ref)


@pytest.mark.parametrize("mode", ["shared"])
def test_shared_nydusd_starts_with_the_snapshotter_and_stays_for_the_next_image(mode, reg, nydus_image):
    """As nydus-snapshotter: the shared nydusd is started with the snapshotter, before any
    image, and stays while the snapshotter runs, so an image pulled after the last one was
    removed is a mount in the same supervisor (a fork), not a new interpreter; it stops with
    the snapshotter when it serves nothing."""
    with ContainerdEnv(snapshotter_args=("--daemon-mode", mode)) as env:
        env.start_snapshotter()
        deadline = time.monotonic() + 30
        while env.shared_mounts() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert env.shared_mounts() == [], env.log_tail("snapshotter")
        (sup,) = env.nydusd_pids()
        env.start_containerd()
        ref = nydus_image["ref"]
        for round_ in range(2):
            reg.sync_log()
            by_tag = reg.count_requests("GET", r"/v2/test/busybox-nydus/manifests/latest")
            rpull(env, ref)
            # the snapshotter resolves the tag once per pull, not once per layer; the second
            # pull's chain (containerd resolved it again) ends as the first's manifest: no GET
            reg.sync_log()
            assert reg.count_requests("GET", r"/v2/test/busybox-nydus/manifests/latest") - by_tag == \
                (1 if round_ == 0 else 0)
            out = env.ctr("run", "--snapshotter", SNAPSHOTTER, "--rm", ref, f"s{round_}", "/bin/busybox",
                          "echo", "ok").stdout
            assert out.strip() == "ok"
            assert env.nydusd_pids() == [sup] and len(env.shared_mounts() or []) == 1
            _remove_image_and_check_clean(env, ref)
            assert env.nydusd_pids() == [sup] and env.shared_mounts() == []
        assert "starting shared nydusd" in env.log_tail("snapshotter", 400)
        assert env.log_tail("snapshotter", 400).count("starting shared nydusd") == 1
        _stop_snapshotter_and_check_no_nydusd(env)


def _stop_snapshotter_and_check_no_nydusd(env: ContainerdEnv) -> None:
    """An idle shared supervisor stops with the snapshotter; nothing else may be left."""
    env.stop_snapshotter()
    assert nydusd_processes_under(env.dir) == []
    assert env.nydusd_pids() == []


# ---------------------------------------------------------------------------- restarts

@pytest.mark.parametrize("mode", ["dedicated", "shared"])
def test_running_container_keeps_reading_its_lazy_rootfs_across_snapshotter_restart(mode, reg, nydus_image):
    """A container runs from a nydus image while the snapshotter stops and starts again: the
    daemon is not the snapshotter's to kill, the snapshotter re-attaches to it, and the
    container reads a file it never read before (its chunks are fetched from the registry
    after the restart). In shared mode, a killed supervisor is then restarted by the
    snapshotter's monitor and every image is mounted again for new containers."""
    with ContainerdEnv(snapshotter_args=("--daemon-mode", mode, "--recover-interval", "1")) as env:
        env.start_snapshotter()
        env.start_containerd()
        ref = nydus_image["ref"]
        rpull(env, ref)
        env.ctr("run", "-d", "--snapshotter", SNAPSHOTTER, ref, "long", "/bin/sleep", "300")
        try:
            assert task_exec(env, "long", "e0", "ls /data").stdout.split() == ["big.bin"]
            pids = sorted(env.nydusd_pids())
            env.stop_snapshotter()
            assert sorted(env.nydusd_pids()) == pids and all(pid_alive(p) for p in pids)
            # while the snapshotter is down the container still reads (nothing of it is ours)
            assert task_exec(env, "long", "e1", "head -c 1048576 /data/big.bin | md5sum").stdout.split()[0] == _big_md5(1 << 20)
            env.start_snapshotter()
            env.wait_reconnected("long")
            assert "re-attached to" in env.log_tail("snapshotter", 80)
            assert sorted(env.nydusd_pids()) == pids
            before = len(blob_gets(reg))
            # bytes 2..3 MiB: never read before, fetched lazily now
            out = task_exec(env, "long", "e2", "dd if=/data/big.bin bs=1048576 skip=2 count=1 2>/dev/null | md5sum").stdout
            import hashlib
            import random
            rng = random.Random(7)
            third = [rng.randbytes(1 << 20) for _ in range(3)][2]
            assert out.split()[0] == hashlib.md5(third).hexdigest()
            assert any(nydus_image["blobs"][-1] in g for g in blob_gets(reg)[before:]), \
                "the read after the restart should fetch from the registry"
            assert "RUNNING" in env.ctr("tasks", "ls").stdout

            if mode == "shared":
                (sup,) = [p for p in env.nydusd_pids()]
                os.kill(sup, signal.SIGKILL)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    new = env.nydusd_pids()
                    if new and new != [sup] and pid_alive(new[0]) and \
                            "serves" in env.log_tail("snapshotter", 5):
                        break
                    time.sleep(0.2)
                assert env.nydusd_pids() != [sup], env.log_tail("snapshotter", 40)
                out = env.ctr("run", "--snapshotter", SNAPSHOTTER, "--rm", ref, "n2", "/bin/sh", "-c",
                              "head -c 1048576 /data/big.bin | md5sum").stdout
                assert out.split()[0] == _big_md5(1 << 20)
                # what the running container sees after its daemon died: reported, not asserted
                r = task_exec(env, "long", "e3", "ls /data 2>&1; cat /bin/busybox >/dev/null; echo rc=$?", check=False)
                print("running container after a supervisor kill + recovery:", r.returncode, r.stdout, r.stderr)
        finally:
            kill_task(env, "long")
        _remove_image_and_check_clean(env, ref)
        _stop_snapshotter_and_check_no_nydusd(env)


# ---------------------------------------------------------------------------- credentials

CRED_HELPER = """#!/bin/sh
# docker credential helper stand-in: `get` with the server URL on stdin
read url
printf '{"ServerURL": "%s", "Username": "%s", "Secret": "%s"}' "$url" "$NYDUS_TEST_USER" "$NYDUS_TEST_SECRET"
"""


@pytest.mark.parametrize("mode,source", [("dedicated", "auths"), ("shared", "credHelpers")])
def test_private_registry_credentials_from_docker_config(mode, source, basic_registry, nydus_image, tmp_path):
    """An htpasswd-protected registry: the snapshotter reads the manifest and bootstrap, and
    nydusd the chunks, with credentials from the docker config (`auths`, or a credential
    helper named in `credHelpers`) found through DOCKER_CONFIG. The secret never appears on a
    command line or in a log; the files that must hold it are 0600."""
    import base64
    import json as _json
    import stat as _stat
    from tests.fixtures.registry import USERS

    (user, password), = USERS.items()
    host = basic_registry.host
    push_oci_layout(nydus_image["layout"], "latest", host, "sec/busybox-nydus", user=(user, password))
    ref = f"{host}/sec/busybox-nydus:latest"
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    cfg_dir = tmp_path / "docker"
    cfg_dir.mkdir()
    extra: dict[str, str] = {"DOCKER_CONFIG": str(cfg_dir)}
    if source == "auths":
        (cfg_dir / "config.json").write_text(_json.dumps({"auths": {host: {"auth": auth}}}))
    else:
        bindir = tmp_path / "bin"
        bindir.mkdir()
        helper = bindir / "docker-credential-nydustest"
        helper.write_text(CRED_HELPER)
        helper.chmod(0o755)
        (cfg_dir / "config.json").write_text(_json.dumps({"credHelpers": {host: "nydustest"}}))
        extra.update(PATH=f"{bindir}:{os.environ['PATH']}", NYDUS_TEST_USER=user, NYDUS_TEST_SECRET=password)

    with ContainerdEnv(snapshotter_args=("--daemon-mode", mode)) as env:
        env.extra_env = extra
        env.start_snapshotter()
        env.start_containerd()
        out = env.ctr_remote("image", "rpull", "--plain-http", "--user", f"{user}:{password}",
                             "--snapshotter", SNAPSHOTTER, ref).stdout
        print(out)
        assert len(list((env.snap_root / "mnt").iterdir())) == 1, env.log_tail("snapshotter", 40)
        out = env.ctr("run", "--snapshotter", SNAPSHOTTER, "--rm", ref, "p1", "/bin/sh", "-c",
                      "head -c 1048576 /data/big.bin | md5sum").stdout
        assert out.split()[0] == _big_md5(1 << 20)

        secrets = [password.encode(), auth.encode()]
        for pid in nydusd_processes_under(env.dir):
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
            assert not any(s in cmdline for s in secrets), f"secret on the command line of pid {pid}"
        holders = []
        for f in env.dir.rglob("*"):
            if not f.is_file() or f.is_symlink() or f.name == "config.toml" or "containerd" in f.name:
                continue
            if f.is_relative_to(env.dir / "root") or f.is_relative_to(env.dir / "state"):
                continue                                          # containerd's own content store
            try:
                data = f.read_bytes()
            except OSError:
                continue
            if any(s in data for s in secrets):
                holders.append(f)
                assert _stat.S_IMODE(f.stat().st_mode) == 0o600, f"{f} holds the secret but is not 0600"
                assert f.suffix == ".json", f"secret found in {f}"
        assert holders, "the nydusd config should carry the auth (nydusd's `auth` field)"
        print("files holding the credentials (0600):", *holders, sep="\n  ")
        _remove_image_and_check_clean(env, ref)


# ---------------------------------------------------------------------------- Cleanup

@pytest.fixture(scope="module")
def nydus_image2(reg, tmp_path_factory):
    """A second nydus image: same busybox layer (same blob as nydus_image), other big.bin."""
    d = tmp_path_factory.mktemp("nydus-img2")
    info = convert_nydus_busybox(d, big=4 << 20, seed=8)
    info["digest"] = push_oci_layout(d / "nydus", "latest", reg.host, "test/busybox-nydus2")
    info["ref"] = f"{reg.host}/test/busybox-nydus2:latest"
    return info


def _cleanup_via_grpc(env: ContainerdEnv) -> None:
    import grpc as _grpc
    from nydus_py.snapshotter.proto import snapshots_pb2 as pb
    from nydus_py.snapshotter.proto import snapshots_pb2_grpc as pbg
    with _grpc.insecure_channel(f"unix:{env.snap_address}") as ch:
        pbg.SnapshotsStub(ch).Cleanup(pb.CleanupRequest(), timeout=60)


def _cache_blobs(env: ContainerdEnv) -> set[str]:
    return {f.name.split(".")[0].split("-")[0] for f in env.snap_root.glob("images/*/cache/*.data")} | \
           {f.name.split(".")[0].split("-")[0] for f in env.snap_root.glob("shared/cache/*.data")}


@pytest.mark.parametrize("mode", ["dedicated", "shared"])
def test_remove_and_cleanup_free_daemons_mounts_dirs_and_cache(mode, reg, nydus_image, nydus_image2):
    """Removing one of two images frees its daemon (or its mount in the shared one), its
    mountpoint, its files and its cached blobs, but not what the other image uses (the
    busybox blob both share); Cleanup, called through the gRPC API, also removes what a crash
    leaves behind. At the end nothing is left: no mount, no daemon, no directory, no cache."""
    with ContainerdEnv(snapshotter_args=("--daemon-mode", mode)) as env:
        env.start_snapshotter()
        env.start_containerd()
        a, b = nydus_image, nydus_image2
        for img in (a, b):
            rpull(env, img["ref"])
            out = env.ctr("run", "--snapshotter", SNAPSHOTTER, "--rm", img["ref"], "r", "/bin/sh", "-c",
                          "head -c 1048576 /data/big.bin | md5sum; ls /bin/busybox").stdout
            assert out.split()[-1] == "/bin/busybox"
        assert len(list((env.snap_root / "mnt").iterdir())) == 2
        hexes = lambda img: {d.split(":")[1] for d in img["blobs"]}       # noqa: E731
        assert hexes(a) & hexes(b), "the busybox blob is shared by both images"
        cached = _cache_blobs(env)
        assert a["blobs"][-1].split(":")[1] in cached and b["blobs"][-1].split(":")[1] in cached

        # what a crash between two steps can leave: a snapshot dir without record, an image
        # dir and a mountpoint without record
        stray = "0" * 64
        (env.snap_root / "snapshots" / "999999" / "fs").mkdir(parents=True)
        (env.snap_root / "snapshots" / "999999" / "fs" / "junk").write_text("x")
        (env.snap_root / "images" / stray).mkdir()
        (env.snap_root / "images" / stray / "bootstrap").write_bytes(b"x")
        (env.snap_root / "mnt" / stray).mkdir()

        env.ctr("images", "rm", "--sync", a["ref"])
        deadline = time.monotonic() + 20
        while len(list((env.snap_root / "mnt").glob("[0-9a-f]*"))) > 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        _cleanup_via_grpc(env)
        a_id = a["digest"].split(":")[1]
        assert sorted(p.name for p in (env.snap_root / "mnt").iterdir()) == [b["digest"].split(":")[1]]
        assert sorted(p.name for p in (env.snap_root / "images").iterdir()) == [b["digest"].split(":")[1]]
        assert not (env.snap_root / "snapshots" / "999999").exists()
        assert not any(a_id in m for m in mounts_under(env.dir))
        cached = _cache_blobs(env)
        assert a["blobs"][-1].split(":")[1] not in cached, "the removed image's own blob stays cached"
        if mode == "shared":
            assert hexes(a) & hexes(b) <= cached, "the blob image b uses must stay"
        out = env.ctr("run", "--snapshotter", SNAPSHOTTER, "--rm", b["ref"], "r2", "/bin/busybox", "echo", "b").stdout
        assert out.strip() == "b"

        env.ctr("images", "rm", "--sync", b["ref"])
        deadline = time.monotonic() + 20
        while _snapshots(env) and time.monotonic() < deadline:
            time.sleep(0.2)
        _cleanup_via_grpc(env)
        assert _snapshots(env) == []
        assert mounts_under(env.dir) == []
        assert env.serving_nydusd() == []
        for sub in ("snapshots", "images", "mnt"):
            assert list((env.snap_root / sub).iterdir()) == [], sub
        assert _cache_blobs(env) == set()
        _stop_snapshotter_and_check_no_nydusd(env)
        assert not (env.snap_root / "shared" / "cache").exists()


# ---------------------------------------------------------------------------- snapshot API

def test_snapshot_info_usage_labels_and_list_filters_as_containerd_sees_them(env, busybox_ref, reg, nydus_image):
    """`ctr snapshots ls/info/usage/label` over an ordinary image (as overlayfs would answer)
    and a nydus one, and List filters through the gRPC API."""
    import json as _json
    import grpc as _grpc
    from nydus_py.snapshotter.proto import snapshots_pb2 as pb
    from nydus_py.snapshotter.proto import snapshots_pb2_grpc as pbg

    ref, _ = busybox_ref
    env.ctr("images", "pull", "--plain-http", "--snapshotter", SNAPSHOTTER, ref)
    env.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "prepare", "work", _snapshots(env)[0])
    rows = {line.split()[0]: line.split()[1:] for line in
            env.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls").stdout.splitlines()[1:]}
    # the bottom layer (no parent column) holds the busybox tree; `ls` order is not defined
    layer = next(k for k, v in rows.items() if v == ["Committed"])
    assert rows["work"][-1] == "Active" and rows["work"][0] in rows

    info = _json.loads(env.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "info", layer).stdout)
    print("ctr snapshots info:", info)
    assert info["Kind"] == "Committed" and info["Name"] == layer and info["Created"] and info["Updated"]
    usage = env.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "usage", layer).stdout.splitlines()[1].split()
    assert usage[0] == layer and int(usage[-1]) > 100            # inodes of the busybox tree
    # an active snapshot's usage is measured now: write 1 MiB into its upper dir
    sid = max(int(p.name) for p in (env.snap_root / "snapshots").iterdir() if p.name.isdigit())
    (env.snap_root / "snapshots" / str(sid) / "fs" / "f").write_bytes(os.urandom(1 << 20))
    wu = env.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "usage", "work").stdout.splitlines()[1]
    print("ctr snapshots usage work:", wu)
    assert wu.split()[0] == "work" and "MiB" in wu and int(wu.split()[-1]) == 2, wu   # fs dir + f

    env.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "label", "work", "team=infra", "containerd.io/snapshot/x=1")
    labels = _json.loads(env.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "info", "work").stdout)["Labels"]
    assert labels["team"] == "infra" and labels["containerd.io/snapshot/x"] == "1"
    env.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "label", "work", "team=")
    labels = _json.loads(env.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "info", "work").stdout).get("Labels") or {}
    assert "team" not in labels

    rpull(env, nydus_image["ref"])
    with _grpc.insecure_channel(f"unix:{env.snap_address}") as ch:
        stub = pbg.SnapshotsStub(ch)

        def names(*filters):
            return sorted(i.name for r in stub.List(pb.ListSnapshotsRequest(filters=list(filters))) for i in r.info)
        everything = names()
        remote = names('labels."containerd.io/snapshot/remote"==nydus-py')
        assert remote and set(remote) < set(everything)
        # containerd passed only the inherited label to the backend (our key is namespaced)
        assert names("labels.containerd.io/snapshot/x") == [k for k in everything if k.endswith("/work")]
        assert names("kind==active") == [k for k in everything if k.endswith("/work")]
        assert names("kind==active", 'labels."containerd.io/snapshot/remote"') == sorted(
            [k for k in everything if k.endswith("/work")] + remote)
        assert names("name~=/work$/") == names("kind==active")
        with pytest.raises(_grpc.RpcError) as e:
            names("kind=(")
        assert e.value.code() == _grpc.StatusCode.INVALID_ARGUMENT
        for key in remote:
            u = stub.Usage(pb.UsageRequest(key=key))
            assert (u.size, u.inodes) == (0, 0)          # nothing of a remote layer is on our disk
            st = stub.Stat(pb.StatSnapshotRequest(key=key)).info
            assert st.kind == pb.COMMITTED
    env.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "rm", "work")
