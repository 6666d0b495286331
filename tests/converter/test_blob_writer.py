"""converter.blob_writer: the blob is the segments in order, its digest is of those bytes, and no
temp file is left in the work dir whichever way a blob ends."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from converter.blob_writer import BlobWriter
from nydus_py.format import compression


def _d(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


CHUNKS = [(os.urandom(3000), False), (b"small text " * 50, True), (b"z" * 70000, False),
          (b"another small one " * 20, False), (os.urandom(100), True)]


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("pool", [False, True])
def test_blob_is_the_segments_in_order(tmp_path, prefetch, pool):
    ex = ThreadPoolExecutor(2) if pool else None
    w = BlobWriter(tmp_path, "zstd", batch_size=4096, executor=ex)
    for data, pf in CHUNKS:
        if len(data) < 4096:
            w.add_member(_d(data), data, prefetch=pf and prefetch)
        else:
            w.add(_d(data), data, prefetch=pf and prefetch)
    fin = w.finish()
    if ex:
        ex.shutdown()
    assert fin is not None
    blob = fin.path.read_bytes()
    assert fin.digest == "sha256:" + hashlib.sha256(blob).hexdigest() and fin.size == len(blob)
    assert os.listdir(tmp_path) == [fin.path.name]          # only the blob is left
    # every chunk decodes from its place in the blob
    by_digest = {_d(d): d for d, _ in CHUNKS}
    for c in fin.chunks:
        stored = blob[c.comp_offset:c.comp_offset + c.comp_size]
        if c.batch_size:
            whole = compression.decompress("zstd", stored, c.batch_size, "batch") if c.compressed else stored
            data = whole[c.batch_offset:c.batch_offset + c.size]
        else:
            data = compression.decompress("zstd", stored, c.size, "chunk") if c.compressed else stored
        assert data == by_digest[c.digest]
    if prefetch:                                            # prefetch chunks come first
        first = {_d(d) for d, pf in CHUNKS if pf}
        assert {c.digest for c in fin.chunks[:len(first)]} == first


def test_nothing_left_when_empty_or_closed(tmp_path):
    w = BlobWriter(tmp_path, "zstd", batch_size=4096)
    assert w.finish() is None
    w = BlobWriter(tmp_path, "zstd", batch_size=4096)
    w.add(_d(b"x" * 9000), b"x" * 9000, prefetch=False)
    w.close()                                               # e.g. the layer failed
    assert os.listdir(tmp_path) == []
