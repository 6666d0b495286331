"""Counters and latency histograms shared by every layer of the daemon.

    Metrics                 the registry one daemon owns; groups by name
    └── MetricGroup         "fs", "backend", "blobcache" (nydusd's metric families)
        ├── Counter         monotonic integer (requests, bytes, errors)
        ├── Gauge           a current value that goes up and down (bytes used by the cache)
        └── Histogram       latency in fixed log-scale buckets (seconds), plus count and sum

Everything is thread-safe: the data path updates metrics from trio's thread and from worker
threads. A metric is created on first use (`group.counter("read_count")`) and lives as long
as its group, so hot paths keep a reference instead of looking names up per call.

`snapshot()` gives plain dicts for the API (`/api/v1/metrics/backend` …); prometheus.py's
`text()` gives the Prometheus text format through prometheus_client (names
`nydus_<group>_<metric>`, counters `_total`, latency histograms `_seconds`, `# HELP`).
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left

# Upper bounds in seconds: 50 µs … 10 s, roughly ×2.5 per step, then +Inf.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, math.inf,
)

GROUPS = ("fs", "backend", "blobcache")


class Counter:
    __slots__ = ("_lock", "_value")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0

    def inc(self, n: int = 1) -> None:
        with self._lock:
            self._value += n

    @property
    def value(self) -> int:
        return self._value


class Gauge(Counter):
    __slots__ = ()

    def set(self, value: int) -> None:
        with self._lock:
            self._value = value

    def dec(self, n: int = 1) -> None:
        self.inc(-n)


class Histogram:
    """Observations in seconds, counted in fixed buckets (non-cumulative internally)."""

    __slots__ = ("_lock", "_counts", "_sum", "bounds")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        if not bounds or bounds[-1] != math.inf or list(bounds) != sorted(bounds):
            raise ValueError("histogram bounds must be sorted and end with +inf")
        self.bounds = bounds
        self._lock = threading.Lock()
        self._counts = [0] * len(bounds)
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        i = bisect_left(self.bounds, seconds)
        with self._lock:
            self._counts[i] += 1
            self._sum += seconds

    def snapshot(self) -> dict:
        with self._lock:
            counts = list(self._counts)
            total = self._sum
        return {"le": [("+Inf" if b == math.inf else b) for b in self.bounds],
                "counts": counts, "count": sum(counts), "sum": total}


class MetricGroup:
    """Named metrics of one family. `inc`/`observe` are conveniences for cold paths."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._metrics: dict[str, Counter | Histogram] = {}

    def _get(self, name: str, kind: type):
        m = self._metrics.get(name)
        if m is None:
            with self._lock:
                m = self._metrics.get(name)
                if m is None:
                    m = self._metrics[name] = kind()
        if type(m) is not kind:
            raise TypeError(f"metric {self.name}.{name} is a {type(m).__name__}, not a {kind.__name__}")
        return m

    def counter(self, name: str) -> Counter:
        return self._get(name, Counter)

    def gauge(self, name: str) -> Gauge:
        return self._get(name, Gauge)

    def histogram(self, name: str) -> Histogram:
        return self._get(name, Histogram)

    def inc(self, name: str, n: int = 1) -> None:
        self.counter(name).inc(n)

    def observe(self, name: str, seconds: float) -> None:
        self.histogram(name).observe(seconds)

    def value(self, name: str) -> int:
        """A counter's or gauge's value; 0 if it was never touched (handy in tests)."""
        m = self._metrics.get(name)
        return m.value if isinstance(m, Counter) else 0

    def snapshot(self) -> dict:
        with self._lock:
            items = sorted(self._metrics.items())
        return {k: (m.snapshot() if isinstance(m, Histogram) else m.value) for k, m in items}

    def items(self) -> list[tuple[str, Counter | Histogram]]:
        with self._lock:
            return sorted(self._metrics.items())



class Metrics:
    """The daemon's registry: `metrics.fs`, `metrics.backend`, `metrics.blobcache`, or
    `metrics.group(name)` for others."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._groups: dict[str, MetricGroup] = {g: MetricGroup(g) for g in GROUPS}

    @property
    def fs(self) -> MetricGroup:
        return self._groups["fs"]

    @property
    def backend(self) -> MetricGroup:
        return self._groups["backend"]

    @property
    def blobcache(self) -> MetricGroup:
        return self._groups["blobcache"]

    def group(self, name: str) -> MetricGroup:
        with self._lock:
            g = self._groups.get(name)
            if g is None:
                g = self._groups[name] = MetricGroup(name)
            return g

    def snapshot(self) -> dict:
        with self._lock:
            groups = list(self._groups.values())
        return {g.name: g.snapshot() for g in groups}

    def groups(self) -> list[MetricGroup]:
        with self._lock:
            return list(self._groups.values())
