"""nydusd on a production host, through real FUSE mounts: persistent and self-repairing cache,
size limit and gc, background prefetch that never delays the workload, the HTTP API, access
pattern → nydusify convert, signals and crash recovery, backend outages, several mounts in one
daemon, and a 32-thread random-read soak.

Every number that proves a claim comes from the daemon's own API (backend read counts, cache
hits, prefetch progress), so a test cannot pass by accident through the page cache.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from nydus_py.daemon.api import call_sync, get_json
from nydus_py.format.bootstrap import Bootstrap
from tests.fixtures.daemon import (
    CHUNK,
    VENV_BIN,
    Daemon,
    backend_reads,
    force_unmount,
    mounted,
    nydusd_cmd,
    rand_bytes,
    read_all,
    src_args,
    wait_for,
)
from tests.fixtures.nydus_build import build

pytestmark = pytest.mark.e2e


# -- cache: persistence, repair, limit, gc ------------------------------------------------------
def test_restart_keeps_the_cache_zero_backend_reads_on_second_cold_read(tmp_path, image):
    cache = tmp_path / "cache"
    with Daemon(tmp_path, *src_args(image), "--cache-dir", str(cache), "--no-prefetch") as d:
        read_all(d.mnt, image[1])
        first = backend_reads(d)
        d.api("/api/v1/daemon/exit", "PUT")
        assert d.proc.wait(15) == 0 and not mounted(d.mnt)
    assert first > 0
    with Daemon(tmp_path, *src_args(image), "--cache-dir", str(cache), name="again") as d:
        read_all(d.mnt, image[1])
        assert backend_reads(d) == 0
        bc = d.api("/api/v1/metrics/blobcache")
        assert bc["hits"] > 0 and bc["misses"] == 0 and bc["cache_corrupt"] == 0
        # the cache files' pages are still in memory: first reads were checked on the loop
        assert bc["nowait_checks"] > 0


def test_corrupt_cached_chunk_is_detected_dropped_and_refetched_through_a_mount(tmp_path, image):
    root, built = image
    cache = tmp_path / "cache"
    with Daemon(tmp_path, *src_args(image), "--cache-dir", str(cache)) as d:
        read_all(d.mnt, built)
    data_file = next(cache.glob("*.data"))
    with open(data_file, "r+b") as f:          # flip bytes inside the first chunks (big/b0)
        for off in (10, CHUNK + 77, 5 * CHUNK + 3):
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 0xFF]))
    with Daemon(tmp_path, *src_args(image), "--cache-dir", str(cache), name="repair") as d:
        assert (d.mnt / "big/b0").read_bytes() == built.files["big/b0"]
        bc = d.api("/api/v1/metrics/blobcache")
        assert bc["cache_corrupt"] == 3
        assert backend_reads(d) >= 1
        # the flipped bytes were in the page cache, where the loop's first-read check saw
        # (and refused) them; the intact chunks of the file were checked and served there
        assert bc["nowait_checks"] > 0
    with Daemon(tmp_path, *src_args(image), "--cache-dir", str(cache), name="repaired") as d:
        read_all(d.mnt, built)
        assert backend_reads(d) == 0 and d.api("/api/v1/metrics/blobcache")["cache_corrupt"] == 0


def test_eviction_keeps_the_cache_under_its_limit(tmp_path, image):
    root, built = image
    total = sum(len(v) for v in built.files.values())
    limit = total // 3
    cache = tmp_path / "cache"
    with Daemon(tmp_path, *src_args(image), "--cache-dir", str(cache),
                "--cache-max-size", str(limit)) as d:
        read_all(d.mnt, built)
        bc = d.api("/api/v1/metrics/blobcache")
        assert bc["max_size"] == limit
        assert bc["total_bytes"] <= limit and bc["evicted_chunks"] > 0
        assert bc["store_errors"] == 0
        disk = sum(p.stat().st_blocks * 512 for p in cache.glob("*.data"))
        assert disk <= limit + 64 * 4096, (disk, limit)   # holes punched for evicted chunks


def test_config_max_size_and_cache_gc(tmp_path, image):
    root, built = image
    cache = tmp_path / "cache"
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"device": {"cache": {"type": "blobcache", "config": {
        "work_dir": str(cache), "max_size": 1 << 30}}}}))
    with Daemon(tmp_path, *src_args(image), "--config", str(cfg)) as d:
        read_all(d.mnt, built)
        assert d.api("/api/v1/metrics/blobcache")["max_size"] == 1 << 30
        r = subprocess.run([*nydusd_cmd(), "cache", "gc", "--cache-dir", str(cache)],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        busy = json.loads(r.stdout)
        assert busy["removed_blobs"] == [] and len(busy["busy_blobs"]) == 1   # in use: kept
        # the mount holds its image state (learned list) too: cache/images.py
        assert busy["removed_images"] == [] and len(busy["busy_images"]) == 1
        digest = busy["busy_images"][0]
    lists = list((cache / "prefetch").iterdir())
    assert [p.name for p in lists] == [digest.split(":")[1] + ".json"]       # saved at unmount
    r = subprocess.run([*nydusd_cmd(), "cache", "gc", "--cache-dir", str(cache), "--max-size", "1G"],
                       capture_output=True, text=True, timeout=30)
    report = json.loads(r.stdout)
    assert report["removed_blobs"] == []                                      # under the limit
    assert report["removed_images"] == [] and lists[0].exists()              # used < 7 days ago
    r = subprocess.run([*nydusd_cmd(), "cache", "gc", "--cache-dir", str(cache), "--max-size", "0"],
                       capture_output=True, text=True, timeout=30)
    report = json.loads(r.stdout)
    assert len(report["removed_blobs"]) == 1 and report["after_bytes"] == 0
    assert report["removed_images"] == [digest] and report["busy_images"] == []
    # nothing is left but empty directories (the learned list and its lock file went too)
    assert [p for p in cache.rglob("*") if not p.is_dir()] == []


# -- prefetch -------------------------------------------------------------------------------------
def test_prefetch_completes_and_never_delays_foreground_reads(tmp_path, image):
    root, built = image
    rate = 1 << 20                                    # 3 MiB of big/ at 1 MiB/s: ~3 s
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"fs_prefetch": {"enable": True, "threads_count": 2,
                                               "merging_size": 256 << 10, "bandwidth_rate": rate}}))
    plist = tmp_path / "prefetch.txt"
    plist.write_text("/big\n# comment\n/not/there\n")
    with Daemon(tmp_path, *src_args(image), "--config", str(cfg), "--prefetch-files", str(plist),
                "--cache-dir", str(tmp_path / "cache")) as d:
        t0 = time.monotonic()
        latencies = []
        smalls = sorted(p for p in built.files if p.startswith("small/"))
        for i, p in enumerate(smalls[:30]):
            t = time.perf_counter()
            assert (d.mnt / p).read_bytes() == built.files[p]
            latencies.append(time.perf_counter() - t)
            time.sleep(0.03)
        during = d.api("/api/v1/metrics/prefetch")
        assert during["state"] == 1, "prefetch should still be running during the reads"
        t = time.perf_counter()                    # a big file that is queued for prefetch
        with open(d.mnt / "big/b3", "rb") as f:
            assert f.read(4096) == built.files["big/b3"][:4096]
        latencies.append(time.perf_counter() - t)
        done = wait_for(lambda: (m := d.api("/api/v1/metrics/prefetch"))["state"] == 2 and m,
                        "prefetch done", timeout=30)
        elapsed = time.monotonic() - t0
        assert done["planned_chunks"] == 4 * (768 << 10) // CHUNK
        assert done["fetched_chunks"] + done["skipped_chunks"] == done["planned_chunks"]
        assert done["errors"] == 0 and done["elapsed_ms"] >= 1500
        print(f"\nprefetch {done['elapsed_ms']} ms; foreground reads: max "
              f"{max(latencies) * 1000:.1f} ms, median {sorted(latencies)[len(latencies) // 2] * 1000:.1f} ms")
        assert max(latencies) < 0.25 and max(latencies) * 10 < elapsed
        before = backend_reads(d)
        for i in range(4):                         # prefetched: served from the cache
            assert (d.mnt / f"big/b{i}").read_bytes() == built.files[f"big/b{i}"]
        assert backend_reads(d) == before
        assert d.api("/api/v1/metrics/blobcache")["prefetch_data_amount"] > 0


# -- API ------------------------------------------------------------------------------------------
def test_api_endpoints_return_the_documented_fields(tmp_path, image):
    root, built = image
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"access_pattern": True, "iostats_files": True}))
    with Daemon(tmp_path, *src_args(image), "--config", str(cfg), "--id", "node-1") as d:
        (d.mnt / "small/s001").read_bytes()
        info = d.api("/api/v1/daemon")
        assert {"id", "version", "state", "pid", "mountpoint", "image"} <= set(info)
        assert info["id"] == "node-1" and info["state"] == "RUNNING"
        assert info["version"]["package_ver"] and info["pid"] == d.proc.pid
        m = d.api("/api/v1/metrics")
        assert {"data_read", "fop_hits", "fop_errors", "read_latency", "read_count"} <= set(m)
        assert m["read_count"] >= 1 and m["read_latency"]["count"] == m["read_count"]
        assert len(m["read_latency"]["le"]) == len(m["read_latency"]["counts"])
        b = d.api("/api/v1/metrics/backend")
        assert {"read_count", "read_errors", "read_amount_total", "read_latency", "backend_type"} <= set(b)
        c = d.api("/api/v1/metrics/blobcache")
        assert {"hits", "misses", "size", "used_bytes", "max_size", "evicted_chunks",
                "prefetch_data_amount", "underlying_files"} <= set(c)
        assert c["size"] > 0
        files = d.api("/api/v1/metrics/files")
        assert files and {"ino", "path", "nr_read", "read_bytes"} <= set(files[0])
        pattern = d.api("/api/v1/metrics/pattern")
        assert pattern[0]["path"] == "/small/s001" and "first_access_time_secs" in pattern[0]
        assert d.api("/api/v1/metrics/inflight") == {"values": []}
        pf = d.api("/api/v1/metrics/prefetch")   # only the learned-list lookup runs: it finds none
        assert pf.get("planned_chunks", 0) == 0 and pf.get("fetched_chunks", 0) == 0, pf
        status, text = call_sync(str(d.sock), "GET", "/metrics")
        assert status == 200 and b"# TYPE nydus_fs_read_latency_seconds histogram" in text
        assert b"nydus_backend_read_count_total " in text and b"nydus_blobcache_hits_total " in text
        assert get_json(str(d.sock), "/api/v1/nope")[0] == 404
        assert get_json(str(d.sock), "/api/v1/metrics", "DELETE")[0] == 405
        assert get_json(str(d.sock), "/api/v1/mount?mountpoint=/x", "POST", {})[0] == 501
        assert call_sync(str(d.sock), "PUT", "/api/v1/daemon/exit")[0] == 204
        assert d.proc.wait(15) == 0
        assert not mounted(d.mnt) and not d.sock.exists()


def test_access_pattern_feeds_nydusify_convert_and_the_new_image_prefetches_it(tmp_path):
    from tests.fixtures.imagegen import Content, Image, Layer

    layer = Layer()
    for i in range(12):
        layer.file(f"app/lib{i}.so", Content.random(200_000, seed=i))
    layer.file("app/main", Content.random(50_000, seed=99))
    src, dst, dst2 = tmp_path / "src", tmp_path / "dst", tmp_path / "dst2"
    Image([layer]).write_oci(src, "v1")
    nydusify = [str(VENV_BIN / "nydusify"), "convert", "--source", f"oci:{src}:v1"]
    subprocess.run([*nydusify, "--target", f"oci:{dst}:v1"], check=True, capture_output=True)
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"access_pattern": True}))
    order = ["/app/main", "/app/lib7.so", "/app/lib2.so"]
    with Daemon(tmp_path, "--image", f"oci:{dst}:v1", "--config", str(cfg)) as d:
        for p in order:                               # "the workload starts"
            (d.mnt / p.lstrip("/")).read_bytes()
        (d.mnt / "app/main").read_bytes()
        assert [e["path"] for e in d.api("/api/v1/metrics/pattern")] == order
        status, text = call_sync(str(d.sock), "GET", "/api/v1/metrics/pattern?format=text")
        assert status == 200 and text.decode().splitlines() == order
    patterns = tmp_path / "pattern.txt"
    patterns.write_bytes(text)
    r = subprocess.run([*nydusify, "--target", f"oci:{dst2}:v1", "--prefetch-patterns", str(patterns)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    bs = _bootstrap_of(dst2, "v1")
    assert sorted(bs.path_of(i) for i in bs.prefetch) == sorted(order)
    with Daemon(tmp_path, "--image", f"oci:{dst2}:v1", name="opt") as d:   # prefetched on mount
        pf = wait_for(lambda: (m := d.api("/api/v1/metrics/prefetch")).get("state") == 2 and m,
                      "prefetch of the optimized image")
        assert pf["planned_chunks"] > 0 and pf["errors"] == 0
        before = backend_reads(d)
        for p in order:
            (d.mnt / p.lstrip("/")).read_bytes()
        assert backend_reads(d) == before


def _bootstrap_of(layout: Path, tag: str) -> Bootstrap:
    from nydus_py.oci.layout import OCILayout
    from nydus_py.oci.nydus_image import find_layers
    lay = OCILayout(layout)
    manifest = lay.read_json(lay.resolve(tag), "manifest")
    return Bootstrap.from_bytes(lay.read_blob(find_layers(manifest, tag).bootstrap, "bootstrap"))


# -- failures -------------------------------------------------------------------------------------
def test_sigterm_exits_zero_and_kill9_recovers_with_the_cache_intact(tmp_path, image):
    root, built = image
    cache = tmp_path / "cache"
    d = Daemon(tmp_path, *src_args(image), "--cache-dir", str(cache)).start()
    try:
        stop = threading.Event()

        def busy():
            while not stop.is_set():
                try:
                    (d.mnt / "small/s010").read_bytes()
                except OSError:
                    return
        t = threading.Thread(target=busy)
        t.start()
        read_all(d.mnt, built)
        assert d.stop(signal.SIGTERM) == 0
        stop.set()
        t.join()
        assert not mounted(d.mnt)
        assert "unmounted" in d.log.read_text()

        d = Daemon(tmp_path, *src_args(image), "--cache-dir", str(cache), mnt=d.mnt, name="k").start()
        pid = d.proc.pid
        d.stop(signal.SIGKILL)
        assert mounted(d.mnt)                                       # stale mount left behind
        with pytest.raises(OSError):
            os.listdir(d.mnt)
        d = Daemon(tmp_path, *src_args(image), "--cache-dir", str(cache), mnt=d.mnt, name="r").start()
        assert d.proc.pid != pid
        read_all(d.mnt, built)
        assert backend_reads(d) == 0                                # cache survived both
        assert "stale FUSE mount" in d.log.read_text()
    finally:
        d.stop()


def test_backend_down_cached_reads_go_on_others_fail_then_recover(tmp_path, image):
    root, built = image
    blobs = tmp_path / "blobs"
    shutil.copytree(root / "blobs", blobs)
    args = ["--bootstrap", str(root / "bootstrap"), "--blob-dir", str(blobs),
            "--cache-dir", str(tmp_path / "cache"), "--no-prefetch"]
    warm = [p for p in built.files if p.startswith("big/")]
    with Daemon(tmp_path, *args) as d:
        for p in warm:
            assert (d.mnt / p).read_bytes() == built.files[p]
    away = tmp_path / "away"
    blobs.rename(away)                      # the "NAS" is gone
    blobs.mkdir()
    try:
        with Daemon(tmp_path, *args, name="down") as d:
            for p in warm:
                assert (d.mnt / p).read_bytes() == built.files[p]
            t = time.monotonic()
            with pytest.raises(OSError) as ei:
                (d.mnt / "small/s020").read_bytes()
            assert ei.value.errno == 5 and time.monotonic() - t < 10
            assert d.api("/api/v1/metrics/backend")["read_errors"] >= 1
            blobs.rmdir()
            away.rename(blobs)              # back: no restart needed
            assert (d.mnt / "small/s020").read_bytes() == built.files["small/s020"]
            log = d.log.read_text()
        line = next(ln for ln in log.splitlines() if "ERROR" in ln and "small/s020" in ln)
        assert "bootstrap" in line and "sha256:" in line     # image, file and blob in one line
    finally:
        if away.exists():
            shutil.rmtree(blobs, ignore_errors=True)
            away.rename(blobs)


def test_32_threads_reading_random_ranges_for_5s_all_get_correct_bytes(tmp_path):
    files = {f"d{i % 8}/f{i:03d}": rand_bytes(random.Random(i).randrange(1, 400_000), 1000 + i)
             for i in range(160)}
    b = build(files, chunk_size=16 << 10)
    b.write(tmp_path / "blobs", tmp_path / "bootstrap")
    total = sum(map(len, files.values()))
    with Daemon(tmp_path, "--bootstrap", str(tmp_path / "bootstrap"), "--blob-dir",
                str(tmp_path / "blobs"), "--cache-max-size", str(total // 2)) as d:
        names = sorted(files)
        deadline = time.monotonic() + 5
        bad, counts = [], [0] * 32

        def worker(k: int) -> None:
            rng = random.Random(k)
            while time.monotonic() < deadline:
                name = rng.choice(names)
                data = files[name]
                off = rng.randrange(0, len(data) + 100)
                size = rng.choice((1, 100, 4096, 65536, 300_000))
                fd = os.open(d.mnt / name, os.O_RDONLY)
                try:
                    got = os.pread(fd, size, off)
                finally:
                    os.close(fd)
                if got != data[off:off + size]:
                    bad.append((name, off, size))
                counts[k] += 1

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        m = d.api("/api/v1/metrics")
        print(f"\n{sum(counts)} reads by 32 threads in 5 s; {m['read_count']} reached the daemon; "
              f"evicted {d.api('/api/v1/metrics/blobcache')['evicted_chunks']} chunks")
        assert not bad, bad[:5]
        assert min(counts) > 0 and m["fop_errors"]["read"] == 0


# -- several mounts, one daemon -------------------------------------------------------------------
def test_one_daemon_serves_several_mounts_through_the_api(tmp_path, image):
    root, built = image
    other = build({"x/hello": b"hello from the second image\n" * 1000}, chunk_size=CHUNK)
    other.write(tmp_path / "o-blobs", tmp_path / "o-boot")
    sock = tmp_path / "sup.sock"
    log = tmp_path / "sup.log"
    with open(log, "wb") as out:
        sup = subprocess.Popen([*nydusd_cmd(), "serve", "--apisock", str(sock), "--cache-dir",
                                str(tmp_path / "cache"), "--state-dir", str(tmp_path / "state")],
                               stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    m1.mkdir(), m2.mkdir()
    try:
        wait_for(sock.exists, "supervisor socket", log=log)
        st, info = get_json(str(sock), f"/api/v1/mount?mountpoint={m1}", "POST",
                            {"bootstrap": str(root / "bootstrap"), "blob_dir": str(root / "blobs"),
                             "config": {"access_pattern": True}})
        assert st == 200 and info["state"] == "RUNNING", info
        st, info2 = get_json(str(sock), f"/api/v1/mount?mountpoint={m2}", "POST",
                             {"bootstrap": str(tmp_path / "o-boot"), "blob_dir": str(tmp_path / "o-blobs")})
        assert st == 200, info2
        assert info["pid"] != info2["pid"] != sup.pid
        st, bad = get_json(str(sock), f"/api/v1/mount?mountpoint={tmp_path / 'm3'}", "POST",
                           {"source": f"oci:{tmp_path}/none:v1"})
        assert st == 500 and "none" in bad["message"]
        read_all(m1, built)
        assert (m2 / "x/hello").read_bytes() == other.files["x/hello"]
        st, mounts = get_json(str(sock), "/api/v1/mount")
        assert sorted(x["mountpoint"] for x in mounts) == sorted([str(m1), str(m2)])
        one = get_json(str(sock), f"/api/v1/metrics/backend?mountpoint={m1}")[1]
        two = get_json(str(sock), f"/api/v1/metrics/backend?mountpoint={m2}")[1]
        both = get_json(str(sock), "/api/v1/metrics/backend")[1]
        assert both["read_count"] == one["read_count"] + two["read_count"] > 0
        assert get_json(str(sock), "/api/v1/metrics/pattern")[1][str(m1)][0]["path"]
        st, text = call_sync(str(sock), "GET", "/metrics")
        assert f'nydus_fs_read_count_total{{mountpoint="{m1}"}}'.encode() in text
        assert f'nydus_fs_read_count_total{{mountpoint="{m2}"}}'.encode() in text
        # a crashed mount is restarted, its stale mountpoint cleared
        os.kill(info2["pid"], signal.SIGKILL)
        wait_for(lambda: any(x["state"] == "RUNNING" and x["restarts"] == 1 and x["pid"] != info2["pid"]
                             for x in get_json(str(sock), "/api/v1/mount")[1]
                             if x["mountpoint"] == str(m2)), "restart", log=log)
        assert (m2 / "x/hello").read_bytes() == other.files["x/hello"]
        assert call_sync(str(sock), "DELETE", f"/api/v1/mount?mountpoint={m2}")[0] == 204
        assert not mounted(m2) and mounted(m1)
        assert call_sync(str(sock), "PUT", "/api/v1/daemon/exit")[0] == 204
        assert sup.wait(30) == 0
        assert not mounted(m1)
    finally:
        if sup.poll() is None:
            sup.terminate()
            sup.wait(30)
        force_unmount(m1)
        force_unmount(m2)
