"""Learned prefetch lists without a mount: the wire form, every rejection of an untrusted list,
the recorder's order/window/limit, the cache-dir copy, and the prefetch ranges built from it."""

from __future__ import annotations

import json
import os
import random

import pytest

from nydus_py.format.bootstrap import Bootstrap
from nydus_py.io import learned as ll
from nydus_py.io.prefetch import learned_batches, resolve
from tests.fixtures.nydus_build import build

DIGEST = "sha256:" + "0f" * 32
CHUNK = 4096


@pytest.fixture(scope="module")
def bs() -> Bootstrap:
    files = {f"f{i}": random.Random(i).randbytes(CHUNK * 3) for i in range(1, 5)}  # 4 x 3 chunks
    return Bootstrap.from_bytes(build(files, chunk_size=CHUNK).bootstrap)


def test_round_trip_folds_runs_and_keeps_first_access_order(bs):
    lst = ll.LearnedList(DIGEST, (5, 6, 7, 0, 1, 9))
    doc = json.loads(lst.to_bytes())
    assert doc["chunks"] == [[5, 3], [0, 2], [9, 1]] and doc["bootstrap"] == DIGEST
    back = ll.LearnedList.from_bytes(lst.to_bytes(), bootstrap_digest=DIGEST, bootstrap=bs, what="t")
    assert back == lst and back.digest == lst.digest


def test_repeated_chunks_are_kept_once_at_their_first_place(bs):
    data = json.dumps({"schemaVersion": 1, "bootstrap": DIGEST, "chunks": [[2, 2], [0, 3]]}).encode()
    lst = ll.LearnedList.from_bytes(data, bootstrap_digest=DIGEST, bootstrap=bs, what="t")
    assert lst.chunks == (2, 3, 0, 1)


@pytest.mark.parametrize("data, why", [
    (b"\x00garbage", "not JSON"),
    (b" " * (ll.MAX_LIST_BYTES + 1), "more than"),
    (json.dumps({"schemaVersion": 2, "bootstrap": DIGEST, "chunks": []}).encode(), "schemaVersion"),
    (json.dumps([1, 2]).encode(), "schemaVersion"),
    (json.dumps({"schemaVersion": 1, "bootstrap": "sha256:" + "ab" * 32, "chunks": []}).encode(),
     "recorded for bootstrap"),
    (json.dumps({"schemaVersion": 1, "bootstrap": DIGEST, "chunks": {"0": 1}}).encode(), "no chunk list"),
    (json.dumps({"schemaVersion": 1, "bootstrap": DIGEST, "chunks": [[0, 1, 2]]}).encode(), "malformed"),
    (json.dumps({"schemaVersion": 1, "bootstrap": DIGEST, "chunks": [[True, 1]]}).encode(), "malformed"),
    (json.dumps({"schemaVersion": 1, "bootstrap": DIGEST, "chunks": [[1.0, 1]]}).encode(), "malformed"),
    (json.dumps({"schemaVersion": 1, "bootstrap": DIGEST, "chunks": [[-1, 1]]}).encode(), "not in"),
    (json.dumps({"schemaVersion": 1, "bootstrap": DIGEST, "chunks": [[0, 0]]}).encode(), "not in"),
    (json.dumps({"schemaVersion": 1, "bootstrap": DIGEST, "chunks": [[11, 2]]}).encode(), "not in"),
    (json.dumps({"schemaVersion": 1, "bootstrap": DIGEST, "chunks": [[0, 1]] * (ll.MAX_CHUNKS + 1)}).encode(),
     "more than"),
])
def test_untrusted_lists_are_rejected_with_a_reason(bs, data, why):
    with pytest.raises(ll.LearnedListError, match=why):
        ll.LearnedList.from_bytes(data, bootstrap_digest=DIGEST, bootstrap=bs, what="t")


def test_recorder_keeps_first_access_order_and_spans_chunks(bs):
    rec = ll.ChunkRecorder(bs)
    f2, f1 = resolve(bs, "/f2"), resolve(bs, "/f1")
    rec.record(f2, CHUNK * 2 + 10, 100)          # f2 chunk 2
    rec.record(f1, 0, CHUNK + 1)                 # f1 chunks 0, 1
    rec.record(f2, CHUNK * 2, 5)                 # again: nothing new
    rec.record(f1, 10, 0)                        # empty read: nothing
    ids2, ids1 = bs.file_chunk_ids(f2), bs.file_chunk_ids(f1)
    assert rec.chunks == [ids2[2], ids1[0], ids1[1]]


def test_recorder_window_and_limit(bs):
    rec = ll.ChunkRecorder(bs, window=60.0, limit=2)
    f1 = resolve(bs, "/f1")
    firsts = []
    rec.on_first = lambda: firsts.append(1)
    rec.record(f1, 0, CHUNK * 3)                 # 3 chunks, room for 2
    assert len(rec.chunks) == 2 and rec.done and firsts == [1]
    rec = ll.ChunkRecorder(bs, window=60.0)
    rec.record(f1, 0, 1)
    rec.started -= 61                            # the window is over
    rec.record(f1, CHUNK, 1)
    assert len(rec.chunks) == 1 and rec.done


def test_cache_dir_copy_round_trip_and_no_symlinks(bs, tmp_path):
    lst = ll.LearnedList(DIGEST, (1, 2))
    assert ll.load_local(str(tmp_path), DIGEST) is None
    path = ll.save_local(str(tmp_path), lst)
    assert os.stat(tmp_path / "prefetch").st_mode & 0o777 == 0o700
    assert ll.load_local(str(tmp_path), DIGEST) == lst.to_bytes() == open(path, "rb").read()
    os.unlink(path)
    (tmp_path / "elsewhere").write_bytes(lst.to_bytes())
    os.symlink(tmp_path / "elsewhere", path)
    with pytest.raises(OSError):
        ll.load_local(str(tmp_path), DIGEST)
    # a symlinked prefetch directory is refused too
    other = tmp_path / "other"
    other.mkdir()
    os.symlink(tmp_path / "prefetch", other / "prefetch")
    with pytest.raises(OSError):
        ll.load_local(str(other), DIGEST)


def test_learned_batches_merge_neighbours_and_keep_first_access_first(bs):
    # chunks of f3 then f1: in the blob f1 comes first, but f3 was read first
    f1, f3 = bs.file_chunk_ids(resolve(bs, "/f1")), bs.file_chunk_ids(resolve(bs, "/f3"))
    ids = [*f3, *f1]
    ranges = learned_batches(bs, ids, max_gap=0, limit=1 << 20)
    assert [[c.id for c in r.chunks] for r in ranges] == [list(f3), list(f1)]
    assert len(learned_batches(bs, ids, max_gap=1 << 20, limit=1 << 20)) == 1   # one request
