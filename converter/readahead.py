"""A bounded pipe: a thread reads a stream ahead of its consumer.

Conversion reads a layer as: raw blob (sha256) -> gunzip -> uncompressed tar (diff_id sha256)
-> tar parser -> chunker. The first three are C code that releases the GIL; running them in a
thread of their own lets them overlap with the Python tar parsing and with the zstd workers
instead of taking turns with them on one thread (base image: gunzip + hashing were ~40 % of the
main thread's samples). The consumer sees exactly the byte sequence the stream gives, and an
exception the stream raised (a corrupt layer, a digest mismatch, the bomb limit) at the point
where it was raised, so errors mean what they meant without the thread. At most `depth` pieces
are held (memory: depth * piece size).
"""

from __future__ import annotations

import sys
import threading
from collections import deque
from contextlib import contextmanager

PIECE = 1 << 20
DEPTH = 4
# GIL hand-over interval while converting. The read-ahead and zstd threads give the GIL up for
# every C call and must get it back from a main thread that is busy in Python; at the default 5 ms
# each hand-back can wait that long (a gunzip thread next to a busy Python thread ran 5x slower
# than alone; at 1 ms 1.5x).
SWITCH_INTERVAL = 0.001


class ReadAhead:
    """`with ReadAhead(stream) as r: r.read(n)...`; leaving the block stops the thread (it
    finishes the read it is in) before the caller closes `stream`."""

    def __init__(self, stream, *, depth: int = DEPTH, piece: int = PIECE, name: str = "readahead"):
        self._stream, self._piece, self._depth = stream, piece, max(1, depth)
        self._buf: deque = deque()           # bytes pieces; b"" = EOF; an exception = raised there
        self._cond = threading.Condition()
        self._stop = False
        self._cur = b""                      # the piece being consumed
        self._pos = 0
        self._end: BaseException | bool = False   # what ends the stream, once reached
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        cond, buf = self._cond, self._buf
        while True:
            try:
                item = self._stream.read(self._piece)
            except BaseException as e:        # handed to the consumer, raised where it happened
                item = e
            with cond:
                while len(buf) >= self._depth and not self._stop:
                    cond.wait()
                if self._stop:
                    return
                buf.append(item)
                cond.notify_all()
            if not isinstance(item, bytes) or not item:
                return

    def read(self, n: int = -1) -> bytes:
        """Up to n bytes (n < 0: the rest); b"" only at the end of the stream."""
        if n is None or n < 0:
            return b"".join(iter(lambda: self.read(PIECE), b""))
        if n == 0:
            return b""
        if self._pos >= len(self._cur):
            if not self._next():
                return b""
        cur, pos = self._cur, self._pos
        if pos == 0 and len(cur) <= n:          # the common case: the whole piece, no copy
            self._pos = len(cur)
            return cur
        out = cur[pos:pos + n]
        self._pos = pos + len(out)
        return out

    def _next(self) -> bool:
        if self._end is not False:
            if isinstance(self._end, BaseException):
                raise self._end
            return False
        with self._cond:
            while not self._buf:
                self._cond.wait()
            item = self._buf.popleft()
            self._cond.notify_all()
        if isinstance(item, BaseException):
            self._end = item
            raise item
        if not item:
            self._end = True
            return False
        self._cur, self._pos = item, 0
        return True

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._buf.clear()
            self._cond.notify_all()
        self._thread.join()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def switch_interval(seconds: float = SWITCH_INTERVAL):
    """Sets the interpreter's GIL switch interval for the block (process-wide; restored)."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(min(old, seconds))
    try:
        yield
    finally:
        sys.setswitchinterval(old)
