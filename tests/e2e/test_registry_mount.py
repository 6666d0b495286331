"""nydusd mount --image HOST/REPO:TAG: lazy ranged reads from a real docker-registry, and what
happens when the registry misbehaves (never wrong bytes, never a dead daemon)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nydus_py import pidwait
from tests.fixtures.cli import nydusify
from tests.fixtures.containerd import push_oci_layout
from tests.fixtures.imagegen import Content, Image, Layer
from tests.fixtures.registry import Fault, FaultProxy, RegistryServer

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
BIG = 48 << 20


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A converted image in a fresh registry: 48 MiB of incompressible data + small files."""
    tmp = tmp_path_factory.mktemp("regmount")
    layer = Layer()
    layer.dir("data")
    layer.file("data/big", Content.random(BIG, seed=7))
    for i in range(20):
        layer.file(f"data/small-{i}", f"small file {i}\n".encode() * 50)
    Image([layer]).write_oci(tmp / "src", "v1")
    with RegistryServer(tmp / "registry") as reg:
        push_oci_layout(tmp / "src", "v1", reg.host, "lazy/app")
        nydusify("convert", "--plain-http", "--source", f"{reg.host}/lazy/app:v1",
                  "--target", f"{reg.host}/lazy/app:v1-nydus")
        yield reg, tmp


class Mounted:
    def __init__(self, tmp: Path, host: str, name: str, *extra: str):
        self.mnt = tmp / f"mnt-{name}"
        self.cache = tmp / f"cache-{name}"
        self.sock = tmp / f"api-{name}.sock"
        self.args = [str(BIN / "nydusd"), "mount", "--image", f"{host}/lazy/app:v1-nydus", "--plain-http",
                     "--cache-dir", str(self.cache), "--apisock", str(self.sock), "--daemon",
                     "--pid-file", str(tmp / f"{name}.pid"), "--log-file", str(tmp / f"{name}.log"),
                     *extra, str(self.mnt)]
        self.pid_file = tmp / f"{name}.pid"

    def __enter__(self) -> "Mounted":
        self.mnt.mkdir(exist_ok=True)
        r = subprocess.run(self.args, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return self

    def alive(self) -> bool:
        try:
            return not pidwait.exited(int(self.pid_file.read_text()))    # a zombie is dead
        except (OSError, ValueError):
            return False

    def backend_metrics(self) -> dict:
        out = subprocess.run(["curl", "-s", "--unix-socket", str(self.sock),
                              "http://localhost/api/v1/metrics/backend"], capture_output=True, text=True)
        return json.loads(out.stdout)

    def __exit__(self, *exc) -> None:
        subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)


def test_small_read_fetches_a_small_part_of_the_image(image, tmp_path):
    reg, _ = image
    before_blobs = reg.count_requests("GET", r"/v2/lazy/app/blobs/")
    with Mounted(tmp_path, reg.host, "lazy") as m:
        assert (m.mnt / "data/small-3").read_bytes() == b"small file 3\n" * 50
        stats = m.backend_metrics()
        fetched = stats.get("read_amount_total", 0)
        assert 0 < fetched <= 2 << 20, stats      # one chunk range + readahead, not 48 MiB
        assert os.path.getsize(m.mnt / "data/big") == BIG
    blob_gets = reg.count_requests("GET", r"/v2/lazy/app/blobs/") - before_blobs
    assert blob_gets <= 6, blob_gets                # manifest blobs: bootstrap + data ranges


def test_full_read_is_byte_exact(image, tmp_path):
    reg, _ = image
    expect = hashlib.sha256(Content.random(BIG, seed=7).read_all()).hexdigest()
    with Mounted(tmp_path, reg.host, "full") as m:
        h = hashlib.sha256()
        with open(m.mnt / "data/big", "rb") as f:
            while buf := f.read(1 << 20):
                h.update(buf)
        assert h.hexdigest() == expect


def test_corrupted_bytes_from_the_server_are_eio_not_data(image, tmp_path):
    reg, _ = image
    proxy = FaultProxy(reg.host)
    try:
        proxy.add(Fault.corrupt(), method="GET", path=r"/v2/lazy/app/blobs/", times=None)
        # the bootstrap read is corrupted too → the mount itself must fail cleanly
        m = Mounted(tmp_path, proxy.host, "corrupt-all")
        m.mnt.mkdir()
        r = subprocess.run(m.args, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "digest" in r.stderr.lower(), r.stderr
        assert not os.path.ismount(m.mnt)
        proxy.clear()
        with Mounted(tmp_path, proxy.host, "corrupt-data") as m:
            proxy.add(Fault.corrupt(), method="GET", path=r"/v2/lazy/app/blobs/", times=None)
            with pytest.raises(OSError) as e:
                (m.mnt / "data/small-5").read_bytes()
            assert e.value.errno == errno.EIO
            assert m.alive()
            proxy.clear()
            assert (m.mnt / "data/small-5").read_bytes() == b"small file 5\n" * 50  # recovers
            log = (tmp_path / "corrupt-data.log").read_text()
            assert "small-5" in log and "sha256" in log.lower()
    finally:
        proxy.close()


def test_registry_down_then_back(image, tmp_path):
    reg, _ = image
    proxy = FaultProxy(reg.host)
    try:
        with Mounted(tmp_path, proxy.host, "down") as m:
            assert (m.mnt / "data/small-1").read_bytes().startswith(b"small file 1")
            proxy.add(Fault.http(503), method="GET", path=r"/v2/lazy/app/blobs/", times=None)
            far = 40 << 20   # far from anything read so far (readahead brought the small files in)
            expect = Content.random(BIG, seed=7).read_all()[far:far + 4096]
            t0 = time.monotonic()
            with pytest.raises(OSError) as e:
                _pread(m.mnt / "data/big", far, 4096)
            assert e.value.errno == errno.EIO
            assert time.monotonic() - t0 < 30              # bounded retries, not a hang
            assert (m.mnt / "data/small-9").read_bytes() == b"small file 9\n" * 50  # cached
            assert m.alive()
            proxy.clear()
            assert _pread(m.mnt / "data/big", far, 4096) == expect
    finally:
        proxy.close()


def _pread(path: Path, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)
