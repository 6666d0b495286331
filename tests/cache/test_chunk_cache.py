"""ChunkCache: store/read, persistence across instances, corruption and torn metadata caught,
write failures surfaced as CacheError."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from pathlib import Path

import pytest
import xxhash

from nydus_py.cache import chunk_cache as cc
from nydus_py.cache import entry as entry_mod
from nydus_py.cache import gc
from nydus_py.cache.chunk_cache import HEADER, RECORD, ChunkCache
from nydus_py.errors import CacheError
from nydus_py.format.bootstrap import BlobInfo, Chunk
from nydus_py.metrics import Metrics

SIZES = [4096, 4096, 4096, 1000]


def _blob(seed: bytes = b"b1") -> tuple[BlobInfo, list[tuple[Chunk, bytes]]]:
    items, off = [], 0
    for i, n in enumerate(SIZES):
        data = hashlib.sha256(seed + bytes([i])).digest() * (n // 32) + b"z" * (n % 32)
        items.append((Chunk(100 + i, 0, i, off * 2, n, off, n, False, hashlib.sha256(data).digest()), data))
        off += n
    info = BlobInfo("sha256:" + hashlib.sha256(seed).hexdigest(), "none", off, off, 100, len(SIZES))
    return info, items


def _paths(work: Path, info: BlobInfo) -> tuple[Path, Path]:
    """The cache entry of `info` (one table per blob in these tests)."""
    key = gc.entry_key(info.id.split(":")[1], entry_mod.untabled(info))
    return work / f"{key}.data", work / f"{key}.meta"


def test_store_then_read_and_missing(tmp_path):
    info, items = _blob()
    c = ChunkCache(tmp_path)
    h = c.open_blob(info)
    assert c.open_blob(info) == h
    assert c.missing(h, range(4)) == [0, 1, 2, 3]
    assert c.read(h, 1, items[1][0].offset, items[1][0].size) is None
    c.store_many(h, [items[1], items[3]])
    assert c.missing(h, range(4)) == [0, 2]
    for ch, data in (items[1], items[3]):
        assert c.read(h, ch.index, ch.offset, ch.size) == data
    assert c.used_bytes == SIZES[1] + SIZES[3]
    data_path, _ = _paths(tmp_path, info)
    assert data_path.stat().st_size == sum(SIZES)
    assert data_path.stat().st_blocks * 512 < sum(SIZES)  # sparse: chunk 0 and 2 not allocated


def test_ready_chunks_survive_a_new_instance(tmp_path):
    info, items = _blob()
    c = ChunkCache(tmp_path)
    h = c.open_blob(info)
    c.store_many(h, items[:3])
    c.close()
    c2 = ChunkCache(tmp_path)
    h2 = c2.open_blob(info)
    assert c2.missing(h2, range(4)) == [3]
    assert c2.used_bytes == sum(SIZES[:3])
    for ch, data in items[:3]:
        assert c2.read(h2, ch.index, ch.offset, ch.size) == data


def _flip(path: Path, pos: int) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x40]))


@pytest.mark.parametrize("mode", ["restart", "revalidate"])
def test_corrupt_data_byte_is_detected_marked_missing_and_restorable(tmp_path, mode):
    info, items = _blob()
    m = Metrics()
    c = ChunkCache(tmp_path, revalidate=(mode == "revalidate"), metrics=m)
    c.store_many(c.open_blob(info), items)
    if mode == "restart":       # rot or a torn write between runs: checked on first read
        c.close()
        c = ChunkCache(tmp_path, metrics=m)
    h = c.open_blob(info)
    data_path, _ = _paths(tmp_path, info)
    ch, data = items[2]
    _flip(data_path, ch.offset + 77)
    assert c.read(h, ch.index, ch.offset, ch.size, 70, 80) is None
    assert m.blobcache.value("cache_corrupt") == 1
    assert c.missing(h, range(4)) == [2]
    assert c.used_bytes == sum(SIZES) - ch.size
    # The cleared record is on disk too: a restarted daemon does not trust the chunk.
    c2 = ChunkCache(tmp_path)
    assert c2.missing(c2.open_blob(info), range(4)) == [2]
    # Refetched bytes can be stored again.
    c.store_many(h, [(ch, data)])
    assert c.read(h, ch.index, ch.offset, ch.size) == data


def test_after_the_first_check_only_the_requested_slice_is_read(tmp_path):
    info, items = _blob()
    c = ChunkCache(tmp_path)
    c.store_many(c.open_blob(info), items)
    c.close()
    c = ChunkCache(tmp_path)
    h = c.open_blob(info)
    ch, data = items[1]
    assert c.read(h, 1, ch.offset, ch.size, 100, 200) == data[100:200]   # full check, then slice
    _flip(_paths(tmp_path, info)[0], ch.offset + 3000)
    assert c.read(h, 1, ch.offset, ch.size, 100, 200) == data[100:200]   # trusted: slice only
    assert c.read(h, 1, ch.offset, ch.size, 0, 0) == b""
    with pytest.raises(ValueError):
        c.read(h, 1, ch.offset, ch.size, 10, ch.size + 1)


def test_torn_record_with_bad_ready_byte_counts_as_not_ready(tmp_path):
    info, items = _blob()
    c = ChunkCache(tmp_path)
    c.store_many(c.open_blob(info), items)
    c.close()
    _, meta = _paths(tmp_path, info)
    with open(meta, "r+b") as f:
        f.seek(HEADER.size + 1 * RECORD.size)
        f.write(b"\x7f")                          # neither 0 nor READY
        f.seek(HEADER.size + 3 * RECORD.size + 8)
        f.write(b"\xde\xad\xbe\xef")              # ready, but xxh3 torn
    c2 = ChunkCache(tmp_path)
    h = c2.open_blob(info)
    assert c2.missing(h, range(4)) == [1]         # record 3 still claims ready...
    ch, _ = items[3]
    assert c2.read(h, 3, ch.offset, ch.size) is None  # ...until its xxh3 fails
    assert c2.missing(h, range(4)) == [1, 3]
    assert c2.read(h, 0, items[0][0].offset, SIZES[0]) == items[0][1]


def test_record_size_mismatch_is_not_trusted(tmp_path):
    info, items = _blob()
    c = ChunkCache(tmp_path)
    h = c.open_blob(info)
    c.store_many(h, items[:1])
    assert c.read(h, 0, 0, SIZES[0] - 1) is None


@pytest.mark.parametrize("damage", ["truncate-meta", "garbage-header", "wrong-data-size", "other-blob"])
def test_meta_that_does_not_match_resets_the_blob_cache(tmp_path, damage):
    info, items = _blob()
    c = ChunkCache(tmp_path)
    c.store_many(c.open_blob(info), items)
    c.close()
    data_path, meta = _paths(tmp_path, info)
    if damage == "truncate-meta":
        os.truncate(meta, 30)
    elif damage == "garbage-header":
        with open(meta, "r+b") as f:
            f.write(b"garbage!")
    elif damage == "wrong-data-size":
        os.truncate(data_path, 10)
    else:
        other, _ = _blob(b"other")
        other_meta = _paths(tmp_path, other)[1]
        meta.rename(other_meta)
        meta = other_meta
        info = other
    c2 = ChunkCache(tmp_path)
    h = c2.open_blob(info)
    assert c2.missing(h, range(4)) == [0, 1, 2, 3]
    assert c2.used_bytes == 0
    assert _paths(tmp_path, info)[0].stat().st_size == info.uncompressed_size


def test_write_error_is_cache_error_with_errno_and_chunk_stays_missing(tmp_path, monkeypatch):
    info, items = _blob()
    m = Metrics()
    c = ChunkCache(tmp_path, metrics=m)
    h = c.open_blob(info)
    real = cc._pwrite_all
    calls = []

    def full_disk(fd, data, offset):
        calls.append(offset)
        if len(calls) == 2:                      # second chunk's data: disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data, offset)

    monkeypatch.setattr(cc, "_pwrite_all", full_disk)
    with pytest.raises(CacheError) as ei:
        c.store_many(h, items[:3])
    assert ei.value.errno == errno.ENOSPC and info.id in str(ei.value)
    assert c.missing(h, range(4)) == [1, 2, 3]   # chunk 0 was written, so it is committed
    assert m.blobcache.value("store_errors") == 1
    monkeypatch.setattr(cc, "_pwrite_all", real)
    c.store_many(h, items[1:3])
    assert c.missing(h, range(4)) == [3]


def test_max_size_without_room_to_evict_is_enospc(tmp_path):
    """Eviction frees chunks of this process's blobs; a store bigger than the limit fails."""
    info, items = _blob()
    c = ChunkCache(tmp_path, max_size=SIZES[3])
    h = c.open_blob(info)
    with pytest.raises(CacheError) as ei:
        c.store_many(h, items[:1])
    assert ei.value.errno == errno.ENOSPC
    assert c.missing(h, range(4)) == [0, 1, 2, 3]
    c.store_many(h, items[3:])


