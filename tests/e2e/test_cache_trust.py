"""Cross-image cache poisoning (issue 9 §1): several images share one chunk cache directory,
one of them hostile. The hostile image names the victim's blob digest in its bootstrap, with its
own chunk table, and its backend serves its own bytes under that digest. Whether it acts before,
during or after the victim's reads, the victim must read its own bytes (never the attacker's,
never zeros), through real FUSE mounts: two `nydusd mount` processes sharing one --cache-dir,
and one `nydusd serve` with several mounts.

Two attackers: "same shape" (same file sizes, so the same chunk count and uncompressed layout as
the victim's blob: only digests and bytes differ, so every header field the old cache compared
matches) and "other shape" (one more chunk: a header mismatch, which the old cache answered by
truncating the shared files).
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
from pathlib import Path

import msgpack
import pytest

from nydus_py.daemon.api import call_sync, get_json
from tests.fixtures.daemon import Daemon, exit_serve, force_unmount, nydusd_cmd, reap, wait_for
from tests.fixtures.nydus_build import Built, build

pytestmark = pytest.mark.e2e

CHUNK = 64 << 10
SIZES = [256 << 10, 200 << 10, 64 << 10, 5000]


def _files(seed: int, extra: bool = False) -> dict[str, bytes]:
    rnd = random.Random(seed)
    files = {f"d/f{i}": rnd.randbytes(n) for i, n in enumerate(SIZES)}
    if extra:
        files["d/zz-extra"] = rnd.randbytes(CHUNK)
    return files


def _write(built: Built, root: Path, blob_id: str | None = None) -> tuple[Path, Path]:
    """bootstrap + blob dir of `built`; with `blob_id`, the image claims that blob digest and
    its blob dir serves its own bytes under that name (the attack)."""
    root.mkdir()
    boot, blobs = root / "bootstrap", root / "blobs"
    blobs.mkdir()
    ((own_id, data),) = built.blobs.items()
    doc = msgpack.unpackb(built.bootstrap, raw=False, strict_map_key=False)
    if blob_id is not None:
        assert blob_id != own_id
        doc["blobs"][0]["id"] = blob_id
    (blobs / (blob_id or own_id).split(":", 1)[1]).write_bytes(data)
    boot.write_bytes(msgpack.packb(doc, use_bin_type=True))
    return boot, blobs


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    victim = build(_files(1), chunk_size=CHUNK)
    (vid,) = victim.blobs
    same = build(_files(2), chunk_size=CHUNK)
    other = build(_files(3, extra=True), chunk_size=CHUNK)
    return {"victim": (victim, _write(victim, root / "victim")),
            "same": (same, _write(same, root / "same", vid)),
            "other": (other, _write(other, root / "other", vid))}


def _read(path: Path) -> bytes:
    """The file's bytes from the daemon, not from the page cache (keep_cache is on)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        parts = []
        while chunk := os.read(fd, 1 << 20):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


