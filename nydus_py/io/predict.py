"""Cold-start prediction: when a dynamically linked executable is first read (the exec), fetch
what the dynamic loader will read next — the interpreter and the DT_NEEDED libraries, found in
the image the way ld.so finds them (io/elfdeps.py), recursively — and the rest of each of those
files, concurrently, instead of one FUSE miss (one round trip) after another.

    exec python3  →  miss on python3's first chunk  →  ElfPrefetcher.trigger(ino, chunk bytes)
        parse PT_INTERP / PT_DYNAMIC from verified bytes (the chunk holding .dynamic is read
        through the read path: the loader reads it next anyway)
        ├─ for each dependency, concurrently: its first chunk(s), its own dependencies, then
        │  the rest of it (background ranges)
        ├─ the rest of the executable (background ranges)
        └─ once a mount, after the loader's headers, all at once: when it links glibc
           (libc.so.6), the small files glibc reads while any program starts
           (elfdeps.glibc_runtime: ld.so.cache, localtime, the C.UTF-8 LC_CTYPE,
           gconv-modules.cache); when it is a CPython interpreter, the standard-library files
           every start imports (io/pystart.py: encodings, sitecustomize, .pth files)

Every byte parsed went through the read path (sha256-verified, cached); predicted chunks are
single-flight flights like any readahead, so the loader's own faults wait for them instead of
fetching again. Bounds: files up to WHOLE_MAX bytes are fetched whole (the loader maps them
whole and, with the mount's 1 MiB readahead, reads most of them), bigger ones only the chunks
the parse needs; at most MAX_FILES files per trigger and MAX_TOTAL per mount, so a scan of
every executable of an image (which reads each header) cannot pull the whole image through
here. A failure costs the prediction, never a read: it is logged at debug level.
"""

from __future__ import annotations

import logging
import posixpath
from typing import Protocol, Sequence

import trio

from nydus_py.errors import NydusError
from nydus_py.format.bootstrap import Bootstrap, Chunk
from nydus_py.io import elfdeps, pystart
from nydus_py.io.fetch import plan_ranges
from nydus_py.metrics import Metrics

log = logging.getLogger(__name__)

WHOLE_MAX = 16 << 20        # files up to this size are fetched whole
MAX_FILES = 32              # files predicted per trigger (a python3 needs 6)
MAX_TOTAL = 512             # files predicted per mount
MAX_TOTAL_BYTES = 256 << 20  # bytes of whole files fetched per mount (a header scan of /usr/bin)
SLOTS = 2                   # bulk ranges in flight at once (the reads' misses share the link)
SMALL_SLOTS = 6             # ranges of start-up files in flight at once (apart from SLOTS)
PARSE_ROUNDS = 8            # fetch rounds one ELF parse may ask for (real files: 1-2)


class PredictReader(Protocol):
    """What prediction needs of the read path (io/reader.py's FileReader)."""
    max_gap: int

    async def read_quiet(self, ino: int, offset: int, size: int) -> bytes | bytearray | memoryview: ...

    def uncached(self, chunks: Sequence[Chunk]) -> list[Chunk]: ...

    async def prefetch(self, chunks: Sequence[Chunk], *, limiter: trio.CapacityLimiter,
                       merging_size: int) -> tuple[int, int]: ...


