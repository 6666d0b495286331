"""Cross-cutting backend behaviour as wrappers with the BlobBackend interface (restic style).

    make_backend() builds  RetryingBackend(MeteredBackend(<concrete backend>))

so metrics count every attempt the concrete backend makes (and every error it raises, even a
retried one), and retries see the backend's own errors. Wrappers forward `close()`.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, TypeVar

from nydus_py.errors import BackendError
from nydus_py.metrics import MetricGroup
from nydus_py.retry import RetryPolicy
from nydus_py.storage.backend import BlobBackend, close_backend

log = logging.getLogger(__name__)
T = TypeVar("T")


class RetryingBackend:
    """Retries transient BackendErrors as `policy` says (nydus_py/retry.py: one policy for
    every backend and the registry client). Permanent errors (not found, auth, bad range) and
    non-backend exceptions pass through at once. The sleep blocks the calling worker thread,
    which is what the read path expects (it runs backend calls in threads).
    """

    def __init__(self, inner: BlobBackend, policy: RetryPolicy | None = None, *,
                 metrics: MetricGroup | None = None):
        self.inner = inner
        self.policy = policy if policy is not None else RetryPolicy()
        self._retries = metrics.counter("retries") if metrics is not None else None

    def __repr__(self) -> str:
        return f"RetryingBackend({self.inner!r}, retry_limit={self.policy.limit})"

    def _count(self, _e: BackendError) -> None:
        if self._retries is not None:
            self._retries.inc()

    def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        return self.policy.call(what, lambda: fn(*args), on_retry=self._count)

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