class Host:
    """Mounts of several images over one cache directory: separate `nydusd mount` processes,
    or one `nydusd serve`."""

    def __init__(self, tmp: Path, mode: str):
        self.tmp, self.mode = tmp, mode
        self.cache = tmp / "cache"
        self.mounts: dict[str, object] = {}
        self.sup: subprocess.Popen | None = None
        self.sock = tmp / "sup.sock"
        self.log = tmp / "sup.log"
        self.seq = 0
        if mode == "serve":
            with open(self.log, "wb") as out:
                self.sup = subprocess.Popen([*nydusd_cmd(), "serve", "--apisock", str(self.sock),
                                             "--cache-dir", str(self.cache), "--state-dir",
                                             str(tmp / "state")],
                                            stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
            wait_for(self.sock.exists, "supervisor socket", log=self.log)

    def mount(self, name: str, image) -> Path:
        boot, blobs = image[1]
        self.seq += 1
        mnt = self.tmp / f"mnt-{name}-{self.seq}"
        if self.mode == "mounts":
            d = Daemon(self.tmp, "--bootstrap", str(boot), "--blob-dir", str(blobs),
                       "--cache-dir", str(self.cache), "--no-prefetch",
                       name=f"{name}-{self.seq}", mnt=mnt).start()
            self.mounts[name] = d
        else:
            mnt.mkdir()
            st, info = get_json(str(self.sock), f"/api/v1/mount?mountpoint={mnt}", "POST",
                                {"bootstrap": str(boot), "blob_dir": str(blobs)})
            assert st == 200 and info["state"] == "RUNNING", info
            self.mounts[name] = mnt
        return mnt

    def reads(self, name: str) -> int:
        """FUSE reads that reached the daemon of mount `name`."""
        m = self.mounts[name]
        if self.mode == "mounts":
            return m.api("/api/v1/metrics")["read_count"]
        st, doc = get_json(str(self.sock), f"/api/v1/metrics?mountpoint={m}")
        assert st == 200, doc
        return doc["read_count"]

    def unmount(self, name: str) -> None:
        m = self.mounts.pop(name)
        if self.mode == "mounts":
            assert m.stop() == 0
        else:
            assert call_sync(str(self.sock), "DELETE", f"/api/v1/mount?mountpoint={m}")[0] == 204

    def close(self) -> None:
        for name in list(self.mounts):
            m = self.mounts.pop(name)
            if self.mode == "mounts":
                m.__exit__(None, None, None)
            else:
                call_sync(str(self.sock), "DELETE", f"/api/v1/mount?mountpoint={m}")
                force_unmount(m)
        if self.sup is not None:
            if self.sup.poll() is None:
                call_sync(str(self.sock), "PUT", "/api/v1/daemon/exit")
                try:
                    self.sup.wait(30)
                except subprocess.TimeoutExpired:
                    self.sup.kill()
                    self.sup.wait()
            for mnt in self.tmp.glob("mnt-*"):
                force_unmount(mnt)


def read_all(mnt: Path, image) -> dict[str, bytes]:
    return {p: _read(mnt / p) for p in image[0].files}


def check_victim(host: Host, mnt: Path, images, name: str = "victim") -> None:
    """Every victim file reads back as the victim's bytes, served by the daemon."""
    before = host.reads(name)
    got = read_all(mnt, images["victim"])
    assert host.reads(name) > before, "reads did not reach the daemon"
    attacker = {**images["same"][0].files, **images["other"][0].files}
    for path, data in got.items():
        assert data != attacker.get(path), f"{path}: the victim reads the attacker's bytes"
        assert data == images["victim"][0].files[path], f"{path}: the victim reads wrong bytes"


def attack(host: Host, images, name: str) -> None:
    """An attacker mount reads all of its files (and so fetches, verifies against ITS chunk
    table, and stores its bytes under the victim's blob digest)."""
    mnt = host.mount(name, images[name])
    assert read_all(mnt, images[name]) == images[name][0].files


@pytest.fixture(params=["mounts", "serve"])
def host(request, tmp_path):
    h = Host(tmp_path, request.param)
    yield h
    h.close()


def test_attacker_first_then_victim(host, images):
    attack(host, images, "other")
    attack(host, images, "same")
    mnt = host.mount("victim", images["victim"])
    check_victim(host, mnt, images)
    check_victim(host, mnt, images)          # after its first-use checks too


def test_attacker_during_the_victims_reads(host, images):
    v = host.mount("victim", images["victim"])
    a = host.mount("same", images["same"])   # both have the blob open, nothing cached yet
    check_victim(host, v, images)             # victim stores its chunks ...
    assert read_all(a, images["same"]) == images["same"][0].files   # ... attacker its own
    check_victim(host, v, images)             # re-read from the daemon: still the victim's
    errors: list[str] = []

    def loop(mnt: Path, image, n: int) -> None:
        for _ in range(n):
            for path, data in image[0].files.items():
                if _read(mnt / path) != data:
                    errors.append(f"{mnt}: {path}")

    threads = [threading.Thread(target=loop, args=(v, images["victim"], 4)),
               threading.Thread(target=loop, args=(a, images["same"], 4))]
    for t in threads:
        t.start()
    attack(host, images, "other")             # a header mismatch while both read
    for t in threads:
        t.join()
    assert errors == []
    check_victim(host, v, images)


def test_attacker_after_the_victims_reads(host, images):
    v = host.mount("victim", images["victim"])
    check_victim(host, v, images)
    attack(host, images, "same")
    attack(host, images, "other")
    check_victim(host, v, images)             # the running victim
    host.unmount("victim")
    v = host.mount("victim2", images["victim"])
    check_victim(host, v, images, "victim2")  # a new victim mount from the shared cache


# -- §4: cache and state directories on a shared host --------------------------------------------
@pytest.mark.skipif(os.geteuid() != 0, reason="root refuses unsafe directories")
@pytest.mark.parametrize("how", ["owner-1000", "mode-0777"])
def test_nydusd_mount_refuses_an_unsafe_cache_dir_with_one_line(tmp_path, images, how):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    if how == "owner-1000":
        os.chown(cache, 1000, 1000)
    else:
        os.chmod(cache, 0o777)
    boot, blobs = images["victim"][1]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run([*nydusd_cmd(), "mount", "--bootstrap", str(boot), "--blob-dir", str(blobs),
                        "--cache-dir", str(cache), "--daemon", str(mnt)], capture_output=True,
                       text=True, timeout=60)
    force_unmount(mnt)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(cache) in lines[0] and "refusing" in lines[0], r.stderr
    assert list(cache.iterdir()) == []


def test_nydusd_serve_under_umask_000_creates_private_dirs_and_files(tmp_path, images):
    state, cache = tmp_path / "s" / "state", tmp_path / "c" / "cache"
    sock, log = tmp_path / "sup.sock", tmp_path / "sup.log"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with open(log, "wb") as out:
        sup = subprocess.Popen([*nydusd_cmd(), "serve", "--apisock", str(sock), "--cache-dir",
                                str(cache), "--state-dir", str(state)],
                               stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               preexec_fn=lambda: os.umask(0))
    try:
        wait_for(sock.exists, "supervisor socket", log=log)
        boot, blobs = images["victim"][1]
        st, info = get_json(str(sock), f"/api/v1/mount?mountpoint={mnt}", "POST",
                            {"bootstrap": str(boot), "blob_dir": str(blobs),
                             "config": {"enable_xattr": True}, "prefetch_files": ["/d/f0"]})
        assert st == 200, info
        assert read_all(mnt, images["victim"]) == images["victim"][0].files
        for d in (state.parent, state, cache.parent, cache):
            assert d.stat().st_mode & 0o777 == 0o700, (d, oct(d.stat().st_mode))
        files = [p for p in [*state.iterdir(), *cache.iterdir()] if p.is_file()]
        assert any(p.suffix == ".data" for p in files) and any(p.suffix == ".json" for p in files)
        for p in files:
            assert p.stat().st_mode & 0o077 == 0, (p, oct(p.stat().st_mode))
        exit_serve(sock, sup)
    finally:
        reap(sup)
        force_unmount(mnt)


# -- digest_validate ------------------------------------------------------------------------------
def test_digest_validate_sha256_checks_cache_hits_against_the_mounts_bootstrap(tmp_path, images):
    """Cached bytes changed behind the daemon's back with a matching xxh3 (what only someone with
    write access to the cache dir can do): digest_validate still serves the right bytes."""
    import json

    import xxhash

    from nydus_py.cache.gc import HEADER, RECORD
    boot, blobs = images["victim"][1]
    files = images["victim"][0].files
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"digest_validate": True}))
    cache = tmp_path / "cache"
    args = ("--bootstrap", str(boot), "--blob-dir", str(blobs), "--cache-dir", str(cache),
            "--no-prefetch")
    with Daemon(tmp_path, *args, name="fill") as d:
        assert read_all(d.mnt, images["victim"]) == files
    (data_file,) = cache.glob("*.data")
    evil = bytes(CHUNK)                         # chunk 0 = d/f0's first 64 KiB
    with open(data_file, "r+b") as f:
        f.write(evil)
    with open(data_file.with_suffix(".meta"), "r+b") as f:
        f.seek(HEADER.size)
        f.write(RECORD.pack(1, CHUNK, xxhash.xxh3_64_intdigest(evil)))
    with Daemon(tmp_path, *args, "--config", str(cfg), name="strict") as d:
        assert read_all(d.mnt, images["victim"]) == files
        assert d.api("/api/v1/metrics/blobcache")["digest_errors"] == 1
        assert read_all(d.mnt, images["victim"]) == files      # re-stored, served again


