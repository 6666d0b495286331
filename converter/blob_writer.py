"""Writes one data blob: the compressed chunks of one source layer, back to back.

A blob has two segments: chunks of files named by the prefetch list come first, so a daemon
can prefetch them with a few large range reads; everything else follows in tar order. Each
segment is a temp file until `finish()` concatenates them (hashing as it goes) into the
final blob file, next to the target, ready to be renamed into place.

Small chunks (`add_member`, format v2) are not compressed alone: they are gathered per
segment into a batch of at most `batch_size` bytes, compressed together (one zstd frame sees
many small files, which is what makes the image smaller than gzip). Chunks (`add`) and batches
are compressed on the executor while later chunks arrive; segment writes stay in add order, so
the blob is byte-reproducible, and at most a few compressions are in flight (memory stays
bounded). Only chunks that are new are compressed (the caller deduplicates first).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections import deque
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path

from nydus_py.format import compression
from nydus_py.format.bootstrap import ChunkSpec

PREFETCH, NORMAL = 0, 1
# per segment: compressions in flight on the executor (each <= chunk_size or batch_size in, as
# much out); enough to keep the workers busy while the reader is parsing
MAX_PENDING = 6
MAX_QUEUED = 16             # per segment: writes waiting behind a compression


@dataclass(frozen=True)
class FinishedBlob:
    digest: str
    size: int
    uncompressed_size: int
    path: Path
    chunks: list[ChunkSpec]   # in blob order; chunk ids are assigned in this order
    order: list[int]          # order[i] = the add() sequence number of chunks[i]


def _compress_batch(codec: str, level: int | None, data: bytes) -> tuple[bytes, bool]:
    z = compression.compress(codec, data, level)
    return (data, False) if z is None else (z, True)


class BlobWriter:
    def __init__(self, work_dir: Path, compressor: str, *, batch_size: int = 0,
                 level: int | None = None, executor: Executor | None = None):
        self.compressor = compressor
        self.batch_size = batch_size
        self._level = level
        self._executor = executor
        self._dir = work_dir
        # the NORMAL segment is a named file hashed as it is written: without a prefetch
        # segment (the usual case) it becomes the blob as is, no second pass over the blob
        self._normal = tempfile.NamedTemporaryFile(dir=work_dir, prefix="blob-", delete=False)
        self._normal_hash = hashlib.sha256()
        self._normal_path_kept = False         # True: the file is gone or handed over as the blob
        self._segs = [tempfile.TemporaryFile(dir=work_dir), self._normal]
        # seg, seg_off, csize, size, digest, compressed, batch_off, batch_size (0: not a member)
        self._entries: list[list] = []
        self._seg_len = [0, 0]
        self._seg_ulen = [0, 0]
        self._open: list[list[tuple[int, bytes]]] = [[], []]     # batch being filled: (entry, data)
        self._open_len = [0, 0]
        # writes not done yet, in order: (entries, stored bytes | Future[(bytes, compressed)])
        self._queue: list[deque] = [deque(), deque()]

    @property
    def count(self) -> int:
        return len(self._entries)

    def add(self, digest: bytes, data: bytes, *, prefetch: bool) -> int:
        """Appends a chunk (uncompressed bytes, compressed alone here); returns its sequence
        number (position in add order)."""
        seg = PREFETCH if prefetch else NORMAL
        self._entries.append([seg, 0, 0, len(data), digest, False, 0, 0])
        self._enqueue(seg, [len(self._entries) - 1], self._compress(data))
        return len(self._entries) - 1

    def _compress(self, data: bytes):
        """(stored bytes, compressed?) or a Future of it."""
        if self.compressor == "none":
            return data, False
        args = (self.compressor, self._level, data)
        return self._executor.submit(_compress_batch, *args) if self._executor else _compress_batch(*args)

    def add_member(self, digest: bytes, data: bytes, *, prefetch: bool) -> int:
        """Appends a small chunk (uncompressed bytes, < batch_size) to the segment's open batch;
        returns its sequence number."""
        seg = PREFETCH if prefetch else NORMAL
        if self._open_len[seg] + len(data) > self.batch_size:
            self._close_batch(seg)
        self._entries.append([seg, 0, 0, len(data), digest, False, self._open_len[seg], 0])
        self._open[seg].append((len(self._entries) - 1, data))
        self._open_len[seg] += len(data)
        return len(self._entries) - 1

    def _close_batch(self, seg: int) -> None:
        members = self._open[seg]
        if not members:
            return
        data = b"".join(d for _, d in members)
        for e, _ in members:
            self._entries[e][7] = len(data)
        self._open[seg], self._open_len[seg] = [], 0
        self._enqueue(seg, [e for e, _ in members], self._compress(data))

    def _enqueue(self, seg: int, entries: list[int], item) -> None:
        q = self._queue[seg]
        q.append((entries, item))
        while q and (not isinstance(q[0][1], Future) or q[0][1].done()
                     or len(q) > MAX_QUEUED or sum(isinstance(i, Future) for _, i in q) > MAX_PENDING):
            self._write_head(seg)

    def _write_head(self, seg: int) -> None:
        entries, item = self._queue[seg].popleft()
        stored, z = item.result() if isinstance(item, Future) else item
        self._segs[seg].write(stored)
        if seg == NORMAL:
            self._normal_hash.update(stored)
        for e in entries:
            ent = self._entries[e]
            ent[1], ent[2], ent[5] = self._seg_len[seg], len(stored), z
            self._seg_ulen[seg] += ent[3]
        self._seg_len[seg] += len(stored)

    def finish(self) -> FinishedBlob | None:
        """Concatenates the segments into the final blob; None when no chunk was added."""
        if not self._entries:
            self.close()
            return None
        try:
            for seg in (PREFETCH, NORMAL):
                self._close_batch(seg)
                while self._queue[seg]:
                    self._write_head(seg)
        except BaseException:
            self.close()
            raise
        # blob order = stored order (members of a batch by their offset in it), so chunk
        # indices grow with comp_offset and a batch's members are neighbours
        order = sorted(range(len(self._entries)),
                       key=lambda i: (self._entries[i][0], self._entries[i][1], self._entries[i][6]))
        chunks = []
        base = [0, self._seg_len[PREFETCH]]
        ubase = [0, self._seg_ulen[PREFETCH]]
        useg_off = [0, 0]
        for i in order:
            seg, off, csize, size, digest, z, boff, bsize = self._entries[i]
            chunks.append(ChunkSpec(digest, base[seg] + off, csize, ubase[seg] + useg_off[seg], size, z,
                                    boff, bsize))
            useg_off[seg] += size
        size = self._seg_len[0] + self._seg_len[1]
        if not self._seg_len[PREFETCH]:
            try:
                self._normal.close()           # flushed; the file is the blob
            except BaseException:
                self.close()
                raise
            tmp, self._normal_path_kept = self._normal.name, True
            self.close()
            return FinishedBlob("sha256:" + self._normal_hash.hexdigest(), size,
                                self._seg_ulen[0] + self._seg_ulen[1], Path(tmp), chunks, order)
        h = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=self._dir, prefix="blob-")
        try:
            with os.fdopen(fd, "wb") as out:
                for s in self._segs:
                    s.seek(0)
                    while buf := s.read(4 << 20):
                        h.update(buf)
                        out.write(buf)
        except BaseException:
            os.unlink(tmp)
            raise
        finally:
            self.close()
        return FinishedBlob("sha256:" + h.hexdigest(), size, self._seg_ulen[0] + self._seg_ulen[1],
                            Path(tmp), chunks, order)

    def close(self) -> None:
        for q in self._queue:
            for _, item in q:
                if isinstance(item, Future):
                    item.cancel()
            q.clear()
        for s in self._segs:
            s.close()
        if not self._normal_path_kept:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._normal.name)
            self._normal_path_kept = True      # once
