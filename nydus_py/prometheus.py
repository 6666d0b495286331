"""Prometheus exposition with the standard client (prometheus_client): our in-process metrics
(metrics.py) as metric families, other daemons' `/metrics` text re-labelled and merged, and a
TCP listener.

    nydus_<group>_<name>_total      counters (`read_count` → `nydus_fs_read_count_total`)
    nydus_<group>_<name>            gauges
    nydus_<group>_<name>_seconds    latency histograms (`_bucket`, `_sum`, `_count`)

Every family has a `# HELP`. prometheus_client is imported only when metrics are rendered or
served, so it costs nothing on a daemon's start-up path.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from nydus_py.metrics import MetricGroup


class HasGroups(Protocol):
    def groups(self) -> list["MetricGroup"]: ...

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

HELP: dict[str, str] = {
    "fs_read_count": "FUSE reads served",
    "fs_read_bytes": "bytes returned to FUSE reads",
    "fs_read_errors": "FUSE reads that failed (EIO)",
    "fs_read_latency": "latency of FUSE reads",
    "backend_read_count": "requests to the storage backend",
    "backend_read_amount_total": "bytes read from the storage backend",
    "backend_read_errors": "failed backend requests (after retries)",
    "backend_retries": "backend requests retried after a transient error",
    "backend_read_latency": "latency of backend requests",
    "blobcache_hits": "chunks served from the cache",
    "blobcache_misses": "chunks not in the cache",
    "blobcache_used_bytes": "bytes of chunk data in the cache",
    "blobcache_max_size": "cache size limit in bytes (0: none)",
    "blobcache_cache_corrupt": "cached chunks that failed their check and were fetched again",
    "blobcache_store_errors": "chunks that could not be stored in the cache",
    "blobcache_integrity_errors": "chunks from the backend that failed their sha256 check",
    "prefetch_state": "prefetch state: 0 idle, 1 running, 2 done, 3 stopped",
}


def text(metrics: HasGroups, prefix: str = "nydus") -> str:
    """The text exposition format of a registry (`_total`, `_seconds`, `# HELP`)."""
    return render(families(metrics, prefix=prefix)).decode()


def _help(key: str) -> str:
    group, _, name = key.partition("_")
    return HELP.get(key, f"nydusd {group} metric {name.replace('_', ' ')}")


def families(metrics: HasGroups, labels: dict[str, str] | None = None, prefix: str = "nydus") -> list["Metric"]:
    """Our registry's metrics as prometheus_client families, with constant `labels`."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    from nydus_py.metrics import Gauge, Histogram
    labels = labels or {}
    names, values = list(labels), list(labels.values())
    out: list[Metric] = []
    for group in metrics.groups():
        for name, m in group.items():
            key = f"{group.name}_{name}"
            full = f"{prefix}_{key}"
            if isinstance(m, Histogram):
                snap = m.snapshot()
                cum, buckets = 0, []
                for le, c in zip(snap["le"], snap["counts"]):
                    cum += c
                    buckets.append(("+Inf" if le == "+Inf" or le == math.inf else repr(float(le)), cum))
                h = HistogramMetricFamily(full if full.endswith("_seconds") else f"{full}_seconds",
                                          f"{_help(key)} (seconds)", labels=names)
                h.add_metric(values, buckets, snap["sum"])
                out.append(h)
            elif isinstance(m, Gauge):
                g = GaugeMetricFamily(full, _help(key), labels=names)
                g.add_metric(values, m.value)
                out.append(g)
            else:
                c = CounterMetricFamily(full, _help(key), labels=names)
                c.add_metric(values, m.value)
                out.append(c)
    return out


def parse(text: str, labels: dict[str, str]) -> list["Metric"]:
    """Another daemon's exposition text → families, each sample with `labels` added."""
    from prometheus_client.parser import text_string_to_metric_families
    out = []
    for fam in text_string_to_metric_families(text):
        fam.samples = [s._replace(labels={**labels, **s.labels}) for s in fam.samples]
        out.append(fam)
    return out


def merge(groups: Iterable[Iterable["Metric"]]) -> list["Metric"]:
    """One family per name (several daemons report the same metric with different labels)."""
    by_name: dict[str, Metric] = {}
    for fams in groups:
        for f in fams:
            have = by_name.get(f.name)
            if have is None:
                by_name[f.name] = f
            else:
                have.samples.extend(f.samples)
    return list(by_name.values())


def render(fams: Iterable["Metric"]) -> bytes:
    from prometheus_client import CollectorRegistry, generate_latest
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector(lambda: list(fams)))
    return generate_latest(reg)


class _Collector:
    def __init__(self, collect: Callable[[], list["Metric"]]):
        self._collect = collect

    def collect(self) -> list["Metric"]:
        return self._collect()


def split_address(address: str) -> tuple[str, int]:
    """"host:port", "[::1]:port" or Nydus's ":9110" (every interface) → (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"metrics address {address!r}: expected HOST:PORT, e.g. 127.0.0.1:9110")
    return host.strip("[]") or "0.0.0.0", int(port)


def serve_tcp(address: str, collect: Callable[[], list["Metric"]]) -> Any:
    """Serve `GET /metrics` on `address` from a thread; returns the server (`.shutdown()`)."""
    from prometheus_client import CollectorRegistry, start_http_server
    host, port = split_address(address)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector(collect))
    server, _thread = start_http_server(port, addr=host, registry=reg)
    return server
