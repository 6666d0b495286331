"""Format v3 (variable-size chunks, `--chunker cdc`): v1/v2 bootstraps are still written
byte for byte as before (pinned digests), v3 is pinned too, and a hostile v3 chunk layout is
refused at load with one line (docs/format.md, "Variable-size chunks")."""

from __future__ import annotations

import hashlib
import random
import struct

import msgpack
import pytest

from nydus_py.errors import FormatError
from nydus_py.format import bootstrap as fmt
from nydus_py.format.bootstrap import Bootstrap
from nydus_py.format.limits import MAX_CHUNK_SIZE
from tests.fixtures.nydus_build import build

rnd = random.Random(7)
FILES = {"a/big": rnd.randbytes(5 * 4096 + 77), "a/small": b"hello\n", "b/text": b"abc" * 3000,
         "empty": b""}


def split(data: bytes) -> list[bytes]:
    """Deterministic variable cuts: 1000, 3000, 5000, 1000, ... bytes."""
    out, pos, k = [], 0, 0
    while pos < len(data):
        n = (1000, 3000, 5000)[k % 3]
        out.append(data[pos:pos + n])
        pos, k = pos + n, k + 1
    return out


# -- golden bytes -------------------------------------------------------------------------------

@pytest.mark.parametrize("batch_size, version, digest", [
    (0, 1, "e343911232dd13096bd32e32b1c7c1abe188148d99cb9b596d90a7daf02a6e31"),
    (8192, 2, "4a41de2677732410357d66529bd070c87908bab42f86fea8083adea542b9d549"),
])
def test_v1_v2_bootstraps_are_written_exactly_as_before(batch_size, version, digest):
    """Digests taken from the builder before format v3 existed: fixed-size images keep their
    bytes, so their blobs, cache entries and learned lists stay valid."""
    b = build(FILES, chunk_size=4096, batch_size=batch_size, compressor="none")
    assert Bootstrap.from_bytes(b.bootstrap).version == version
    assert hashlib.sha256(b.bootstrap).hexdigest() == digest


def test_v3_golden_and_reads_back():
    b = build(FILES, chunk_size=4096, batch_size=8192, compressor="none", split=split)
    bs = Bootstrap.from_bytes(b.bootstrap)
    assert bs.version == 3 and bs.variable
    doc = msgpack.unpackb(b.bootstrap, raw=False)
    assert set(doc) - {"batch", "chunk_offsets"} == set(msgpack.unpackb(
        build(FILES, compressor="none").bootstrap, raw=False))
    for path, data in FILES.items():
        ino = 1
        for name in path.split("/"):
            ino = bs.lookup(ino, name.encode())
        ids, offs = bs.file_chunk_ids(ino), bs.file_chunk_offsets(ino)
        assert [bs.chunk(c).size for c in ids] == [len(p) for p in split(data)]
        assert list(offs) == [sum(len(p) for p in split(data)[:k]) for k in range(len(ids))]
        for off in range(0, len(data), 333):
            k = bs.chunk_index(ino, off)
            assert offs[k] <= off < offs[k] + bs.chunk(ids[k]).size
    assert hashlib.sha256(b.bootstrap).hexdigest() == \
        "3ebd36ac73c08a3e6542bcf2c1c4939743b6d05c630f88088bd6d1dae28780d0"


# -- hostile v3 ---------------------------------------------------------------------------------

def v3_doc(batch_size: int = 0) -> dict:
    return msgpack.unpackb(build(FILES, chunk_size=4096, batch_size=batch_size, compressor="none",
                                 split=split).bootstrap, raw=False)


def _big_ino(doc: dict) -> int:
    bs = Bootstrap(doc)
    return bs.lookup(bs.lookup(1, b"a"), b"big")


def _set_off(doc: dict, ref: int, value: int) -> dict:
    col = bytearray(doc["chunk_offsets"])
    struct.pack_into("<Q", col, ref * 8, value)
    return dict(doc, chunk_offsets=bytes(col))


def _set_chunk(doc: dict, cid: int, field: int, value: int) -> dict:
    col = bytearray(doc["chunks"])
    vals = list(fmt.CHUNK.unpack_from(col, cid * fmt.CHUNK.size))
    vals[field] = value
    fmt.CHUNK.pack_into(col, cid * fmt.CHUNK.size, *vals)
    return dict(doc, chunks=bytes(col))


