"""Chunking — fixed-size, or content-defined (FastCDC, `--chunker cdc`) — each chunk's digest, in
order, and the thread pool that compresses them.

The main thread parses tar and reads file data; it digests each chunk itself (sha256 releases
the GIL and costs ~7 % of zstd-6 on the same bytes) so that the builder can deduplicate at
once, and only chunks that are new are compressed, on the pool, by the blob writer, whose
writes stay in add order (so the blob and the chunk ids are deterministic) with a bounded
number in flight (so memory stays bounded whatever the image size). Handing every chunk to a
worker for its digest, as before, made the main thread wait for digests queued behind
compressions (29 % of its samples on the base image) while the workers waited for it.
Content-defined cut points are found on the main thread too, by pyfastcdc's C gear hash (the
GIL released), in windows of max_size bytes.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable


class ChunkPipeline:
    """submit() chunks of file data; each is handed to `on_done((digest, size, data), target, k)`
    before submit returns (so in submission order), where target/k say where the caller wants
    the chunk id recorded. `executor` runs the compressions (threads start on first use)."""

    def __init__(self, workers: int):
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="chunk")
        self.on_done: Callable[[tuple[bytes, int, bytes], object, int], None] | None = None

    def submit(self, data: bytes, target: object, k: int) -> None:
        assert self.on_done is not None, "set on_done before submitting"
        self.on_done((hashlib.sha256(data).digest(), len(data), data), target, k)

    @property
    def executor(self) -> ThreadPoolExecutor:
        return self._pool

    def drain(self) -> None:
        """Nothing is left in flight here (the blob writer's finish() waits for compressions)."""

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def read_exact_pieces(read: Callable[[int], bytes], size: int, chunk_size: int):
    """Yields the file's data as chunk_size pieces (last one shorter) from a reader that may
    return short reads. A reader that ends early is the tar layer's problem to report."""
    left = size
    while left > 0:
        want = min(chunk_size, left)
        parts = []
        got = 0
        while got < want:
            b = read(want - got)
            if not b:
                raise EOFError(f"unexpected end of file data ({size - left + got} of {size} bytes)")
            parts.append(b)
            got += len(b)
        left -= want
        yield parts[0] if len(parts) == 1 else b"".join(parts)


@dataclass(frozen=True)
class CdcParams:
    """FastCDC 2020 cut parameters (pyfastcdc's ranges: min 64..1 MiB, avg 256..4 MiB, max
    1 KiB..16 MiB; ours are narrower, see converter/builder.py)."""
    min_size: int
    avg_size: int
    max_size: int

    def cutter(self):
        from pyfastcdc import FastCDC   # imported on use: fixed-size conversion does not need it
        return FastCDC(self.avg_size, min_size=self.min_size, max_size=self.max_size)


def cdc_pieces(read: Callable[[int], bytes], size: int, params: CdcParams, cutter=None):
    """Yields the file's data cut at FastCDC boundaries, streamed: at most 2 * max_size bytes
    are held. A cut depends only on the max_size bytes after the chunk's start, so refilling
    the window whenever less than max_size is left gives exactly the cuts of the whole file
    at once (tests/converter/test_cdc.py checks it). Files of at most min_size are one chunk
    without calling the chunker."""
    if size <= params.min_size:
        yield from read_exact_pieces(read, size, max(size, 1))
        return
    cutter = cutter or params.cutter()
    src = read_exact_pieces(read, size, params.max_size)
    buf, pos, left = b"", 0, size
    while True:
        if len(buf) - pos < params.max_size and left:
            piece = next(src)
            left -= len(piece)
            buf = buf[pos:] + piece if pos < len(buf) else piece
            pos = 0
        if pos == len(buf):
            return
        if not left:                       # the rest is in the window: cut it all
            view = memoryview(buf)[pos:]
            for ch in cutter.cut_buf(view):
                yield bytes(ch.data)
            return
        n = next(iter(cutter.cut_buf(memoryview(buf)[pos:]))).length
        yield buf[pos:pos + n]
        pos += n
