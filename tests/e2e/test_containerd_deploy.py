"""Deploying like Nydus: the snapshotter's config.toml with a nydusd template, through real
containerd + runc + docker-registry, with a Dragonfly-style forward proxy (dfdaemon's stand-in)
started by the test."""

from __future__ import annotations

import hashlib
import json
import random

import pytest

from tests.fixtures.containerd import SNAPSHOTTER, ContainerdEnv, blob_gets, kill_task, rpull, task_exec
from tests.fixtures.metrics import scrape, value
from tests.fixtures.proxy import ForwardProxy
from tests.fixtures.registry import free_port

pytestmark = pytest.mark.e2e


def _mib_md5(index: int, seed: int = 7) -> str:
    """md5 of MiB number `index` of /data/big.bin (Content.random: randbytes, 1 MiB at a time)."""
    rng = random.Random(seed)
    return hashlib.md5([rng.randbytes(1 << 20) for _ in range(index + 1)][index]).hexdigest()


@pytest.mark.parametrize("mode", ["dedicated", "shared"])
def test_config_toml_template_sends_chunks_through_the_proxy_and_falls_back(mode, reg, nydus_image, tmp_path):
    px = ForwardProxy()
    template = tmp_path / "nydusd-config.json"
    template.write_text(json.dumps({
        "device": {"backend": {"type": "registry", "config": {
                       "timeout": 5, "connect_timeout": 2,
                       "proxy": {"url": px.url, "ping_url": f"{px.url}/server/ping", "fallback": True,
                                 "check_interval": 0.5}}},
                   "cache": {"type": "blobcache", "config": {"max_size": 1 << 30}}},
        "mode": "direct", "digest_validate": True, "amplify_io": 262144}))
    cfg = tmp_path / "config.toml"
    port = free_port()
    cfg.write_text(f'version = 1\ndaemon_mode = "{mode}"\n[daemon]\nnydusd_config = "{template}"\n'
                   f'[log]\nlevel = "debug"\n[metrics]\naddress = "127.0.0.1:{port}"\n')
    try:
        with ContainerdEnv(snapshotter_args=("--config", str(cfg))) as env:
            env.start_snapshotter()
            env.start_containerd()
            ref = nydus_image["ref"]
            big_blob = nydus_image["blobs"][-1]
            rpull(env, ref)
            env.ctr("run", "-d", "--snapshotter", SNAPSHOTTER, ref, "long", "/bin/sleep", "300")
            try:
                # the daemon got the template's settings, and the snapshotter's registry + cache dir
                if mode == "dedicated":
                    (doc_path,) = (env.snap_root / "images").glob("*/nydusd.json")
                    doc = json.loads(doc_path.read_text())
                    assert doc["amplify_io"] == 262144
                    bconf = doc["device"]["backend"]["config"]
                    assert bconf["proxy"]["url"] == px.url and bconf["repo"] == "test/busybox-nydus"
                    assert doc["device"]["cache"]["config"] == {"max_size": 1 << 30,
                                                                "work_dir": str(doc_path.parent / "cache")}
                before_reg = len(blob_gets(reg))
                before_px = px.count("GET", f"/blobs/{big_blob}")
                out = task_exec(env, "long", "e1", "dd if=/data/big.bin bs=1048576 skip=1 count=1 2>/dev/null | md5sum")
                assert out.stdout.split()[0] == _mib_md5(1)
                via_proxy = px.count("GET", f"/blobs/{big_blob}") - before_px
                assert via_proxy > 0, "chunks must come through the proxy"
                # the proxy relays to the registry: every GET the registry saw came through it
                assert sum(big_blob in g for g in blob_gets(reg)[before_reg:]) == via_proxy
                for method, url in px.seen:
                    assert url.startswith(f"http://{reg.host}/v2/test/busybox-nydus/"), url

                # Prometheus over TCP ([metrics] address): the snapshotter's own series and its daemon's
                fams = scrape(port)
                assert value(fams["nydus_snapshotter_images"], "nydus_snapshotter_images", mode=mode) == 1
                assert value(fams["nydus_snapshotter_daemon_up"], "nydus_snapshotter_daemon_up",
                             image_ref=ref, mode=mode) == 1
                where = {"image_ref": ref} if mode == "dedicated" else {"daemon": "shared"}
                assert value(fams["nydus_backend_read_count"], "nydus_backend_read_count_total", **where) >= via_proxy
                assert value(fams["nydus_fs_read_latency_seconds"], "nydus_fs_read_latency_seconds_count", **where) > 0

                # dfdaemon dies: never-read chunks come from the registry directly
                px.stop()
                seen = px.count("GET", "/blobs/")
                before_reg = len(blob_gets(reg))
                out = task_exec(env, "long", "e2", "dd if=/data/big.bin bs=1048576 skip=5 count=1 2>/dev/null | md5sum")
                assert out.stdout.split()[0] == _mib_md5(5)
                assert any(big_blob in g for g in blob_gets(reg)[before_reg:]), "fallback to the registry"
                assert px.count("GET", "/blobs/") == seen
            finally:
                kill_task(env, "long")
    finally:
        px.stop()


# ---------------------------------------------------------------------------- Kubernetes' path

