"""Cold start, real FUSE + real registry: the first read of a dynamically linked executable (what
exec does) makes the daemon fetch its interpreter, the libraries it needs (recursively, found
through the image's own symlinks as ld.so finds them) and the rest of each file, concurrently
and verified; nothing else. Uses the host's /bin/ls and its libraries as the image."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.cli import nydusify
from tests.fixtures.containerd import push_oci_layout
from tests.fixtures.daemon import wait_for
from tests.fixtures.imagegen import Content, Image, Layer
from tests.fixtures.registry import Fault, FaultProxy, RegistryServer

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
ARCH = "x86_64-linux-gnu"
LIBS = ("libselinux.so.1", "libpcre2-8.so.0", "libc.so.6", "ld-linux-x86-64.so.2")
CHUNK = 64 << 10
RUNTIME = {"usr/share/zoneinfo/Etc/UTC": b"TZif2" + bytes(109),
           "usr/lib/locale/C.utf8/LC_CTYPE": bytes(range(256)) * 1400,
           f"usr/lib/{ARCH}/gconv/gconv-modules.cache": b"gconv cache" * 2400}


def _host_ls() -> dict[str, bytes] | None:
    """/bin/ls and the libraries it loads on this host (Debian x86_64), or None."""
    out = {"usr/bin/ls": Path("/bin/ls").read_bytes()}
    for name in LIBS:
        p = Path("/lib") / ARCH / name
        if not p.exists():
            return None
        out[f"usr/lib/{ARCH}/{name}"] = p.resolve().read_bytes()
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    files = _host_ls()
    if files is None:
        pytest.skip("needs /bin/ls with libselinux, libpcre2 and glibc (Debian x86_64)")
    tmp = tmp_path_factory.mktemp("coldpredict")
    layer = Layer()
    for d in ("usr", "usr/bin", "usr/lib", f"usr/lib/{ARCH}", "lib64", "usr/share"):
        layer.dir(d)
    layer.symlink("lib", "usr/lib")             # merged /usr, as Debian
    layer.symlink("bin", "usr/bin")
    layer.symlink("lib64/ld-linux-x86-64.so.2", f"/lib/{ARCH}/ld-linux-x86-64.so.2")
    for path, data in files.items():
        layer.file(path, data, mode=0o755)
    # what glibc reads while a program starts (io/elfdeps.py glibc_runtime): fetched once
    layer.dir("etc")
    for d in ("usr/share/zoneinfo", "usr/share/zoneinfo/Etc", "usr/lib/locale", "usr/lib/locale/C.utf8",
              f"usr/lib/{ARCH}/gconv"):
        layer.dir(d)
    for path, data in RUNTIME.items():
        layer.file(path, data)
    layer.symlink("etc/localtime", "/usr/share/zoneinfo/Etc/UTC")
    layer.file("usr/lib/locale/locale-archive", Content.random(3 << 20, seed=5))   # not taken
    # files nobody loads: never fetched by the prediction
    layer.file(f"usr/lib/{ARCH}/libunused.so.1", Content.random(1 << 20, seed=3), mode=0o755)
    layer.file("usr/share/filler", Content.random(2 << 20, seed=4))
    with converted_behind_proxy(layer, tmp) as proxy:
        yield proxy, files


@contextlib.contextmanager
def converted_behind_proxy(layer: Layer, tmp: Path):
    """`layer` as an image in a real registry, converted there (CHUNK-sized chunks, no batches:
    every file is its own chunks) to `cold/ls:v1-nydus`; yields a FaultProxy in front of it."""
    Image([layer]).write_oci(tmp / "src", "v1")
    with RegistryServer(tmp / "registry") as reg:
        push_oci_layout(tmp / "src", "v1", reg.host, "cold/ls")
        nydusify("convert", "--plain-http", "--chunk-size", hex(CHUNK), "--batch-size", "0",
                  "--source", f"{reg.host}/cold/ls:v1", "--target", f"{reg.host}/cold/ls:v1-nydus")
        proxy = FaultProxy(reg.host)
        try:
            yield proxy
        finally:
            proxy.close()


@pytest.fixture
def image_clean(image):
    """The image, with the proxy's faults cleared after the test (a failed test's too)."""
    yield image
    image[0].clear()


class Mounted:
    def __init__(self, tmp: Path, host: str):
        self.mnt, self.sock = tmp / "mnt", tmp / "api.sock"
        self.args = [str(BIN / "nydusd"), "mount", "--image", f"{host}/cold/ls:v1-nydus",
                     "--plain-http", "--cache-dir", str(tmp / "cache"), "--apisock", str(self.sock),
                     "--no-learned-prefetch", "--daemon", "--log-file", str(tmp / "log"),
                     "--log-level", "debug", str(self.mnt)]
        self.log = tmp / "log"

    def __enter__(self) -> "Mounted":
        self.mnt.mkdir(exist_ok=True)
        r = subprocess.run(self.args, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return self

    def metrics(self) -> dict:
        out = subprocess.run(["curl", "-s", "--unix-socket", str(self.sock),
                              "http://localhost/api/v1/metrics"], capture_output=True, text=True)
        return json.loads(out.stdout)

    def __exit__(self, *exc) -> None:
        subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)


def _head(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, 64, 0)
    finally:
        os.close(fd)


def test_exec_read_fetches_the_libraries_and_nothing_else(image_clean, tmp_path):
    proxy, files = image_clean
    with Mounted(tmp_path, proxy.host) as m:
        assert _head(m.mnt / "bin/ls") == files["usr/bin/ls"][:64]     # what exec reads first
        wait_for(lambda: m.metrics().get("predict_triggers") == 1
                 and m.metrics().get("predict_active") == 0, "prediction done", log=m.log)
        got = m.metrics()
        # ls, each library once, and glibc's three start-up files
        assert got["predict_files"] == 1 + len(LIBS) + len(RUNTIME), got
        assert got["predict_errors"] == 0, got
        assert got["chunk_misses"] == 1, got                 # only the head read itself
        # Everything the loader needs is cached now: with every data request failing, the
        # whole executable, every library and glibc's files (the zone found through the
        # image's /etc/localtime) still read back exactly.
        proxy.add(Fault.http(500), method="GET", path=r"/blobs/sha256:", times=None)
        for path, data in [*files.items(), *RUNTIME.items()]:
            assert (m.mnt / path).read_bytes() == data, path
        assert os.readlink(m.mnt / "etc/localtime") == "/usr/share/zoneinfo/Etc/UTC"  # (absolute:
        #                                             the host would follow it to its own zone)
        after = m.metrics()
        assert after["chunk_misses"] == 1, after
        # the files nobody loads were not fetched
        for path in ("usr/share/filler", f"usr/lib/{ARCH}/libunused.so.1", "usr/lib/locale/locale-archive"):
            with pytest.raises(OSError):
                (m.mnt / path).read_bytes()


def test_the_libraries_are_fetched_concurrently(image_clean, tmp_path):
    """ls's interpreter and both libraries it names are requested at once: every data GET
    after ls's own is held at the proxy until three are waiting (a fetcher going one library
    at a time would hold one, time out at the proxy, and leave peak at 1)."""
    proxy, files = image_clean
    with Mounted(tmp_path, proxy.host) as m:
        held = Fault.held(3, skip=1)    # ls's own range passes: no library is known before it
        proxy.add(held, method="GET", path=r"/blobs/sha256:", times=None)
        _head(m.mnt / "bin/ls")
        wait_for(lambda: m.metrics().get("predict_active") == 0, "prediction done", log=m.log)
        assert held.gate is not None and held.gate.peak >= 3, held.gate
        assert m.metrics()["predict_errors"] == 0
        proxy.clear()
        for path, data in files.items():
            assert (m.mnt / path).read_bytes() == data, path


def test_ls_runs_in_the_image(image_clean, tmp_path):
    proxy, _ = image_clean
    with Mounted(tmp_path, proxy.host) as m:
        r = subprocess.run(["chroot", str(m.mnt), "/bin/ls", "/usr/lib/" + ARCH],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "libc.so.6" in r.stdout.split()
        got = m.metrics()
        assert got["predict_files"] == 1 + len(LIBS) + len(RUNTIME), got
        assert got["predict_errors"] == 0, got


def test_exec_prefetch_false_turns_prediction_off(image_clean, tmp_path):
    proxy, files = image_clean
    cfg = tmp_path / "nydusd.json"
    cfg.write_text(json.dumps({"exec_prefetch": False}))
    m = Mounted(tmp_path, proxy.host)
    m.args[2:2] = ["--config", str(cfg)]
    with m:
        assert _head(m.mnt / "bin/ls") == files["usr/bin/ls"][:64]
        assert (m.mnt / "bin/ls").read_bytes() == files["usr/bin/ls"]
        got = m.metrics()
        assert got.get("predict_triggers", 0) == 0, got
        # nothing fetched the libraries: with data requests failing they cannot be read
        proxy.add(Fault.http(500), method="GET", path=r"/blobs/sha256:", times=None)
        with pytest.raises(OSError) as e:
            (m.mnt / f"lib/{ARCH}/{LIBS[0]}").read_bytes()
        assert e.value.errno == errno.EIO
