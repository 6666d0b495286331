"""Run-time prefetch: after the mount is ready, fetch chosen files' chunks into the cache in
the background, without getting in the way of the workload's own reads.

What is prefetched (in this order, each chunk once):
  0. a learned list (daemon/learned.py: chunk ids an earlier run read, first access first),
     when `learned` finds one: merged into ranges per blob, the ranges ordered by the earliest
     access among their chunks, ahead of everything else,
  1. the bootstrap's `prefetch` list (files named by `nydusify convert --prefetch-patterns`),
  2. the paths of `nydusd mount --prefetch-files FILE` (absolute paths, one a line, "#"
     comments; a directory means every file below it),
  3. with `prefetch_all`, every regular file of the image.
Chunks are then sorted by blob and offset (the converter lays prefetch files out first, so
this is also priority order) and merged into ranges of at most `merging_size` bytes.

Priority, so foreground reads always go first:
  - prefetch runs its backend calls in worker threads under its OWN CapacityLimiter
    (`threads_count` slots); foreground reads use the reader's limiter and never wait for a
    prefetch slot;
  - a foreground read waits on prefetch only through single-flight, for a chunk a prefetch
    range is fetching right now, and a range is at most `merging_size` bytes;
  - the bandwidth limit (`bandwidth_rate` bytes/s, a token bucket on compressed bytes fetched)
    is waited out BEFORE a range claims its chunks, so a throttled prefetch holds nothing a
    foreground read could need.

Progress is in the metrics group "prefetch": state (0 idle, 1 running, 2 done, 3 stopped),
planned_chunks/planned_bytes, fetched_chunks/fetched_bytes (compressed bytes from the
backend), skipped_chunks (already cached or fetched by a foreground read), errors, and
elapsed_ms. A failed range is logged (naming the image and blob) and skipped.
"""

from __future__ import annotations

import logging
import math
import os
import stat
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable, Protocol, Sequence

import trio

from nydus_py.errors import NydusError
from nydus_py.format.bootstrap import ROOT_INO, Bootstrap, Chunk
from nydus_py.io.fetch import plan_ranges
from nydus_py.metrics import Metrics
from nydus_py.storage.backend import BlobBackend, close_backend

log = logging.getLogger(__name__)

IDLE, RUNNING, DONE, STOPPED = 0, 1, 2, 3


@dataclass(frozen=True, kw_only=True)
class PrefetchPlan:
    inodes: tuple[int, ...]
    chunks: tuple[Chunk, ...]           # deduplicated, sorted by (blob, comp_offset)
    errors: int = 0                     # files skipped because their records are bad

    @property
    def bytes(self) -> int:
        return sum(c.size for c in self.chunks)


class TokenBucket:
    """Bytes-per-second limiter (virtual-clock token bucket, `burst` bytes of credit)."""

    def __init__(self, rate: int, burst: int):
        self.rate = rate
        self.burst = max(burst, 1)
        self._t = -math.inf             # the time at which the bucket is empty

    async def take(self, n: int) -> None:
        now = trio.current_time()
        self._t = max(self._t, now - self.burst / self.rate) + n / self.rate
        if self._t > now:
            await trio.sleep_until(self._t)


def read_paths_file(path: str) -> list[str]:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]


def resolve(bs: Bootstrap, path: str) -> int | None:
    """The inode of an absolute image path (no symlinks followed), None if absent."""
    ino = ROOT_INO
    for part in os.fsencode(path).split(b"/"):
        if not part or part == b".":
            continue
        nxt = bs.lookup(ino, part)
        if nxt is None:
            return None
        ino = nxt
    return ino


def _files_under(bs: Bootstrap, ino: int) -> Iterable[int]:
    """Regular files below `ino`, depth first. Each directory is entered once (a visited set:
    the walk ends whatever the bootstrap's dirents say)."""
    stack = [ino]
    seen_dirs: set[int] = set()
    while stack:
        cur = stack.pop()
        mode = bs.attr(cur).mode
        if stat.S_ISREG(mode):
            yield cur
        elif stat.S_ISDIR(mode) and cur not in seen_dirs:
            seen_dirs.add(cur)
            stack.extend(child for _, _, child in reversed(list(bs.readdir(cur))))


def learned_batches(bs: Bootstrap, ids: Sequence[int], *, max_gap: int, limit: int) -> list:
    """Ranges over the learned chunk ids (validated by io/learned.py): neighbours in a blob
    merged, ranges ordered by the first access among their chunks."""
    rank = {cid: i for i, cid in reversed(list(enumerate(ids)))}
    chunks = []
    for cid in rank:
        try:
            chunks.append(bs.chunk(cid))
        except NydusError:          # a chunk record failing its use-time check is skipped
            continue
    ranges = plan_ranges(chunks, max_gap=max_gap, limit=limit)
    ranges.sort(key=lambda r: min(rank[c.id] for c in r.chunks))
    return ranges


