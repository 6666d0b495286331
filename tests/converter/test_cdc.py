"""Content-defined chunking (`nydusify convert --chunker cdc`, format v3): the streamed FastCDC
chunker, the builder options, the v3 bootstrap (per-file chunk offsets) read back through the
real FileReader, dedup of a shifted file, reproducibility, chunk dictionaries across chunkers."""

from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path

import pytest
import trio

from converter import tar as tarlayer
from converter.builder import Builder, BuildOptions, BuildResult
from converter.chunker import CdcParams, cdc_pieces
from nydus_py.cache.chunk_cache import ChunkCache
from nydus_py.errors import ConfigError
from nydus_py.format.bootstrap import Bootstrap
from nydus_py.io.reader import FileReader
from nydus_py.storage.localfs import LocalFsBackend
from tests.fixtures.chunk_dict import build_layers as build, data, files_layer as layer
from tests.fixtures.imagegen import Layer

P = CdcParams(0x1000, 0x4000, 0x10000)        # 4 KiB / 16 KiB / 64 KiB
CDC = dict(chunker="cdc", chunk_size=0x4000, cdc_min_size=0x1000, cdc_max_size=0x10000)


# -- the chunker --------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 0x1000, 0x1001, 0x10000, 0x10001, 300_001, 1_000_003])
def test_streamed_cuts_equal_whole_file_cuts(size):
    """Windows of max_size, whatever the short reads, cut exactly where FastCDC cuts the whole."""
    from pyfastcdc import FastCDC
    rnd = random.Random(size)
    content = data(size, size)
    f = io.BytesIO(content)
    got = list(cdc_pieces(lambda n: f.read(min(n, rnd.randrange(1, 0x14000))), size, P))
    assert b"".join(got) == content
    if size > P.min_size:
        whole = [bytes(c.data) for c in FastCDC(P.avg_size, min_size=P.min_size,
                                                max_size=P.max_size).cut_buf(content)]
        assert got == whole
        assert len(got) > 1 or size <= P.max_size
    assert all(len(p) <= P.max_size for p in got)
    assert all(len(p) >= P.min_size for p in got[:-1])


def test_cut_points_are_pinned():
    """pyfastcdc's cut points are part of our images' reproducibility (FastCDC 2020, seed 0,
    the gear table of the paper's C code, as fastcdc-rs v2020): a library upgrade that moves
    them changes every cdc image's chunks; this fails first."""
    content = data(2026, 400_000)
    sizes = [len(p) for p in cdc_pieces(io.BytesIO(content).read, len(content), P)]
    assert hashlib.sha256(repr(sizes).encode()).hexdigest()[:16] == PINNED_CUTS, sizes


PINNED_CUTS = "e7b6de839feb9e5e"     # first sizes: 26539, 20091, 7988, 33887, 44543


# -- options ------------------------------------------------------------------------------------

def test_cdc_defaults_follow_the_chunk_size():
    o = BuildOptions(chunker="cdc", chunk_size=0x100000)
    assert (o.cdc_min_size, o.cdc_avg_size, o.cdc_max_size) == (0x40000, 0x100000, 0x400000)
    o = BuildOptions(chunker="cdc", chunk_size=0x400000)
    assert o.cdc_max_size == 0x1000000                  # 4 × 4 MiB = MAX_CHUNK_SIZE
    o = BuildOptions(chunker="cdc", cdc_avg_size=0x10000)
    assert o.chunk_size == 0x10000                      # the image's nominal chunk size


@pytest.mark.parametrize("opts", [
    dict(chunker="cdc", cdc_min_size=0x20000, cdc_avg_size=0x10000),      # min > avg
    dict(chunker="cdc", cdc_avg_size=0x10000, cdc_max_size=0x8000),       # max < avg
    dict(chunker="cdc", cdc_avg_size=0x3000),                              # not a power of two
    dict(chunker="cdc", cdc_avg_size=0x800000),                            # avg over 4 MiB
    dict(chunker="cdc", cdc_max_size=0x2000000),                           # max over 16 MiB
    dict(chunker="cdc", cdc_min_size=0x800, cdc_avg_size=0x4000),          # min under 4 KiB
    dict(chunker="cdc", chunk_size=0x1000000),                             # avg 16 MiB
    dict(cdc_avg_size=0x10000),                                            # cdc size, fixed chunker
    dict(chunker="rabin"),
])
def test_inconsistent_cdc_sizes_are_one_clear_error(opts):
    with pytest.raises(ConfigError) as e:
        BuildOptions(**opts)
    assert "\n" not in str(e.value) and ("cdc" in str(e.value) or "chunker" in str(e.value))


# -- the v3 image ---------------------------------------------------------------------------------

class Reader:
    """A v3 image read through the real FileReader over its real blob files."""

    def __init__(self, tmp: Path, result: BuildResult, *others: BuildResult):
        self.bs = Bootstrap.from_bytes(result.bootstrap)
        blobs = tmp / "blobs"
        blobs.mkdir(parents=True, exist_ok=True)
        for r in (result, *others):
            for b in r.blobs:
                (blobs / b.digest.split(":", 1)[1]).write_bytes(b.path.read_bytes())
        self.cache = ChunkCache(str(tmp / "cache"))
        self.reader = FileReader(self.bs, LocalFsBackend(str(blobs)), self.cache,
                                 limiter=trio.CapacityLimiter(2))

    def ino(self, path: str) -> int:
        ino = 1
        for name in path.split("/"):
            ino = self.bs.lookup(ino, name.encode())
        return ino

    def read(self, path: str, off: int, size: int) -> bytes:
        return trio.run(self.reader.read, self.ino(path), off, size)

    def close(self):
        self.cache.close()


