#!/usr/bin/env python3
"""nydus-py benchmark harness (run it through perf/run, which installs what it needs).

    perf/run                  full suite: Debian images, shaped network, 3 reps
    perf/run --quick          busybox-sized image, loopback only, 1 rep (CI)
    perf/run --only cold_start,read_path --reps 5

Writes perf/results/{full,quick}.json, .md and *.png; exits non-zero when a scenario fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import images, report, scenarios                    # noqa: E402
from benchlib.net import NETNS, Registry                          # noqa: E402
from benchlib.util import CACHE, RESULTS, log, run, umount_all_under   # noqa: E402

ALL = ["cold_start", "conversion", "read_path", "metadata", "storage"]


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    disk = subprocess.run(["df", "-h", "--output=source,fstype", str(CACHE)], capture_output=True, text=True).stdout
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(mem / 2**20, 1), "kernel": platform.release(),
            "os": _os_release(), "python": platform.python_version(),
            "disk": " ".join(disk.split()[2:]), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _os_release() -> str:
    try:
        for line in open("/etc/os-release"):
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return "?"


def unpacked(tag: str) -> Path:
    """Native tree for images not built from a rootfs dir: umoci unpack (cached)."""
    d = CACHE / "unpacked" / tag
    if not (d / "rootfs").exists():
        shutil.rmtree(d, ignore_errors=True)
        d.parent.mkdir(parents=True, exist_ok=True)
        run(["umoci", "unpack", "--image", f"{images.OCI}:{tag}", d])
    return d / "rootfs"


def _layer_meta_from_oci(tag: str) -> list[dict]:
    from nydus_py.oci.layout import OCILayout
    lay = OCILayout(images.OCI)
    m = lay.read_json(lay.resolve(tag), tag)
    return [{"digest": d["digest"], "size": d["size"]} for d in m["layers"]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="busybox image, loopback, 1 rep (CI)")
    ap.add_argument("--reps", type=int, help="repetitions per scenario (default 3, --quick 1)")
    ap.add_argument("--cold-reps", type=int, default=0, help="repetitions for cold_start (default --reps)")
    ap.add_argument("--only", help=f"comma list of {','.join(ALL)}")
    ap.add_argument("--nets", help="comma list of RATE_MBIT/RTT_MS (default 100/20,1000/2; --quick: 0/2)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if os.geteuid() != 0:
        print("perf: needs root (FUSE mounts, chroot, network namespaces, drop_caches)", file=sys.stderr)
        return 2
    only = args.only.split(",") if args.only else ALL
    bad = set(only) - set(ALL)
    if bad:
        ap.error(f"unknown scenario(s) {bad}")
    reps = args.reps or (1 if args.quick else 3)
    if args.nets:
        nets = [(int(r) or None, float(t)) for r, t in (x.split("/") for x in args.nets.split(","))]
    else:
        nets = [(None, 2.0)] if args.quick else [(100, 20.0), (1000, 2.0)]

    # SIGTERM/SIGHUP unwind like Ctrl-C, so every context manager cleans up
    def _term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGHUP, _term)

    t_start = time.time()
    if args.quick:
        images.build_generated("busybox", "busybox")
        images.build_generated("files5k", "files", n_files=5000)
        tags = ["busybox", "files5k"]
        layer_meta = {t: _layer_meta_from_oci(t) for t in tags}
        native = {t: unpacked(t) for t in tags}
        cfg = dict(cold_image="busybox", cold_cmd=["/bin/sh", "-c", "echo hello"], convert_images=["busybox"],
                   read_image="busybox", meta_images=["busybox", "files5k"], storage_images=[])
        if "storage" in only:
            only.remove("storage")
    else:
        layer_meta = images.build_debian_images()
        images.flat_tar("python")
        images.build_generated("files100k", "files")
        layer_meta["files100k"] = _layer_meta_from_oci("files100k")
        tags = ["base", "python", "python-curl"]
        native = {t: images.rootfs(t) for t in tags}
        if "metadata" in only:              # an umoci unpack of 100k files, for that scenario only
            native["files100k"] = unpacked("files100k")
        cfg = dict(cold_image="python", cold_cmd=["python3", "-c", 'print("hello")'],
                   convert_images=["base", "python"], read_image="python", meta_images=["python", "files100k"],
                   storage_images=["base", "python", "python-curl"])
    if args.quick and "read_path" in only:
        # ratarmount needs the flattened tar of the read image
        tar = CACHE / "layers" / "busybox-flat.tar"
        if not tar.exists():
            tar.parent.mkdir(parents=True, exist_ok=True)
            with open(tar.with_suffix(".tmp"), "wb") as f:
                images.write_layer(native["busybox"], None, f)
            tar.with_suffix(".tmp").rename(tar)

    work = Path(tempfile.mkdtemp(prefix="nydperf-", dir="/var/tmp"))
    results = {"mode": "quick" if args.quick else "full", "reps": reps, "machine": machine(),
               "nets": nets, "scenarios": {}}
    prev = RESULTS / f"{results['mode']}.json"
    if args.only and prev.exists():
        # a partial run updates its scenarios in the last results and keeps the others
        try:
            old = json.loads(prev.read_text())
            results["scenarios"] = {k: v for k, v in old.get("scenarios", {}).items()}
            results["scenario_dates"] = old.get("scenario_dates", {})
            results["loadavg_1m_after"] = old.get("loadavg_1m_after", {})
        except ValueError:
            pass
    failed = False
    try:
        with Registry(work / "registry") as reg:
            log.info("registry on %s; pushing source images", reg.host)
            for t in {*tags, cfg["cold_image"], cfg["read_image"]}:
                run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{images.OCI}:{t}",
                     f"docker://{reg.host}/bench/{t}:oci"])
            for t in {cfg["cold_image"], cfg["read_image"]}:
                s = scenarios.convert(f"{reg.host}/bench/{t}:oci", f"{reg.host}/bench/{t}:nydus", work / "convwork")
                log.info("converted %s in %.1fs", t, s)
            b = scenarios.Bench(quick=args.quick, reps=reps, work=work, registry=reg, layer_meta=layer_meta,
                                nets=nets, native=native, cold_reps=args.cold_reps, **cfg)
            for name in only:
                log.info("=== %s", name)
                t0 = time.time()
                try:
                    results["scenarios"][name] = getattr(scenarios, name)(b)
                except KeyboardInterrupt:
                    raise
                except Exception as e:
                    failed = True
                    log.error("%s failed: %s", name, traceback.format_exc())
                    results["scenarios"][name] = {"error": f"{e.__class__.__name__}: {e}"[:2000]}
                results["scenarios"][name + "_seconds"] = round(time.time() - t0, 1)
                results.setdefault("scenario_dates", {})[name] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0))
                results.setdefault("loadavg_1m_after", {})[name] = os.getloadavg()[0]
                _write(results, args.quick)        # partial results survive a later failure
    finally:
        umount_all_under(work)
        subprocess.run(["ip", "netns", "del", NETNS], stderr=subprocess.DEVNULL)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    results["total_seconds"] = round(time.time() - t_start, 1)
    md, targets = _write(results, args.quick, final=True)
    print(md)
    if failed:
        print("perf: at least one scenario failed (see Errors)", file=sys.stderr)
        return 1
    return 0


def _write(results: dict, quick: bool, final: bool = False):
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "quick" if quick else "full"
    scen = {k: v for k, v in results["scenarios"].items() if not k.endswith("_seconds")}
    md, targets = report.tables({**results, "scenarios": scen})
    results["targets"] = [{"target": t, "measured": v, "met": ok} for t, v, ok in targets]
    (RESULTS / f"{name}.json.tmp").write_text(json.dumps(results, indent=1, default=str))
    (RESULTS / f"{name}.json.tmp").rename(RESULTS / f"{name}.json")
    m = results["machine"]
    head = (f"## nydus-py benchmarks ({results['mode']}, {results['reps']} rep(s), medians)\n\n"
            f"Machine: {m['cpu']}, {m['cores']} cores, {m['mem_gib']} GiB, {m['os']}, kernel {m['kernel']}, "
            f"Python {m['python']}, disk {m['disk']}; {m['date']}. 1-min load average after each scenario: "
            f"{results.get('loadavg_1m_after', {})} (other jobs on the machine inflate absolute times). "
            f"Scenario start times: {results.get('scenario_dates', {})}.\n\n")
    (RESULTS / f"{name}.md").write_text(head + md)
    if final:
        charts = report.charts({**results, "scenarios": scen}, RESULTS, f"{name}-")
        for c in charts:
            log.info("chart %s", c)
    return head + md, targets


if __name__ == "__main__":
    sys.exit(main())
