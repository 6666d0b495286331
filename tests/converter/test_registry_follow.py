"""The registry source's follow-reader: a layer is read while its download writes it."""

from __future__ import annotations

import threading

import pytest

from converter.sources.registry import _Download, _Follower
from nydus_py.errors import DigestMismatchError, NydusError

WHAT = "layer 1/1 (sha256:0123456789ab…)"


class Writer(threading.Thread):
    """Writes `parts` to the download file one at a time, each after its gate opens; then
    finishes with `error` (None = success) once `end` opens."""

    def __init__(self, dl: _Download, parts: list[bytes], error: BaseException | None = None):
        super().__init__(daemon=True)
        self.dl, self.parts, self.error = dl, parts, error
        self.gates = [threading.Event() for _ in parts]
        self.end = threading.Event()

    def run(self) -> None:
        with open(self.dl.path, "wb", buffering=0) as out:
            for part, gate in zip(self.parts, self.gates):
                gate.wait()
                out.write(part)
                self.dl.advance(len(part))
        self.end.wait()
        self.dl.finish(self.error)


def reader_thread(f: _Follower, n: int) -> tuple[threading.Thread, list]:
    got: list = []

    def run() -> None:
        try:
            got.append(f.read(n))
        except BaseException as e:  # noqa: BLE001 - handed to the test
            got.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, got


def test_bytes_before_the_writer_finishes_and_eof_only_after_success(tmp_path):
    dl = _Download(tmp_path / "layer-0")
    w = Writer(dl, [b"a" * 1000, b"b" * 500])
    w.start()
    f = _Follower(dl, WHAT)
    w.gates[0].set()
    assert f.read(4096) == b"a" * 1000          # the writer is still waiting on gates[1]
    t, got = reader_thread(f, 4096)             # caught up: blocks, not EOF
    w.gates[1].set()
    t.join()
    assert got == [b"b" * 500]
    t, got = reader_thread(f, 4096)             # all bytes read, but not yet verified: blocks
    assert t.is_alive() and got == []
    w.end.set()
    t.join()
    assert got == [b""]
    assert f.read(10) == b""
    f.close()
    w.join()


def test_the_download_error_surfaces_mid_layer_and_names_the_layer(tmp_path):
    dl = _Download(tmp_path / "layer-0")
    w = Writer(dl, [b"x" * 100], DigestMismatchError("blob r/x@sha256:00: digest mismatch"))
    w.start()
    f = _Follower(dl, WHAT)
    w.gates[0].set()
    assert f.read(100) == b"x" * 100
    t, got = reader_thread(f, 100)
    w.end.set()
    t.join()
    assert isinstance(got[0], DigestMismatchError)
    assert WHAT in str(got[0]) and "digest mismatch" in str(got[0])
    with pytest.raises(DigestMismatchError):    # and again on every later read
        f.read(1)
    f.close()
    w.join()


def test_an_error_before_the_first_byte_is_raised_even_with_no_file(tmp_path):
    dl = _Download(tmp_path / "never-written")
    f = _Follower(dl, WHAT)
    dl.finish(OSError("connection reset"))
    with pytest.raises(OSError, match="connection reset"):
        f.read(10)


def test_an_empty_blob_gives_eof_after_success(tmp_path):
    dl = _Download(tmp_path / "never-written")
    dl.finish()
    assert _Follower(dl, WHAT).read(10) == b""


def test_cancel_wakes_a_blocked_reader(tmp_path):
    dl = _Download(tmp_path / "layer-0")
    f = _Follower(dl, WHAT)
    t, got = reader_thread(f, 10)               # nothing written yet: blocks
    dl.finish(NydusError("download cancelled: the source image was closed"))
    t.join()
    assert isinstance(got[0], NydusError) and "cancelled" in str(got[0]) and WHAT in str(got[0])
    dl.finish()                                 # a finish after the failure does not undo it
    with pytest.raises(NydusError, match="cancelled"):
        f.read(1)
