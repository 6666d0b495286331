"""Fixed-size chunking with digest + compression on worker threads.

The main thread parses tar and reads file data; sha256 and zstd/lz4 release the GIL, so a
small thread pool keeps both cores busy. Results are consumed strictly in submission order
(so the blob and the chunk ids are deterministic), with a bounded number in flight (so
memory stays at depth * chunk_size whatever the image size).
"""

from __future__ import annotations

import hashlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from nydus_py.format import compression

# (digest, data length, stored bytes, compressed?) -> chunk id
Sink = Callable[[bytes, int, bytes, bool], int]


def _digest_and_compress(codec: str, level: int | None, data: bytes,
                         batch_below: int = 0) -> tuple[bytes, int, bytes, bool]:
    digest = hashlib.sha256(data).digest()
    if len(data) < batch_below:   # goes into a batch (blob_writer), compressed there
        return digest, len(data), data, False
    z = compression.compress(codec, data, level)
    return (digest, len(data), data, False) if z is None else (digest, len(data), z, True)


class ChunkPipeline:
    """submit() chunks of file data; each result is handed to `on_done(result, target, k)` in
    submission order, where target/k say where the caller wants the chunk id recorded."""

    def __init__(self, codec: str, workers: int, depth: int, level: int | None = None,
                 batch_below: int = 0):
        self._codec = codec
        self._level = level
        self._batch_below = batch_below
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="chunk")
        self._queue: deque[tuple[Future, object, int]] = deque()
        self._depth = max(1, depth)
        self.on_done: Callable[[tuple, object, int], None] | None = None

    def submit(self, data: bytes, target: object, k: int) -> None:
        self._queue.append((self._pool.submit(_digest_and_compress, self._codec, self._level, data,
                                              self._batch_below), target, k))
        while len(self._queue) > self._depth:
            self._complete_one()

    @property
    def executor(self) -> ThreadPoolExecutor:
        return self._pool

    def drain(self) -> None:
        while self._queue:
            self._complete_one()

    def _complete_one(self) -> None:
        fut, target, k = self._queue.popleft()
        assert self.on_done is not None, "set on_done before submitting"
        self.on_done(fut.result(), target, k)

    def close(self) -> None:
        for fut, _, _ in self._queue:
            fut.cancel()
        self._queue.clear()
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
