"""The read path under FUSE `read`: plan → cache → (single-flight) fetch → verify → store → bytes.

    read(ino, offset, size)
      1. plan      chunk ids covering the range (bootstrap columns, no I/O), clamped at EOF
      2. lookup    chunks this process has checked and whose bytes are in the page cache are
                   read on the loop (RWF_NOWAIT, never blocks); ONE worker-thread call reads
                   every other cached chunk (xxh3-checked the first time) of the request
      3. resolve   for each miss: wait for the task already fetching it (single-flight, keyed by
                   (blob, index)), or fetch it: merge into ranges (fetch.plan_ranges), extend
                   the last range of each blob forward over the file's own next uncached
                   chunks (amplify_io readahead; other files' chunks only within
                   `readahead_other_bytes`, fetch.own_first), one `backend.read_range` per range in a worker thread, which also
                   splits, decompresses, verifies sha256 and stores the chunks in the cache
      4. assemble  one b"".join over memoryview slices

The single-flight table lives in trio's thread, so it needs no lock. A chunk is marked ready in
the cache (by the worker) before its flight is resolved (in trio), so a task that finds neither
a flight nor a ready chunk may fetch it itself: at most a rare duplicate fetch, never a hang.
Tasks waiting on a flight receive its bytes or its error (a copy, with the same type).

Policy on a full or failing cache disk: `store_many`'s CacheError is logged and counted
(`fs.cache_store_errors`), and the verified bytes are still returned, so a full cache degrades
to uncached reads instead of failing the container's I/O. A chunk that fails verification is
never cached and never returned: IntegrityError naming the file, blob and chunk.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_right
from typing import Sequence

import trio

from nydus_py.cache.chunk_cache import ChunkCache
from nydus_py.cache.entry import table_digest
from nydus_py.errors import CacheError, FormatError, IntegrityError, NydusError
from nydus_py.format.bootstrap import Bootstrap, Chunk
from nydus_py.io.fetch import (
    Range,
    add_batch_siblings,
    decode_chunk,
    extend_forward,
    own_first,
    plan_ranges,
)
from nydus_py.io.predict import ElfPrefetcher
from nydus_py.metrics import Metrics
from nydus_py.storage.backend import BlobBackend

log = logging.getLogger(__name__)

DEFAULT_AMPLIFY_IO = 1 << 20
DEFAULT_MAX_GAP = 16 << 10
# amplify_io readahead after a miss takes other files' chunks (those following the file in the
# blob) only up to this many compressed bytes: they are rarely read next (tar order is not
# access order), so more of them costs bandwidth, not round trips (docs/performance.md).
DEFAULT_READAHEAD_OTHER_BYTES = 0
# ... unless the misses walk the blob: a miss within BLOB_SEQ_SLACK chunks after where the last
# fetch of that blob ended (a reader going through files in tar order: a cold `cat` of a tree,
# an image scan) lets other files in, from BLOB_SEQ_START bytes, doubling per such miss up to
# amplify_io; any other miss resets it.
BLOB_SEQ_START = 128 << 10
BLOB_SEQ_SLACK = 8
DEFAULT_READAHEAD_WINDOW = 8 << 20  # per-file sequential readahead cap, bytes (0: off)
SEQ_FILES = 1024                    # files whose read position is tracked (LRU)

Key = tuple[int, int]           # (blob index, chunk index within the blob)
Want = tuple[Chunk, int, int]   # a chunk and the span [lo, hi) of it a request needs
# bytes of a chunk from offset `base` (0: the whole chunk); read_nowait's are bytearray/memoryview
Got = dict[Key, tuple[int, bytes | bytearray | memoryview]]


class _Flight:
    __slots__ = ("event", "data", "error")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.data: bytes | None = None
        self.error: BaseException | None = None


class _Interrupted(Exception):
    """The fetching task was cancelled before its fetch ran; waiters fetch themselves."""


def _copy_error(e: BaseException) -> NydusError:
    """A fresh exception per waiter (raising one object from many tasks tangles tracebacks)."""
    if isinstance(e, NydusError):
        new = type(e)(str(e), permanent=e.permanent, errno=e.errno)
    else:
        new = NydusError(f"chunk fetch failed: {e!r}")
    new.__cause__ = e
    return new


def _valid_chunks(bs: Bootstrap, start: int, end: int):
    """Chunks start.. of one blob for readahead, up to the first whose record is bad: that
    chunk costs the file that names it (its own read fails), never a neighbour's read."""
    for cid in range(start, end):
        try:
            yield bs.chunk(cid)
        except FormatError:
            return


