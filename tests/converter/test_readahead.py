"""converter.readahead: the read-ahead thread between a layer stream and the tar reader."""

from __future__ import annotations

import io
import sys
import threading

import pytest

from converter.readahead import ReadAhead, switch_interval
from nydus_py.errors import DigestMismatchError, LayerError


class Pieces:
    """A stream that returns the given pieces (bytes, or an exception to raise), then EOF;
    records how far it was read and on which thread."""

    def __init__(self, items):
        self.items = list(items)
        self.reads = 0
        self.threads: set[str] = set()
        self.gate = threading.Event()
        self.gate.set()

    def read(self, n: int = -1) -> bytes:
        self.gate.wait()
        self.threads.add(threading.current_thread().name)
        self.reads += 1
        if not self.items:
            return b""
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item


def test_same_bytes_in_any_read_sizes():
    data = bytes(range(256)) * 5000
    for sizes in ([1], [512], [7, 100_000], [1 << 20], [3 << 20]):
        with ReadAhead(io.BytesIO(data), piece=65536, depth=2) as r:
            out, i = [], 0
            while piece := r.read(sizes[i % len(sizes)]):
                assert len(piece) <= sizes[i % len(sizes)]
                out.append(piece)
                i += 1
            assert b"".join(out) == data
            assert r.read(10) == b""


def test_read_all_and_zero():
    with ReadAhead(io.BytesIO(b"abc" * 1000), piece=100) as r:
        assert r.read(0) == b""
        assert r.read() == b"abc" * 1000


def test_reads_on_its_own_thread():
    src = Pieces([b"x" * 10, b"y" * 10])
    with ReadAhead(src, name="layer-7") as r:
        assert r.read() == b"x" * 10 + b"y" * 10
    assert src.threads == {"layer-7"}


@pytest.mark.parametrize("exc", [LayerError("layer 1: corrupt or truncated gzip data"),
                                 DigestMismatchError("layer 1: digest mismatch")])
def test_an_error_is_raised_where_it_happened_and_again_after(exc):
    src = Pieces([b"first", b"second", exc, b"never"])
    with ReadAhead(src) as r:
        assert r.read(100) == b"first"
        assert r.read(100) == b"second"
        with pytest.raises(type(exc)) as ei:
            r.read(100)
        assert ei.value is exc
        with pytest.raises(type(exc)):       # e.g. blame_digest reading on after a parse error
            r.read(100)
    assert src.items == [b"never"]           # nothing read past the error


def test_holds_at_most_depth_pieces():
    src = Pieces([b"p"] * 100)
    with ReadAhead(src, depth=3) as r:
        assert r.read(1) == b"p"
        # the reader filled the pipe and waits: it has read depth pieces past the one consumed,
        # plus the one it holds while waiting for room
        with r._cond:
            r._cond.wait_for(lambda: len(r._buf) == 3)
        assert src.reads <= 1 + 3 + 1


def test_close_before_the_end_stops_the_thread():
    src = Pieces([b"q" * 1000] * 1000)
    r = ReadAhead(src, depth=2)
    assert r.read(10) == b"q" * 10
    r.close()
    assert not r._thread.is_alive()
    assert src.reads < 10


def test_close_waits_for_a_read_in_progress():
    src = Pieces([b"a", b"b"])
    src.gate.clear()                         # the first read blocks until we open the gate
    r = ReadAhead(src)
    closer = threading.Thread(target=r.close)
    closer.start()
    src.gate.set()
    closer.join()
    assert not r._thread.is_alive()


def test_switch_interval_is_restored():
    old = sys.getswitchinterval()
    with switch_interval(0.0005):
        assert sys.getswitchinterval() == pytest.approx(0.0005)
    assert sys.getswitchinterval() == old