class CriContainerdEnv(ContainerdEnv):
    """containerd with its CRI plugin on (Debian's containerd has it built in), pulling through
    the nydus-py snapshotter with the layer labels, the test registry over plain http."""

    def __init__(self, registry_host: str, **kw):
        super().__init__(**kw)
        self.registry_host = registry_host
        self.namespace = "k8s.io"          # CRI's namespace; this containerd is ours alone

    def config_toml(self) -> str:
        d = self.dir
        text = super().config_toml().replace('"io.containerd.grpc.v1.cri", ', "")
        return text + "\n".join([
            '[plugins."io.containerd.grpc.v1.cri"]',
            '  disable_apparmor = true',
            '  enable_selinux = false',
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
            '[plugins."io.containerd.grpc.v1.cri".containerd]',
            f'  snapshotter = "{SNAPSHOTTER}"',
            "  disable_snapshot_annotations = false",
            '[plugins."io.containerd.grpc.v1.cri".cni]',
            f'  bin_dir = "{d}/cni/bin"',
            f'  conf_dir = "{d}/cni/conf"',
            f'[plugins."io.containerd.grpc.v1.cri".registry.mirrors."{self.registry_host}"]',
            f'  endpoint = ["http://{self.registry_host}"]',
            "",
        ])


def test_cri_pull_with_a_pull_secret_is_lazy_and_the_secret_reaches_nydusd(basic_registry, nydus_image, tmp_path):
    """kubelet's path: CRI ImageService.PullImage with auth, sent to the snapshotter's socket
    (the image-service proxy) and forwarded to containerd's CRI plugin; the snapshotter has no
    other credentials (empty docker config, no IMAGE_PULL_AUTH), yet fetches the bootstrap and
    nydusd the chunks from the htpasswd registry; then `ctr run` from the CRI-pulled image."""
    import grpc

    from nydus_py.snapshotter.proto import cri_image_pb2 as cri
    from nydus_py.snapshotter.proto import cri_image_pb2_grpc as cri_grpc
    from tests.fixtures.registry import USERS

    (user, password), = USERS.items()
    host = basic_registry.host
    from tests.fixtures.containerd import push_oci_layout
    push_oci_layout(nydus_image["layout"], "latest", host, "k8s/busybox-nydus", user=(user, password))
    ref = f"{host}/k8s/busybox-nydus:latest"
    big_blob = nydus_image["blobs"][-1]
    (tmp_path / "docker").mkdir()
    with CriContainerdEnv(host) as env:
        cfg = tmp_path / "config.toml"
        cfg.write_text(f'[remote.auth]\nenable_cri_keychain = true\nimage_service_address = "{env.address}"\n')
        env.snapshotter_args = ("--config", str(cfg))
        env.extra_env = {"DOCKER_CONFIG": str(tmp_path / "docker"), "IMAGE_PULL_AUTH": ""}
        env.start_snapshotter()
        env.start_containerd()
        with grpc.insecure_channel(f"unix:{env.snap_address}") as ch:
            images = cri_grpc.ImageServiceStub(ch)
            with pytest.raises(grpc.RpcError) as ei:          # no secret: the registry says no
                images.PullImage(cri.PullImageRequest(image=cri.ImageSpec(image=ref)), timeout=120)
            assert "401" in (ei.value.details() or "") or "unauthorized" in (ei.value.details() or "").lower()
            before = len(blob_gets(basic_registry))
            resp = images.PullImage(cri.PullImageRequest(
                image=cri.ImageSpec(image=ref), auth=cri.AuthConfig(username=user, password=password)), timeout=300)
            assert resp.image_ref.startswith("sha256:")
            status = images.ImageStatus(cri.ImageStatusRequest(image=cri.ImageSpec(image=ref)), timeout=60)
            assert status.image.id == resp.image_ref and ref in status.image.repo_tags
            listed = images.ListImages(cri.ListImagesRequest(), timeout=60)
            assert resp.image_ref in [i.id for i in listed.images]
        gets = blob_gets(basic_registry)[before:]
        print("blob GETs during the CRI pull:", *gets, sep="\n  ")
        assert not any(big_blob in g for g in gets), "a CRI pull must be lazy"
        assert len(list((env.snap_root / "mnt").iterdir())) == 1, env.log_tail("snapshotter", 40)
        assert "CRI PullImage" in env.log_tail("snapshotter", 200) and password not in env.log_tail("snapshotter", 400)

        out = env.ctr("run", "--snapshotter", SNAPSHOTTER, "--rm", ref, "cri1", "/bin/sh", "-c",
                      "dd if=/data/big.bin bs=1048576 skip=3 count=1 2>/dev/null | md5sum").stdout
        assert out.split()[0] == _mib_md5(3)
        assert any(big_blob in g for g in blob_gets(basic_registry)[before:]), "nydusd read with the pull secret"
        with grpc.insecure_channel(f"unix:{env.snap_address}") as ch:
            cri_grpc.ImageServiceStub(ch).RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=ref)),
                                                      timeout=60)
            assert not cri_grpc.ImageServiceStub(ch).ImageStatus(
                cri.ImageStatusRequest(image=cri.ImageSpec(image=ref)), timeout=60).HasField("image")