def _refused(doc: dict, match: str) -> None:
    with pytest.raises(FormatError, match=match) as e:
        Bootstrap(doc)
    assert "\n" not in str(e.value)


def test_hostile_offsets_are_refused_at_load():
    doc = v3_doc()
    bs = Bootstrap(doc)
    ino = _big_ino(doc)
    start = bs._raw(ino)[9]
    offs = list(bs.file_chunk_offsets(ino))
    _refused(_set_off(doc, start + 2, offs[2] + 1), "without gap or overlap")        # a gap
    _refused(_set_off(doc, start + 2, offs[2] - 1), "without gap or overlap")        # overlap
    _refused(_set_off(doc, start, 5), "without gap or overlap|not 0")                 # first ≠ 0
    _refused(_set_off(doc, start + 1, 0), "without gap or overlap")
    _refused(dict(doc, chunk_offsets=doc["chunk_offsets"][:-8]), "chunk_offsets")
    _refused(_set_off(doc, start + 1, (1 << 64) - 1), "overflows|without gap")


def test_hostile_chunk_sizes_are_refused_at_load():
    doc = v3_doc()
    bs = Bootstrap(doc)
    ino = _big_ino(doc)
    last = bs.file_chunk_ids(ino)[-1]
    size = bs.chunk(last).size
    # sizes that do not add up to the file size (the blob layout shifted along with it)
    _refused(_set_chunk(doc, last, 4, size - 1), "chunk|inode")
    end = bs.chunk_count - 1                 # the blob's last chunk: no neighbour moves
    _refused(_set_chunk(doc, end, 4, 0), "size 0 is not")                               # zero-size
    huge = dict(_set_chunk(doc, end, 4, MAX_CHUNK_SIZE + 1),
                blobs=[dict(doc["blobs"][0], uncompressed_size=1 << 40)])
    _refused(huge, f"is not 1..{MAX_CHUNK_SIZE}")
    # the file's size changed instead: the chunks no longer end at it
    col = bytearray(doc["inodes"])
    vals = list(fmt.INODE.unpack_from(col, (ino - 1) * fmt.INODE.size))
    vals[4] += 1
    fmt.INODE.pack_into(col, (ino - 1) * fmt.INODE.size, *vals)
    _refused(dict(doc, inodes=bytes(col)), "chunks end at")


def test_hostile_refs_are_refused_at_load():
    doc = v3_doc()
    bs = Bootstrap(doc)
    ino = _big_ino(doc)
    col = bytearray(doc["chunk_refs"])
    struct.pack_into("<I", col, bs._raw(ino)[9] * 4, bs.chunk_count + 5)
    _refused(dict(doc, chunk_refs=bytes(col)), "out of range")
    col = bytearray(doc["inodes"])
    vals = list(fmt.INODE.unpack_from(col, (ino - 1) * fmt.INODE.size))
    vals[9] += 1                                     # refs no longer tile chunk_refs
    fmt.INODE.pack_into(col, (ino - 1) * fmt.INODE.size, *vals)
    _refused(dict(doc, inodes=bytes(col)), "tile chunk_refs")


def test_v3_batch_flag_needs_the_batch_column():
    doc = v3_doc(batch_size=8192)
    assert "batch" in doc and Bootstrap(doc).version == 3
    no_batch = dict(doc)
    del no_batch["batch"]
    _refused(no_batch, "unknown flags")
    assert "batch" not in v3_doc(0)                  # written only when some chunk is a member


def test_learned_recorder_maps_offsets_to_v3_chunks():
    """The learned prefetch list records the chunks a read touched: a binary search of the
    file's chunk offsets for v3 (splits of 1000/3000/5000 bytes), not offset // chunk_size."""
    from nydus_py.io.learned import ChunkRecorder
    bs = Bootstrap.from_bytes(build(FILES, chunk_size=4096, compressor="none", split=split).bootstrap)
    ino = bs.lookup(bs.lookup(1, b"a"), b"big")
    ids = list(bs.file_chunk_ids(ino))
    rec = ChunkRecorder(bs)
    rec.record(ino, 3999, 2)            # bytes 3999..4000: chunk 1 (1000..3999) and 2 (4000..8999)
    assert rec.chunks == ids[1:3]
    rec.record(ino, 9000, 10 ** 6)      # chunk 3 (9000..9999) to the end of the file
    assert rec.chunks == ids[1:]
    rec.record(ino, len(FILES["a/big"]), 10)   # at EOF: nothing
    assert rec.chunks == ids[1:]
