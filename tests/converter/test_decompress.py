"""gzip layers give the same verdicts with ISA-L's igzip (the default when isal is installed) and
with Python's gzip module (the fallback): multi-member streams, zero padding, trailing garbage,
truncation, corruption, CRC and length checks, the bomb limit, digest mismatch first."""

from __future__ import annotations

import gzip
import io
import os
import struct
import zlib

import pytest

from converter import decompress
from converter.decompress import open_layer_stream
from converter.tar import iter_entries
from nydus_py.errors import DigestMismatchError, LayerError
from nydus_py.oci import digest as dg
from nydus_py.oci import mediatypes as mt
from tests.fixtures.tarbuild import END, member

WHAT = "layer 2 (sha256:0123456789ab…)"
DATA = os.urandom(20000) + b"compressible " * 4000
TAR = member(b"a", DATA) + member(b"b", b"B" * 100) + END
GZ = gzip.compress(TAR)


@pytest.fixture(params=["isal", "zlib"])
def decoder(request, monkeypatch):
    if request.param == "isal":
        assert decompress._igzip is not None, "isal is a dependency (pyproject.toml)"
    else:
        monkeypatch.setattr(decompress, "_igzip", None)
    return request.param


def entries(blob: bytes, **kw):
    s = open_layer_stream(io.BytesIO(blob), mt.OCI_LAYER_GZIP, WHAT, **kw)
    return [(e.path, e.read(1 << 20)) for e in iter_entries(s, WHAT)]


def refused(blob: bytes, match: str = r"corrupt or truncated gzip data", **kw) -> str:
    with pytest.raises(LayerError, match=match) as ei:
        entries(blob, **kw)
    assert str(ei.value).startswith(WHAT)
    return str(ei.value)


EXPECTED = [((b"a",), DATA), ((b"b",), b"B" * 100)]


def test_the_decoder_in_use_is_igzip():
    assert isinstance(decompress.gzip_reader(io.BytesIO(GZ)), decompress._igzip.GzipFile)


def test_multi_member_and_zero_padding(decoder):
    half = len(TAR) // 2
    assert entries(gzip.compress(TAR[:half]) + gzip.compress(TAR[half:]) + bytes(100)) == EXPECTED
    assert entries(GZ + gzip.compress(b"")) == EXPECTED       # an empty member at the end


@pytest.mark.parametrize("tail", [b"garbage!", bytes(5) + b"xx", b"\x1f", b"\x1f\x8b", b"\x1f\x8b\x08"])
def test_trailing_garbage_is_refused(decoder, tail):
    refused(GZ + tail)


@pytest.mark.parametrize("cut", [10, 0.5, -8, -4, -1])
def test_truncated_stream_is_refused(decoder, cut):
    n = cut if isinstance(cut, int) else int(len(GZ) * cut)
    refused(GZ[:n])


def test_corrupt_data_bad_crc_and_bad_length_are_refused(decoder):
    mid = bytearray(GZ)
    mid[len(mid) // 2] ^= 0xFF
    refused(bytes(mid))
    crc = bytearray(GZ)
    crc[-8] ^= 1
    refused(bytes(crc))
    size = bytearray(GZ)
    size[-4] ^= 1
    refused(bytes(size))


def _member_with_header_crc(data: bytes, *, break_crc: bool) -> bytes:
    head = b"\x1f\x8b\x08\x02" + bytes(4) + b"\x00\xff"       # FHCRC set
    crc16 = zlib.crc32(head) & 0xFFFF
    head += struct.pack("<H", crc16 ^ (1 if break_crc else 0))
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return head + c.compress(data) + c.flush() + struct.pack("<II", zlib.crc32(data), len(data))


def test_header_crc(decoder):
    """A good FHCRC is accepted by both. A wrong one: igzip refuses it, as Go's compress/gzip
    (containerd, umoci) does; Python's gzip module never checked it, so the fallback accepts."""
    assert entries(_member_with_header_crc(TAR, break_crc=False)) == EXPECTED
    bad = _member_with_header_crc(TAR, break_crc=True)
    if decoder == "isal":
        refused(bad)
    else:
        assert entries(bad) == EXPECTED


def test_bomb_limit(decoder):
    refused(gzip.compress(member(b"z", bytes(4 << 20)) + END, compresslevel=1),
            match="more than 1048576 uncompressed bytes", max_uncompressed=1 << 20)


def test_digest_mismatch_wins_over_corrupt_data(decoder):
    bad = bytearray(GZ)
    bad[len(bad) // 2] ^= 0xFF
    raw = dg.VerifyingReader(io.BytesIO(bytes(bad)), dg.of_bytes(GZ), len(bad), WHAT)
    s = open_layer_stream(raw, mt.OCI_LAYER_GZIP, WHAT)
    with pytest.raises(DigestMismatchError, match="digest mismatch"):
        for e in iter_entries(s, WHAT):
            e.read(1 << 20)