def plan(bs: Bootstrap, *, paths: Sequence[str] = (), prefetch_all: bool = False,
         bootstrap_list: bool = True) -> PrefetchPlan:
    """Blocking (walks the bootstrap): call it from a worker thread."""
    inodes: list[int] = list(bs.prefetch) if bootstrap_list else []
    for p in paths:
        ino = resolve(bs, p)
        if ino is None:
            log.warning("prefetch: %s is not in the image; skipped", p)
            continue
        inodes.extend(_files_under(bs, ino))
    if prefetch_all:
        inodes.extend(_files_under(bs, ROOT_INO))
    seen_ino: set[int] = set()
    seen_chunk: set[int] = set()
    chunks: list[Chunk] = []
    order: list[int] = []
    errors = 0
    for ino in inodes:
        if ino in seen_ino:
            continue
        seen_ino.add(ino)
        try:
            if not stat.S_ISREG(bs.attr(ino).mode):
                continue
            mine = [bs.chunk(cid) for cid in bs.file_chunk_ids(ino) if cid not in seen_chunk]
        except (KeyError, NydusError) as e:   # a bad record costs this file, not the prefetch
            errors += 1
            log.warning("prefetch: inode %d skipped: %s", ino, e)
            continue
        order.append(ino)
        for c in mine:
            if c.id not in seen_chunk:
                seen_chunk.add(c.id)
                chunks.append(c)
    chunks.sort(key=lambda c: (c.blob, c.comp_offset))
    return PrefetchPlan(inodes=tuple(order), chunks=tuple(chunks), errors=errors)


EARLY_MAX = 64 << 20        # compressed bytes fetched before the mount is ready (memory bound)


class _Segment:
    __slots__ = ("blob", "start", "end", "data", "error", "done", "used")

    def __init__(self, blob: str, start: int, end: int):
        self.blob, self.start, self.end = blob, start, end
        self.data: bytes | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.used = 0


class EarlyRanges:
    """A BlobBackend in front of a mount's backend that starts fetching the learned list's
    ranges before the mount is ready — while pyfuse3 and trio are still importing and the
    kernel mount is being made — and serves them to the reads that then ask for them (the
    prefetcher's, in the same ranges, or any read wholly inside one). Bytes are the backend's,
    unchecked here: the reader verifies every chunk (sha256) as for any backend read. A read
    of a range still in flight waits for it (it is called in worker threads, never on the
    loop); a failed early range is read again from the backend. At most EARLY_MAX bytes; a
    range is dropped once all of it was read, the rest by `clear()` when the prefetch ends."""

    def __init__(self, backend: BlobBackend, *, limit: int = EARLY_MAX):
        self.backend = backend
        self.limit = limit
        self._segs: dict[str, list[_Segment]] = {}
        self._lock = threading.Lock()
        self.fetched = 0                # bytes fetched early (tests, logs)
        # set once start() ran or will not run: the prefetcher waits for it, so that it never
        # asks the backend for a range a moment before start() claims it (twice the bytes)
        self.decided = threading.Event()

    def start(self, ranges: Sequence[tuple[str, int, int]], threads: int) -> int:
        """Fetches (blob id, offset, length) ranges, in this order, on `threads` threads;
        returns how many ranges (those within the byte limit)."""
        todo: deque[_Segment] = deque()
        total = 0
        with self._lock:
            for blob, off, n in ranges:
                if n <= 0 or total + n > self.limit:
                    break
                total += n
                seg = _Segment(blob, off, off + n)
                self._segs.setdefault(blob, []).append(seg)
                todo.append(seg)

        def run() -> None:
            while True:
                with self._lock:
                    if not todo:
                        return
                    seg = todo.popleft()
                try:
                    seg.data = self.backend.read_range(seg.blob, seg.start, seg.end - seg.start)
                    self.fetched += seg.end - seg.start
                except Exception as e:  # noqa: BLE001  (the read that wants it asks again)
                    seg.error = e
                finally:
                    seg.done.set()
        count = len(todo)
        for i in range(min(max(threads, 1), count)):
            threading.Thread(target=run, name=f"early-prefetch-{i}", daemon=True).start()
        self.decided.set()
        return count

    def clear(self) -> None:
        with self._lock:
            self._segs.clear()

    def blob_size(self, blob_id: str) -> int:
        return self.backend.blob_size(blob_id)

    def read_range(self, blob_id: str, offset: int, length: int) -> bytes:
        end = offset + length
        with self._lock:
            seg = next((s for s in self._segs.get(blob_id, ())
                        if s.start <= offset and end <= s.end), None)
        if seg is not None:
            seg.done.wait()
            data = seg.data
            if data is not None:
                with self._lock:
                    seg.used += length
                    if seg.used >= seg.end - seg.start and seg in self._segs.get(blob_id, ()):
                        self._segs[blob_id].remove(seg)
                return data[offset - seg.start:end - seg.start]
        return self.backend.read_range(blob_id, offset, length)

    def close(self) -> None:
        self.clear()
        close_backend(self.backend)


def early_ranges(bs: Bootstrap, ids: Sequence[int], *, max_gap: int,
                 limit: int) -> list[tuple[str, int, int]]:
    """The learned list's ranges as the prefetcher will ask for them (learned_batches)."""
    return [(bs.blobs[r.blob].id, r.start, r.length)
            for r in learned_batches(bs, ids, max_gap=max_gap, limit=limit)]