class FileReader:
    """Reads file data of one image. `read` is the only entry point of the FUSE layer."""

    def __init__(self, bootstrap: Bootstrap, backend: BlobBackend, cache: ChunkCache, *,
                 limiter: trio.CapacityLimiter, amplify_io: int = DEFAULT_AMPLIFY_IO,
                 max_gap: int = DEFAULT_MAX_GAP, metrics: Metrics | None = None,
                 readahead_window: int = DEFAULT_READAHEAD_WINDOW,
                 readahead_other_bytes: int = DEFAULT_READAHEAD_OTHER_BYTES,
                 predict: bool = True):
        if bootstrap.digester != "sha256":
            raise FormatError(f"bootstrap: chunk digester {bootstrap.digester!r} is not supported "
                              "(only sha256)")
        self.bootstrap = bootstrap
        self.backend = backend
        self.cache = cache
        self.limiter = limiter
        self.amplify_io = max(amplify_io, 0)
        self.max_gap = max(max_gap, 0)
        self.readahead_other_bytes = max(readahead_other_bytes, 0)
        self._handles: list[int | None] = [None] * len(bootstrap.blobs)
        self._inflight: dict[Key, _Flight] = {}
        # Per-file sequential readahead (see _window): ino -> [next file chunk, window chunks].
        self.readahead_window = max(readahead_window, 0)
        self._seq: dict[int, list[int]] = {}
        # blob -> [chunk index after its last fetched range, other files' bytes it allowed]
        self._blob_seq: dict[int, list[int]] = {}
        # Cold-start prediction (io/predict.py): told about every first chunk a read fetched.
        self.predictor: ElfPrefetcher | None = None
        if predict:
            self.predictor = ElfPrefetcher(self, bootstrap, metrics=metrics)
        # Background readahead gets half the worker slots, so foreground misses never queue
        # behind a window of readahead ranges.
        self._ra_limiter = trio.CapacityLimiter(max(1, int(limiter.total_tokens) // 2))
        m = (metrics or Metrics()).fs
        self._m_reads = m.counter("read_count")
        self._m_read_bytes = m.counter("read_bytes")
        self._m_latency = m.histogram("read_latency")
        self._m_hits = m.counter("chunk_hits")
        self._m_misses = m.counter("chunk_misses")
        self._m_waits = m.counter("singleflight_waits")
        self._m_ranges = m.counter("fetch_ranges")
        self._m_fetch_bytes = m.counter("fetch_bytes")
        self._m_fetched = m.counter("fetch_chunks")
        self._m_readahead = m.counter("readahead_chunks")
        self._m_integrity = m.counter("integrity_errors")
        self._m_store_errors = m.counter("cache_store_errors")

    # -- public -------------------------------------------------------------------------------
    def open_blobs(self) -> None:
        """Opens the cache files of every blob (blocking; daemon start-up). Optional: blobs are
        otherwise opened on first use, in a worker thread."""
        for i in range(len(self._handles)):
            self._handle(i)

    async def read(self, ino: int, offset: int, size: int) -> bytes | bytearray | memoryview:
        return await self._read(ino, offset, size, True)

    async def read_quiet(self, ino: int, offset: int, size: int) -> bytes | bytearray | memoryview:
        """A read on the read path's own behalf (io/predict.py): the same cache, single-flight,
        fetch and verification, but no sequential tracking, no prediction, no read metrics."""
        return await self._read(ino, offset, size, False)

    async def _read(self, ino: int, offset: int, size: int,
                    foreground: bool) -> bytes | bytearray | memoryview:
        t0 = time.perf_counter()
        plan = self._plan(ino, offset, size)
        if not plan:
            return b""
        bs = self.bootstrap
        k0 = bs.chunk_index(ino, offset) if bs.variable else offset // bs.chunk_size
        track = foreground and self.readahead_window
        nxt, win = self._sequential(ino, k0, k0 + len(plan) - 1) if track else (0, 0)
        if len(plan) == 1:
            # The common case (a small file, or a read within one chunk) served on the loop:
            # no dicts, no join; pyfuse3 replies from the buffer as it is.
            c, a, b = plan[0]
            h = self._handles[c.blob]
            if h is not None:
                hit = self.cache.read_nowait(h, c.index, c.offset, c.size, a, b)
                if hit is not None:
                    if foreground:
                        self._m_hits.inc()
                        self._done(len(hit), t0)
                    return hit
        # One want per distinct chunk (a file may repeat a chunk): the span of it we need.
        wants: dict[Key, Want] = {}
        for c, a, b in plan:
            w = wants.get((c.blob, c.index))
            if w is None:
                wants[(c.blob, c.index)] = (c, a, b)
            else:
                wants[(c.blob, c.index)] = (c, min(w[1], a), max(w[2], b))
        try:
            # Chunks already checked whose bytes are in memory: read on the loop, no thread
            # hop (RWF_NOWAIT never blocks); the rest in one worker-thread call.
            got = self._lookup_nowait(wants)
            rest = [w for k, w in wants.items() if k not in got]
            if rest:
                got.update(await trio.to_thread.run_sync(self._lookup, rest, limiter=self.limiter))
            missing = [w for k, w in wants.items() if k not in got]
            if foreground:
                self._m_hits.inc(len(got))
                self._m_misses.inc(len(missing))
            if missing:
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("miss ino %d [%d, +%d): %d of %d chunks", ino, offset, size,
                              len(missing), len(wants))
                if win:
                    self._read_ahead(ino, nxt, win)
                # the file's chunks after this read: what amplify_io may read ahead
                own = bs.file_chunk_ids(ino)[k0 + len(plan):]
                await self._resolve(missing, got, own)
                first = plan[0][0]
                if (foreground and self.predictor is not None and k0 == 0
                        and any(w[0] is first for w in missing)):
                    # the first chunk of a file just arrived: an executable being loaded?
                    base, data = got[(first.blob, first.index)]
                    if base == 0:
                        self.predictor.trigger(ino, data)
        except NydusError as e:
            raise self._with_path(e, ino) from e
        parts = []
        for c, a, b in plan:
            base, data = got[(c.blob, c.index)]
            parts.append(memoryview(data)[a - base:b - base])
        out = b"".join(parts)
        if foreground:
            self._done(len(out), t0)
        return out

    def _done(self, n: int, t0: float) -> None:
        self._m_reads.inc()
        self._m_read_bytes.inc(n)
        self._m_latency.observe(time.perf_counter() - t0)

    # -- 1. plan ------------------------------------------------------------------------------
    def _plan(self, ino: int, offset: int, size: int) -> list[tuple[Chunk, int, int]]:
        """(chunk, start, stop) slices of each chunk, in file order. No I/O."""
        bs = self.bootstrap
        try:
            fsize = bs.attr(ino).size
        except KeyError:
            raise FormatError(f"read of unknown inode {ino}") from None
        end = min(offset + size, fsize)
        if size <= 0 or offset < 0 or offset >= end:
            return []
        ids = bs.file_chunk_ids(ino)
        if bs.variable:
            return self._plan_variable(ino, offset, end, ids)
        cs = bs.chunk_size
        k0, k1 = offset // cs, (end - 1) // cs
        if k1 >= len(ids):
            raise FormatError(f"{bs.path_of(ino)}: {len(ids)} chunks for {fsize} bytes")
        plan = []
        for k in range(k0, k1 + 1):
            c = bs.chunk(ids[k])
            base = k * cs
            if c.size != min(cs, fsize - base):
                raise FormatError(f"{bs.path_of(ino)}: chunk {c.id} has size {c.size}, expected "
                                  f"{min(cs, fsize - base)} at file offset {base}")
            plan.append((c, max(offset - base, 0), min(end - base, c.size)))
        return plan

    def _plan_variable(self, ino: int, offset: int, end: int, ids) -> list[tuple[Chunk, int, int]]:
        """v3 (content-defined chunks): the chunks covering [offset, end) by a binary search
        of the file's chunk offsets (checked at load to tile the file exactly)."""
        bs = self.bootstrap
        offs = bs.file_chunk_offsets(ino)
        assert offs is not None         # a v3 bootstrap has the column
        k0 = bisect_right(offs, offset) - 1
        k1 = bisect_right(offs, end - 1, k0) - 1
        plan = []
        for k in range(k0, k1 + 1):
            c = bs.chunk(ids[k])
            base = offs[k]
            plan.append((c, max(offset - base, 0), min(end - base, c.size)))
        return plan

    # -- per-file sequential readahead -------------------------------------------------------
    def _sequential(self, ino: int, k0: int, k1: int) -> tuple[int, int]:
        """Tracks where each file's last read ended (a read of file chunks k0..k1); returns (the
        file chunk after this read, the readahead window in chunks: 0 unless this read
        continues the file's last one)."""
        cs = self.bootstrap.chunk_size      # v3: the average chunk size, for the window in chunks
        st = self._seq.pop(ino, None)
        if st is not None and k0 in (st[0] - 1, st[0]):    # continues the last read
            win = min(max(2, st[1] * 2), max(self.readahead_window // cs, 1))
        else:
            win = 0
        self._seq[ino] = [k1 + 1, win]
        if len(self._seq) > SEQ_FILES:
            del self._seq[next(iter(self._seq))]
        # Below chunk 2 the kernel's own readahead (read_ahead_kb, one chunk) is enough: `head`
        # or a header read of a big file must not pull more of it.
        return k1 + 1, win if k0 >= 2 else 0

    def _read_ahead(self, ino: int, nxt: int, win: int) -> None:
        """On a miss in a sequentially read file: fetch its next `win` chunks in the
        background, concurrently (one range of at most amplify_io per worker slot, half of
        the slots). Once a file has been read sequentially past its first two chunks the window
        is 2+ chunks and doubles while reads stay sequential, up to `readahead_window` bytes;
        a read elsewhere in the file (the page-ins of a mapped library) resets it and fetches
        nothing extra, so only proven-sequential reads over-fetch. Chunks read ahead are flights like any other: a read that needs one
        waits for it instead of fetching it again."""
        bs = self.bootstrap
        ids = bs.file_chunk_ids(ino)
        mine: dict[Key, Chunk] = {}
        for c in self.uncached([bs.chunk(i) for i in ids[nxt:nxt + win]]):
            mine.setdefault((c.blob, c.index), c)
        if not mine:
            return
        owned = {key: _Flight() for key in mine}
        self._inflight.update(owned)
        ranges = plan_ranges(list(mine.values()), max_gap=self.max_gap,
                             limit=max(self.amplify_io, 1))
        self._m_readahead.inc(len(owned))
        trio.lowlevel.spawn_system_task(self._background, ranges, owned)

    async def _background(self, ranges: list[Range], owned: dict[Key, _Flight]) -> None:
        """Fetches readahead ranges concurrently; never raises (a system task must not)."""
        errors: list[BaseException] = []
        try:
            async with trio.open_nursery() as nursery:
                for r in ranges:
                    r.readahead = len(r.chunks)         # nobody asked: results are not kept
                    nursery.start_soon(self._fetch_range, r, owned, {}, errors, self._ra_limiter)
        except Exception as e:  # noqa: BLE001 (a system task's error would end the mount)
            errors.append(e)
        finally:
            for key, f in owned.items():
                self._settle(key, f, None, _Interrupted())
        if errors:  # the chunks stay missing; a read that needs one fetches it (and reports)
            log.debug("readahead failed: %s", errors[0])

    # -- background prefetch (io/prefetch.py drives it) ----------------------------------------
    def uncached(self, chunks: Sequence[Chunk]) -> list[Chunk]:
        """The chunks among `chunks` neither cached nor being fetched. Memory only."""
        out = []
        for c in chunks:
            h = self._handles[c.blob]
            if (c.blob, c.index) not in self._inflight and (h is None or not self.cache.is_ready(h, c.index)):
                out.append(c)
        return out

    async def prefetch(self, chunks: Sequence[Chunk], *, limiter: trio.CapacityLimiter,
                       merging_size: int) -> tuple[int, int]:
        """Fetches and caches those of `chunks` nobody has or is fetching, under `limiter`
        (the prefetcher's own, so that it never takes the slots foreground reads use).
        Foreground reads that need one of these chunks meanwhile wait for it through
        single-flight, as for any other fetch. Returns (chunks fetched, compressed bytes);
        raises the first error (the chunks stay missing; a later read fetches them)."""
        owned: dict[Key, _Flight] = {}
        mine = []
        for c in self.uncached(chunks):
            key = (c.blob, c.index)
            owned[key] = self._inflight[key] = _Flight()
            mine.append(c)
        if not mine:
            return 0, 0
        errors: list[BaseException] = []
        ranges = plan_ranges(mine, max_gap=self.max_gap, limit=max(merging_size, 1))
        try:
            for r in ranges:
                # every chunk counts as wanted, so that a chunk failing verification is
                # reported (and counted by the prefetcher); its bytes live for this range only
                await self._fetch_range(r, owned, {}, errors, limiter)
        finally:
            for key, f in owned.items():
                self._settle(key, f, None, _Interrupted())
        if errors:
            raise errors[0]
        return len(mine), sum(r.length for r in ranges)

    # -- 2. lookup (worker thread) ------------------------------------------------------------
    def _handle(self, blob: int) -> int:
        h = self._handles[blob]
        if h is None:  # open_blob is idempotent, so racing threads agree on the handle
            info = self.bootstrap.blobs[blob]
            start, chunk = info.chunk_start, self.bootstrap.chunk
            # keyed by this bootstrap's chunk table: only bytes verified against exactly these
            # chunk digests are ever served to us (cache/chunk_cache.py, "Trust")
            h = self._handles[blob] = self.cache.open_blob(
                info, offset_of=lambda i: chunk(start + i).offset,
                table=table_digest(self.bootstrap, blob))
        return h

    def _lookup_nowait(self, wants: dict[Key, Want]) -> Got:
        got: Got = {}
        for key, (c, lo, hi) in wants.items():
            h = self._handles[c.blob]
            if h is not None:
                data = self.cache.read_nowait(h, c.index, c.offset, c.size, lo, hi)
                if data is not None:
                    got[key] = (lo, data)
        return got

    def _is_ready(self, c: Chunk) -> bool:
        h = self._handles[c.blob]
        return h is not None and self.cache.is_ready(h, c.index)

    def _lookup(self, wants: Sequence[Want]) -> Got:
        got: Got = {}
        for c, lo, hi in wants:
            data = self.cache.read(self._handle(c.blob), c.index, c.offset, c.size, lo, hi, c.digest)
            if data is not None:
                got[(c.blob, c.index)] = (lo, data)
        return got

    # -- 3. resolve misses (trio thread) ------------------------------------------------------
    async def _resolve(self, missing: list[Want], got: Got, own: Sequence[int] = ()) -> None:
        pending = missing
        reread_once: set[Key] = set()
        while pending:
            mine: list[Chunk] = []
            owned: dict[Key, _Flight] = {}
            waits: list[tuple[Want, _Flight]] = []
            reread: list[Want] = []
            for w in pending:
                c = w[0]
                key = (c.blob, c.index)
                f = self._inflight.get(key)
                if f is not None:
                    waits.append((w, f))
                elif key not in reread_once and self._is_ready(c):
                    reread.append(w)  # fetched and stored by another task since our lookup
                    reread_once.add(key)
                else:
                    owned[key] = self._inflight[key] = _Flight()
                    mine.append(c)
            pending = []
            if reread:
                again = await trio.to_thread.run_sync(self._lookup, reread, limiter=self.limiter)
                got.update(again)
                pending += [w for w in reread if (w[0].blob, w[0].index) not in again]
            if mine:
                await self._fetch(mine, owned, got, own)
            for w, f in waits:
                self._m_waits.inc()
                await f.event.wait()
                if isinstance(f.error, _Interrupted):
                    pending.append(w)
                elif f.error is not None:
                    raise _copy_error(f.error)
                else:
                    assert f.data is not None     # a flight ends with data or an error
                    got[(w[0].blob, w[0].index)] = (0, f.data)

    async def _fetch(self, mine: list[Chunk], owned: dict[Key, _Flight],
                     got: Got, own: Sequence[int] = ()) -> None:
        """Fetches `mine`, whose flights (`owned`) this task registered, plus readahead over
        `own` (the file's chunk ids after the read) and readahead_other_bytes of others; settles
        every flight it owns whatever happens (a cancelled fetch lets waiters retry)."""
        errors: list[BaseException] = []
        try:
            ranges = plan_ranges(mine, max_gap=self.max_gap, limit=self.amplify_io)
            self._readahead(ranges, owned, own)
            async with trio.open_nursery() as nursery:
                for r in ranges:
                    nursery.start_soon(self._fetch_range, r, owned, got, errors)
        finally:
            for key, f in owned.items():
                self._settle(key, f, None, _Interrupted())
        if errors:
            raise errors[0]

    def _readahead(self, ranges: list[Range], owned: dict[Key, _Flight], own: Sequence[int]) -> None:
        """Extends the last range of each blob forward over chunks nobody has (amplify_io):
        the file's own next chunks (`own`), other files' only within readahead_other_bytes."""
        last: dict[int, Range] = {}
        for r in ranges:
            last[r.blob] = r
        bs = self.bootstrap
        others: dict[int, int] = {}
        for b, r in last.items():
            info = bs.blobs[b]
            h = self._handles[b]
            first = max(c.index for c in r.chunks) + 1
            other = others[b] = self._other_budget(b, min(c.index for c in r.chunks))
            following = own_first(
                _valid_chunks(bs, info.chunk_start + first, info.chunk_start + info.chunk_count),
                own, other)

            def accept(c: Chunk, h=h) -> bool:
                key = (c.blob, c.index)
                if key in self._inflight or self.cache.is_ready(h, c.index):
                    return False
                owned[key] = self._inflight[key] = _Flight()
                return True

            n = extend_forward(r, following, max_gap=self.max_gap, limit=self.amplify_io, accept=accept)
            self._m_readahead.inc(n)
        for r in ranges:   # a batch is fetched whole: cache all of its members
            info = bs.blobs[r.blob]
            h = self._handles[r.blob]

            def sibling(c: Chunk, h=h) -> bool:
                key = (c.blob, c.index)
                if key in self._inflight or self.cache.is_ready(h, c.index):
                    return False
                owned[key] = self._inflight[key] = _Flight()
                return True

            start = info.chunk_start            # the lambda is used within this call only
            self._m_readahead.inc(add_batch_siblings(
                r, lambda i: bs.chunk(start + i), info.chunk_count, sibling))
        for b, r in last.items():   # where the next miss of a blob walk would land
            self._blob_seq[b] = [max(c.index for c in r.chunks) + 1, others[b]]

    def _other_budget(self, blob: int, miss: int) -> int:
        """Bytes of other files' chunks the readahead of a miss at chunk `miss` may take."""
        st = self._blob_seq.get(blob)
        if st is not None and st[0] <= miss <= st[0] + BLOB_SEQ_SLACK:
            return min(max(st[1] * 2, BLOB_SEQ_START, self.readahead_other_bytes), self.amplify_io)
        return self.readahead_other_bytes

    async def _fetch_range(self, r: Range, owned: dict[Key, _Flight], got: Got,
                           errors: list, limiter: trio.CapacityLimiter | None = None) -> None:
        wanted = len(r.chunks) - r.readahead
        try:
            results = await trio.to_thread.run_sync(self._fetch_range_sync, r,
                                                    limiter=limiter or self.limiter)
        except Exception as e:  # the whole range failed: every chunk in it shares the error
            for c in r.chunks:
                key = (c.blob, c.index)
                self._settle(key, owned[key], None, e)
            errors.append(e)
            return
        for i, (c, res) in enumerate(results):
            key = (c.blob, c.index)
            if isinstance(res, BaseException):
                self._settle(key, owned[key], None, res)
                if i < wanted:
                    errors.append(res)
            else:
                self._settle(key, owned[key], res, None)
                if i < wanted:
                    got[key] = (0, res)

    def _settle(self, key: Key, f: _Flight, data: bytes | None, error: BaseException | None) -> None:
        if f.event.is_set():
            return
        if self._inflight.get(key) is f:
            del self._inflight[key]
        f.data, f.error = data, error
        f.event.set()

    # -- the worker side of a fetch -----------------------------------------------------------
    def _fetch_range_sync(self, r: Range) -> list[tuple[Chunk, bytes | IntegrityError]]:
        info = self.bootstrap.blobs[r.blob]
        t0 = time.perf_counter()
        raw = memoryview(self.backend.read_range(info.id, r.start, r.length))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("fetched blob %d [%d, +%d): %d chunks (%d read ahead) in %.1f ms", r.blob,
                      r.start, r.length, len(r.chunks), r.readahead, (time.perf_counter() - t0) * 1e3)
        self._m_ranges.inc()
        self._m_fetch_bytes.inc(r.length)
        results: list[tuple[Chunk, bytes | IntegrityError]] = []
        good: list[tuple[Chunk, bytes]] = []
        frames: dict[int, bytes] = {}   # batches decoded in this range
        for c in r.chunks:
            rel = c.comp_offset - r.start
            try:
                data = decode_chunk(info, c, raw[rel:rel + c.comp_size], frames)
            except IntegrityError as e:
                self._m_integrity.inc()
                log.error("%s; not cached", e)
                results.append((c, e))
                continue
            results.append((c, data))
            good.append((c, data))
        self._m_fetched.inc(len(good))
        if good:
            try:
                self.cache.store_many(self._handle(r.blob), good)
            except CacheError as e:
                self._m_store_errors.inc()
                log.warning("%s; serving %d chunks uncached", e, len(good))
        return results

    # -- errors -------------------------------------------------------------------------------
    def _with_path(self, e: NydusError, ino: int) -> NydusError:
        try:
            path = self.bootstrap.path_of(ino)
        except Exception:
            path = f"inode {ino}"
        new = _copy_error(e)
        new.args = (f"{path}: {e}",)
        return new
