#!/usr/bin/env python3
"""Cold start A/B: the cold-start scenario of perf/run (`python3 -c 'print("hello")'` in the
`python` image over a shaped link) for several `nydusd` binaries, alternated within every
repetition, so that the load of a shared machine hits every variant alike.

    sudo .venv/bin/python perf/coldab.py --variant before=/work/main/.venv/bin/nydusd \\
        --variant after=.venv/bin/nydusd --reps 4 [--net 100/20] [--learned] [--skopeo]
        [--work /var/tmp/coldab] [--trace]

Per run: seconds from exec of `nydusd mount --daemon` to the command's exit (as perf/run),
mount-ready, bytes through the delay proxy, registry requests (access log), and the daemon's
backend metrics. `--learned` adds the "second host" row: one recording run with the first
variant's daemon pushes the learned list first. `--work DIR` keeps the converted image for the
next invocation (delete DIR yourself). `--trace` keeps each daemon's debug log
(`DIR/trace-<variant>-<rep>-<row>.log`). Uses its own network namespace (`nydcold`), so it can
run beside perf/run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import net                                   # noqa: E402
from benchlib.images import OCI                            # noqa: E402
from benchlib.net import DelayProxy, Registry, ShapedNet   # noqa: E402
from benchlib.nydus import convert, registry_manifest      # noqa: E402
from benchlib.util import drop_caches, median, run, umount_all_under  # noqa: E402
from nydus_py import pidwait                                # noqa: E402

log = logging.getLogger("coldab")

# a namespace and addresses of our own: perf/run may be using nydperf / 10.213.7.0/30
net.NETNS, net.HOST_IF, net.NS_IF = "nydcold", "nydc0", "nydc1"
net.HOST_IP, net.NS_IP = "10.213.9.1", "10.213.9.2"
CMD = ["python3", "-c", 'print("hello")']


def api(sock: Path, path: str) -> dict:
    out = subprocess.run(["curl", "-s", "--unix-socket", str(sock), f"http://localhost{path}"],
                         capture_output=True, timeout=30).stdout
    try:
        return json.loads(out)
    except ValueError:
        return {}


def cold_run(nydusd: str, host: str, tag: str, d: Path, extra: tuple, trace: Path | None,
             proxy: DelayProxy | None, reg: Registry | None) -> dict:
    """One cold start from an empty cache; the daemon is stopped afterwards (not timed)."""
    shutil.rmtree(d, ignore_errors=True)
    (d / "mnt").mkdir(parents=True)
    sock, pidf, logf = d / "api.sock", d / "pid", d / "nydusd.log"
    drop_caches()
    if proxy is not None:
        proxy.reset()
    lines0 = reg.log_lines() if reg is not None else 0
    argv = [nydusd, "mount", "--daemon", "--pid-file", pidf, "--log-file", logf,
            "--log-level", "debug" if trace else "warn", "--cache-dir", d / "cache",
            "--apisock", sock, *extra, "--image", f"{host}/bench/python:{tag}", "--plain-http",
            d / "mnt"]
    t0 = time.perf_counter()
    run(argv, timeout=300)
    ready = time.perf_counter() - t0
    p = run(["chroot", d / "mnt", *CMD], capture=True, timeout=300)
    seconds = time.perf_counter() - t0
    if b"hello" not in p.stdout:
        raise RuntimeError(f"command printed {p.stdout!r} {p.stderr[-500:]!r}")
    backend = api(sock, "/api/v1/metrics/backend")
    fs = api(sock, "/api/v1/metrics")
    if pidf.exists():
        _stop(int(pidf.read_text()), 10)
    umount_all_under(d / "mnt")
    time.sleep(0.3)         # access-log lines land a few ms after the response
    out = {"seconds": seconds, "ready": ready,
           "bytes": proxy.bytes_down if proxy is not None else None,
           "requests": (reg.log_lines() - lines0) if reg is not None else None,
           "backend": backend, "fs": {k: v for k, v in fs.items()
                                       if k in ("fetch_ranges", "fetch_bytes", "chunk_misses",
                                                "singleflight_waits", "readahead_chunks")}}
    if trace is not None and logf.exists():
        shutil.copy(logf, trace)
    return out


def _stop(pid: int, seconds: float) -> None:
    """SIGTERM a daemon and wait up to `seconds` for it to exit (not for init to reap it)."""
    pidwait.stop(pid, seconds)


def record_and_push(nydusd: str, host: str, d: Path) -> None:
    """One run of the command with --push-prefetch (unshaped): the learned list as a referrer."""
    shutil.rmtree(d, ignore_errors=True)
    (d / "mnt").mkdir(parents=True)
    pidf = d / "pid"
    run([nydusd, "mount", "--daemon", "--pid-file", pidf, "--log-file", d / "log",
         "--cache-dir", d / "cache", "--push-prefetch", "--no-learned-prefetch",
         "--image", f"{host}/bench/python:nydus", "--plain-http", d / "mnt"], timeout=300)
    run(["chroot", d / "mnt", *CMD])
    _stop(int(pidf.read_text()), 20)
    text = (d / "log").read_text(errors="replace")
    if "pushed" not in text:
        raise RuntimeError(f"learned list not pushed: {text[-800:]}")


def skopeo_run(host: str, d: Path, proxy: DelayProxy) -> dict:
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    drop_caches()
    proxy.reset()
    t0 = time.perf_counter()
    run(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
         f"docker://{host}/bench/python:oci", f"oci:{d}/img:x"], timeout=1200)
    run(["umoci", "unpack", "--image", f"{d}/img:x", d / "bundle"], timeout=600)
    p = run(["chroot", d / "bundle" / "rootfs", *CMD], capture=True)
    s = time.perf_counter() - t0
    if b"hello" not in p.stdout:
        raise RuntimeError("skopeo run did not print hello")
    shutil.rmtree(d, ignore_errors=True)
    return {"seconds": s, "bytes": proxy.bytes_down}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", required=True, metavar="NAME=NYDUSD")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--net", default="100/20", help="RATE_MBIT/RTT_MS (0/RTT: loopback)")
    ap.add_argument("--learned", action="store_true", help="also the learned-prefetch row")
    ap.add_argument("--no-default", action="store_true", help="skip the default row")
    ap.add_argument("--skopeo", action="store_true", help="skopeo+umoci once per repetition")
    ap.add_argument("--work", help="work dir, kept (reuses its converted image)")
    ap.add_argument("--trace", action="store_true", help="keep every daemon's debug log")
    args = ap.parse_args()

    def _term(signum, frame):   # unwind like Ctrl-C: namespace, registries, mounts removed
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, _term)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    variants = [v.split("=", 1) for v in args.variant]
    rate, rtt = (float(x) for x in args.net.split("/"))
    work = Path(args.work) if args.work else Path(f"/var/tmp/coldab-{os.getpid()}")
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"net": args.net, "variants": dict(variants), "runs": []}
    try:
        with Registry(work / "registry") as reg:
            have = True
            try:
                registry_manifest(reg.host, "bench/python", "nydus")
            except Exception:
                have = False
            if not have:
                run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{OCI}:python",
                     f"docker://{reg.host}/bench/python:oci"], timeout=1200)
                s = convert(f"{reg.host}/bench/python:oci", f"{reg.host}/bench/python:nydus",
                            work / "convwork", ())
                log.info("converted in %.1fs", s)
                shutil.rmtree(work / "convwork", ignore_errors=True)
            if args.learned:
                record_and_push(variants[0][1], reg.host, work / "record")
                log.info("learned list pushed")
        with ShapedNet(int(rate)) if rate else _null() as _:
            with Registry(work / "registry", addr=net.NS_IP if rate else "127.0.0.1",
                          port=5000 if rate else None, netns=net.NETNS if rate else None,
                          name="shaped") as reg, DelayProxy(reg.host, rtt) as proxy:
                rows = ([] if args.no_default else [("default", ("--no-learned-prefetch",))]) + \
                       ([("learned", ())] if args.learned else [])
                for rep in range(args.reps):
                    order = variants if rep % 2 == 0 else list(reversed(variants))
                    for row, extra in rows:
                        for name, nydusd in order:
                            tr = work / f"trace-{name}-{rep}-{row}.log" if args.trace else None
                            r = cold_run(nydusd, proxy.host, "nydus", work / "run", extra, tr, proxy, reg)
                            r.update(variant=name, row=row, rep=rep)
                            results["runs"].append(r)
                            log.info("rep %d %-8s %-8s %.2fs (ready %.2fs) %.2f MB %d req %s", rep, row,
                                     name, r["seconds"], r["ready"], (r["bytes"] or 0) / 1e6,
                                     r["requests"] or 0, r["fs"])
                    if args.skopeo:
                        r = skopeo_run(proxy.host, work / "skopeo", proxy)
                        r.update(variant="skopeo", row="skopeo", rep=rep)
                        results["runs"].append(r)
                        log.info("rep %d skopeo+umoci %.2fs", rep, r["seconds"])
    finally:
        umount_all_under(work)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print("\nvariant   row       seconds (per rep)            median  ready med  MB      requests")
    keys = sorted({(r["row"], r["variant"]) for r in results["runs"]})
    for row, name in keys:
        rs = [r for r in results["runs"] if r["row"] == row and r["variant"] == name]
        print(f"{name:9} {row:9} {' '.join('%.2f' % r['seconds'] for r in rs):28} "
              f"{median([r['seconds'] for r in rs]):6.2f}  "
              f"{median([r.get('ready') for r in rs]) or 0:6.2f}  "
              f"{(median([r['bytes'] for r in rs]) or 0) / 1e6:6.2f}  "
              f"{median([r.get('requests') for r in rs]) or 0}")
    out = work / "results.json" if args.work else None
    if out:
        out.write_text(json.dumps(results, indent=1))
    return 0


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


if __name__ == "__main__":
    sys.exit(main())
