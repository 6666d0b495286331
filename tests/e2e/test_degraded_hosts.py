"""Degraded hosts keep working (issue 9 §5): a full cache disk does not stop a mount (reads go
uncached), and a mount from a warm cache works while the backend is gone: an OCI layout whose
data blob files were removed, and a registry image whose registry is unreachable (its bootstrap
kept in the cache directory). Zero backend reads are proven by the daemon's own counters."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.daemon import Daemon, backend_reads, force_unmount, nydusd_cmd
from tests.fixtures.containerd import push_oci_layout
from tests.fixtures.imagegen import Image, Layer
from tests.fixtures.nydus_build import build
from tests.fixtures.registry import FaultProxy, RegistryServer

pytestmark = pytest.mark.e2e
VENV_BIN = Path(sys.executable).parent
FILES = {f"data/f{i}": random.Random(i).randbytes(n)
         for i, n in enumerate([900 << 10, 300 << 10, 70 << 10, 4096, 1])}
FILES["data/text"] = b"hello from a warm cache\n" * 1000


def nydusify(*args: str) -> None:
    r = subprocess.run([str(VENV_BIN / "nydusify"), *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _image() -> Image:
    layer = Layer()
    layer.dir("data")
    for path, data in FILES.items():
        layer.file(path, data)
    return Image([layer])


def read_all(mnt: Path) -> None:
    for path, data in FILES.items():
        assert (mnt / path).read_bytes() == data, path


@pytest.fixture(scope="module")
def oci_image(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("degraded-oci")
    _image().write_oci(tmp / "src", "v1")
    nydusify("convert", "--source", f"oci:{tmp / 'src'}:v1", "--target", f"oci:{tmp / 'dst'}:v1")
    return tmp / "dst"


def _data_blobs(layout: Path) -> list[Path]:
    """The data blob files of the converted image (every layer but the last, the bootstrap)."""
    index = json.loads((layout / "index.json").read_text())
    (desc,) = index["manifests"]
    manifest = json.loads((layout / "blobs" / "sha256" / desc["digest"].split(":")[1]).read_text())
    blobs = [layout / "blobs" / "sha256" / layer["digest"].split(":")[1]
             for layer in manifest["layers"][:-1]]
    assert blobs and all(b.exists() for b in blobs)
    return blobs


def test_full_cache_disk_does_not_stop_a_mount(tmp_path):
    built = build(FILES, chunk_size=64 << 10)
    built.write(tmp_path / "blobs", tmp_path / "bootstrap")
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(cache)],
                   check=True)
    try:
        fd = os.open(cache / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with pytest.raises(OSError) as e:
                while True:
                    os.write(fd, bytes(4096))
            assert e.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        with Daemon(tmp_path, "--bootstrap", str(tmp_path / "bootstrap"), "--blob-dir",
                    str(tmp_path / "blobs"), "--cache-dir", str(cache), "--no-prefetch") as d:
            read_all(d.mnt)
            assert d.api("/api/v1/metrics/blobcache")["uncached_blobs"] == 1
            assert backend_reads(d) > 0
        assert "uncached" in d.log.read_text()
    finally:
        subprocess.run(["umount", "-l", str(cache)], check=False)


def test_oci_image_mounts_from_a_warm_cache_without_its_data_blobs(tmp_path, oci_image):
    layout = tmp_path / "layout"
    subprocess.run(["cp", "-a", str(oci_image), str(layout)], check=True)
    cache = tmp_path / "cache"
    args = ("--image", f"oci:{layout}:v1", "--cache-dir", str(cache), "--no-prefetch")
    with Daemon(tmp_path, *args, name="warm") as d:
        read_all(d.mnt)
        assert backend_reads(d) > 0
    for blob in _data_blobs(layout):
        blob.unlink()
    with Daemon(tmp_path, *args, name="offline") as d:
        read_all(d.mnt)
        assert backend_reads(d) == 0
        assert d.api("/api/v1/metrics/blobcache")["misses"] == 0
    # the same layout with a cold cache is refused, with one line naming the missing blob
    mnt = tmp_path / "mnt-cold"
    mnt.mkdir()
    r = subprocess.run([*nydusd_cmd(), "mount", "--image", f"oci:{layout}:v1", "--cache-dir",
                        str(tmp_path / "cold"), "--daemon", str(mnt)], capture_output=True,
                       text=True, timeout=60)
    force_unmount(mnt)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "is missing from" in lines[0] and "cache lacks" in lines[0], r.stderr


def test_registry_image_mounts_from_a_warm_cache_while_the_registry_is_down(tmp_path):
    _image().write_oci(tmp_path / "src", "v1")
    with RegistryServer(tmp_path / "registry") as reg:
        push_oci_layout(tmp_path / "src", "v1", reg.host, "off/app")
        nydusify("convert", "--plain-http", "--source", f"{reg.host}/off/app:v1",
                 "--target", f"{reg.host}/off/app:v1-nydus")
        proxy = FaultProxy(reg.host)
        ref = f"{proxy.host}/off/app:v1-nydus"
        cache = tmp_path / "cache"
        args = ("--image", ref, "--plain-http", "--cache-dir", str(cache), "--no-prefetch")
        try:
            with Daemon(tmp_path, *args, name="online") as d:
                read_all(d.mnt)
                assert backend_reads(d) > 0
        finally:
            proxy.close()                  # nothing listens there any more
    with Daemon(tmp_path, *args, name="offline") as d:
        read_all(d.mnt)
        assert backend_reads(d) == 0
    assert "registry unreachable" in d.log.read_text()
    # a tampered kept bootstrap is not used: the mount fails as it did before this feature
    (kept,) = (cache / "images").glob("sha256-*")
    kept.write_bytes(kept.read_bytes()[:-1] + b"\0")
    mnt = tmp_path / "mnt-tampered"
    mnt.mkdir()
    r = subprocess.run([*nydusd_cmd(), "mount", *args, "--daemon", str(mnt)], capture_output=True,
                       text=True, timeout=120)
    force_unmount(mnt)
    errors = [x for x in r.stderr.splitlines() if "error" in x.lower() and "WARNING" not in x]
    assert r.returncode != 0 and len(errors) == 1 and "ConnectionError" in errors[0], r.stderr
    assert "does not match its digest" in r.stderr
