"""`nydusify convert --chunker cdc` end to end: a real FUSE mount of a v3 image reads every
byte and random spans across chunk boundaries; a shifted big file between two image
versions dedups through --chunk-dict with cdc and not with fixed-size chunks."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from nydus_py.format.bootstrap import Bootstrap, decompress_layer
from tests.fixtures.cli import Mount, nydusify
from tests.fixtures.imagegen import Content, Image, Layer

pytestmark = pytest.mark.e2e

BIG = Content.random(6 << 20, seed=11).read_all()


def _manifest(layout: Path, tag: str) -> dict:
    idx = json.loads((layout / "index.json").read_bytes())
    d = next(m for m in idx["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == tag)
    return json.loads((layout / "blobs/sha256" / d["digest"].split(":")[1]).read_bytes())


def _bootstrap(layout: Path, tag: str) -> Bootstrap:
    boot = _manifest(layout, tag)["layers"][-1]["digest"].split(":")[1]
    return Bootstrap.from_bytes(decompress_layer((layout / "blobs/sha256" / boot).read_bytes()))


def _own_blob_bytes(layout: Path, tag: str) -> int:
    """Bytes of the blobs this image stored itself (not those taken from a chunk dictionary)."""
    return sum(l["size"] for l in _manifest(layout, tag)["layers"]
               if l["annotations"].get("io.nydus-py.blob") == "true"
               and l["annotations"].get("io.nydus-py.chunk-dict") != "true")


def test_cdc_image_mount_reads_every_byte_and_random_preads(tmp_path):
    layer = Layer()
    layer.dir("d")
    layer.file("d/big", BIG)
    layer.file("d/zeros", Content.zeros(3 << 20))
    layer.file("d/small", b"small\n")
    Image([layer]).write_oci(tmp_path / "src", "c")
    nydusify("convert", "--source", f"oci:{tmp_path}/src:c", "--target", f"oci:{tmp_path}/dst:c",
             "--chunker", "cdc", "--chunk-size", "0x10000")
    bs = _bootstrap(tmp_path / "dst", "c")
    assert bs.version == 3
    big = bs.lookup(bs.lookup(1, b"d"), b"big")
    offs = list(bs.file_chunk_offsets(big))
    assert len(offs) > 40 and len({b - a for a, b in zip(offs, offs[1:])}) > 20   # variable sizes
    with Mount(f"oci:{tmp_path}/dst:c", tmp_path / "mnt", tmp_path / "cache") as mnt:
        fd = os.open(mnt / "d/big", os.O_RDONLY)
        try:
            rnd = random.Random(5)
            for b in offs[1::7]:                    # spans across chunk boundaries, cold
                assert os.pread(fd, 100, b - 50) == BIG[b - 50:b + 50]
            for _ in range(300):
                off = rnd.randrange(len(BIG))
                n = rnd.choice((1, 4096, rnd.randrange(1, 300_000)))
                assert os.pread(fd, n, off) == BIG[off:off + n]
        finally:
            os.close(fd)
        assert (mnt / "d/big").read_bytes() == BIG
        assert (mnt / "d/zeros").read_bytes() == bytes(3 << 20)
        assert (mnt / "d/small").read_bytes() == b"small\n"


def test_shifted_file_dedups_with_cdc_not_with_fixed(tmp_path):
    """v2 of the image inserts 1000 bytes at the start of a 6 MiB file; converted with v1 as
    --chunk-dict, cdc stores about one chunk again, fixed-size chunks store the whole file."""
    for tag, content in (("v1", BIG), ("v2", os.urandom(1000) + BIG)):
        layer = Layer()
        layer.file("big", content)
        Image([layer]).write_oci(tmp_path / "src", tag)
    stored = {}
    for mode in ("fixed", "cdc"):
        dst = tmp_path / mode
        opts = ["--chunker", mode, "--chunk-size", "0x10000", "--compressor", "none"]
        nydusify("convert", "--source", f"oci:{tmp_path}/src:v1", "--target", f"oci:{dst}:v1", *opts)
        nydusify("convert", "--source", f"oci:{tmp_path}/src:v2", "--target", f"oci:{dst}:v2", *opts,
                 "--chunk-dict", f"oci:{dst}:v1")
        stored[mode] = _own_blob_bytes(dst, "v2")
        with Mount(f"oci:{dst}:v2", tmp_path / f"mnt-{mode}", tmp_path / f"cache-{mode}") as mnt:
            assert (mnt / "big").read_bytes()[1000:] == BIG
    assert stored["fixed"] >= len(BIG)                      # every chunk moved
    assert stored["cdc"] <= 1000 + 2 * (0x40000)             # ≤ the insertion + 2 max-size chunks
    assert stored["cdc"] * 20 < stored["fixed"]


def test_fixed_conversion_refuses_a_cdc_dictionary_in_one_line(tmp_path):
    layer = Layer()
    layer.file("f", b"data\n")
    Image([layer]).write_oci(tmp_path / "src", "a")
    nydusify("convert", "--source", f"oci:{tmp_path}/src:a", "--target", f"oci:{tmp_path}/cdc:a",
             "--chunker", "cdc")
    r = nydusify("convert", "--source", f"oci:{tmp_path}/src:a", "--target", f"oci:{tmp_path}/out:a",
                 "--chunk-dict", f"oci:{tmp_path}/cdc:a", check=False)
    assert r.returncode == 1
    assert "use it with --chunker cdc" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()