def test_concurrent_store_and_read_from_threads(tmp_path):
    blobs = [_blob(bytes([i])) for i in range(4)]
    c = ChunkCache(tmp_path)
    handles = [c.open_blob(info) for info, _ in blobs]
    bad = []

    def worker(k: int) -> None:
        for rnd in range(30):
            info, items = blobs[(k + rnd) % 4]
            h = handles[(k + rnd) % 4]
            c.store_many(h, items[rnd % 4:rnd % 4 + 2])
            for ch, data in items:
                got = c.read(h, ch.index, ch.offset, ch.size)
                if got is not None and got != data:
                    bad.append((k, rnd, ch.index))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bad == []
    assert c.used_bytes == sum(len(d) for _, items in blobs for _, d in items)


def _forge(work: Path, info: BlobInfo, ch: Chunk, evil: bytes) -> None:
    """Someone with write access to the cache replaces a chunk and fixes up its xxh3."""
    data_path, meta = _paths(work, info)
    with open(data_path, "r+b") as f:
        f.seek(ch.offset)
        f.write(evil)
    with open(meta, "r+b") as f:
        f.seek(HEADER.size + ch.index * RECORD.size)
        f.write(RECORD.pack(1, len(evil), xxhash.xxh3_64_intdigest(evil)))


def test_digest_validate_checks_every_hit_against_the_readers_sha256(tmp_path):
    info, items = _blob()
    c = ChunkCache(tmp_path)
    c.store_many(c.open_blob(info), items)
    c.close()
    ch, good = items[1]
    evil = bytes(len(good))
    _forge(tmp_path, info, ch, evil)
    plain = ChunkCache(tmp_path)                       # xxh3 alone cannot tell (documented)
    assert plain.read(plain.open_blob(info), ch.index, ch.offset, ch.size, digest=ch.digest) == evil
    plain.close()
    m = Metrics()
    strict = ChunkCache(tmp_path, validate=True, metrics=m)
    h = strict.open_blob(info)
    assert strict.read(h, ch.index, ch.offset, ch.size, digest=ch.digest) is None
    assert m.blobcache.value("digest_errors") == 1 and strict.missing(h, [ch.index]) == [ch.index]
    for other, data in (items[0], items[2]):           # good chunks: served, every time
        for _ in range(2):
            assert strict.read(h, other.index, other.offset, other.size, 5, 9, other.digest) == data[5:9]
    strict.store_many(h, [(ch, good)])
    assert strict.read(h, ch.index, ch.offset, ch.size, digest=ch.digest) == good
    _forge(tmp_path, info, ch, evil)                   # changed while this process runs
    strict._blobs[h].records[ch.index * RECORD.size:(ch.index + 1) * RECORD.size] = \
        RECORD.pack(1, len(evil), xxhash.xxh3_64_intdigest(evil))
    assert strict.read(h, ch.index, ch.offset, ch.size, digest=ch.digest) is None
    assert m.blobcache.value("digest_errors") == 2


