"""Prometheus over TCP: `nydusd serve --metrics-address` covers every mount it runs; scraped on
127.0.0.1 and read with prometheus_client's own text parser (a format error fails the parse)."""

from __future__ import annotations

import subprocess
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nydus_py.daemon.api import call_sync, get_json
from tests.fixtures.daemon import force_unmount, nydusd_cmd, read_all, wait_for
from tests.fixtures.metrics import scrape, value
from tests.fixtures.registry import free_port

pytestmark = pytest.mark.e2e


def test_nydusd_serve_metrics_over_tcp_cover_every_mount(tmp_path, image):
    root, built = image
    sock = tmp_path / "sup.sock"
    log = tmp_path / "sup.log"
    port = free_port()
    with open(log, "wb") as out:
        sup = subprocess.Popen([*nydusd_cmd(), "serve", "--apisock", str(sock), "--cache-dir", str(tmp_path / "cache"),
                                "--state-dir", str(tmp_path / "state"), "--metrics-address", f"127.0.0.1:{port}"],
                               stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    m1.mkdir(), m2.mkdir()
    try:
        wait_for(sock.exists, "supervisor socket", log=log)
        for m in (m1, m2):
            st, info = get_json(str(sock), f"/api/v1/mount?mountpoint={m}", "POST",
                                {"bootstrap": str(root / "bootstrap"), "blob_dir": str(root / "blobs")})
            assert st == 200, info
        read_all(m1, built)
        (m2 / "small/s001").read_bytes()
        fams = scrape(port)
        assert value(fams["nydusd_mounts"], "nydusd_mounts", state="RUNNING") == 2
        reads = fams["nydus_fs_read_count"]
        assert reads.type == "counter"
        r1 = value(reads, "nydus_fs_read_count_total", mountpoint=str(m1))
        r2 = value(reads, "nydus_fs_read_count_total", mountpoint=str(m2))
        assert r1 > r2 > 0
        lat = fams["nydus_fs_read_latency_seconds"]
        assert lat.type == "histogram"
        assert value(lat, "nydus_fs_read_latency_seconds_count", mountpoint=str(m1)) == r1
        assert value(lat, "nydus_fs_read_latency_seconds_bucket", mountpoint=str(m1), le="+Inf") == r1
        # the unix-socket endpoint serves the same families
        st, text = call_sync(str(sock), "GET", "/metrics")
        assert st == 200 and {f.name for f in text_string_to_metric_families(text.decode())} == set(fams)
        assert call_sync(str(sock), "PUT", "/api/v1/daemon/exit")[0] == 204
        assert sup.wait(30) == 0
        with pytest.raises(OSError):                      # the listener went with the daemon
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
    finally:
        if sup.poll() is None:
            sup.terminate()
            sup.wait(30)
        force_unmount(m1)
        force_unmount(m2)


def test_bad_metrics_address_is_one_error_line(tmp_path):
    p = subprocess.run([*nydusd_cmd(), "serve", "--apisock", str(tmp_path / "s.sock"), "--state-dir",
                        str(tmp_path / "st"), "--metrics-address", "nowhere"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "expected HOST:PORT" in p.stderr, p.stderr
