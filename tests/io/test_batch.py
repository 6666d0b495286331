"""Batch chunks (format v2) on the read path: small chunks compressed together, fetched as one
range, decoded once, each member verified by its own sha256 and cached; a corrupt batch serves
nothing. Real files: LocalFsBackend → MeteredBackend → ChunkCache on disk."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest
import trio

from nydus_py.cache.chunk_cache import ChunkCache
from nydus_py.errors import FormatError, IntegrityError
from nydus_py.format.bootstrap import ROOT_INO, Bootstrap
from nydus_py.io.fetch import Range, add_batch_siblings, decode_chunk
from nydus_py.io.reader import FileReader
from nydus_py.metrics import Metrics
from nydus_py.storage.localfs import LocalFsBackend
from nydus_py.storage.wrappers import MeteredBackend
from tests.fixtures.nydus_build import build

CS = 4096


def text(n: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    words = [bytes(rnd.choices(b"abcdefghij \n", k=7)) for _ in range(40)]
    return b"".join(rnd.choice(words) for _ in range(n // 7 + 1))[:n]


class Img:
    def __init__(self, tmp: Path, files: dict[str, bytes], batch_size: int, amplify_io: int = 0):
        self.built = build(files, chunk_size=CS, batch_size=batch_size)
        self.built.write(tmp / "blobs", tmp / "bootstrap")
        (self.blob_id,) = self.built.blobs
        self.blob_path = tmp / "blobs" / self.blob_id.split(":")[1]
        self.bs = Bootstrap.from_bytes(self.built.bootstrap)
        self.metrics = Metrics()
        backend = MeteredBackend(LocalFsBackend(tmp / "blobs"), self.metrics.backend)
        self.cache = ChunkCache(tmp / "cache", metrics=self.metrics)
        self.reader = FileReader(self.bs, backend, self.cache, limiter=trio.CapacityLimiter(4),
                                 amplify_io=amplify_io, metrics=self.metrics)

    def ino(self, path: str) -> int:
        return self.bs.lookup(ROOT_INO, path.encode())

    def read(self, path: str, offset: int = 0, size: int = 1 << 20) -> bytes:
        return trio.run(self.reader.read, self.ino(path), offset, size)

    def chunks_of(self, path: str):
        return [self.bs.chunk(i) for i in self.bs.file_chunk_ids(self.ino(path))]

    @property
    def requests(self) -> int:
        return self.metrics.backend.value("read_count")


FILES = {f"f{i}": text(300 + 97 * i, i) for i in range(12)} | {"big": text(3 * CS + 5, 99)}


def test_batched_image_is_v2_and_reads_back_every_file(tmp_path):
    img = Img(tmp_path, FILES, batch_size=CS)
    assert img.bs.version == 2
    members = img.chunks_of("f3")
    assert members[0].batch_size and members[0].compressed
    assert not img.chunks_of("big")[0].batch_size          # a full chunk is stored alone
    assert img.chunks_of("big")[-1].batch_size              # its 5-byte tail is batched
    for path, data in FILES.items():
        assert img.read(path) == data, path


def test_one_member_read_fetches_its_batch_once_and_caches_every_member(tmp_path):
    img = Img(tmp_path, FILES, batch_size=CS)
    target = img.chunks_of("f5")[0]
    batch_mates = [c for p in FILES for c in img.chunks_of(p) if c.comp_offset == target.comp_offset]
    assert len(batch_mates) >= 3 and any(c.index < target.index for c in batch_mates)
    assert img.read("f5") == FILES["f5"]
    assert img.requests == 1
    h = img.reader._handles[target.blob]
    assert img.cache.missing(h, [c.index for c in batch_mates]) == []
    for p in FILES:   # the other members come from the cache: no new request for them
        if img.chunks_of(p)[0].comp_offset == target.comp_offset and len(FILES[p]) < CS:
            assert img.read(p) == FILES[p]
    assert img.requests == 1


def test_corrupt_batch_serves_nothing_and_caches_nothing(tmp_path):
    img = Img(tmp_path, FILES, batch_size=CS)
    target = img.chunks_of("f2")[0]
    raw = bytearray(img.blob_path.read_bytes())
    raw[target.comp_offset + target.comp_size // 2] ^= 0x01
    img.blob_path.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError) as ei:
        img.read("f2")
    assert img.blob_id in str(ei.value) and "/f2" in str(ei.value)
    assert img.cache.missing(img.reader._handles[0], [target.index]) == [target.index]
    assert img.metrics.fs.value("integrity_errors") >= 1


def test_member_with_a_wrong_digest_is_refused_even_if_the_batch_decodes():
    data = b"".join(text(500, s) for s in range(3))
    import zstandard
    z = zstandard.ZstdCompressor().compress(data)
    from nydus_py.format.bootstrap import BlobInfo, Chunk
    blob = BlobInfo("sha256:" + "0" * 64, "zstd", len(z), len(data), 0, 3)
    member = Chunk(1, 0, 1, 0, len(z), 500, 500, True, hashlib.sha256(data[500:1000]).digest(), 500, len(data))
    frames: dict[int, bytes] = {}
    assert decode_chunk(blob, member, z, frames) == data[500:1000]
    assert frames == {0: data}
    with pytest.raises(IntegrityError):
        decode_chunk(blob, member._replace(batch_offset=400), z, {})
    with pytest.raises(IntegrityError):   # batch size the frame does not decode to
        decode_chunk(blob, member._replace(batch_size=len(data) - 1), z, {})


def test_add_batch_siblings_adds_neighbours_sharing_the_frame_as_readahead():
    from nydus_py.format.bootstrap import Chunk

    def ch(i, off, bsize=100):
        return Chunk(i, 0, i, off, 50, i * 10, 10, True, b"", (i % 3) * 10, bsize)
    chunks = [ch(0, 0), ch(1, 0), ch(2, 0), ch(3, 50), ch(4, 50)]
    r = Range(0, 0, 50, [chunks[1]])
    n = add_batch_siblings(r, lambda i: chunks[i], len(chunks), lambda c: c.index != 2)
    assert n == 1 and [c.index for c in r.chunks] == [1, 0] and r.readahead == 1
    assert r.end == 50


def test_v1_bootstrap_with_a_batch_flag_or_v2_with_a_bad_batch_is_refused(tmp_path):
    import msgpack

    from nydus_py.format import bootstrap as fmt
    built = build(FILES, chunk_size=CS, batch_size=CS)
    doc = msgpack.unpackb(built.bootstrap, raw=False)
    assert doc["version"] == 2
    old = dict(doc, version=1)
    old.pop("batch")
    with pytest.raises(FormatError, match="unknown flags 0x3"):   # v1 knows no batch flag
        Bootstrap(old)
    member = next(i for i in range(len(doc["chunks"]) // fmt.CHUNK.size)
                  if fmt.CHUNK.unpack_from(doc["chunks"], i * fmt.CHUNK.size)[5] & 2)
    with pytest.raises(FormatError, match="batch column"):
        Bootstrap(dict(doc, batch=doc["batch"][:-8]))
    for boff, bsize in [(0, fmt.MAX_BATCH + 1), (CS, CS), (0, 0)]:
        bad = bytearray(doc["batch"])
        fmt.BATCH.pack_into(bad, member * fmt.BATCH.size, boff, bsize)
        with pytest.raises(FormatError, match="bad batch"):
            Bootstrap(dict(doc, batch=bytes(bad))).chunk(member)


def test_unbatched_image_stays_v1(tmp_path):
    img = Img(tmp_path, FILES, batch_size=0)
    assert img.bs.version == 1
    assert img.read("f4") == FILES["f4"]
