"""The foundation path end to end: generated OCI image → nydusify convert → nydusd mount →
the tree must equal umoci's unpack of the same image, and data must come lazily."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from converter.compare import compare_trees
from tests.fixtures.cli import Mount, nydusify
from tests.fixtures.imagegen import (Image, Layer, busybox_image, feature_image, large_image,
                                     whiteout_image)
from tests.fixtures.umoci import umoci_reference

pytestmark = pytest.mark.e2e


def cache_bytes(cache: Path) -> int:
    """Bytes of chunk data actually stored (allocated blocks of the sparse cache files)."""
    return sum(p.stat().st_blocks * 512 for p in cache.rglob("*.data"))


def convert_and_compare(tmp_path: Path, image: Image, tag: str, *extra: str) -> list[str]:
    src, dst = tmp_path / "src", tmp_path / "dst"
    image.write_oci(src, tag)
    nydusify("convert", "--source", f"oci:{src}:{tag}", "--target", f"oci:{dst}:{tag}", *extra)
    ref = umoci_reference(src, tag, tmp_path / "umoci")
    with Mount(f"oci:{dst}:{tag}", tmp_path / "mnt", tmp_path / "cache") as mnt:
        return compare_trees(ref.rootfs, mnt, ignore_mtime=ref.volatile_mtimes)


@pytest.mark.parametrize("extra", [(), ("--compressor", "lz4", "--chunk-size", "0x1000"),
                                   ("--compressor", "none",),
                                   # format v1 (no batches), as images converted before v2
                                   ("--batch-size", "0"),
                                   # many small batches, big files split around them
                                   ("--chunk-size", "0x1000", "--batch-size", "0x2000"),
                                   # format v3: content-defined chunks, default sizes
                                   ("--chunker", "cdc"),
                                   # v3 with small cdc chunks: the 1 MiB and 300 kB files split
                                   ("--chunker", "cdc", "--chunk-size", "0x4000",
                                    "--batch-size", "0x2000"),
                                   ("--chunker", "cdc", "--cdc-avg-size", "0x2000",
                                    "--cdc-min-size", "0x1000", "--cdc-max-size", "0x8000",
                                    "--compressor", "lz4")])
def test_feature_image_mounts_identical_to_umoci(tmp_path, extra):
    assert convert_and_compare(tmp_path, feature_image(), "feat", *extra) == []


def test_whiteout_image_mounts_identical_to_umoci(tmp_path):
    assert convert_and_compare(tmp_path, whiteout_image(), "wh") == []


@pytest.mark.parametrize("extra", [(), ("--chunker", "cdc", "--chunk-size", "0x10000")])
def test_busybox_image_identical_and_runs_in_chroot(tmp_path, extra):
    assert convert_and_compare(tmp_path, busybox_image(extra_budget=2 << 20), "bb", *extra) == []
    with Mount(f"oci:{tmp_path / 'dst'}:bb", tmp_path / "mnt2", tmp_path / "cache2") as mnt:
        out = subprocess.run(["chroot", str(mnt), "/bin/sh", "-c", "echo hi from $(basename $0); ls /bin | wc -l"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("hi from sh")
        assert int(out.stdout.split()[-1]) > 50  # the applet links


def test_docker_archive_source_converts_to_the_same_tree(tmp_path):
    img = whiteout_image()
    img.write_oci(tmp_path / "src", "wh")
    img.write_docker_archive(tmp_path / "img.tar", "example/wh:1")
    nydusify("convert", "--source", f"docker-archive:{tmp_path / 'img.tar'}", "--target", f"oci:{tmp_path}/dst:wh")
    ref = umoci_reference(tmp_path / "src", "wh", tmp_path / "umoci")
    with Mount(f"oci:{tmp_path}/dst:wh", tmp_path / "mnt", tmp_path / "cache") as mnt:
        assert compare_trees(ref.rootfs, mnt, ignore_mtime=ref.volatile_mtimes) == []


def test_reading_one_small_file_fetches_only_its_chunks(tmp_path):
    img = large_image(32 << 20)
    img.write_oci(tmp_path / "src", "big")
    nydusify("convert", "--source", f"oci:{tmp_path}/src:big", "--target", f"oci:{tmp_path}/dst:big")
    cache = tmp_path / "cache"
    with Mount(f"oci:{tmp_path}/dst:big", tmp_path / "mnt", cache) as mnt:
        assert cache_bytes(cache) == 0  # mounting reads no data
        assert (mnt / "big/small").read_bytes() == b"small file next to big ones\n"
        fetched = cache_bytes(cache)
        assert 0 < fetched <= 2 << 20, fetched  # at most the small file plus amplify_io readahead
        total = sum(os.path.getsize(mnt / "big" / n) for n in os.listdir(mnt / "big"))
        assert total > 30 << 20


def test_layers_repeating_the_same_files_store_chunks_once(tmp_path):
    data = os.urandom(3 << 20)
    base, top = Layer(), Layer()
    base.dir("a")
    base.file("a/one", data)
    top.dir("b")
    top.file("b/copy", data)            # whole file again, in an upper layer
    top.file("b/half", data[: 1 << 20])  # its first chunk again
    Image([base, top]).write_oci(tmp_path / "src", "dup")
    nydusify("convert", "--source", f"oci:{tmp_path}/src:dup", "--target", f"oci:{tmp_path}/dst:dup",
             "--compressor", "none")
    manifest = _manifest(tmp_path / "dst", "dup")
    blobs = [l for l in manifest["layers"] if l["annotations"].get("io.nydus-py.blob") == "true"]
    assert len(blobs) == 1                       # the upper layer adds no new chunk: no blob
    assert blobs[0]["size"] == len(data)         # 3 chunks stored once, uncompressed
    with Mount(f"oci:{tmp_path}/dst:dup", tmp_path / "mnt", tmp_path / "cache") as mnt:
        assert (mnt / "b/copy").read_bytes() == data
        assert (mnt / "b/half").read_bytes() == data[: 1 << 20]


@pytest.mark.parametrize("extra", [(), ("--chunker", "cdc", "--chunk-size", "0x4000")])
def test_same_input_gives_byte_identical_output(tmp_path, extra):
    feature_image().write_oci(tmp_path / "src", "f")
    nydusify("convert", "--source", f"oci:{tmp_path}/src:f", "--target", f"oci:{tmp_path}/a:f", *extra)
    nydusify("convert", "--source", f"oci:{tmp_path}/src:f", "--target", f"oci:{tmp_path}/b:f", *extra)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_converted_manifest_links_back_to_source(tmp_path):
    desc = whiteout_image().write_oci(tmp_path / "src", "wh")
    nydusify("convert", "--source", f"oci:{tmp_path}/src:wh", "--target", f"oci:{tmp_path}/dst:wh")
    m = _manifest(tmp_path / "dst", "wh")
    assert m["subject"]["digest"] == desc.digest
    assert m["layers"][-1]["mediaType"] == "application/vnd.oci.image.layer.nydus-py.bootstrap.v1"
    cfg = json.loads((tmp_path / "dst/blobs/sha256" / m["config"]["digest"].split(":")[1]).read_bytes())
    assert cfg["rootfs"]["diff_ids"] == [l["digest"] for l in m["layers"]]


def test_nydusify_check_reports_identical_and_different(tmp_path):
    whiteout_image().write_oci(tmp_path / "src", "wh")
    feature_image().write_oci(tmp_path / "src", "feat")
    nydusify("convert", "--source", f"oci:{tmp_path}/src:wh", "--target", f"oci:{tmp_path}/dst:wh")
    ok = nydusify("check", "--source", f"oci:{tmp_path}/src:wh", "--target", f"oci:{tmp_path}/dst:wh",
                  check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = nydusify("check", "--source", f"oci:{tmp_path}/src:feat", "--target", f"oci:{tmp_path}/dst:wh",
                   check=False)
    assert bad.returncode == 1 and "difference" in bad.stderr and bad.stdout.strip()


def _manifest(layout: Path, tag: str) -> dict:
    idx = json.loads((layout / "index.json").read_bytes())
    d = next(m for m in idx["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag)
    return json.loads((layout / "blobs/sha256" / d["digest"].split(":")[1]).read_bytes())


def test_image_without_xattrs_reports_no_xattr_support(tmp_path):
    layer = Layer()
    layer.file("plain", b"no xattrs anywhere\n")
    Image([layer]).write_oci(tmp_path / "src", "nx")
    nydusify("convert", "--source", f"oci:{tmp_path}/src:nx", "--target", f"oci:{tmp_path}/dst:nx")
    with Mount(f"oci:{tmp_path}/dst:nx", tmp_path / "mnt", tmp_path / "cache") as mnt:
        for _ in range(2):  # the first answer (ENOSYS) is remembered by the kernel
            with pytest.raises(OSError) as e:
                os.listxattr(mnt / "plain")
            assert e.value.errno == errno.EOPNOTSUPP
        assert (mnt / "plain").read_bytes() == b"no xattrs anywhere\n"


def test_mount_raises_the_kernel_readahead_window(tmp_path):
    whiteout_image().write_oci(tmp_path / "src", "ra")
    nydusify("convert", "--source", f"oci:{tmp_path}/src:ra", "--target", f"oci:{tmp_path}/dst:ra")
    with Mount(f"oci:{tmp_path}/dst:ra", tmp_path / "mnt", tmp_path / "cache") as mnt:
        dev = subprocess.run(["mountpoint", "-d", str(mnt)], capture_output=True, text=True).stdout.strip()
        ra = Path(f"/sys/class/bdi/{dev}/read_ahead_kb")
        for _ in range(50):   # set by the daemon just after the FUSE INIT handshake
            if ra.read_text().strip() == "1024":
                break
            time.sleep(0.05)
        assert ra.read_text().strip() == "1024"