class ElfPrefetcher:
    def __init__(self, reader: PredictReader, bootstrap: Bootstrap, *,
                 metrics: Metrics | None = None, whole_max: int = WHOLE_MAX,
                 max_files: int = MAX_FILES, max_total: int = MAX_TOTAL,
                 max_total_bytes: int = MAX_TOTAL_BYTES, slots: int = SLOTS,
                 range_size: int = 1 << 20):
        self.reader = reader
        self.bootstrap = bootstrap
        self.whole_max = whole_max
        self.max_files = max_files
        self.max_total = max_total
        self.bytes_left = max_total_bytes   # whole-file fetches this mount may still start
        self.range_size = range_size
        self.slots = trio.CapacityLimiter(slots)      # bulk ranges in flight
        self._threads = trio.CapacityLimiter(slots)
        self._small_threads = trio.CapacityLimiter(SMALL_SLOTS)
        self._seen: set[int] = set()        # inodes predicted (deps + whole file) this mount
        self._tried: set[int] = set()       # inodes whose first chunk triggered a parse
        self._runtime_started = False       # glibc's start-up files asked for (once a mount)
        self._python_started = False        # CPython's (pystart), once a mount
        m = (metrics or Metrics()).fs      # in /api/v1/metrics with the reads they serve
        self._m_triggers = m.counter("predict_triggers")
        self._m_files = m.counter("predict_files")
        self._m_chunks = m.counter("predict_chunks")
        self._m_errors = m.counter("predict_errors")
        self._m_active = m.gauge("predict_active")  # predictions running now
        self._active = 0

    def trigger(self, ino: int, head: bytes | bytearray | memoryview) -> None:
        """Called on the trio loop with the verified first chunk of `ino`, which a read just
        fetched; starts the prediction in the background when it is an executable to load."""
        if (ino in self._seen or ino in self._tried or len(self._tried) >= 4 * self.max_total
                or not elfdeps.is_elf(head)):
            return
        self._tried.add(ino)
        self._m_triggers.inc()
        self._active += 1
        self._m_active.set(self._active)
        trio.lowlevel.spawn_system_task(self._run, ino, bytes(head))

    async def _run(self, ino: int, head: bytes) -> None:
        budget = [self.max_files]
        try:
            async with trio.open_nursery() as nursery:
                await self._file(nursery, ino, head, budget, trio.Event(), executable=True)
        except Exception as e:  # noqa: BLE001  (a system task must not raise; reads go on)
            self._m_errors.inc()
            log.debug("prediction for inode %d stopped: %s", ino, e)
        finally:
            self._active -= 1
            self._m_active.set(self._active)

    async def _file(self, nursery: trio.Nursery, ino: int, head: bytes | None, budget: list[int],
                    parsed: trio.Event, executable: bool = False) -> None:
        """Parse (the loader needs these bytes next), start the dependencies, and once their
        headers are in, fetch the rest of this file: the loader maps and relocates the
        libraries before the executable's own code runs."""
        bs = self.bootstrap
        deps = None
        try:
            size = bs.attr(ino).size
            deps = await self._parse(ino, size, head)
        finally:
            if deps is None or not executable:
                parsed.set()
        if deps is None or (executable and deps.interp is None):
            return                          # not ELF, or a static executable / a library read
        if executable:
            if ino in self._seen or len(self._seen) >= self.max_total:
                return
            self._seen.add(ino)
            self._m_files.inc()
        path = bs.path_of(ino).encode("utf-8", "surrogateescape")
        waits = []
        libc = None
        for dep in elfdeps.resolve(bs, deps, path):
            if executable and not self._runtime_started and libc is None:
                dep_path = bs.path_of(dep).encode("utf-8", "surrogateescape")
                if posixpath.basename(dep_path) == elfdeps.GLIBC_SONAME:
                    libc = dep_path
            if dep in self._seen or budget[0] <= 0 or len(self._seen) >= self.max_total:
                continue
            self._seen.add(dep)
            budget[0] -= 1
            self._m_files.inc()
            ev = trio.Event()
            waits.append(ev)
            nursery.start_soon(self._file, nursery, dep, None, budget, ev)
        for ev in waits:
            await ev.wait()
        parsed.set()
        runtime: list[int] = []             # wanted after the loader's own bytes
        if libc is not None and not self._runtime_started:
            self._runtime_started = True
            runtime += elfdeps.glibc_runtime(bs, libc)
        if executable and not self._python_started:
            python = pystart.startup_files(bs, path)
            if python:
                self._python_started = True
                runtime += python
        if runtime:
            nursery.start_soon(self._runtime, runtime)
        if size <= self.whole_max and size <= self.bytes_left:
            self.bytes_left -= size
            await self._rest(ino)

    async def _runtime(self, inos: list[int]) -> None:
        """Small files a runtime reads at start-up (elfdeps.glibc_runtime, pystart), once per
        mount, all at once and outside the bulk slots: a few KB each, wanted right after the
        loader's work, one serial miss each otherwise (measured: 3 of a python3 start's 7 for
        glibc's, the other 4 for CPython's). Their chunks are planned as ranges together (files
        of one directory usually share batch chunks or sit side by side in the blob), and the
        ranges go out concurrently."""
        bs = self.bootstrap
        todo = [ino for ino in dict.fromkeys(inos)
                if ino not in self._seen and len(self._seen) < self.max_total]
        self._seen.update(todo)
        self._m_files.inc(len(todo))
        wanted: dict[tuple[int, int], Chunk] = {}
        for ino in todo:
            for c in self.reader.uncached([bs.chunk(i) for i in bs.file_chunk_ids(ino)]):
                wanted.setdefault((c.blob, c.index), c)
        async with trio.open_nursery() as nursery:
            for r in plan_ranges(list(wanted.values()), max_gap=self.reader.max_gap, limit=self.range_size):
                nursery.start_soon(self._small, r.chunks)

    async def _small(self, chunks: Sequence[Chunk]) -> None:
        n, _ = await self.reader.prefetch(chunks, limiter=self._small_threads,
                                          merging_size=self.range_size)
        self._m_chunks.inc(n)

    async def _rest(self, ino: int) -> None:
        """The file's chunks nobody has, one range at a time per slot: a range claims its chunks
        (single-flight) only when it is sent, so a read never waits behind queued ones, and
        the few slots leave the link to the reads' own misses."""
        bs = self.bootstrap
        chunks = self.reader.uncached([bs.chunk(c) for c in bs.file_chunk_ids(ino)])
        for r in plan_ranges(chunks, max_gap=self.reader.max_gap, limit=self.range_size):
            async with self.slots:
                todo = self.reader.uncached(r.chunks)
                if todo:
                    n, _ = await self.reader.prefetch(todo, limiter=self._threads,
                                                      merging_size=self.range_size)
                    self._m_chunks.inc(n)

    async def _parse(self, ino: int, size: int, head: bytes | None) -> elfdeps.ElfDeps | None:
        """Parses with the bytes at hand, fetching (through the read path, verified) what the
        parse asks for, a bounded number of times."""
        have: dict[int, bytes] = {}
        if head is not None:
            have[0] = head

        def get(off: int, n: int) -> bytes:
            if off < 0 or n < 0 or off >= size:
                return b""
            n = min(n, size - off)
            for start, data in have.items():
                if start <= off and off + n <= start + len(data):
                    return data[off - start:off - start + n]
            raise elfdeps.NeedBytes(off, n)
        for _ in range(PARSE_ROUNDS):
            try:
                return elfdeps.parse(get)
            except elfdeps.NeedBytes as need:
                try:
                    have[need.offset] = bytes(await self.reader.read_quiet(ino, need.offset, need.n))
                except NydusError as e:     # the read that needs it reports it
                    log.debug("prediction: %s", e)
                    return None
        return None
