"""On-disk, persistent cache of verified, uncompressed chunks, one pair of files per blob.

Under `work_dir`, for blob "sha256:<hex>":

    <hex>.data   sparse file of the blob's uncompressed size; chunk i lives at its `offset`
    <hex>.meta   HEADER (64 bytes) + one RECORD (16 bytes) per chunk, at 64 + 16 * index

    HEADER  magic b"NYPYBCM\\0", version u16, record size u16, chunk_count u32,
            uncompressed size u64, sha256 of the blob (32 bytes), 8 bytes zero
    RECORD  ready u8 (1 = chunk stored), 3 bytes zero, size u32, xxh3-64 of the data u64

Write order: data (pwrite), then its record (pwrite); no fsync. A crash, or writeback
reordering the two files, therefore leaves a chunk either not ready (fetched again) or marked
ready over torn data, which the xxh3 check catches on read: the chunk is then marked missing,
`blobcache.cache_corrupt` is bumped and None is returned, so the caller fetches it again. A meta
file whose header does not match the blob (other version, truncated, garbage) resets the blob's
cache. The xxh3 check is the cheap guard against bit rot and torn writes; the cryptographic
digest is verified once, when a chunk comes from the backend, before it is stored.

When: a chunk is checked on its first read by this process (chunks it stored itself count as
checked), which catches torn writes and rot between runs; `revalidate=True` checks every read.

The records of every open blob are mirrored in memory (a bytearray, 16 bytes per chunk), so
`missing()` does no I/O at all (the read path calls it from the trio thread to plan a fetch).

Errors: a failed *write* (ENOSPC, EIO, cache size limit) raises CacheError with the errno; the
chunks whose records were not written stay missing. A failed *read* of the cache is logged,
counted (`read_errors`) and reported as a miss (None): the backend is still there. The read
path's policy on CacheError from `store_many` (serve the verified bytes anyway) is in io/reader.py.

Size: `used_bytes` is the sum of the sizes of ready chunks (what eviction will account; disk
usage is a bit higher because of block granularity). `max_size` is the seam for eviction
(issue #4): today a store that would exceed it raises CacheError(ENOSPC) instead of evicting.

Thread-safe and blocking: call it from worker threads (except `missing`, which is memory-only).
Several daemons sharing one work_dir is not supported yet (no lock file); it would only cost
misses, never wrong bytes, since every read is checked against its record's xxh3.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
from pathlib import Path
from typing import Sequence

import xxhash

from nydus_py.errors import CacheError
from nydus_py.format.bootstrap import BlobInfo, Chunk
from nydus_py.metrics import Metrics
from nydus_py.storage.backend import blob_hex

log = logging.getLogger(__name__)

META_MAGIC = b"NYPYBCM\x00"
META_VERSION = 1
HEADER = struct.Struct("<8sHHIQ32s8x")
RECORD = struct.Struct("<BxxxIQ")
READY = 1
_NOT_READY = bytes(RECORD.size)


class _Blob:
    __slots__ = ("info", "name", "data_fd", "meta_fd", "records", "verified", "lock", "used")

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


def _header(blob: BlobInfo, hexid: str) -> bytes:
    return HEADER.pack(META_MAGIC, META_VERSION, RECORD.size, blob.chunk_count,
                       blob.uncompressed_size, bytes.fromhex(hexid))


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


class ChunkCache:
    """Persistent chunk cache under `work_dir`. See the module docstring for format and policy.

    Blobs are addressed by the handle `open_blob` returns (the same handle for the same blob
    id, however often it is opened); chunks by their index within the blob.
    """

    def __init__(self, work_dir: str | os.PathLike, *, max_size: int | None = None,
                 revalidate: bool = False, metrics: Metrics | None = None):
        self.work_dir = Path(work_dir)
        try:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"cache work_dir {self.work_dir}: {e.strerror}", errno=e.errno) from None
        self.max_size = max_size
        self.revalidate = revalidate
        m = (metrics or Metrics()).blobcache
        self._m_hits = m.counter("hits")
        self._m_misses = m.counter("misses")
        self._m_corrupt = m.counter("cache_corrupt")
        self._m_read_errors = m.counter("read_errors")
        self._m_stored = m.counter("stored_chunks")
        self._m_stored_bytes = m.counter("stored_bytes")
        self._m_store_errors = m.counter("store_errors")
        self._m_used = m.gauge("used_bytes")
        self._lock = threading.Lock()
        self._blobs: list[_Blob] = []
        self._by_id: dict[str, int] = {}
        self._used = 0

    # -- blobs ----------------------------------------------------------------------------------
    def open_blob(self, blob: BlobInfo) -> int:
        """Opens (creating or validating) the cache files of `blob`; returns its handle."""
        with self._lock:
            h = self._by_id.get(blob.id)
            if h is not None:
                return h
            b = self._open(blob)
            self._blobs.append(b)
            h = self._by_id[blob.id] = len(self._blobs) - 1
            self._used += b.used
            self._m_used.set(self._used)
            return h

    def _open(self, blob: BlobInfo) -> _Blob:
        hexid = blob_hex(blob.id)
        data_path = self.work_dir / f"{hexid}.data"
        meta_path = self.work_dir / f"{hexid}.meta"
        nrec = blob.chunk_count
        want = HEADER.size + nrec * RECORD.size
        data_fd = meta_fd = -1
        try:
            data_fd = os.open(data_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            meta_fd = os.open(meta_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            header = _header(blob, hexid)
            valid = (os.pread(meta_fd, HEADER.size, 0) == header
                     and os.fstat(data_fd).st_size == blob.uncompressed_size)
            if valid:
                records = bytearray(os.pread(meta_fd, nrec * RECORD.size, HEADER.size))
                records.extend(bytes(nrec * RECORD.size - len(records)))  # short file: not ready
            else:
                if os.fstat(meta_fd).st_size:
                    log.warning("blob cache %s: metadata does not match the blob; resetting", meta_path)
                # Invalidate the records first, so a crash in between leaves an invalid header.
                os.ftruncate(meta_fd, 0)
                os.ftruncate(data_fd, 0)
                os.ftruncate(data_fd, blob.uncompressed_size)
                os.ftruncate(meta_fd, want)
                _pwrite_all(meta_fd, header, 0)
                records = bytearray(nrec * RECORD.size)
        except OSError as e:
            for fd in (data_fd, meta_fd):
                if fd >= 0:
                    os.close(fd)
            raise CacheError(f"blob cache for {blob.id} in {self.work_dir}: {e.strerror}",
                             errno=e.errno) from None
        used = 0
        for i, (ready, size, _) in enumerate(RECORD.iter_unpack(records)):
            if ready == READY:
                used += size
            elif ready:  # torn record: neither 0 nor READY
                records[i * RECORD.size:(i + 1) * RECORD.size] = _NOT_READY
        return _Blob(blob, hexid[:12], data_fd, meta_fd, records, used)

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
        return self._used

    # -- data -----------------------------------------------------------------------------------
    def read(self, blob: int, index: int, offset: int, size: int,
             start: int = 0, stop: int | None = None) -> bytes | None:
        """Bytes [start, stop) (default: all) of the chunk stored at `offset` (`size` bytes) of
        the blob's data; None when not stored or failing its xxh3 check (then it is marked
        missing so that it is fetched again).

        The whole chunk is read and xxh3-checked the first time this process reads it; after
        that (or for chunks this process stored) only [start, stop) is read, so a small read of
        a big chunk costs a small pread. With `revalidate=True` every read checks the whole
        chunk (catches bit rot during a run, at the cost of reading whole chunks).
        """
        b = self._blob(blob)
        stop = size if stop is None else stop
        if not 0 <= start <= stop <= size:
            raise ValueError(f"bad slice [{start}, {stop}) of a {size}-byte chunk")
        pos = index * RECORD.size
        with b.lock:
            rec = bytes(b.records[pos:pos + RECORD.size])
            verified = b.verified[index] and not self.revalidate
        ready, rsize, rhash = RECORD.unpack(rec)
        if ready != READY:
            self._m_misses.inc()
            return None
        try:
            if verified and rsize == size:
                data = os.pread(b.data_fd, stop - start, offset + start)
                if len(data) == stop - start:
                    self._m_hits.inc()
                    return data
                verified = 0  # the file shrank under us: fall through to the full check
            data = os.pread(b.data_fd, size, offset)
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
        with b.lock:
            if bytes(b.records[pos:pos + RECORD.size]) == rec:
                b.verified[index] = 1
        self._m_hits.inc()
        return data if (start, stop) == (0, size) else data[start:stop]

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
        todo = sorted(((c, d) for c, d in items if b.records[c.index * RECORD.size] != READY),
                      key=lambda cd: cd[0].index)
        if not todo:
            return
        limit = b.info.uncompressed_size
        for c, d in todo:
            if len(d) != c.size or c.offset + c.size > limit or not 0 <= c.index < b.info.chunk_count:
                raise ValueError(f"chunk {c.id} does not fit blob {b.info.id} "
                                 f"(index {c.index}, offset {c.offset}, size {c.size}/{len(d)})")
        self._reserve(b, sum(c.size for c, _ in todo))
        done: list[tuple[Chunk, bytes]] = []
        try:
            try:
                for c, d in todo:
                    _pwrite_all(b.data_fd, d, c.offset)
                    done.append((c, RECORD.pack(READY, c.size, xxhash.xxh3_64_intdigest(d))))
            finally:
                self._commit(b, done)
        except OSError as e:
            self._m_store_errors.inc()
            raise CacheError(f"blob cache {b.info.id} in {self.work_dir}: cannot store "
                             f"chunks: {e.strerror}", errno=e.errno) from None

    def _commit(self, b: _Blob, done: list[tuple[Chunk, bytes]]) -> None:
        """Writes the records of chunks whose data is on disk (contiguous runs in one pwrite),
        then publishes them in memory."""
        run_start = 0
        for i in range(1, len(done) + 1):
            if i == len(done) or done[i][0].index != done[i - 1][0].index + 1:
                first = done[run_start][0].index
                _pwrite_all(b.meta_fd, b"".join(r for _, r in done[run_start:i]),
                            HEADER.size + first * RECORD.size)
                added = 0
                with b.lock:
                    for c, r in done[run_start:i]:
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
        """Eviction seam (issue #4): make room for `nbytes` or raise. Today: only a check."""
        if self.max_size is not None and self._used + nbytes > self.max_size:
            self._m_store_errors.inc()
            raise CacheError(f"blob cache {self.work_dir} is full ({self._used} of {self.max_size} "
                             f"bytes used, {nbytes} more needed for blob {b.info.id}); eviction is "
                             f"not implemented yet", errno=errno.ENOSPC)

    def _account(self, delta: int) -> None:
        with self._lock:
            self._used += delta
            self._m_used.set(self._used)

    def close(self) -> None:
        with self._lock:
            blobs, self._blobs, self._by_id = self._blobs, [], {}
        for b in blobs:
            for fd in (b.data_fd, b.meta_fd):
                try:
                    os.close(fd)
                except OSError:
                    pass