def test_a_store_never_rewrites_a_chunk_another_process_stored(tmp_path, monkeypatch):
    info, items = _blob()
    a, b = ChunkCache(tmp_path), ChunkCache(tmp_path)
    ha, hb = a.open_blob(info), b.open_blob(info)
    a.store_many(ha, items[:2])
    writes = []
    real = cc._pwrite_all
    monkeypatch.setattr(cc, "_pwrite_all", lambda fd, d, off: (writes.append(off), real(fd, d, off)))
    b.store_many(hb, items[:3])                        # b has not seen a's chunks in memory
    assert items[0][0].offset not in writes and items[1][0].offset not in writes
    assert items[2][0].offset in writes
    assert b.missing(hb, range(4)) == [3]
    assert b.read(hb, 0, items[0][0].offset, items[0][0].size) == items[0][1]


def test_read_nowait_checks_a_chunk_on_its_first_read_and_never_means_missing(tmp_path):
    info, items = _blob()
    (c0, d0), (c1, _) = items[0], items[1]
    m = Metrics()
    cache = ChunkCache(tmp_path)
    h = cache.open_blob(info)
    assert cache.read_nowait(h, 0, c0.offset, c0.size, 0, 10) is None      # not stored
    cache.store_many(h, [(c0, d0)])
    assert cache.read_nowait(h, 0, c0.offset, c0.size, 100, 300) == d0[100:300]  # stored here
    assert cache.read_nowait(h, 1, c1.offset, c1.size, 0, 10) is None
    cache.close()
    again = ChunkCache(tmp_path, metrics=m)     # a new process: nothing checked yet
    h2 = again.open_blob(info)
    # the whole chunk is in the page cache (just written): read whole, xxh3-checked, served
    assert again.read_nowait(h2, 0, c0.offset, c0.size, 4000, 4096) == d0[4000:]
    assert m.blobcache.value("nowait_checks") == 1
    assert again.read_nowait(h2, 0, c0.offset, c0.size, 0, 10) == d0[:10]    # checked now
    assert m.blobcache.value("nowait_checks") == 1
    strict = ChunkCache(tmp_path, validate=True)    # digest_validate: every hit is read()'s
    h3 = strict.open_blob(info)
    assert strict.read(h3, 0, c0.offset, c0.size, 0, 10, c0.digest) == d0[:10]
    assert strict.read_nowait(h3, 0, c0.offset, c0.size, 0, 10) is None


