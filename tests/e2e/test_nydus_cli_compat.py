"""Nydus's documented nydusd command lines and configs, run unchanged against real FUSE mounts."""

from __future__ import annotations

import json
import subprocess

import pytest

from nydus_py.daemon import api
from tests.fixtures.mounts import command, running
from tests.fixtures.rich_image import build_rich

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """(bootstrap path, blob dir, rich image) written as Nydus lays them out."""
    rich = build_rich()
    d = tmp_path_factory.mktemp("nydus-layout")
    (d / "blobs").mkdir()
    (d / "blobs" / rich.blob_id.removeprefix("sha256:")).write_bytes(rich.blob)
    (d / "bootstrap").write_bytes(rich.bootstrap)
    return d / "bootstrap", d / "blobs", rich


def _localfs_config(tmp_path, blobs):
    # docs/nydusd.md's nydusd-config.localfs.json, with our directories
    cfg = tmp_path / "nydusd-config.localfs.json"
    cfg.write_text(json.dumps({
        "device": {"backend": {"type": "localfs", "config": {"dir": str(blobs)}},
                   "cache": {"type": "blobcache", "config": {"work_dir": str(tmp_path / "cache")}}},
        "mode": "direct", "digest_validate": False, "iostats_files": False, "enable_xattr": True,
        "latest_read_files": True}))
    return cfg


def test_nydusd_docs_command_line_mounts(image, tmp_path):
    boot, blobs, rich = image
    cfg, mnt, sock = _localfs_config(tmp_path, blobs), tmp_path / "mnt", tmp_path / "api.sock"
    argv = [*command("nydusd"), "--config", str(cfg), "--mountpoint", str(mnt), "--bootstrap",
            str(boot), "--apisock", str(sock), "--log-level", "info", "--id", "nydus-doc"]
    with running(argv, mnt, tmp_path / "log") as proc:
        assert (mnt / "etc/hostname").read_bytes() == rich.files["etc/hostname"]
        assert (mnt / "big").read_bytes() == rich.files["big"]
        status, info = api.get_json(str(sock), "/api/v1/daemon")
        assert status == 200 and info["id"] == "nydus-doc" and info["state"] == "RUNNING"
        proc.terminate()
        assert proc.wait(15) == 0
    log = (tmp_path / "log").read_text()
    assert "warning" in log and "latest_read_files" in log     # said once, not ignored silently


def test_nydusd_fuse_subcommand_with_localfs_dir(image, tmp_path):
    boot, blobs, rich = image
    mnt = tmp_path / "mnt"
    argv = [*command("nydusd"), "fuse", "--localfs-dir", str(blobs), "--mountpoint", str(mnt),
            "--bootstrap", str(boot), "--log-level", "warn"]
    with running(argv, mnt, tmp_path / "log"):
        assert (mnt / "text").read_bytes() == rich.files["text"]


def test_nydusd_with_v2_toml_config(image, tmp_path):
    boot, blobs, rich = image
    mnt = tmp_path / "mnt"
    cfg = tmp_path / "nydusd.toml"
    cfg.write_text(f'version = 2\nid = "toml"\n[backend]\ntype = "localfs"\n[backend.localfs]\n'
                   f'dir = "{blobs}"\n[cache]\ntype = "filecache"\n[cache.filecache]\n'
                   f'work_dir = "{tmp_path / "cache"}"\n[rafs]\nmode = "direct"\nbatch_size = "256K"\n')
    argv = [*command("nydusd"), "--config", str(cfg), "--mountpoint", str(mnt), "--bootstrap", str(boot)]
    with running(argv, mnt, tmp_path / "log"):
        assert (mnt / "big").read_bytes() == rich.files["big"]
    assert any((tmp_path / "cache").iterdir())          # the filecache work_dir was used


@pytest.mark.parametrize("argv, words", [
    (["--writable", "--mountpoint", "/m", "--bootstrap", "/b", "--config", "/c"], "--writable, because"),
    (["--sock", "/s", "--bootstrap", "/b"], "--sock, because"),
    (["virtiofs", "--sock", "/s"], "nydusd virtiofs, because"),
    (["singleton", "--fscache", "/f"], "nydusd singleton, because"),
    (["--fuse-threads", "4", "--mountpoint", "/m"], "--fuse-threads, because"),
])
def test_nydus_flags_without_meaning_here_are_one_line_and_non_zero(argv, words):
    r = subprocess.run([*command("nydusd"), *argv], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("nydusd: not supported by nydus-py: ") and words in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_pseudo_mount_form_points_at_serve(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text("{}")
    r = subprocess.run([*command("nydusd"), "--apisock", str(tmp_path / "s"), "--config", str(cfg),
                        "--mountpoint", str(tmp_path / "m")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "nydusd serve --apisock" in r.stderr
    assert not (tmp_path / "m").exists()