# -- legitimate sharing is kept -------------------------------------------------------------------
def test_images_sharing_a_chunk_dict_blob_share_its_cache_entry(tmp_path):
    """The cache key holds the chunk table, and an image converted with --chunk-dict carries the
    dictionary blob's table unchanged: so the second image reads the first one's cached chunks."""
    from tests.fixtures.chunk_dict import (
        app_layer,
        base_layer,
        extra_layer,
        manifest,
        own_blobs,
    )
    from tests.fixtures.cli import nydusify
    from tests.fixtures.imagegen import Image

    src = tmp_path / "src"
    base, app = base_layer(), app_layer(1)
    Image([base, app]).write_oci(src, "a")
    Image([base, app, extra_layer()]).write_oci(src, "b")
    nydusify("convert", "--compressor", "none", "--source", f"oci:{src}:a",
             "--target", f"oci:{tmp_path}/A:a")
    nydusify("convert", "--compressor", "none", "--source", f"oci:{src}:b",
             "--target", f"oci:{tmp_path}/B:b", "--chunk-dict", f"oci:{tmp_path}/A:a")
    cache = tmp_path / "cache"

    def read_tree(mnt: Path) -> int:
        n = 0
        for p in sorted(mnt.rglob("*")):
            if p.is_file() and not p.is_symlink():
                n += len(_read(p))
        return n

    with Daemon(tmp_path, "--image", f"oci:{tmp_path}/A:a", "--cache-dir", str(cache),
                "--no-prefetch", name="a") as d:
        assert read_tree(d.mnt) > 0
    with Daemon(tmp_path, "--image", f"oci:{tmp_path}/B:b", "--cache-dir", str(cache),
                "--no-prefetch", name="b") as d:
        read_tree(d.mnt)
        fetched = d.api("/api/v1/metrics/backend")["read_amount_total"]
        (own,) = own_blobs(manifest(tmp_path / "B", "b"))
        assert 0 < fetched <= own["size"], fetched   # only B's own new blob came from the backend
    for blob in own_blobs(manifest(tmp_path / "A", "a")):
        assert len(list(cache.glob(blob["digest"].split(":")[1] + "-*.data"))) == 1
