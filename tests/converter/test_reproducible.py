"""The converter's output bytes are pinned: the same source gives the same manifest (so the same
blobs and bootstrap) whatever the pipeline does inside (threads, read-ahead, gzip decoder).

The pinned digests were produced by the converter as it was before the conversion-speed work
(main at e940619, `nydusify convert` of this image). If a change alters the format on purpose
(a new bootstrap field, another chunker default), update the pins in that change and say so;
if it only makes conversion faster, they must not move.
"""

from __future__ import annotations

import json

import pytest

from converter import decompress
from converter.builder import BuildOptions
from converter.convert import convert
from converter.sources import SourceRef
from tests.fixtures.imagegen import Content, Image, Layer, feature_image


def reproducible_image() -> Image:
    """Every tar feature (feature_image: gzip, zstd, plain layers), plus a gzip layer with many
    small compressible files (batches), multi-chunk files, a file repeated (dedup) and an
    incompressible one (stored raw)."""
    img = feature_image()
    m = Layer(compression="gzip", level=6)
    m.dir("etc/conf.d")
    for i in range(300):
        text = "".join(f"key{j} = value {i * j} # setting {j} of file {i}\n" for j in range(i % 37 + 1))
        m.file(f"etc/conf.d/{i:03}.conf", text)
    m.file("usr/lib/big.so", Content.pattern(3 << 20, bytes(range(256)) * 97))
    m.file("usr/lib/big-copy.so", Content.pattern(3 << 20, bytes(range(256)) * 97))
    m.file("usr/lib/noise", Content.random((1 << 20) + 12345, seed=5))
    return Image(img.layers + [m])


PINNED = {
    "default": "sha256:7722090ffd53d23e238160912fc6841848a69fca36b672a9329d388e28e02c1a",
    "batch-size 0": "sha256:a000773305d237ff80dcdd09057530bc77bd0944e076c70f7c50654c9be40b33",
    "lz4": "sha256:af2f8622836af7b6bf7de6e17c16fd47186f80a6d238583dbc61cebc571a41a7",
    "none": "sha256:85665aae1a9784050cdc891924db239673a0be0d2b9e2325a813153ecf021abe",
    "level 3, chunk 64 KiB": "sha256:5683e3e121d025d7bf4d097695b693a2480670c64166aa7c1e9b090aa4efa390",
    "prefetch list": "sha256:1feb76a6a0755dd175880925281787f5808c5d0c6b4592f7d7d837f5bfc6478f",
}
OPTIONS = {
    "default": BuildOptions(),
    "batch-size 0": BuildOptions(batch_size=0),
    "lz4": BuildOptions(compressor="lz4"),
    "none": BuildOptions(compressor="none"),
    "level 3, chunk 64 KiB": BuildOptions(compression_level=3, chunk_size=0x10000),
    # a prefetch segment in front of the blob (blob_writer concatenates the two segments)
    "prefetch list": BuildOptions(prefetch_patterns=("/etc/conf.d", "/usr/lib/noise")),
}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    reproducible_image().write_oci(src, "r")
    return src


@pytest.mark.parametrize("name", list(OPTIONS))
def test_output_bytes_are_pinned(source, tmp_path, name):
    res = convert(SourceRef("oci", str(source), "r"), SourceRef("oci", str(tmp_path / "out"), "r"),
                  OPTIONS[name])
    assert res.manifest.digest == PINNED[name], (
        f"{name}: converted manifest changed; layers: "
        f"{json.dumps([b.digest for b in res.build.blobs])}")


def test_zlib_fallback_gives_the_same_output(source, tmp_path, monkeypatch):
    """Without isal the gzip layers are decoded by Python's gzip module: same output."""
    monkeypatch.setattr(decompress, "_igzip", None)
    res = convert(SourceRef("oci", str(source), "r"), SourceRef("oci", str(tmp_path / "out"), "r"),
                  BuildOptions())
    assert res.manifest.digest == PINNED["default"]
