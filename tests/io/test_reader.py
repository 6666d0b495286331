"""FileReader end to end over real files: LocalFsBackend → MeteredBackend → ChunkCache on disk,
real worker threads. Backend traffic is counted by MeteredBackend (metrics.backend)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from nydus_py.cache import chunk_cache as cc
from nydus_py.cache.chunk_cache import ChunkCache
from nydus_py.errors import BackendError, BlobNotFoundError, IntegrityError
from nydus_py.format.bootstrap import ROOT_INO, Bootstrap
from nydus_py.io.reader import FileReader
from nydus_py.metrics import Metrics
from nydus_py.retry import RetryPolicy
from nydus_py.storage.localfs import LocalFsBackend
from nydus_py.storage.wrappers import MeteredBackend, RetryingBackend
from tests.fixtures.nydus_build import build

CS = 4096


def compressible(n: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    words = [bytes(rnd.choices(b"abcdefgh", k=8)) for _ in range(16)]
    return b"".join(rnd.choice(words) for _ in range(n // 8 + 1))[:n]


def incompressible(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


class Image:
    def __init__(self, tmp: Path, files: dict[str, bytes], *, compressor="zstd", chunk_size=CS,
                 amplify_io=1 << 20, wrap=None, limiter_tokens=4, work_dir=None,
                 readahead_window=8 << 20):
        self.tmp = tmp
        self.built = build(files, chunk_size=chunk_size, compressor=compressor)
        self.built.write(tmp / "blobs", tmp / "bootstrap")
        self.bs = Bootstrap.from_bytes(self.built.bootstrap)
        self.metrics = Metrics()
        self.local = LocalFsBackend(tmp / "blobs")
        backend = MeteredBackend(wrap(self.local) if wrap else self.local, self.metrics.backend)
        self.backend = backend
        self.cache = ChunkCache(work_dir or tmp / "cache", metrics=self.metrics)
        self.limiter = trio.CapacityLimiter(limiter_tokens)
        self.reader = FileReader(self.bs, backend, self.cache, limiter=self.limiter,
                                 amplify_io=amplify_io, metrics=self.metrics,
                                 readahead_window=readahead_window)

    def ino(self, path: str) -> int:
        ino = ROOT_INO
        for part in path.split("/"):
            ino = self.bs.lookup(ino, part.encode())
        return ino

    def read(self, path: str, offset: int, size: int) -> bytes:
        return trio.run(self.reader.read, self.ino(path), offset, size)

    @property
    def requests(self) -> int:
        return self.metrics.backend.value("read_count")

    @property
    def fetched(self) -> int:
        return self.metrics.backend.value("read_amount_total")

    def blob_path(self) -> Path:
        (bid,) = self.built.blobs
        return self.tmp / "blobs" / bid.split(":")[1]

    def chunks_of(self, path: str):
        return [self.bs.chunk(i) for i in self.bs.file_chunk_ids(self.ino(path))]


@pytest.mark.parametrize("compressor", ["zstd", "lz4", "none"])
def test_reads_across_chunk_boundaries_and_eof_match_the_file(tmp_path, compressor):
    data = compressible(3 * CS + 1234, 1)
    img = Image(tmp_path, {"f": data, "g": incompressible(CS + 5, 2)}, compressor=compressor)
    flags = {c.compressed for c in img.chunks_of("f")}
    assert flags == ({False} if compressor == "none" else {True})
    assert {c.compressed for c in img.chunks_of("g")} == {False}   # incompressible: stored raw
    cases = [(0, 1), (0, CS), (CS - 1, 2), (100, 3 * CS), (CS, CS), (2 * CS + 7, 5000),
             (len(data) - 10, 100), (len(data) - 1, 1), (0, 1 << 20), (len(data), 10),
             (len(data) + 100, 10), (5, 0)]
    for off, size in cases:
        assert img.read("f", off, size) == data[off:off + size], (off, size)
    assert img.read("g", CS - 3, 10) == img.built.files["g"][CS - 3:CS + 7]


def test_deduplicated_chunks_are_fetched_once(tmp_path):
    block = compressible(CS, 3)
    files = {"a": block * 3, "b": block + compressible(CS, 4)}
    img = Image(tmp_path, files)
    assert len({c.id for c in img.chunks_of("a")}) == 1
    assert img.read("a", 0, 3 * CS) == files["a"]
    assert img.requests == 1
    assert img.metrics.fs.value("fetch_chunks") >= 1
    assert img.read("b", 0, CS) == block          # same chunk: cache hit
    assert img.read("b", 0, 2 * CS) == files["b"]
    assert img.read("a", CS - 10, CS + 20) == files["a"][CS - 10:2 * CS + 10]  # one chunk, 3 spans
    assert img.requests == 2   # b's own chunk is not a's: amplify_io stays within "a"
    assert img.metrics.fs.value("chunk_hits") >= 2


def test_reading_one_file_fetches_only_its_bytes(tmp_path):
    files = {f"dir/f{i:02d}": incompressible(2 * CS, 10 + i) for i in range(12)}
    files["dir/small"] = b"tiny file\n"
    img = Image(tmp_path, files, amplify_io=0)
    assert img.read("dir/small", 0, 4096) == b"tiny file\n"
    (c,) = img.chunks_of("dir/small")
    assert img.requests == 1 and img.fetched == c.comp_size
    assert img.read("dir/f05", 0, 2 * CS) == files["dir/f05"]
    f05 = img.chunks_of("dir/f05")
    assert img.fetched == c.comp_size + sum(x.comp_size for x in f05)
    assert img.fetched < img.blob_path().stat().st_size // 5


def test_adjacent_missing_chunks_merge_into_one_request_bounded_by_amplify_io(tmp_path):
    data = incompressible(8 * CS, 20)
    img = Image(tmp_path, {"f": data}, amplify_io=4 * CS)
    assert img.read("f", 0, 8 * CS) == data
    assert img.requests == 2 and img.fetched == 8 * CS    # two ranges of 4 chunks each
    assert img.metrics.fs.value("fetch_ranges") == 2


def test_amplify_io_reads_ahead_over_following_uncached_chunks(tmp_path):
    data = incompressible(16 * CS, 21)
    img = Image(tmp_path, {"f": data}, amplify_io=8 * CS)
    assert img.read("f", 0, 100) == data[:100]
    assert img.requests == 1 and img.fetched == 8 * CS      # 1 wanted + 7 read ahead
    assert img.metrics.fs.value("readahead_chunks") == 7
    assert img.read("f", 100, 8 * CS - 100) == data[100:8 * CS]
    assert img.requests == 1                                 # all from the cache
    assert img.read("f", 8 * CS, 8 * CS) == data[8 * CS:]
    assert img.requests == 2


def test_amplify_io_reads_ahead_the_files_own_chunks_not_the_files_after_it(tmp_path):
    # small files lie back to back in tar (= blob) order; a miss on one must not pull the
    # next ones in (a cold python start fetched 1400 such chunks for 18 misses)
    files = {f"lib/m{i:02d}.py": incompressible(CS // 2, 30 + i) for i in range(8)}
    files["lib/big"] = incompressible(4 * CS, 40)
    img = Image(tmp_path, files, amplify_io=1 << 20)
    assert img.read("lib/m03.py", 0, CS) == files["lib/m03.py"]
    (m03,) = img.chunks_of("lib/m03.py")
    assert img.requests == 1 and img.fetched == m03.comp_size
    assert img.metrics.fs.value("readahead_chunks") == 0
    big = img.chunks_of("lib/big")
    assert img.read("lib/big", 0, 100) == files["lib/big"][:100]
    assert img.requests == 2 and img.fetched == m03.comp_size + sum(c.comp_size for c in big)
    assert img.metrics.fs.value("readahead_chunks") == 3          # its own chunks 1..3
    assert img.read("lib/m04.py", 0, CS) == files["lib/m04.py"]   # not read ahead: a miss
    assert img.requests == 3


def test_readahead_other_bytes_lets_a_small_budget_of_following_files_in(tmp_path):
    files = {f"lib/m{i:02d}.py": incompressible(CS // 2, 50 + i) for i in range(8)}
    budget = 2 * (CS // 2)     # room for two of the following files, not three
    img = Image(tmp_path, files, amplify_io=1 << 20)
    img.reader.readahead_other_bytes = budget
    assert img.read("lib/m01.py", 0, CS) == files["lib/m01.py"]
    assert img.requests == 1 and img.metrics.fs.value("readahead_chunks") == 2
    assert img.read("lib/m02.py", 0, CS) == files["lib/m02.py"]
    assert img.read("lib/m03.py", 0, CS) == files["lib/m03.py"]
    assert img.requests == 1
    assert img.read("lib/m04.py", 0, CS) == files["lib/m04.py"]
    assert img.requests == 2


def test_misses_that_walk_the_blob_in_file_order_read_other_files_ahead(tmp_path):
    # reading a tree in tar order (cold `cat`, an image scan): the second miss right after the
    # first one's range lets the following files in; a miss elsewhere in the blob resets it
    files = {f"d/m{i:03d}": incompressible(CS // 2, 60 + i) for i in range(300)}
    img = Image(tmp_path, files, amplify_io=1 << 20)
    names = sorted(files)
    assert [img.chunks_of(n)[0].index for n in names] == list(range(300))     # tar order
    for n in names[:2]:
        assert img.read(n, 0, CS) == files[n]
    assert img.requests == 2                        # m000 alone, m001 + 128 KiB of the next
    assert img.metrics.fs.value("readahead_chunks") == (128 << 10) // (CS // 2)
    for n in names[2:66]:
        assert img.read(n, 0, CS) == files[n]
    assert img.requests == 2
    assert img.read(names[66], 0, CS) == files[names[66]]                   # 256 KiB next
    assert img.requests == 3
    assert img.read(names[250], 0, CS) == files[names[250]]                 # a jump
    assert img.requests == 4 and img.fetched == 4 * (CS // 2) + (128 << 10) + (256 << 10)


def test_sequential_reads_fetch_the_files_next_chunks_in_the_background_concurrently(tmp_path):
    data = incompressible(16 * CS, 22)
    img = Image(tmp_path, {"f": data}, amplify_io=CS, limiter_tokens=8)
    ino = img.ino("f")
    seen = []

    async def main():
        r = img.reader
        for k in range(3):                  # chunk 2, the third sequential read, opens a window
            assert await r.read(ino, k * CS, CS) == data[k * CS:(k + 1) * CS]
        for f in list(r._inflight.values()):    # the readahead flights, started by the miss
            await f.event.wait()
        seen.append(img.requests)
        chunks = img.chunks_of("f")
        assert r.uncached(chunks[3:7]) == [] and r.uncached(chunks[7:8]) == chunks[7:8]
        assert await r.read(ino, 3 * CS, 4 * CS) == data[3 * CS:7 * CS]
        seen.append(img.requests)
    trio.run(main)
    # a window of 4 chunks (2, doubled by the second sequential read) as 4 one-chunk ranges
    # (amplify_io); reading them afterwards costs no request
    assert seen == [3 + 4, 3 + 4]
    assert img.metrics.fs.value("readahead_chunks") == 4


def test_reads_that_jump_around_a_file_read_nothing_ahead(tmp_path):
    data = incompressible(16 * CS, 23)
    img = Image(tmp_path, {"f": data}, amplify_io=CS)
    ino = img.ino("f")

    async def main():
        for k in (8, 3, 12, 6, 14):         # page-ins of a mapped library, say
            assert await img.reader.read(ino, k * CS, 100) == data[k * CS:k * CS + 100]
        await trio.testing.wait_all_tasks_blocked()
    trio.run(main)
    assert img.requests == 5 and img.fetched == 5 * CS
    assert img.metrics.fs.value("readahead_chunks") == 0


def test_readahead_window_zero_turns_the_file_window_off(tmp_path):
    data = incompressible(16 * CS, 24)
    img = Image(tmp_path, {"f": data}, amplify_io=CS, readahead_window=0)
    ino = img.ino("f")

    async def main():
        for k in range(6):
            assert await img.reader.read(ino, k * CS, CS) == data[k * CS:(k + 1) * CS]
        await trio.testing.wait_all_tasks_blocked()
    trio.run(main)
    assert img.requests == 6 and img.metrics.fs.value("readahead_chunks") == 0


class SlowBackend:
    def __init__(self, inner, delay=0.05):
        self.inner, self.delay = inner, delay

    def blob_size(self, blob_id):
        return self.inner.blob_size(blob_id)

    def read_range(self, blob_id, offset, length):
        time.sleep(self.delay)
        return self.inner.read_range(blob_id, offset, length)


def test_concurrent_reads_of_one_chunk_fetch_it_once(tmp_path):
    data = incompressible(4 * CS, 30)
    img = Image(tmp_path, {"f": data}, amplify_io=0, wrap=SlowBackend, limiter_tokens=8)
    ino = img.ino("f")
    results = {}

    async def one(i):
        off = (i * 37) % (CS - 64)
        results[i] = (off, await img.reader.read(ino, off, 64))

    async def main():
        async with trio.open_nursery() as n:
            for i in range(40):
                n.start_soon(one, i)

    trio.run(main)
    assert all(r == data[off:off + 64] for off, r in results.values())
    assert img.requests == 1
    assert img.metrics.fs.value("singleflight_waits") >= 1


@pytest.mark.parametrize("compressor", ["none", "zstd"])
def test_corrupt_blob_byte_is_an_integrity_error_and_nothing_is_cached(tmp_path, compressor):
    data = compressible(3 * CS, 40)
    img = Image(tmp_path, {"etc/passwd": data, "other": compressible(CS, 41)},
                compressor=compressor, amplify_io=0)
    target = img.chunks_of("etc/passwd")[1]
    raw = bytearray(img.blob_path().read_bytes())
    raw[target.comp_offset + target.comp_size // 2] ^= 0x01
    img.blob_path().write_bytes(bytes(raw))
    assert img.read("etc/passwd", 0, 100) == data[:100]          # chunk 0 is fine
    with pytest.raises(IntegrityError) as ei:
        img.read("etc/passwd", CS + 10, 100)
    msg = str(ei.value)
    assert "/etc/passwd" in msg and next(iter(img.built.blobs)) in msg and f"chunk {target.id}" in msg
    h = img.reader._handles[target.blob]
    assert img.cache.missing(h, [target.index]) == [target.index]
    assert img.metrics.fs.value("integrity_errors") == 1
    with pytest.raises(IntegrityError):                          # fetched again, fails again
        img.read("etc/passwd", CS, 1)
    assert img.requests == 3


def test_waiters_on_a_failing_fetch_get_the_error_not_a_hang(tmp_path):
    data = incompressible(2 * CS, 50)
    img = Image(tmp_path, {"f": data}, compressor="none", amplify_io=0, wrap=SlowBackend,
                limiter_tokens=8)
    raw = bytearray(img.blob_path().read_bytes())
    raw[10] ^= 0xFF
    img.blob_path().write_bytes(bytes(raw))
    ino = img.ino("f")
    outcomes = []

    async def one():
        try:
            await img.reader.read(ino, 0, 64)
            outcomes.append("ok")
        except IntegrityError:
            outcomes.append("integrity")

    async def main():
        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                for _ in range(10):
                    n.start_soon(one)

    trio.run(main)
    assert outcomes == ["integrity"] * 10
    assert img.requests < 10


class Flaky:
    """Fails the first `n` reads with a transient error."""

    def __init__(self, inner, n=2):
        self.inner, self.n = inner, n

    def blob_size(self, blob_id):
        return self.inner.blob_size(blob_id)

    def read_range(self, blob_id, offset, length):
        if self.n:
            self.n -= 1
            raise BackendError(f"blob {blob_id}: connection reset", permanent=False)
        return self.inner.read_range(blob_id, offset, length)


def test_transient_backend_errors_are_retried(tmp_path):
    data = compressible(2 * CS, 60)
    img = Image(tmp_path, {"f": data}, wrap=Flaky)
    img.reader.backend = RetryingBackend(img.backend, RetryPolicy(limit=3, backoff=0, sleep=lambda s: None))
    assert img.read("f", 0, 2 * CS) == data
    assert img.metrics.backend.value("read_errors") == 2
    assert img.requests == 3


def test_missing_blob_error_names_the_file(tmp_path):
    img = Image(tmp_path, {"usr/bin/sh": compressible(CS, 70)})
    img.blob_path().unlink()
    with pytest.raises(BlobNotFoundError) as ei:
        img.read("usr/bin/sh", 0, 10)
    assert "/usr/bin/sh" in str(ei.value) and ei.value.permanent


def test_cache_survives_a_new_reader_over_the_same_work_dir(tmp_path):
    data = compressible(5 * CS, 80)
    img = Image(tmp_path, {"f": data})
    assert img.read("f", 0, len(data)) == data
    assert img.requests == 1
    img.cache.close()
    cache2 = ChunkCache(tmp_path / "cache")
    reader2 = FileReader(img.bs, img.backend, cache2, limiter=trio.CapacityLimiter(2))
    assert trio.run(reader2.read, img.ino("f"), 0, len(data)) == data
    assert img.requests == 1


def test_corrupt_cache_file_is_refetched_from_the_backend(tmp_path):
    data = compressible(2 * CS, 90)
    img = Image(tmp_path, {"f": data})
    assert img.read("f", 0, len(data)) == data
    (bid,) = img.built.blobs
    with open(next((tmp_path / "cache").glob(bid.split(":")[1] + "-*.data")), "r+b") as f:
        f.seek(CS + 5)
        f.write(b"\x00\x00\x00")
    img.cache.close()               # a restart: the new cache checks each chunk on first read
    cache2 = ChunkCache(tmp_path / "cache", metrics=img.metrics)
    reader2 = FileReader(img.bs, img.backend, cache2, limiter=img.limiter)
    assert trio.run(reader2.read, img.ino("f"), CS, 10) == data[CS:CS + 10]
    assert img.metrics.blobcache.value("cache_corrupt") == 1
    assert img.requests == 2


def test_full_cache_disk_still_serves_verified_bytes(tmp_path, monkeypatch):
    data = compressible(2 * CS, 100)
    img = Image(tmp_path, {"f": data})
    img.reader.open_blobs()          # the daemon opens blobs at start-up, before the disk fills

    def enospc(fd, data, offset):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cc, "_pwrite_all", enospc)
    assert img.read("f", 0, len(data)) == data
    assert img.metrics.fs.value("cache_store_errors") == 1
    assert img.read("f", 0, len(data)) == data        # not cached: fetched again
    assert img.requests == 2


def test_metrics_count_reads(tmp_path):
    img = Image(tmp_path, {"f": compressible(CS, 110)})
    img.read("f", 0, 10)
    img.read("f", 10, 10)
    snap = img.metrics.snapshot()
    assert snap["fs"]["read_count"] == 2 and snap["fs"]["read_bytes"] == 20
    assert snap["fs"]["read_latency"]["count"] == 2
    assert snap["blobcache"]["hits"] == 1


def test_a_miss_that_another_task_stored_meanwhile_is_reread_not_refetched(tmp_path):
    data = compressible(2 * CS, 120)
    img = Image(tmp_path, {"f": data}, amplify_io=0)
    assert img.read("f", 0, len(data)) == data
    assert img.requests == 2
    # A task whose cache lookup missed just before the other task stored the chunk:
    c = img.chunks_of("f")[1]
    got = {}
    trio.run(img.reader._resolve, [(c, 0, c.size)], got)
    assert got[(c.blob, c.index)] == (0, data[CS:])
    assert img.requests == 2


def test_cancelled_reader_does_not_strand_tasks_waiting_on_its_fetch(tmp_path):
    data = incompressible(2 * CS, 130)
    img = Image(tmp_path, {"f": data}, amplify_io=0, wrap=lambda b: SlowBackend(b, 0.2))
    ino = img.ino("f")
    out = {}

    async def first():
        with trio.move_on_after(0.05) as scope:
            await img.reader.read(ino, 0, 10)
        out["first_cancelled"] = scope.cancelled_caught

    async def second():
        await trio.sleep(0.02)
        out["second"] = await img.reader.read(ino, 0, 10)

    async def main():
        with trio.fail_after(5):
            async with trio.open_nursery() as n:
                n.start_soon(first)
                n.start_soon(second)

    trio.run(main)
    assert out["second"] == data[:10]
    assert img.requests == 1


def test_waiters_of_a_fetch_that_never_ran_fetch_for_themselves(tmp_path):
    from nydus_py.io import reader as reader_mod

    data = compressible(CS, 140)
    img = Image(tmp_path, {"f": data}, amplify_io=0)
    img.reader.open_blobs()
    (c,) = img.chunks_of("f")
    key = (c.blob, c.index)
    planted = reader_mod._Flight()          # as if a task registered it, then was cancelled
    img.reader._inflight[key] = planted
    got = {}

    async def main():
        with trio.fail_after(5):
            async with trio.open_nursery() as n:
                n.start_soon(img.reader._resolve, [(c, 0, c.size)], got)
                await trio.sleep(0.01)
                assert not got
                img.reader._settle(key, planted, None, reader_mod._Interrupted())

    trio.run(main)
    assert got[key] == (0, data)
    assert img.requests == 1


def test_a_cached_chunk_in_memory_is_read_on_the_loop_without_a_worker_thread(tmp_path):
    data = incompressible(4 * CS, 25)
    img = Image(tmp_path, {"f": data}, amplify_io=CS, limiter_tokens=1)
    ino = img.ino("f")
    done = []

    async def read(off, n):
        done.append(await img.reader.read(ino, off, n))

    async def main():
        assert await img.reader.read(ino, CS, 100) == data[CS:CS + 100]  # fetched, stored
        await img.limiter.acquire()         # hold the only worker slot: no thread can run
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, CS + 200, 300)
            await trio.testing.wait_all_tasks_blocked()
            assert done == [data[CS + 200:CS + 500]]    # served without the slot
            nursery.start_soon(read, 3 * CS, 10)
            await trio.testing.wait_all_tasks_blocked()
            assert len(done) == 1                       # a miss waits for a worker slot
            img.limiter.release()
        assert done[1] == data[3 * CS:3 * CS + 10]
    trio.run(main)
