"""Writes one data blob: the compressed chunks of one source layer, back to back.

A blob has two segments: chunks of files named by the prefetch list come first, so a daemon
can prefetch them with a few large range reads; everything else follows in tar order. Each
segment is a temp file until `finish()` concatenates them (hashing as it goes) into the
final blob file, next to the target, ready to be renamed into place.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from nydus_py.format.bootstrap import ChunkSpec

PREFETCH, NORMAL = 0, 1


@dataclass(frozen=True)
class FinishedBlob:
    digest: str
    size: int
    uncompressed_size: int
    path: Path
    chunks: list[ChunkSpec]   # in blob order; chunk ids are assigned in this order
    order: list[int]          # order[i] = the add() sequence number of chunks[i]


class BlobWriter:
    def __init__(self, work_dir: Path, compressor: str):
        self.compressor = compressor
        self._dir = work_dir
        self._segs = [tempfile.TemporaryFile(dir=work_dir), tempfile.TemporaryFile(dir=work_dir)]
        self._entries: list[tuple[int, int, int, int, bytes, bool]] = []  # seg, seg_off, csize, size, digest, z
        self._seg_len = [0, 0]
        self._seg_ulen = [0, 0]

    @property
    def count(self) -> int:
        return len(self._entries)

    def add(self, digest: bytes, data_len: int, stored: bytes, compressed: bool, *, prefetch: bool) -> int:
        """Appends a chunk; returns its sequence number (position in add order)."""
        seg = PREFETCH if prefetch else NORMAL
        self._segs[seg].write(stored)
        self._entries.append((seg, self._seg_len[seg], len(stored), data_len, digest, compressed))
        self._seg_len[seg] += len(stored)
        self._seg_ulen[seg] += data_len
        return len(self._entries) - 1

    def finish(self) -> FinishedBlob | None:
        """Concatenates the segments into the final blob; None when no chunk was added."""
        if not self._entries:
            self.close()
            return None
        order = sorted(range(len(self._entries)), key=lambda i: self._entries[i][0])  # stable
        chunks = []
        base = [0, self._seg_len[PREFETCH]]
        ubase = [0, self._seg_ulen[PREFETCH]]
        useg_off = [0, 0]
        for i in order:
            seg, off, csize, size, digest, z = self._entries[i]
            chunks.append(ChunkSpec(digest, base[seg] + off, csize, ubase[seg] + useg_off[seg], size, z))
            useg_off[seg] += size
        h = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=self._dir, prefix="blob-")
        try:
            with os.fdopen(fd, "wb") as out:
                for seg in self._segs:
                    seg.seek(0)
                    while buf := seg.read(4 << 20):
                        h.update(buf)
                        out.write(buf)
        except BaseException:
            os.unlink(tmp)
            raise
        finally:
            self.close()
        size = self._seg_len[0] + self._seg_len[1]
        return FinishedBlob("sha256:" + h.hexdigest(), size, self._seg_ulen[0] + self._seg_ulen[1],
                            Path(tmp), chunks, order)

    def close(self) -> None:
        for s in self._segs:
            s.close()