class PrefetchReader(Protocol):
    """What the prefetcher needs of the read path (io/reader.py's FileReader)."""
    max_gap: int

    def uncached(self, chunks: Sequence[Chunk]) -> list[Chunk]: ...

    async def prefetch(self, chunks: Sequence[Chunk], *, limiter: trio.CapacityLimiter,
                       merging_size: int) -> tuple[int, int]: ...


class Prefetcher:
    def __init__(self, reader: PrefetchReader, bootstrap: Bootstrap, *, threads_count: int = 4,
                 merging_size: int = 1 << 20, bandwidth_rate: int = 0, prefetch_all: bool = False,
                 paths: Sequence[str] = (), metrics: Metrics | None = None, image: str = "",
                 learned: Callable[[], Awaitable[Sequence[int]]] | None = None,
                 bootstrap_list: bool = True):
        self.reader = reader
        self.bootstrap = bootstrap
        self.threads = max(threads_count, 1)
        self.merging_size = max(merging_size, 4096)
        self.bucket = TokenBucket(bandwidth_rate, self.merging_size) if bandwidth_rate > 0 else None
        self.prefetch_all = prefetch_all
        self.paths = list(paths)
        self.image = image
        self.learned = learned
        self.bootstrap_list = bootstrap_list
        self.limiter = trio.CapacityLimiter(self.threads)
        m = (metrics or Metrics()).group("prefetch")
        self.m = m
        self._state = m.gauge("state")
        self._planned = m.gauge("planned_chunks")
        self._planned_bytes = m.gauge("planned_bytes")
        self._fetched = m.counter("fetched_chunks")
        self._fetched_bytes = m.counter("fetched_bytes")
        self._skipped = m.counter("skipped_chunks")
        self._errors = m.counter("errors")
        self._elapsed = m.gauge("elapsed_ms")
        self._learned = m.gauge("learned_chunks")
        self.done = trio.Event()

    async def run(self) -> None:
        t0 = time.perf_counter()
        self._state.set(RUNNING)
        try:
            ids = await self.learned() if self.learned is not None else ()
            gap, limit = self.reader.max_gap, self.merging_size

            def make() -> tuple[PrefetchPlan, list]:
                p = plan(self.bootstrap, paths=self.paths, prefetch_all=self.prefetch_all,
                         bootstrap_list=self.bootstrap_list)
                first = learned_batches(self.bootstrap, ids, max_gap=gap, limit=limit)
                done = {c.id for r in first for c in r.chunks}
                rest = [c for c in p.chunks if c.id not in done]
                return p, first + plan_ranges(rest, max_gap=gap, limit=limit)
            p, batches = await trio.to_thread.run_sync(make)
            self._errors.inc(p.errors)
            nchunks = sum(len(r.chunks) for r in batches)
            self._learned.set(len(ids))
            self._planned.set(nchunks)
            self._planned_bytes.set(sum(c.size for r in batches for c in r.chunks))
            log.info("prefetch of %s: %d learned chunks, %d files, %d chunks in all",
                     self.image or "image", len(ids), len(p.inodes), nchunks)
            send, recv = trio.open_memory_channel(len(batches) or 1)
            for r in batches:
                send.send_nowait(r.chunks)
            send.close()
            async with trio.open_nursery() as nursery:
                for _ in range(self.threads):
                    nursery.start_soon(self._worker, recv.clone())
            recv.close()
            self._state.set(DONE)
            log.info("prefetch of %s done in %.2fs: %d chunks fetched, %d already cached, "
                     "%d errors", self.image or "image", time.perf_counter() - t0,
                     self._fetched.value, self._skipped.value, self._errors.value)
        except Exception as e:  # noqa: BLE001  (never fatal: the mount serves on without prefetch)
            self._errors.inc()
            self._state.set(STOPPED)
            log.error("prefetch of %s stopped: %s", self.image or "image", e)
        except BaseException:
            self._state.set(STOPPED)
            raise
        finally:
            self._elapsed.set(int((time.perf_counter() - t0) * 1000))
            self.done.set()

    async def _worker(self, recv) -> None:
        async with recv:
            async for chunks in recv:
                todo = self.reader.uncached(chunks)
                self._skipped.inc(len(chunks) - len(todo))
                if not todo:
                    continue
                if self.bucket is not None:
                    await self.bucket.take(sum(c.comp_size for c in todo))
                try:
                    n, nbytes = await self.reader.prefetch(todo, limiter=self.limiter,
                                                           merging_size=self.merging_size)
                except Exception as e:  # noqa: BLE001  (logged and counted; other ranges go on)
                    self._errors.inc()
                    blob = self.bootstrap.blobs[todo[0].blob].id
                    log.warning("prefetch of %s: blob %s, %d chunks: %s", self.image or "image",
                                blob, len(todo), e)
                    continue
                self._fetched.inc(n)
                self._skipped.inc(len(todo) - n)
                self._fetched_bytes.inc(nbytes)
