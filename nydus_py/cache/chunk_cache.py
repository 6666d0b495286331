"""On-disk, persistent cache of verified, uncompressed chunks, one pair of files per blob *and
chunk table*. The layout (file names, header, records) is defined in cache/gc.py.

Trust (see docs/operations.md "Trust model"): one cache directory may be shared by many mounts
of many images, some hostile. An image can name any blob digest and describe any chunks in it,
and its backend can serve any bytes under that digest. So a blob's cache entry is keyed by
(blob digest, sha256 of the chunk table of that blob as the reading bootstrap describes it:
every chunk's sha256, compressed and uncompressed offset and size, compression; see
`entry.table_digest`). Bytes are stored into an entry only after they were sha256-verified
against that very table (the reader checks every fetched chunk before `store_many`), and a table whose
chunks overlap is never cached. Hence every ready chunk in an entry is the chunk that table
names, and any mount whose bootstrap has the same table (legit images sharing a blob share it
byte for byte, see docs/architecture.md) reads bytes proven to be its own; a bootstrap with any
other table gets another entry. Stores are write-once: a chunk that is ready (in memory or on
disk) is never rewritten; only eviction clears it, under the lock protocol below. An entry with
a bad header (crash while creating it, older layout) is replaced only while nobody has it open:
new files are created and renamed over it under an flock of the directory; if another process
has it open the blob is read uncached. Nothing is ever truncated in place.

Write order: data (pwrite), then its record (pwrite); no fsync. A crash, or writeback
reordering the two files, therefore leaves a chunk either not ready (fetched again) or marked
ready over torn data, which the xxh3 check catches on read: the chunk is then marked missing,
`blobcache.cache_corrupt` is bumped and None is returned, so the caller fetches it again. The
xxh3 check is the cheap guard against bit rot and torn writes.

When: a chunk is xxh3-checked on its first read by this process (chunks it stored itself count
as checked); `revalidate=True` checks every read. With `validate=True` (the daemon's
`digest_validate`) every hit is instead read whole and sha256-checked against the digest the
reading bootstrap gives for it, before it is served.

The records of every open blob are mirrored in memory (a bytearray, 16 bytes per chunk), so
`missing()` does no I/O at all (the read path calls it from the trio thread to plan a fetch).

Errors: a failed *write* (ENOSPC, EIO, cache size limit) raises CacheError with the errno; the
chunks whose records were not written stay missing. A failed *read* of the cache is logged,
counted (`read_errors`) and reported as a miss (None): the backend is still there. A blob whose
cache files cannot be created or opened (full disk, read-only fs, a planted symlink, an entry
another process holds with a bad header) is opened *uncached*: one warning line,
`blobcache.uncached_blobs`, every read a miss, stores dropped; the mount goes on. The read
path's policy on CacheError from `store_many` (serve the verified bytes anyway) is in
io/reader.py.

Files: everything is opened relative to the cache directory's fd with O_NOFOLLOW, created 0600;
the directory itself is opened (and as root, checked) by cache/safedir.py.

Size: `used_bytes` is the sum of the sizes of ready chunks of the blobs this process has open
(disk usage is a bit higher because of block granularity); `total_bytes` adds the other blobs
in the directory as of the last scan. With `max_size`, a store that would go over the limit
first evicts, down to 90% of the limit (so that eviction is not paid on every store):
  1. whole entries no process has open (see cache/gc.py: lockf-based "in use"), least recently
     used first (meta mtime);
  2. then chunks of this process's own entries that no other process has open, least recently
     read or stored first (a per-chunk tick in memory), by clearing their records and punching
     a hole in the data file.
If that cannot make room (everything belongs to blobs other mounts use), the store raises
CacheError(ENOSPC) and the read path serves the bytes uncached.

Eviction vs. concurrent reads: chunks are punched out, their records cleared and the blob's
eviction generation bumped in one critical section of the blob's lock, and `read` re-checks
record and generation under that lock after its pread, so a reader racing an eviction gets a
miss, never zeros. A store whose data write overlapped an eviction of the same blob publishes
nothing (its chunks are fetched again).

Sharing a work_dir between processes (one per mount, see docs/operations.md): every process
holds a POSIX read lock on the meta files of the entries it has open. An entry is deleted or
replaced only under a write lock (nobody uses it); chunks are evicted only from entries whose
lock this process can upgrade to a write lock (nobody else uses them), held during the eviction.

Thread-safe and blocking: call it from worker threads (except `missing`, which is memory-only).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import itertools
import logging
import os
import threading
from array import array
from pathlib import Path
from typing import Callable, Sequence

import xxhash

from nydus_py.cache import entry, safedir
from nydus_py.cache import gc as gc_mod

# the on-disk layout is defined once, in gc.py, which reads the same files
from nydus_py.cache.gc import HEADER, READY, RECORD
from nydus_py.errors import CacheError
from nydus_py.format.bootstrap import (
    BlobInfo,
    Chunk,
)
from nydus_py.metrics import Metrics
from nydus_py.storage.backend import blob_hex

log = logging.getLogger(__name__)

_NOT_READY = bytes(RECORD.size)
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0x8)     # Linux >= 4.14 (buffered reads)
# Largest chunk `read_nowait` reads whole and xxh3-checks on the event loop (~25 us for 1 MiB);
# bigger ones are checked in a worker thread by `read`.
NOWAIT_CHECK_MAX = 1 << 20
NOWAIT_CHECK_SMALL = 128 << 10  # ... and above this size only for a read of half of it or more


LOW_WATERMARK = 0.9     # eviction frees down to this fraction of max_size

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
# CDLL(None): the libc this process already has; find_library would run ldconfig (~7 ms of
# every mount's start-up).
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Frees [offset, offset+length) of a file (reads return zeros). False if unsupported."""
    r = _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
    return r == 0


