"""io/prefetch.EarlyRanges: the learned list's ranges fetched before the mount is ready are
served to the reads that ask for them (each byte fetched once), anything else goes to the
backend, and a failed early range is asked again."""

from __future__ import annotations

import hashlib
import threading

import pytest

from nydus_py.errors import BlobNotFoundError
from nydus_py.io.prefetch import EarlyRanges
from nydus_py.metrics import Metrics
from nydus_py.storage.localfs import LocalFsBackend
from nydus_py.storage.wrappers import MeteredBackend


@pytest.fixture
def blob(tmp_path):
    data = bytes(range(256)) * 4096             # 1 MiB
    bid = "sha256:" + hashlib.sha256(data).hexdigest()
    (tmp_path / bid.split(":")[1]).write_bytes(data)
    m = Metrics()
    return bid, data, MeteredBackend(LocalFsBackend(tmp_path), m.backend), m.backend


def test_early_ranges_are_served_once_fetched(blob):
    bid, data, backend, m = blob
    early = EarlyRanges(backend)
    assert early.start([(bid, 0, 4096), (bid, 100_000, 50_000)], threads=2) == 2
    assert early.read_range(bid, 0, 4096) == data[:4096]
    assert early.read_range(bid, 110_000, 1000) == data[110_000:111_000]     # inside one
    assert early.read_range(bid, 100_000, 50_000) == data[100_000:150_000]
    assert m.counter("read_count").value == 2                               # the early ones
    assert early.read_range(bid, 4000, 200) == data[4000:4200]              # not inside: backend
    assert m.counter("read_count").value == 3
    # a fully read range is dropped: asking again goes to the backend
    assert early.read_range(bid, 0, 4096) == data[:4096]
    assert m.counter("read_count").value == 4
    early.close()


def test_limit_and_failed_ranges(blob):
    bid, data, backend, m = blob
    early = EarlyRanges(backend, limit=10_000)
    missing = "sha256:" + "0" * 64
    assert early.start([(missing, 0, 100), (bid, 0, 8000), (bid, 8000, 8000)], threads=1) == 2
    with pytest.raises(BlobNotFoundError):      # failed early: asked again, fails again
        early.read_range(missing, 0, 100)
    assert early.read_range(bid, 8000, 8000) == data[8000:16000]            # beyond the limit
    early.clear()
    assert early.read_range(bid, 0, 8000) == data[:8000]


def test_a_read_waits_for_its_range_in_flight(blob):
    bid, data, backend, m = blob
    gate = threading.Event()

    class Slow:
        def blob_size(self, blob_id):
            return backend.blob_size(blob_id)

        def read_range(self, blob_id, offset, length):
            gate.wait(30)
            return backend.read_range(blob_id, offset, length)
    early = EarlyRanges(Slow())
    early.start([(bid, 0, 65536)], threads=1)
    got: list = []
    t = threading.Thread(target=lambda: got.append(early.read_range(bid, 0, 65536)))
    t.start()
    gate.set()
    t.join(30)
    assert got == [data[:65536]]
    assert m.counter("read_count").value == 1   # the waiting read did not fetch it again
