"""Cache size limit: LRU eviction of unused blobs and own chunks, never of blobs another
process has open; `collect` (nydusd cache gc); readers racing an eviction never see holes."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nydus_py.cache import entry as entry_mod
from nydus_py.cache import gc
from nydus_py.cache.chunk_cache import ChunkCache
from nydus_py.errors import CacheError
from nydus_py.format.bootstrap import BlobInfo, Chunk

N, SIZE = 8, 64 << 10


def _blob(seed: bytes, n: int = N, size: int = SIZE):
    items = []
    for i in range(n):
        data = hashlib.sha256(seed + bytes([i])).digest() * (size // 32)
        items.append((Chunk(i, 0, i, i * size, size, i * size, size, False,
                            hashlib.sha256(data).digest()), data))
    info = BlobInfo("sha256:" + hashlib.sha256(seed).hexdigest(), "none", n * size, n * size, 0, n)
    return info, items


def _key(info: BlobInfo) -> str:
    return gc.entry_key(info.id.split(":")[1], entry_mod.untabled(info))


def _set_last_use(cache_dir, info: BlobInfo, when: float) -> None:
    """A blob's LRU age is its meta file's mtime (cache/gc.py): set it, rather than sleeping
    between stores and hoping the filesystem's timestamps tell them apart."""
    os.utime(cache_dir / f"{_key(info)}.meta", (when, when))


def _open(c: ChunkCache, info: BlobInfo) -> int:
    return c.open_blob(info, offset_of=lambda i: i * SIZE)


def _disk(work: Path, info: BlobInfo) -> int:
    return sum(p.stat().st_blocks * 512 for p in work.glob(info.id.split(":")[1] + "-*.data"))


def test_lru_chunks_are_evicted_to_stay_under_the_limit(tmp_path):
    info, items = _blob(b"a")
    c = ChunkCache(tmp_path, max_size=4 * SIZE)
    h = _open(c, info)
    c.store_many(h, items[:4])
    assert c.read(h, 0, 0, SIZE) == items[0][1]         # chunk 0 is now the most recent
    c.store_many(h, items[4:5])
    assert c.total_bytes <= 4 * SIZE
    ready = [i for i in range(N) if c.is_ready(h, i)]
    assert 0 in ready and 4 in ready and 1 not in ready  # 1 was least recently used
    assert c.read(h, 1, SIZE, SIZE) is None
    for i in ready:
        assert c.read(h, i, i * SIZE, SIZE) == items[i][1]
    # the evicted chunks' blocks are given back (hole punched)
    assert _disk(tmp_path, info) <= 4 * SIZE + 8192
    c.close()
    c2 = ChunkCache(tmp_path)                            # persisted: records cleared on disk
    h2 = _open(c2, info)
    assert [i for i in range(N) if c2.is_ready(h2, i)] == ready


def test_unused_blobs_go_first_least_recently_used_first(tmp_path):
    old, new, cur = _blob(b"old"), _blob(b"new"), _blob(b"cur")
    for age, (info, items) in enumerate((old, new)):
        c = ChunkCache(tmp_path)
        c.store_many(_open(c, info), items)
        c.close()
        _set_last_use(tmp_path, info, 1_000_000 + 100 * age)
    c = ChunkCache(tmp_path, max_size=(N + N) * SIZE)
    h = _open(c, cur[0])
    c.store_many(h, cur[1][:4])                           # needs room: "old" goes, "new" stays
    hexes = {p.name.split(".")[0].split("-")[0] for p in tmp_path.iterdir()}
    assert old[0].id.split(":")[1] not in hexes
    assert new[0].id.split(":")[1] in hexes
    assert all(c.is_ready(h, i) for i in range(4))
    assert c.total_bytes <= (N + N) * SIZE


HOLDER = r"""
import sys
from nydus_py.cache.chunk_cache import ChunkCache
from nydus_py.format.bootstrap import BlobInfo
c = ChunkCache(sys.argv[1])
c.open_blob(BlobInfo(sys.argv[2], "none", int(sys.argv[3]), int(sys.argv[3]), 0, int(sys.argv[4])))
print("held", flush=True)
sys.stdin.read()
"""


def test_a_blob_another_process_uses_is_never_evicted(tmp_path):
    info, items = _blob(b"shared")
    c = ChunkCache(tmp_path)
    c.store_many(_open(c, info), items)
    c.close()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), info.id,
                               str(N * SIZE), str(N)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        other, oitems = _blob(b"other")
        c = ChunkCache(tmp_path, max_size=N * SIZE + SIZE)
        h = _open(c, other)
        c.store_many(h, oitems[:1])
        with pytest.raises(CacheError) as ei:             # only the shared blob could make room
            c.store_many(h, oitems[1:3])
        assert ei.value.errno == errno.ENOSPC
        assert gc.collect(tmp_path, 0, skip=[_key(other)]).busy_blobs == [_key(info)]
        c.close()
    finally:
        holder.stdin.close()
        holder.wait(10)
    report = gc.collect(tmp_path, 0)                      # released: now collectable
    assert _key(info) in report.removed_blobs


def test_collect_trims_to_max_size_and_removes_garbage(tmp_path):
    blobs = [_blob(bytes([i])) for i in range(3)]
    for age, (info, items) in enumerate(blobs):
        c = ChunkCache(tmp_path)
        c.store_many(_open(c, info), items)
        c.close()
        _set_last_use(tmp_path, info, 1_000_000 + 100 * age)
    (tmp_path / ("f" * 64 + ".data")).write_bytes(b"x" * 100)   # orphan data file
    report = gc.collect(tmp_path, 2 * N * SIZE)
    assert report.before == 3 * N * SIZE and report.after == 2 * N * SIZE
    assert report.removed_blobs == ["f" * 64, _key(blobs[0][0])]
    assert gc.collect(tmp_path, 0).after == 0
    assert list(tmp_path.iterdir()) == []


def test_readers_racing_evictions_get_the_bytes_or_a_miss_never_holes(tmp_path):
    info, items = _blob(b"race", n=4)
    c = ChunkCache(tmp_path, max_size=10 * N * SIZE)
    h = _open(c, info)
    stop = time.monotonic() + 1.5
    bad, reads = [], [0]

    def reader():
        while time.monotonic() < stop:
            for i in range(4):
                got = c.read(h, i, i * SIZE, SIZE, 100, 5000)
                if got is None:                 # like the read path: fetch and store it
                    c.store_many(h, [items[i]])
                else:
                    reads[0] += 1
                    if got != items[i][1][100:5000]:
                        bad.append(i)

    def churn():
        while time.monotonic() < stop:
            c._evict_own_chunks(2 * SIZE)

    ts = [threading.Thread(target=reader) for _ in range(3)] + [threading.Thread(target=churn)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not bad and reads[0] > 100


def test_parse_size():
    assert gc.parse_size("4096") == 4096
    assert gc.parse_size("512M") == 512 << 20
    assert gc.parse_size("1.5GiB") == 3 << 29
    with pytest.raises(ValueError):
        gc.parse_size("lots")


def test_collect_removes_the_leftovers_of_a_creator_that_died(tmp_path):
    info, items = _blob(b"t")
    c = ChunkCache(tmp_path)
    c.store_many(_open(c, info), items)
    key = _key(info)
    for ext in ("data", "meta"):
        (tmp_path / f".{key}.{ext}.new").write_bytes(b"x" * 8192)
    report = gc.collect(tmp_path, 1 << 30)
    assert report.removed_bytes >= 16384 and report.removed_blobs == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{key}.data", f"{key}.meta"]
    c.close()