class _Blob:
    __slots__ = ("info", "name", "key", "data_fd", "meta_fd", "records", "verified", "lock",
                 "used", "gen", "atime", "offset_of")

    def __init__(self, info: BlobInfo, name: str, data_fd: int, meta_fd: int, records: bytearray,
                 used: int):
        self.info = info
        self.name = name
        self.data_fd = data_fd
        self.meta_fd = meta_fd
        self.records = records
        self.verified = bytearray(info.chunk_count)  # xxh3-checked (or stored) in this process
        self.lock = threading.Lock()
        self.used = used
        self.key = ""             # entry key (gc.entry_key); "" when uncached
        self.gen = 0                                   # bumped by every eviction in the blob
        self.atime = array("Q", bytes(8 * info.chunk_count))   # LRU tick per chunk
        # chunk index -> data offset (to punch evicted chunks out)
        self.offset_of: Callable[[int], int] | None = None


# errno values for which a blob is opened uncached instead of failing the mount
_DEGRADE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.ELOOP, errno.EBUSY,
            errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EAGAIN, errno.EMLINK)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


class ChunkCache:
    """Persistent chunk cache under `work_dir`. See the module docstring for format and policy.

    Blobs are addressed by the handle `open_blob` returns (the same handle for the same blob
    id and table, however often it is opened); chunks by their index within the blob.
    """

    def __init__(self, work_dir: str | os.PathLike, *, max_size: int | None = None,
                 revalidate: bool = False, validate: bool = False, metrics: Metrics | None = None):
        self.work_dir = Path(work_dir)
        # ConfigError (one line) for a directory we cannot create, open, or (as root) trust
        self.dir_fd = safedir.open_dir(self.work_dir, what="cache directory")
        self.max_size = max_size
        self.revalidate = revalidate
        self.validate = validate
        m = (metrics or Metrics()).blobcache
        self._m_hits = m.counter("hits")
        self._m_misses = m.counter("misses")
        self._m_corrupt = m.counter("cache_corrupt")
        self._m_digest_errors = m.counter("digest_errors")
        self._m_read_errors = m.counter("read_errors")
        self._m_nowait_checks = m.counter("nowait_checks")
        self._m_stored = m.counter("stored_chunks")
        self._m_stored_bytes = m.counter("stored_bytes")
        self._m_store_errors = m.counter("store_errors")
        self._m_uncached = m.counter("uncached_blobs")
        self._m_used = m.gauge("used_bytes")
        self._m_total = m.gauge("total_bytes")
        self._m_max = m.gauge("max_size")
        self._m_evicted_chunks = m.counter("evicted_chunks")
        self._m_evicted_bytes = m.counter("evicted_bytes")
        self._m_evicted_blobs = m.counter("evicted_blobs")
        self._m_evictions = m.counter("evictions")
        self._m_max.set(max_size or 0)
        self._lock = threading.Lock()
        self._evict_lock = threading.Lock()
        self._blobs: list[_Blob] = []
        self._by_id: dict[str, int] = {}
        self._used = 0
        self._tick = itertools.count(1)
        # Entries in work_dir that this process has not opened, as of the last scan.
        self._others: dict[str, int] = {}
        if max_size:
            self._rescan()

    # -- blobs ----------------------------------------------------------------------------------
    def open_blob(self, blob: BlobInfo, offset_of: Callable[[int], int] | None = None, *,
                  table: bytes | None = None) -> int:
        """Opens (creating or validating) the cache entry of `blob` as read through chunk table
        `table` (`table_digest`; FileReader always passes it) and returns its handle.
        table=b"" opens the blob uncached; None keys the entry by the blob alone, which is only
        safe for a cache directory one image uses (unit tests).
        `offset_of(index)` gives a chunk's data offset; without it evicted chunks are only
        marked missing, their disk blocks are not freed.
        A blob whose files cannot be created or opened is opened uncached (module docstring)."""
        if table is None:
            table = entry.untabled(blob)
        key = gc_mod.entry_key(blob_hex(blob.id), table) if table else ""
        with self._lock:
            h = self._by_id.get(key or blob.id + "/uncached")
            if h is not None:
                return h
            if not key:
                log.warning("blob cache: blob %s has overlapping chunks in its table; reading it "
                            "uncached", blob.id)
                b = self._uncached(blob)
            else:
                try:
                    b = self._open(blob, table, key)
                except CacheError as e:
                    if e.errno not in _DEGRADE:
                        raise
                    log.warning("%s; reading blob %s uncached", e, blob.id)
                    b = self._uncached(blob)
            b.offset_of = offset_of
            self._blobs.append(b)
            h = self._by_id[key or blob.id + "/uncached"] = len(self._blobs) - 1
            self._others.pop(b.key, None)
            self._used += b.used
            self._publish_sizes()
            return h

    def _uncached(self, blob: BlobInfo) -> _Blob:
        self._m_uncached.inc()
        return _Blob(blob, blob_hex(blob.id)[:12], -1, -1, bytearray(blob.chunk_count * RECORD.size), 0)

    def _open(self, blob: BlobInfo, table: bytes, key: str) -> _Blob:
        """Opens the entry's files and takes the shared "in use" lock; retries if a gc removed
        (or a creator replaced) the files between our open and our lock (st_nlink == 0)."""
        head = entry.header(blob, blob_hex(blob.id), table)
        what = f"blob cache for {blob.id} in {self.work_dir}"
        for _ in range(8):
            try:
                fds = entry.open_existing(self.dir_fd, key)
            except OSError as e:
                raise CacheError(f"{what}: {e.strerror}", errno=e.errno) from None
            if fds is None:
                entry.install(self.dir_fd, key, blob, head, what)
                continue
            data_fd, meta_fd = fds
            b = _Blob(blob, blob_hex(blob.id)[:12], data_fd, meta_fd, bytearray(), 0)
            try:
                fcntl.lockf(meta_fd, fcntl.LOCK_SH)
                if not (os.fstat(meta_fd).st_nlink and os.fstat(data_fd).st_nlink):
                    self._close_fds(b)
                    continue
                if not entry.valid(data_fd, meta_fd, head, blob.uncompressed_size):
                    self._close_fds(b)
                    entry.install(self.dir_fd, key, blob, head, what)
                    continue
                self._load_records(b)
                os.utime(meta_fd)         # LRU stamp for gc between mounts
                b.key = key
                return b
            except OSError as e:
                self._close_fds(b)
                raise CacheError(f"{what}: {e.strerror}", errno=e.errno) from None
        raise CacheError(f"{what}: files keep disappearing (another process collecting the "
                         "cache?)", errno=errno.EAGAIN)

    def _load_records(self, b: _Blob) -> None:
        nrec = b.info.chunk_count
        records = bytearray(os.pread(b.meta_fd, nrec * RECORD.size, HEADER.size))
        records.extend(bytes(nrec * RECORD.size - len(records)))  # short file: not ready
        used = 0
        # A fresh or empty cache has only zero records: skip the per-record scan (~40 ms for
        # 100k chunks, part of every mount's start-up).
        scan = RECORD.iter_unpack(records) if records.count(0) != len(records) else ()
        for i, (ready, size, _) in enumerate(scan):
            if ready == READY:
                used += size
            elif ready:  # torn record: neither 0 nor READY
                records[i * RECORD.size:(i + 1) * RECORD.size] = _NOT_READY
        b.records, b.used = records, used
        b.verified = bytearray(nrec)

    @staticmethod
    def _close_fds(b: _Blob) -> None:
        for fd in (b.data_fd, b.meta_fd):
            if fd < 0:
                continue
            try:
                os.close(fd)
            except OSError:
                pass

    def _blob(self, handle: int) -> _Blob:
        try:
            return self._blobs[handle]
        except IndexError:
            raise ValueError(f"unknown blob cache handle {handle}") from None

    # -- queries --------------------------------------------------------------------------------
    def missing(self, blob: int, indices: Sequence[int]) -> list[int]:
        """The indices among `indices` not stored (yet). Memory only, never blocks on I/O."""
        rec = self._blob(blob).records
        step = RECORD.size
        return [i for i in indices if rec[i * step] != READY]

    def is_ready(self, blob: int, index: int) -> bool:
        return self._blob(blob).records[index * RECORD.size] == READY

    @property
    def used_bytes(self) -> int:
        """Ready bytes of the blobs this process has open."""
        return self._used

    @property
    def total_bytes(self) -> int:
        """`used_bytes` plus the other blobs in work_dir as of the last scan."""
        return self._used + sum(self._others.values())

    # -- data -----------------------------------------------------------------------------------
    def read(self, blob: int, index: int, offset: int, size: int,
             start: int = 0, stop: int | None = None, digest: bytes | None = None) -> bytes | None:
        """Bytes [start, stop) (default: all) of the chunk stored at `offset` (`size` bytes) of
        the blob's data; None when not stored or failing its check (then it is marked missing
        so that it is fetched again).

        The whole chunk is read and xxh3-checked the first time this process reads it; after
        that (or for chunks this process stored) only [start, stop) is read, so a small read of
        a big chunk costs a small pread. With `revalidate=True` every read checks the whole
        chunk (catches bit rot during a run, at the cost of reading whole chunks). With
        `validate=True` and the chunk's sha256 `digest` (from the reading bootstrap), every
        read reads the whole chunk and checks it against `digest` before serving it.
        """
        sha = digest if self.validate else None
        b = self._blob(blob)
        stop = size if stop is None else stop
        if not 0 <= start <= stop <= size:
            raise ValueError(f"bad slice [{start}, {stop}) of a {size}-byte chunk")
        pos = index * RECORD.size
        with b.lock:
            rec = bytes(b.records[pos:pos + RECORD.size])
            verified = b.verified[index] and not self.revalidate and sha is None
            gen = b.gen
        ready, rsize, rhash = RECORD.unpack(rec)
        if ready != READY:
            self._m_misses.inc()
            return None
        b.atime[index] = next(self._tick)
        try:
            if verified and rsize == size:
                data = os.pread(b.data_fd, stop - start, offset + start)
                if not self._unchanged(b, pos, rec, gen):
                    self._m_misses.inc()        # evicted while we read: maybe holes
                    return None
                if len(data) == stop - start:
                    self._m_hits.inc()
                    return data
                verified = 0  # the file shrank under us: fall through to the full check
            data = os.pread(b.data_fd, size, offset)
            if not self._unchanged(b, pos, rec, gen):
                self._m_misses.inc()
                return None
        except OSError as e:
            self._m_read_errors.inc()
            log.warning("blob cache %s: reading chunk %d failed (%s); fetching it again",
                        b.name, index, e.strerror)
            return None
        if rsize != size or len(data) != size or xxhash.xxh3_64_intdigest(data) != rhash:
            self._m_corrupt.inc()
            log.warning("blob cache %s: chunk %d (offset %d, size %d) failed its xxh3 check; "
                        "fetching it again", b.name, index, offset, size)
            self._invalidate(b, index, rec)
            return None
        if sha is not None and hashlib.sha256(data).digest() != sha:
            self._m_corrupt.inc()
            self._m_digest_errors.inc()
            log.warning("blob cache %s: chunk %d (offset %d, size %d) does not match its sha256 "
                        "%s (digest_validate); fetching it again", b.name, index, offset, size,
                        sha.hex()[:16])
            self._invalidate(b, index, rec)
            return None
        with b.lock:
            if bytes(b.records[pos:pos + RECORD.size]) == rec and b.gen == gen:
                b.verified[index] = 1
        self._m_hits.inc()
        return data if (start, stop) == (0, size) else data[start:stop]

    def read_nowait(self, blob: int, index: int, offset: int, size: int,
                    start: int, stop: int) -> bytearray | memoryview | None:
        """As `read`, but only from the page cache (preadv2 with RWF_NOWAIT), so it never blocks
        on the disk and can run on the event loop. None means "ask `read`", never "missing".

        A chunk this process has already checked: only [start, stop) is read. One it has not
        (the first read after a restart, or every read with `revalidate`): the whole chunk is
        read and xxh3-checked here, exactly as `read` does, if all of it is in memory and it is
        at most NOWAIT_CHECK_SMALL bytes, or at most NOWAIT_CHECK_MAX with half of it asked for;
        a chunk failing the check is left to `read`, which reads it again, counts, logs and
        drops it. Never serves with `validate` (every read is then a full sha256 check, which
        is `read`'s). Returns a buffer of its own (pyfuse3 replies from any buffer)."""
        if self.validate:
            return None
        b = self._blob(blob)
        if not 0 <= start <= stop <= size:
            raise ValueError(f"bad slice [{start}, {stop}) of a {size}-byte chunk")
        pos = index * RECORD.size
        with b.lock:
            rec = bytes(b.records[pos:pos + RECORD.size])
            verified = b.verified[index] and not self.revalidate
            gen = b.gen
        ready, rsize, rhash = RECORD.unpack(rec)
        if ready != READY or rsize != size:
            return None
        if not verified and (size > NOWAIT_CHECK_MAX or
                             (size > NOWAIT_CHECK_SMALL and 2 * (stop - start) < size)):
            return None     # a small slice of a big chunk (a random pread): copying and hashing
            #                 all of it here would delay every other request; `read` does it
        lo, hi = (start, stop) if verified else (0, size)
        buf = bytearray(hi - lo)
        try:
            n = os.preadv(b.data_fd, [buf], offset + lo, _RWF_NOWAIT)
        except OSError:         # EAGAIN: not in memory; anything else: `read` reports it
            return None
        if n != len(buf):
            return None
        if not verified and xxhash.xxh3_64_intdigest(buf) != rhash:
            return None         # torn or rotten: `read` checks it again and drops it
        with b.lock:            # still the chunk we read (no eviction or invalidation since)?
            if b.gen != gen or bytes(b.records[pos:pos + RECORD.size]) != rec:
                return None
            if not verified:
                b.verified[index] = 1
        b.atime[index] = next(self._tick)
        self._m_hits.inc()
        if verified:
            return buf
        self._m_nowait_checks.inc()
        return memoryview(buf)[start:stop]

    @staticmethod
    def _unchanged(b: _Blob, pos: int, rec: bytes, gen: int) -> bool:
        with b.lock:
            return b.gen == gen and bytes(b.records[pos:pos + RECORD.size]) == rec

    def _invalidate(self, b: _Blob, index: int, seen: bytes) -> None:
        """Marks a chunk missing, unless it was re-stored since `seen` was read."""
        pos = index * RECORD.size
        with b.lock:
            if bytes(b.records[pos:pos + RECORD.size]) != seen:
                return
            b.records[pos:pos + RECORD.size] = _NOT_READY
            b.verified[index] = 0
            b.used -= RECORD.unpack(seen)[1]
        self._account(-RECORD.unpack(seen)[1])
        try:
            _pwrite_all(b.meta_fd, _NOT_READY, HEADER.size + pos)
        except OSError as e:  # the record stays ready on disk; xxh3 catches it again later
            log.warning("blob cache %s: cannot clear record %d: %s", b.name, index, e.strerror)

    def store_many(self, blob: int, items: Sequence[tuple[Chunk, bytes]]) -> None:
        """Stores verified chunks (data first, then records). Raises CacheError on a write
        failure or when `max_size` would be exceeded; chunks stored before the failure stay."""
        b = self._blob(blob)
        if b.data_fd < 0:
            return                              # uncached blob (see open_blob)
        todo = sorted(((c, d) for c, d in items if b.records[c.index * RECORD.size] != READY),
                      key=lambda cd: cd[0].index)
        if not todo:
            return
        limit = b.info.uncompressed_size
        for c, d in todo:
            if len(d) != c.size or c.offset + c.size > limit or not 0 <= c.index < b.info.chunk_count:
                raise ValueError(f"chunk {c.id} does not fit blob {b.info.id} "
                                 f"(index {c.index}, offset {c.offset}, size {c.size}/{len(d)})")
        todo = self._adopt_stored(b, todo)
        if not todo:
            return
        self._reserve(b, sum(c.size for c, _ in todo))
        gen = b.gen
        done: list[tuple[Chunk, bytes]] = []
        try:
            try:
                for c, d in todo:
                    _pwrite_all(b.data_fd, d, c.offset)
                    done.append((c, RECORD.pack(READY, c.size, xxhash.xxh3_64_intdigest(d))))
            finally:
                self._commit(b, done, gen)
        except OSError as e:
            self._m_store_errors.inc()
            raise CacheError(f"blob cache {b.info.id} in {self.work_dir}: cannot store "
                             f"chunks: {e.strerror}", errno=e.errno) from None

    def _adopt_stored(self, b: _Blob, todo: list[tuple[Chunk, bytes]]) -> list[tuple[Chunk, bytes]]:
        """Write-once: chunks another process stored meanwhile (ready on disk) are not written
        again; their records are taken into memory instead. Returns the rest."""
        lo, hi = todo[0][0].index, todo[-1][0].index + 1
        try:
            disk = os.pread(b.meta_fd, (hi - lo) * RECORD.size, HEADER.size + lo * RECORD.size)
        except OSError:
            return todo
        rest, added = [], 0
        with b.lock:
            for c, d in todo:
                at = (c.index - lo) * RECORD.size
                rec = disk[at:at + RECORD.size]
                if len(rec) == RECORD.size and rec[0] == READY:
                    pos = c.index * RECORD.size
                    if b.records[pos] != READY:
                        b.records[pos:pos + RECORD.size] = rec
                        added += RECORD.unpack(rec)[1]
                else:
                    rest.append((c, d))
            b.used += added
        if added:
            self._account(added)
        return rest

    def _commit(self, b: _Blob, done: list[tuple[Chunk, bytes]], gen: int) -> None:
        """Writes the records of chunks whose data is on disk (contiguous runs in one pwrite),
        then publishes them in memory. If the blob saw an eviction since the data was written
        (generation `gen`), a hole may have been punched over it: publish nothing."""
        with b.lock:
            if b.gen != gen:
                return
        run_start = 0
        for i in range(1, len(done) + 1):
            if i == len(done) or done[i][0].index != done[i - 1][0].index + 1:
                first = done[run_start][0].index
                _pwrite_all(b.meta_fd, b"".join(r for _, r in done[run_start:i]),
                            HEADER.size + first * RECORD.size)
                added = 0
                tick = next(self._tick)
                with b.lock:
                    if b.gen != gen:        # evicted while we wrote the records: not ready
                        return
                    for c, r in done[run_start:i]:
                        b.atime[c.index] = tick
                        pos = c.index * RECORD.size
                        if b.records[pos] != READY:
                            added += c.size
                        b.records[pos:pos + RECORD.size] = r
                        b.verified[c.index] = 1  # its sha256 was checked before the store
                    b.used += added
                self._account(added)
                self._m_stored.inc(i - run_start)
                self._m_stored_bytes.inc(sum(c.size for c, _ in done[run_start:i]))
                run_start = i

    def _reserve(self, b: _Blob, nbytes: int) -> None:
        """Makes room for `nbytes` under `max_size` (evicting), or raises CacheError(ENOSPC).
        Concurrent stores may overshoot the limit by what they store at the same moment."""
        if not self.max_size or self.total_bytes + nbytes <= self.max_size:
            return
        with self._evict_lock:
            if self.total_bytes + nbytes > self.max_size:
                target = min(int(self.max_size * LOW_WATERMARK), self.max_size - nbytes)
                self._evict(max(target, 0))
            if self.total_bytes + nbytes > self.max_size:
                self._m_store_errors.inc()
                raise CacheError(
                    f"blob cache {self.work_dir} is full ({self.total_bytes} of {self.max_size} "
                    f"bytes used, {nbytes} more needed for blob {b.info.id}; the rest belongs "
                    f"to blobs other mounts use)", errno=errno.ENOSPC)

    # -- eviction -------------------------------------------------------------------------------
    def _scan_others(self) -> list[gc_mod.BlobUsage]:
        """The entries this process has not open. Under self._lock: scanning opens and closes
        meta files, and closing any fd of a file drops this process's POSIX lock on it, so no
        blob may be opened (and locked) while the scan runs."""
        with self._lock:
            return gc_mod.scan(self.dir_fd, skip={b.key for b in self._blobs})

    def _rescan(self) -> None:
        others = {u.key: u.used for u in self._scan_others()}
        with self._lock:
            self._others = others
        self._publish_sizes()

    def _evict(self, target: int) -> None:
        """Frees space until total_bytes <= target: unused blobs, then own chunks (LRU)."""
        self._m_evictions.inc()
        self._rescan()
        blobs = self._scan_others()
        for u in sorted(blobs, key=lambda u: (u.valid, u.mtime)):
            if self.total_bytes <= target:
                return
            with self._lock:                # never probe (and so unlock) a blob we opened
                if u.key in {b.key for b in self._blobs}:
                    continue
                removed = gc_mod.remove_if_unused(self.dir_fd, u.key)
                if removed:
                    self._others.pop(u.key, None)
            if removed:
                self._m_evicted_blobs.inc()
                log.info("blob cache %s: evicted unused blob %s (%d bytes)", self.work_dir,
                         u.key[:12], u.used)
        self._publish_sizes()
        if self.total_bytes > target:
            self._evict_own_chunks(self.total_bytes - target)

    def _evict_own_chunks(self, need: int) -> None:
        with self._lock:
            blobs = list(self._blobs)
        mine = []
        for b in blobs:
            if b.meta_fd < 0:
                continue            # uncached
            try:        # upgrade our read lock; fails (and keeps it) if another process has it
                fcntl.lockf(b.meta_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                mine.append(b)
            except OSError:
                continue
        try:
            cands = []
            for b in mine:
                rec, at = b.records, b.atime
                for i in range(b.info.chunk_count):
                    if rec[i * RECORD.size] == READY:
                        cands.append((at[i], i, b))
            cands.sort(key=lambda t: t[0])
            victims: dict[int, tuple[_Blob, list[int]]] = {}
            freed = 0
            for _, i, b in cands:
                if freed >= need:
                    break
                victims.setdefault(id(b), (b, []))[1].append(i)
                freed += RECORD.unpack_from(b.records, i * RECORD.size)[1]
            for b, indices in victims.values():
                self._evict_chunks(b, indices)
        finally:
            for b in mine:
                try:
                    fcntl.lockf(b.meta_fd, fcntl.LOCK_SH)
                except OSError as e:
                    log.warning("blob cache %s: cannot downgrade lock: %s", b.name, e.strerror)

    def _evict_chunks(self, b: _Blob, indices: list[int]) -> None:
        """Punches the chunks out, clears their records and bumps the generation in ONE
        critical section of the blob's lock: a reader re-checks record and generation under
        that lock after its pread, so whatever its pread saw during the punch is discarded;
        a store that wrote over a punched range sees the new generation and publishes nothing.
        The on-disk records are cleared afterwards (a crash in between leaves ready records
        over holes, which the xxh3 check catches)."""
        freed = []
        with b.lock:
            b.gen += 1
            for i in indices:
                pos = i * RECORD.size
                ready, size, _ = RECORD.unpack_from(b.records, pos)
                if ready != READY:
                    continue
                if b.offset_of is not None:
                    punch_hole(b.data_fd, b.offset_of(i), size)
                b.records[pos:pos + RECORD.size] = _NOT_READY
                b.verified[i] = 0
                b.used -= size
                freed.append((i, size))
        total = sum(s for _, s in freed)
        self._account(-total)
        self._m_evicted_chunks.inc(len(freed))
        self._m_evicted_bytes.inc(total)
        for i, size in freed:
            try:
                _pwrite_all(b.meta_fd, _NOT_READY, HEADER.size + i * RECORD.size)
            except OSError as e:
                log.warning("blob cache %s: cannot clear record %d: %s", b.name, i, e.strerror)
        log.debug("blob cache %s: evicted %d chunks (%d bytes)", b.name, len(freed), total)

    def _account(self, delta: int) -> None:
        with self._lock:
            self._used += delta
        self._publish_sizes()

    def _publish_sizes(self) -> None:
        self._m_used.set(self._used)
        self._m_total.set(self.total_bytes)

    def close(self) -> None:
        with self._lock:
            blobs, self._blobs, self._by_id = self._blobs, [], {}
        for b in blobs:
            if b.meta_fd < 0:
                continue            # uncached
            try:        # "flush the cache map": records reach the disk before we let go
                os.fsync(b.meta_fd)
                os.utime(b.meta_fd)
            except OSError as e:
                log.warning("blob cache %s: cannot flush metadata: %s", b.name, e.strerror)
            self._close_fds(b)      # also releases the "in use" lock
        fd, self.dir_fd = self.dir_fd, -1
        if fd >= 0:
            os.close(fd)
