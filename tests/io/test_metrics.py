import threading

from prometheus_client.parser import text_string_to_metric_families

from nydus_py import prometheus
from nydus_py.metrics import Metrics


def test_counters_are_exact_under_threads():
    m = Metrics()
    c = m.backend.counter("read_count")

    def work():
        for _ in range(20_000):
            c.inc()

    ts = [threading.Thread(target=work) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert m.snapshot()["backend"]["read_count"] == 80_000


def test_histogram_buckets_and_prometheus_text():
    m = Metrics()
    h = m.fs.histogram("read_latency")
    for s in (0.00001, 0.0003, 0.0003, 2.0, 99.0):
        h.observe(s)
    snap = m.fs.snapshot()["read_latency"]
    assert snap["count"] == 5 and abs(snap["sum"] - 101.00061) < 1e-9
    assert snap["counts"][0] == 1 and snap["counts"][-1] == 1
    assert snap["counts"][snap["le"].index(0.0005)] == 2
    m.blobcache.gauge("used_bytes").set(42)
    m.backend.inc("read_count", 7)
    text = prometheus.text(m)
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    lat = fams["nydus_fs_read_latency_seconds"]
    assert lat.type == "histogram" and lat.documentation == "latency of FUSE reads (seconds)"
    buckets = {s.labels["le"]: s.value for s in lat.samples if s.name.endswith("_bucket")}
    assert buckets["+Inf"] == 5 and buckets["0.0005"] == 3
    assert fams["nydus_blobcache_used_bytes"].type == "gauge"
    assert fams["nydus_blobcache_used_bytes"].samples[0].value == 42
    c = fams["nydus_backend_read_count"]
    assert c.type == "counter" and c.samples[0].name == "nydus_backend_read_count_total" and c.samples[0].value == 7
    assert "# HELP nydus_backend_read_count_total requests to the storage backend" in text


def test_group_inc_is_what_the_vfs_calls():
    m = Metrics()
    m.fs.inc("read_errors")
    m.fs.inc("read_errors", 2)
    assert m.fs.value("read_errors") == 3 and m.fs.value("never") == 0