@pytest.mark.parametrize("mode", ["restart", "revalidate"])
def test_read_nowait_never_serves_a_chunk_failing_its_check(tmp_path, mode):
    """The first-read check on the loop is the same xxh3 check as `read`'s: a torn or rotten
    chunk (here: a flipped byte, in the page cache) is not served, not marked checked, and
    `read` then drops it (counted once) so that it is fetched again."""
    info, items = _blob()
    m = Metrics()
    c = ChunkCache(tmp_path, revalidate=(mode == "revalidate"), metrics=m)
    c.store_many(c.open_blob(info), items)
    if mode == "restart":
        c.close()
        c = ChunkCache(tmp_path, metrics=m)
    h = c.open_blob(info)
    ch, data = items[2]
    _flip(_paths(tmp_path, info)[0], ch.offset + 77)
    for _ in range(2):
        assert c.read_nowait(h, ch.index, ch.offset, ch.size, 0, 100) is None
    assert m.blobcache.value("cache_corrupt") == 0 and m.blobcache.value("nowait_checks") == 0
    assert c.read(h, ch.index, ch.offset, ch.size, 0, 100) is None
    assert m.blobcache.value("cache_corrupt") == 1
    assert c.missing(h, range(4)) == [2]
    assert c.read_nowait(h, ch.index, ch.offset, ch.size, 0, 100) is None   # missing now
    # its neighbours are unharmed and still checked on the loop
    c1, d1 = items[1]
    assert c.read_nowait(h, 1, c1.offset, c1.size, 0, c1.size) == d1


def test_read_nowait_leaves_small_slices_of_big_unchecked_chunks_to_read(tmp_path):
    """Checking a big chunk means copying and hashing all of it on the event loop: only when
    the read wants half of it or more (or the chunk is small)."""
    big = cc.NOWAIT_CHECK_SMALL * 2
    data = os.urandom(big)
    ch = Chunk(7, 0, 0, 0, big, 0, big, False, hashlib.sha256(data).digest())
    info = BlobInfo("sha256:" + "ab" * 32, "none", big, big, 7, 1)
    c = ChunkCache(tmp_path)
    c.store_many(c.open_blob(info), [(ch, data)])
    c.close()
    m = Metrics()
    c = ChunkCache(tmp_path, metrics=m)
    h = c.open_blob(info)
    assert c.read_nowait(h, 0, 0, big, 0, 4096) is None
    assert c.read_nowait(h, 0, 0, big, 4096, 4096 + big // 2) == data[4096:4096 + big // 2]
    assert c.read_nowait(h, 0, 0, big, 0, 4096) == data[:4096]      # checked by now
    assert m.blobcache.value("nowait_checks") == 1