def test_v3_image_reads_every_byte_and_random_spans(tmp_path):
    files = {"big": data(1, 700_001), "mid": data(2, 0x5000), "small": b"hello\n",
             "zero": bytes(300_000), "empty": b""}
    r = build(tmp_path, [layer(files)], **CDC)
    img = Reader(tmp_path, r)
    try:
        assert img.bs.version == 3 and img.bs.variable
        big = img.ino("big")
        offs = list(img.bs.file_chunk_offsets(big))
        sizes = [img.bs.chunk(c).size for c in img.bs.file_chunk_ids(big)]
        assert len(set(sizes)) > 3                     # variable sizes, not fixed ones
        assert offs == [sum(sizes[:k]) for k in range(len(sizes))]
        for path, content in files.items():
            assert img.read(path, 0, len(content) + 10) == content
        rnd = random.Random(3)
        content = files["big"]
        for b in offs[1:6]:                               # across chunk boundaries
            assert img.read("big", b - 7, 20) == content[b - 7:b + 13]
        for _ in range(200):
            off = rnd.randrange(len(content))
            n = rnd.randrange(1, 0x30000)
            assert img.read("big", off, n) == content[off:off + n]
        assert img.read("big", len(content), 10) == b""
    finally:
        img.close()


def test_same_input_gives_the_same_v3_image(tmp_path):
    files = {"big": data(4, 500_000), "a/small": b"x" * 100}
    one, two = build(tmp_path, [layer(files)], **CDC), build(tmp_path, [layer(files)], **CDC)
    assert one.bootstrap == two.bootstrap
    assert [b.path.read_bytes() for b in one.blobs] == [b.path.read_bytes() for b in two.blobs]


def test_batching_is_as_for_fixed_chunks(tmp_path):
    """Every new chunk below --batch-size is a batch member (small files, tails, inner cdc
    chunks smaller than a batch); bigger ones are compressed alone."""
    files = {"big": data(5, 600_000), **{f"s/{i}": data(10 + i, 100 + i) for i in range(20)}}
    r = build(tmp_path, [layer(files)], batch_size=0x8000, **CDC)
    bs = Bootstrap.from_bytes(r.bootstrap)
    chunks = [bs.chunk(c) for c in bs.file_chunk_ids(bs.lookup(1, b"big"))]
    assert {c.size < 0x8000 for c in chunks} == {True, False}       # both kinds in this file
    assert all(bool(c.batch_size) == (c.size < 0x8000) for c in chunks)
    small = [bs.chunk(c) for i in range(20) for c in bs.file_chunk_ids(
        bs.lookup(bs.lookup(1, b"s"), str(i).encode()))]
    assert all(c.batch_size for c in small)


def unique_bytes(*results: BuildResult) -> int:
    return sum(b.uncompressed_size for r in results for b in r.blobs)


def test_shift_cdc_dedups_fixed_does_not(tmp_path):
    """Bytes inserted at the start of a large file between two versions: with cdc the second
    image (the first as --chunk-dict) stores little more than the insertion; with fixed-size
    chunks every chunk after it moves and is stored again."""
    v1 = data(6, 2 << 20)
    v2 = b"inserted at the start" * 50 + v1
    out = {}
    for name, opts in (("fixed", dict(chunk_size=0x4000)), ("cdc", CDC)):
        a = build(tmp_path, [layer({"f": v1})], compressor="none", **opts)
        b = build(tmp_path, [layer({"f": v2})], Bootstrap.from_bytes(a.bootstrap), compressor="none", **opts)
        out[name] = unique_bytes(b)
        img = Reader(tmp_path / name, b, a)
        try:
            assert img.read("f", 0, len(v2)) == v2
        finally:
            img.close()
    assert out["fixed"] >= len(v1)                 # nothing after the insertion dedups
    assert out["cdc"] <= 0x10000 + 2000            # the first chunk or two (≤ max_size) again


SIZE = 48 << 20


def test_cdc_conversion_memory_is_bounded_by_the_max_size_not_the_file(tmp_path):
    """A 48 MiB file (9.0 MiB peak at 16 MiB, 9.7 MiB at 96 MiB: flat) streamed from a tar on disk: the builder's Python allocations stay
    within a few max-size windows and pipeline slots, never the file."""
    import tracemalloc

    from tests.fixtures.imagegen import Content
    lay = Layer(compression="none")
    lay.file("huge", Content.random(SIZE, seed=3))
    tar = tmp_path / "layer.tar"
    with open(tar, "wb") as f:
        for piece in lay.tar_chunks():
            f.write(piece)
    work = tmp_path / "work"
    work.mkdir()
    b = Builder(BuildOptions(workers=2, compressor="none", chunker="cdc", chunk_size=0x10000), work)
    tracemalloc.start()
    try:
        with open(tar, "rb") as f:
            b.add_layer(tarlayer.iter_entries(f, "layer"), 0, f"sha256:{0:064x}", "layer")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    r = b.finish()
    assert sum(x.uncompressed_size for x in r.blobs) == SIZE
    # max_size 256 KiB: window ≤ 512 KiB, 6 pipeline slots, blob writer queues — not 48 MiB
    assert peak < 12 << 20, peak
