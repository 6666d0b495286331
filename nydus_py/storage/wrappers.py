"""Cross-cutting backend behaviour as wrappers with the BlobBackend interface (restic style).

    make_backend() builds  RetryingBackend(MeteredBackend(<concrete backend>))

so metrics count every attempt the concrete backend makes (and every error it raises, even a
retried one), and retries see the backend's own errors. Wrappers forward `close()`.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Callable

from nydus_py.errors import BackendError
from nydus_py.metrics import MetricGroup
from nydus_py.storage.backend import BlobBackend, close_backend

log = logging.getLogger(__name__)


class RetryingBackend:
    """Retries transient BackendErrors (`permanent=False`) up to `retry_limit` more times,
    sleeping `backoff * 2**attempt` (capped at `max_backoff`) with ±50% jitter in between.

    Permanent errors (not found, auth, bad range) and non-backend exceptions pass through at
    once. The sleep blocks the calling worker thread, which is what the read path expects (it
    runs backend calls in threads); `sleep`/`rand` are injectable for tests.
    """

    def __init__(self, inner: BlobBackend, retry_limit: int = 2, backoff: float = 0.1, *,
                 max_backoff: float = 5.0, metrics: MetricGroup | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 rand: Callable[[], float] = random.random):
        if retry_limit < 0 or backoff < 0:
            raise ValueError("retry_limit and backoff must be >= 0")
        self.inner = inner
        self.retry_limit = retry_limit
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._retries = metrics.counter("retries") if metrics is not None else None
        self._sleep = sleep
        self._rand = rand

    def __repr__(self) -> str:
        return f"RetryingBackend({self.inner!r}, retry_limit={self.retry_limit})"

    def delay(self, attempt: int) -> float:
        base = min(self.max_backoff, self.backoff * (2 ** attempt))
        return base * (0.5 + self._rand())

    def _call(self, what: str, fn, *args):
        attempt = 0
        while True:
            try:
                return fn(*args)
            except BackendError as e:
                if e.permanent or attempt >= self.retry_limit:
                    raise
                d = self.delay(attempt)
                attempt += 1
                log.warning("%s failed (%s); retry %d/%d in %.2fs",
                            what, e, attempt, self.retry_limit, d)
                if self._retries is not None:
                    self._retries.inc()
                self._sleep(d)

    def blob_size(self, blob_id: str) -> int:
        return self._call(f"size of blob {blob_id}", self.inner.blob_size, blob_id)

    def read_range(self, blob_id: str, offset: int, length: int) -> bytes:
        return self._call(f"read of blob {blob_id} [{offset}, {offset + length})",
                          self.inner.read_range, blob_id, offset, length)

    def close(self) -> None:
        close_backend(self.inner)


class MeteredBackend:
    """Counts requests, bytes, errors and latency of `inner` into a metric group (normally
    `Metrics().backend`), under nydusd's backend metric names."""

    def __init__(self, inner: BlobBackend, metrics: MetricGroup):
        self.inner = inner
        self.metrics = metrics
        self._count = metrics.counter("read_count")
        self._bytes = metrics.counter("read_amount_total")
        self._errors = metrics.counter("read_errors")
        self._latency = metrics.histogram("read_latency")
        self._size_count = metrics.counter("blob_size_count")

    def __repr__(self) -> str:
        return f"MeteredBackend({self.inner!r})"

    def blob_size(self, blob_id: str) -> int:
        self._size_count.inc()
        return self.inner.blob_size(blob_id)

    def read_range(self, blob_id: str, offset: int, length: int) -> bytes:
        self._count.inc()
        t0 = time.perf_counter()
        try:
            data = self.inner.read_range(blob_id, offset, length)
        except Exception:
            self._errors.inc()
            raise
        finally:
            self._latency.observe(time.perf_counter() - t0)
        self._bytes.inc(len(data))
        return data

    def close(self) -> None:
        close_backend(self.inner)
