from __future__ import annotations

import pytest

from nydus_py.errors import AuthError, BackendError, BlobNotFoundError
from nydus_py.metrics import Metrics
from nydus_py.retry import RetryPolicy
from nydus_py.storage.wrappers import MeteredBackend, RetryingBackend

BID = "sha256:" + "ab" * 32


class Scripted:
    """A backend that plays a script of exceptions, then returns data."""

    def __init__(self, errors, data=b"x" * 10):
        self.errors = list(errors)
        self.data = data
        self.calls = 0
        self.closed = False

    def blob_size(self, blob_id):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return len(self.data)

    def read_range(self, blob_id, offset, length):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.data[offset:offset + length]

    def close(self):
        self.closed = True


def transient(msg="timeout"):
    return BackendError(msg, permanent=False)


def test_transient_errors_are_retried_with_growing_jittered_backoff():
    inner = Scripted([transient(), transient(), transient()])
    sleeps = []
    m = Metrics()
    r = RetryingBackend(inner, RetryPolicy(limit=3, backoff=0.1, sleep=sleeps.append, rand=lambda: 0.5),
                        metrics=m.backend)
    assert r.read_range(BID, 2, 3) == b"xxx"
    assert inner.calls == 4
    assert sleeps == pytest.approx([0.1, 0.2, 0.4])
    assert m.backend.value("retries") == 3


def test_jitter_stays_within_half_to_one_and_a_half_of_the_base():
    r = RetryPolicy(limit=1, backoff=1.0, max_backoff=2.0, rand=lambda: 0.0)
    assert r.delay(0) == 0.5 and r.delay(5) == 1.0
    r = RetryPolicy(limit=1, backoff=1.0, max_backoff=2.0, rand=lambda: 0.999)
    assert r.delay(5) == pytest.approx(2.998)


def test_gives_up_after_retry_limit_with_the_last_error():
    inner = Scripted([transient("a"), transient("b"), transient("c")])
    r = RetryingBackend(inner, RetryPolicy(limit=2, backoff=0, sleep=lambda s: None))
    with pytest.raises(BackendError, match="c"):
        r.read_range(BID, 0, 1)
    assert inner.calls == 3


@pytest.mark.parametrize("err", [BlobNotFoundError("gone"), AuthError("denied"),
                                 BackendError("bad range", permanent=True)])
def test_permanent_errors_are_not_retried(err):
    inner = Scripted([err])
    r = RetryingBackend(inner, RetryPolicy(limit=5, backoff=0, sleep=lambda s: None))
    with pytest.raises(type(err)):
        r.read_range(BID, 0, 1)
    assert inner.calls == 1


def test_blob_size_is_retried_too():
    inner = Scripted([transient()])
    r = RetryingBackend(inner, RetryPolicy(limit=1, backoff=0, sleep=lambda s: None))
    assert r.blob_size(BID) == 10


def test_metered_counts_requests_bytes_errors_and_latency():
    m = Metrics()
    inner = Scripted([transient()])
    b = MeteredBackend(inner, m.backend)
    with pytest.raises(BackendError):
        b.read_range(BID, 0, 4)
    assert b.read_range(BID, 0, 4) == b"xxxx"
    assert b.read_range(BID, 4, 6) == b"xxxxxx"
    snap = m.snapshot()["backend"]
    assert snap["read_count"] == 3
    assert snap["read_errors"] == 1
    assert snap["read_amount_total"] == 10
    assert snap["read_latency"]["count"] == 3


def test_metered_inside_retrying_counts_every_attempt():
    m = Metrics()
    inner = Scripted([transient(), transient()])
    b = RetryingBackend(MeteredBackend(inner, m.backend), RetryPolicy(limit=2, backoff=0, sleep=lambda s: None))
    b.read_range(BID, 0, 1)
    assert m.backend.value("read_count") == 3 and m.backend.value("read_errors") == 2


def test_wrappers_forward_close():
    inner = Scripted([])
    RetryingBackend(MeteredBackend(inner, Metrics().backend)).close()
    assert inner.closed
