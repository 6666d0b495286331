import hashlib

import pytest

from nydus_py.errors import IntegrityError
from nydus_py.format import compression
from nydus_py.format.bootstrap import BlobInfo, Chunk
from nydus_py.io.fetch import (
    Range,
    decode_chunk,
    extend_forward,
    own_first,
    plan_ranges,
)


def ch(blob, index, comp_offset, comp_size):
    return Chunk(blob * 100 + index, blob, index, comp_offset, comp_size, index * 4096, 4096, True, b"")


def spans(ranges):
    return [(r.blob, r.start, r.end, [c.index for c in r.chunks]) for r in ranges]


def test_adjacent_chunks_merge_tiny_gaps_allowed_large_gaps_split():
    cs = [ch(0, 0, 0, 100), ch(0, 1, 100, 100), ch(0, 3, 310, 50), ch(0, 9, 5000, 10)]
    assert spans(plan_ranges(cs, max_gap=16, limit=1 << 20)) == [(0, 0, 200, [0, 1]), (0, 310, 360, [3]),
                                                                 (0, 5000, 5010, [9])]
    assert spans(plan_ranges(cs, max_gap=200, limit=1 << 20)) == [(0, 0, 360, [0, 1, 3]), (0, 5000, 5010, [9])]


def test_ranges_are_bounded_by_limit_but_a_big_chunk_stands_alone():
    cs = [ch(0, i, i * 100, 100) for i in range(5)] + [ch(0, 5, 500, 1000)]
    assert spans(plan_ranges(cs, max_gap=0, limit=250)) == [
        (0, 0, 200, [0, 1]), (0, 200, 400, [2, 3]), (0, 400, 500, [4]), (0, 500, 1500, [5])]


def test_ranges_never_span_blobs_and_input_order_does_not_matter():
    cs = [ch(1, 0, 0, 10), ch(0, 1, 10, 10), ch(0, 0, 0, 10), ch(1, 1, 10, 10)]
    assert spans(plan_ranges(cs, max_gap=0, limit=100)) == [(0, 0, 20, [0, 1]), (1, 0, 20, [0, 1])]


def test_extend_forward_stops_at_limit_gap_or_rejected_chunk():
    r = Range(0, 0, 100, [ch(0, 0, 0, 100)])
    following = [ch(0, i, i * 100, 100) for i in range(1, 10)]
    assert extend_forward(r, following, max_gap=0, limit=400, accept=lambda c: True) == 3
    assert (r.end, r.readahead) == (400, 3)
    r = Range(0, 0, 100, [ch(0, 0, 0, 100)])
    assert extend_forward(r, following, max_gap=0, limit=1000, accept=lambda c: c.index != 3) == 2
    r = Range(0, 0, 100, [ch(0, 0, 0, 100)])
    assert extend_forward(r, [ch(0, 1, 500, 10)], max_gap=16, limit=1000, accept=lambda c: True) == 0


def test_own_first_passes_the_files_next_chunks_and_other_files_within_a_budget():
    following = [ch(0, i, i * 100, 100) for i in range(1, 10)]
    ids = [c.id for c in following]
    # the file's next chunks are 1, 2, 3; chunk 4 on belongs to other files
    assert [c.index for c in own_first(following, ids[:3], 0)] == [1, 2, 3]
    assert [c.index for c in own_first(following, ids[:3], 250)] == [1, 2, 3, 4, 5]
    # another file's chunk in between costs budget but does not end the file's run
    assert [c.index for c in own_first(following, [ids[0], ids[2]], 100)] == [1, 2, 3]
    assert [c.index for c in own_first(following, [ids[0], ids[2]], 99)] == [1]
    # a file whose next chunk lies elsewhere (deduplicated) gets nothing but the budget
    assert [c.index for c in own_first(following, [999], 0)] == []
    r = Range(0, 0, 100, [ch(0, 0, 0, 100)])
    assert extend_forward(r, own_first(following, ids[:2], 0), max_gap=0, limit=1 << 20,
                          accept=lambda c: True) == 2


def test_decode_chunk_verifies_digest_and_sizes():
    data = b"abc" * 1000
    z = compression.compress("zstd", data)
    blob = BlobInfo("sha256:" + "0" * 64, "zstd", len(z), len(data), 0, 1)
    good = Chunk(7, 0, 0, 0, len(z), 0, len(data), True, hashlib.sha256(data).digest())
    assert decode_chunk(blob, good, z) == data
    with pytest.raises(IntegrityError, match="chunk 7.*sha256 mismatch"):
        decode_chunk(blob, good._replace(digest=b"\0" * 32), z)
    with pytest.raises(IntegrityError, match="cannot decompress|decompressed to"):
        decode_chunk(blob, good, z[:8] + bytes(len(z) - 8))
    raw = good._replace(compressed=False, comp_size=len(data))
    assert decode_chunk(blob, raw, data) == data
    with pytest.raises(IntegrityError, match="stored bytes"):
        decode_chunk(blob, raw, data[:-1])
