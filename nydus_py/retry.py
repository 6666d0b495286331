"""The one retry policy: which failures are retried, how long to wait, how often.

Used by the registry transport (oci/transport.py: every request of the converter and of
`nydusd --image`) and by storage/wrappers.py's RetryingBackend (every backend of a mount).

    retried      BackendError with permanent=False: connection errors, timeouts, truncated
                 bodies, HTTP 429 and 5xx. Everything else passes through at once.
    attempts     1 + `limit`
    wait         backoff * 2**n, capped at max_backoff, times a jitter in [0.5, 1.5)
                 (n = retries so far); a server's Retry-After wins, capped at max_retry_after
    defaults     limit 2, backoff 0.1 s, max_backoff 5 s, max_retry_after 30 s (nydusd's
                 backend `retry_limit` / `retry_backoff` keys set the first two per backend;
                 RegistryConfig's retry_limit / backoff_base for the converter's client)

The sleep blocks the calling thread: backend calls run in worker threads, never on the trio
loop. `sleep`, `clock` (wall time, for HTTP-date Retry-After values) and `rand` are injectable,
so tests check the schedule without waiting.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from nydus_py.errors import BackendError, ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_LIMIT = 2
DEFAULT_BACKOFF = 0.1
DEFAULT_MAX_BACKOFF = 5.0
DEFAULT_MAX_RETRY_AFTER = 30.0


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    limit: int = DEFAULT_LIMIT                  # retries after the first attempt; 0 = none
    backoff: float = DEFAULT_BACKOFF            # seconds before the first retry; doubles each time
    max_backoff: float = DEFAULT_MAX_BACKOFF
    max_retry_after: float = DEFAULT_MAX_RETRY_AFTER
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False, compare=False)
    clock: Callable[[], float] = field(default=time.time, repr=False, compare=False)
    rand: Callable[[], float] = field(default=random.random, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.limit < 0 or self.backoff < 0 or self.max_backoff < 0 or self.max_retry_after < 0:
            raise ConfigError("retry: limit, backoff, max_backoff and max_retry_after must be >= 0")

    def delay(self, retries: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `retries` + 1."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_retry_after)
        return min(self.max_backoff, self.backoff * (2 ** retries)) * (0.5 + self.rand())

    def retry_after(self, header: str | None) -> float | None:
        """Seconds from a Retry-After header (delta-seconds or HTTP-date), None if absent/bad."""
        if not header:
            return None
        value = header.strip()
        if value.isdigit():
            return float(value)
        import email.utils  # here: importing it costs every daemon start-up ~5 ms
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - self.clock())

    def call(self, what: str, attempt: Callable[[], T], *,
             on_retry: Callable[[BackendError], None] | None = None) -> T:
        """`attempt()`, retried on transient BackendErrors; the last error when retries run out.
        `on_retry` is told about each failure that is retried (metrics)."""
        retries = 0
        while True:
            try:
                return attempt()
            except BackendError as e:
                if e.permanent or retries >= self.limit:
                    raise
                d = self.delay(retries, getattr(e, "retry_after", None))
                retries += 1
                if on_retry is not None:
                    on_retry(e)
                log.warning("%s failed (%s); retry %d/%d in %.2fs", what, e, retries, self.limit, d)
                self.sleep(d)
