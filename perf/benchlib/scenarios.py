"""The five scenarios. Each takes the Bench context and returns a JSON-able dict of raw runs
and medians; report.py turns them into the table and charts."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import images, readers
from .net import NS_IP, DelayProxy, Registry, ShapedNet
from .nydus import NYDUSD, NYDUSIFY, Mount, convert, has_chunk_dict, registry_manifest
from .util import CACHE, ROOT, Timer, ctr_env, drop_caches, log, median, run, umount_all_under

sys.path.insert(0, str(ROOT))


@dataclass
class Bench:
    quick: bool
    reps: int
    work: Path                          # private temp dir for this run
    registry: Registry                  # loopback, unshaped (sources, conversions)
    layer_meta: dict                    # tag -> [layer meta]
    cold_image: str                     # tag
    cold_cmd: list[str]
    convert_images: list[str]
    read_image: str
    meta_images: list[str]
    storage_images: list[str]
    nets: list[tuple[int | None, float]]
    native: dict = field(default_factory=dict)   # tag -> unpacked rootfs dir
    cold_reps: int = 0                  # 0: reps

    def ref(self, repo: str, tag: str) -> str:
        return f"{self.registry.host}/{repo}:{tag}"

    def tmp(self, name: str) -> Path:
        p = Path(tempfile.mkdtemp(prefix=name + "-", dir=self.work))
        return p


def _sum_layers(manifest: dict) -> int:
    return sum(int(d["size"]) for d in manifest["layers"])


def image_bytes(b: Bench, tag: str) -> int:
    return sum(lay["size"] for lay in b.layer_meta[tag])


# ---------------------------------------------------------------------------- 1 cold start

def cold_start(b: Bench) -> dict:
    out = {"image": b.cold_image, "command": b.cold_cmd, "image_gzip_bytes": image_bytes(b, b.cold_image),
           "nets": []}
    conv = registry_manifest(b.registry.host, f"bench/{b.cold_image}", "nydus")
    out["image_nydus_bytes"] = _sum_layers(conv)
    pf_tag = _record_and_reconvert(b)   # "run once, optimize the image" (docs/operations.md)
    learned = _record_and_push(b)       # "run once anywhere": learned list as a referrer
    for rate, rtt in b.nets:
        label = f"{rate} Mbit/s, {rtt:g} ms RTT" if rate else f"loopback, {rtt:g} ms RTT"
        log.info("cold start over %s", label)
        res = {"net": label, "rate_mbit": rate, "rtt_ms": rtt,
               "runs": {"nydus": [], "nydus_learned": [], "nydus_prefetch": [], "nydus_snapshotter": [],
                        "nydus_snapshotter_learned": [], "skopeo_umoci": [], "containerd": []}}
        with contextlib.ExitStack() as st:
            if rate:
                st.enter_context(ShapedNet(rate))
                reg = st.enter_context(Registry(b.registry.root, addr=NS_IP, port=5000, netns="nydperf",
                                                name="shaped"))
            else:
                reg = b.registry
            proxy = st.enter_context(DelayProxy(reg.host, rtt))
            for rep in range(b.cold_reps or b.reps):
                # default conversion, no list of any kind (the learned list is on the registry)
                res["runs"]["nydus"].append(_cold_nydus(b, proxy, reg, extra=("--no-learned-prefetch",)))
                if learned:     # a fresh host: empty cache, the list found as a referrer
                    res["runs"]["nydus_learned"].append(_cold_nydus(b, proxy, reg))
                if pf_tag:
                    res["runs"]["nydus_prefetch"].append(_cold_nydus(b, proxy, reg, pf_tag))
                for key, use_learned in (("nydus_snapshotter", False), ("nydus_snapshotter_learned", True)):
                    if use_learned and not learned:
                        continue
                    r = _cold_snapshotter(b, proxy, reg, use_learned)
                    if r is not None:
                        res["runs"][key].append(r)
                res["runs"]["skopeo_umoci"].append(_cold_skopeo(b, proxy, reg))
                r = _cold_containerd(b, proxy, reg)
                if r is not None:
                    res["runs"]["containerd"].append(r)
                log.info("  rep %d: %s", rep, {k: round(v[-1]["seconds"], 2) for k, v in res["runs"].items() if v})
        res["median"] = {k: {m: median([r[m] for r in v]) for m in ("seconds", "bytes", "requests")}
                         for k, v in res["runs"].items() if v}
        out["nets"].append(res)
    return out


def _measure(proxy: DelayProxy, reg: Registry, fn) -> dict:
    drop_caches()
    proxy.reset()
    lines0 = reg.log_lines()
    with Timer() as t:
        extra = fn() or {}
    time.sleep(0.3)     # access-log lines land a few ms after the response
    return {"seconds": t.s, "bytes": proxy.bytes_down, "requests": reg.log_lines() - lines0, **extra}


def _check_hello(p: subprocess.CompletedProcess) -> None:
    if b"hello" not in p.stdout:
        raise RuntimeError(f"command printed {p.stdout!r} {p.stderr[-500:]!r}")


def _record_and_reconvert(b: Bench) -> str | None:
    """Runs the cold command once on a mount that records its access pattern, then converts
    the image again with that list as --prefetch-patterns (tag nydus-pf): its chunks go first
    in each blob and nydusd prefetches them in large ranges right after mounting."""
    d = b.tmp("record-pattern")
    try:
        cfg = d / "record.json"
        cfg.write_text(json.dumps({"access_pattern": True}))
        sock = d / "api.sock"
        with Mount(d / "mnt", d, registry=(b.registry.host, f"bench/{b.cold_image}", "nydus"),
                   cache_dir=d / "cache", extra=("--config", cfg, "--apisock", sock)) as m:
            _check_hello(run(["chroot", m.mp, *b.cold_cmd], capture=True))
            pattern = run(["curl", "-s", "--unix-socket", sock,
                           "http://localhost/api/v1/metrics/pattern?format=text"], capture=True).stdout
        (d / "patterns").write_bytes(pattern)
        convert(b.ref(f"bench/{b.cold_image}", "oci"), b.ref(f"bench/{b.cold_image}", "nydus-pf"),
                b.work / "convwork", ("--prefetch-patterns", d / "patterns"))
        log.info("recorded %d paths for the prefetch list", len(pattern.splitlines()))
        return "nydus-pf"
    except Exception as e:  # the variant is optional; the plain nydus row still stands
        log.warning("prefetch variant skipped: %s", e)
        return None
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _record_and_push(b: Bench) -> bool:
    """Runs the cold command once on a plain lazy mount ("some host", unshaped registry) with
    --push-prefetch: the chunks it read become a referrer of the image, which every later
    cold mount of the same (not reconverted) image finds on its own."""
    if "--push-prefetch" not in run([NYDUSD, "mount", "--help"], capture=True).stdout.decode():
        return False
    d = b.tmp("record-learned")
    try:
        with Mount(d / "mnt", d, registry=(b.registry.host, f"bench/{b.cold_image}", "nydus"),
                   cache_dir=d / "cache", extra=("--push-prefetch", "--no-learned-prefetch")) as m:
            _check_hello(run(["chroot", m.mp, *b.cold_cmd], capture=True))
        # the list is pushed when the daemon unmounts (Mount.__exit__ waits for it to exit)
        text = (d / "nydusd.log").read_text(errors="replace") if (d / "nydusd.log").exists() else ""
        if "not pushed" in text:
            raise RuntimeError(text[-500:])
        return True
    except Exception as e:  # the variant is optional; the plain nydus row still stands
        log.warning("learned prefetch variant skipped: %s", e)
        return False
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _cold_nydus(b: Bench, proxy: DelayProxy, reg: Registry, tag: str = "nydus", extra: tuple = ()) -> dict:
    d = b.tmp(f"cold-{tag}")
    info = {}

    def go():
        m = Mount(d / "mnt", d, registry=(proxy.host, f"bench/{b.cold_image}", tag),
                  cache_dir=d / "cache", extra=extra)
        with m:
            info["mount_ready_s"] = m.ready_s
            _check_hello(run(["chroot", m.mp, *b.cold_cmd], capture=True))
            t = time.perf_counter()
        info["unmount_s"] = time.perf_counter() - t
    r = _measure(proxy, reg, go)
    shutil.rmtree(d, ignore_errors=True)
    # "seconds" ends when the command has printed and exited, as for the other methods (their
    # rootfs is not removed either); stopping the daemon and unmounting is reported apart
    r["seconds_with_unmount"] = r["seconds"]
    r["seconds"] -= info["unmount_s"]
    return {**r, **info}


def _cold_snapshotter(b: Bench, proxy: DelayProxy, reg: Registry, learned: bool) -> dict | None:
    """nydus-py as containerd runs it: our snapshotter in shared mode, whose nydusd starts with
    it (a host that runs containers has both running: not timed, as containerd itself is not),
    then `ctr-remote image rpull` + `ctr run`, on the same containerd and runc as the ctr row.
    `learned`: the image's learned list (a referrer) is used, else learned prefetch is off."""
    if shutil.which("ctr-remote") is None:
        return None
    d = b.tmp("cold-snapshotter")
    template = d / "nydusd-config.json"
    template.write_text(json.dumps({"learned_prefetch": {"enable": learned, "record": False}}))
    env = ctr_env(("--daemon-mode", "shared", "--log-level", "warn", "--nydusd-config", str(template)))
    if env is None:
        return None
    ref = f"{proxy.host}/bench/{b.cold_image}:nydus"
    info = {}
    try:
        with env:
            env.start_snapshotter()
            env.start_containerd()
            deadline = time.monotonic() + 60
            while env.shared_mounts() is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the shared nydusd did not start: {env.log_tail('snapshotter')}")
                time.sleep(0.05)

            def go():
                with Timer() as t:
                    env.ctr_remote("image", "rpull", "--plain-http", "--snapshotter", "nydus-py", ref,
                                   timeout=300)
                info["pull_s"] = t.s
                p = env.ctr("run", "--snapshotter", "nydus-py", "--rm", ref, "cold1", *b.cold_cmd, timeout=300)
                if "hello" not in p.stdout:
                    raise RuntimeError(f"ctr run printed {p.stdout!r}")
            r = _measure(proxy, reg, go)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return {**r, **info}


def _cold_skopeo(b: Bench, proxy: DelayProxy, reg: Registry) -> dict:
    d = b.tmp("cold-skopeo")
    info = {}

    def go():
        with Timer() as t:
            run(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                 f"docker://{proxy.host}/bench/{b.cold_image}:oci", f"oci:{d}/img:x"])
        info["pull_s"] = t.s
        run(["umoci", "unpack", "--image", f"{d}/img:x", d / "bundle"])
        _check_hello(run(["chroot", d / "bundle" / "rootfs", *b.cold_cmd], capture=True))
    r = _measure(proxy, reg, go)
    shutil.rmtree(d, ignore_errors=True)
    return {**r, **info}


def _cold_containerd(b: Bench, proxy: DelayProxy, reg: Registry) -> dict | None:
    env = ctr_env()
    if env is None:
        return None
    ref = f"{proxy.host}/bench/{b.cold_image}:oci"
    info = {}
    with env:
        env.start_containerd()

        def go():
            with Timer() as t:
                env.ctr("image", "pull", "--plain-http", ref, timeout=1200)
            info["pull_s"] = t.s
            p = env.ctr("run", "--rm", ref, "cold1", *b.cold_cmd, timeout=300)
            if "hello" not in p.stdout:
                raise RuntimeError(f"ctr run printed {p.stdout!r}")
        r = _measure(proxy, reg, go)
    return {**r, **info}


# ---------------------------------------------------------------------------- 2 conversion

def conversion(b: Bench) -> dict:
    out = {"images": []}
    for tag in b.convert_images:
        log.info("conversion of %s", tag)
        res = {"image": tag, "gzip_bytes": image_bytes(b, tag), "runs": {"nydusify": [], "nydusify_local": [],
                                                                          "estargz": [], "mkfs_erofs": []}}
        for rep in range(b.reps):
            repo = f"bench/conv-{tag}-{rep}-{os.getpid()}"
            s = convert(b.ref(f"bench/{tag}", "oci"), b.ref(repo, "nydus"), b.work / "convwork")
            res["runs"]["nydusify"].append({"seconds": s, "bytes": _sum_layers(
                registry_manifest(b.registry.host, repo, "nydus"))})
            res["runs"]["nydusify_local"].append(_convert_local(b, tag))
            r = _estargz(b, tag, f"{repo}-esgz")
            if r:
                res["runs"]["estargz"].append(r)
            if tag in b.native and shutil.which("mkfs.erofs"):
                f = b.work / "erofs.img"
                with Timer() as t:
                    run(["mkfs.erofs", "--chunksize=1048576", "-T0", f,
                         b.native[tag]])
                res["runs"]["mkfs_erofs"].append({"seconds": t.s, "bytes": f.stat().st_size})
                f.unlink()
            log.info("  rep %d: %s", rep, {k: round(v[-1]["seconds"], 2) for k, v in res["runs"].items() if v})
        res["median"] = {k: {m: median([r.get(m) for r in v]) for m in ("seconds", "bytes", "convert_s")}
                         for k, v in res["runs"].items() if v}
        out["images"].append(res)
    return out


def _convert_local(b: Bench, tag: str) -> dict:
    """nydusify from the local OCI layout to a local one: no registry on either side, like
    mkfs.erofs from a local rootfs to a local file (which also skips gunzip and verification)."""
    out = b.tmp(f"conv-local-{tag}")
    with Timer() as t:
        run([NYDUSIFY, "convert", "--quiet", "--source", f"oci:{images.OCI}:{tag}",
             "--target", f"oci:{out}:{tag}"])
    from nydus_py.oci.layout import OCILayout
    lay = OCILayout(out)
    m = lay.read_json(lay.resolve(tag), tag)
    shutil.rmtree(out)
    return {"seconds": t.s, "bytes": _sum_layers(m)}


def _estargz(b: Bench, tag: str, repo: str) -> dict | None:
    if not shutil.which("ctr-remote"):
        return None
    env = ctr_env()
    if env is None:
        return None
    src, dst = b.ref(f"bench/{tag}", "oci"), b.ref(repo, "esgz")
    with env:
        env.start_containerd()
        t0 = time.perf_counter()
        env.ctr("image", "pull", "--plain-http", src, timeout=1200)
        t1 = time.perf_counter()
        env.ctr_remote("image", "convert", "--estargz", "--oci", src, dst, timeout=3600)
        t2 = time.perf_counter()
        env.ctr("image", "push", "--plain-http", dst, timeout=1200)
        t3 = time.perf_counter()
    m = registry_manifest(b.registry.host, repo, "esgz")
    return {"seconds": t3 - t0, "convert_s": t2 - t1, "pull_s": t1 - t0, "push_s": t3 - t2,
            "bytes": _sum_layers(m), "layers": [d["digest"] for d in m["layers"]],
            "layer_sizes": [d["size"] for d in m["layers"]]}


# ---------------------------------------------------------------------------- 3 read path

def read_path(b: Bench) -> dict:
    tag = b.read_image
    native = b.native[tag]
    files = readers.list_files(native)
    samples = readers.random_samples(files, 300 if b.quick else 2000)
    conc = readers.random_samples(files, 640 if b.quick else 4000, seed=11)   # other pages
    out = {"image": tag, "files": len(files), "bytes": sum(s for _, s in files), "samples": len(samples),
           "cmd": b.cold_cmd, "runs": {"nydus": [], "native": [], "ratarmount": []}}
    for rep in range(b.reps):
        log.info("read path rep %d", rep)
        out["runs"]["nydus"].append(_read_nydus(b, tag, files, samples, conc))
        out["runs"]["native"].append(_read_local(native, files, samples, conc, b.cold_cmd))
        r = _read_ratarmount(b, tag, files, samples)
        if r:
            out["runs"]["ratarmount"].append(r)
        log.info("  %s", {k: {s: round(v[-1][s]["mb_s"], 1) for s in ("cold", "warm", "hot") if s in v[-1]}
                          for k, v in out["runs"].items() if v})
    out["median"] = {}
    for k, runs in out["runs"].items():
        if not runs:
            continue
        med = {}
        for state in ("cold", "warm", "hot"):
            if state in runs[0]:
                med[state] = {"seconds": median([r[state]["seconds"] for r in runs]),
                              "mb_s": median([r[state]["mb_s"] for r in runs])}
            if "rand_" + state in runs[0]:
                med["rand_" + state] = {m: median([r["rand_" + state][m] for r in runs])
                                        for m in ("p50_us", "p99_us")}
        if "conc_warm" in runs[0]:
            med["conc_warm"] = {m: median([r["conc_warm"][m] for r in runs])
                                for m in ("p50_us", "p99_us", "worst_reader_p99_us", "ops_s",
                                          "slowest_reader_s", "fastest_reader_s")}
        if "start" in runs[0]:
            med["start"] = {"first_s": median([r["start"][0] for r in runs]),
                            "second_s": median([r["start"][1] for r in runs])}
        out["median"][k] = med
    return out


def _read_nydus(b: Bench, tag: str, files, samples, conc) -> dict:
    d = b.tmp("read-nydus")
    reg = (b.registry.host, f"bench/{tag}", "nydus")
    r = {}
    try:
        drop_caches()
        with Mount(d / "mnt", d / "w1", registry=reg, cache_dir=d / "cache") as m:
            r["cold"] = readers.read_all(m.mp, files)
        drop_caches()
        with Mount(d / "mnt", d / "w2", registry=reg, cache_dir=d / "cache") as m:
            r["warm"] = readers.read_all(m.mp, files)
            r["hot"] = readers.read_all(m.mp, files)
        drop_caches()
        with Mount(d / "mnt", d / "w3", registry=reg, cache_dir=d / "cache") as m:
            r["rand_warm"] = readers.random_reads(m.mp, samples)
            r["rand_hot"] = readers.random_reads(m.mp, samples)
        drop_caches()
        with Mount(d / "mnt", d / "w5", registry=reg, cache_dir=d / "cache") as m:
            r["conc_warm"] = readers.concurrent_random_reads(m.mp, conc)
            r["start"] = readers.chroot_start(m.mp, b.cold_cmd)     # [first, later] on this mount
        drop_caches()
        with Mount(d / "mnt", d / "w4", registry=reg, cache_dir=d / "cache2") as m:
            r["rand_cold"] = readers.random_reads(m.mp, samples)
    finally:
        umount_all_under(d)
        shutil.rmtree(d, ignore_errors=True)
    return r


def _read_local(root: Path, files, samples, conc=None, cmd=None) -> dict:
    r = {}
    drop_caches()
    r["warm"] = readers.read_all(root, files)       # from disk: what a warm chunk cache competes with
    r["hot"] = readers.read_all(root, files)
    drop_caches()
    r["rand_warm"] = readers.random_reads(root, samples)
    r["rand_hot"] = readers.random_reads(root, samples)
    if conc:
        drop_caches()
        r["conc_warm"] = readers.concurrent_random_reads(root, conc)
        if cmd:
            r["start"] = readers.chroot_start(root, cmd)
    return r


def _read_ratarmount(b: Bench, tag: str, files, samples) -> dict | None:
    exe = str(CACHE / "ratarmount-venv/bin/ratarmount")     # perf/run installs it there
    if not os.path.exists(exe):
        return None
    tar = images.flat_tar(tag)
    d = b.tmp("read-rat")
    mp = d / "mnt"
    mp.mkdir()
    r = {}

    def mount():
        p = subprocess.Popen([exe, "-f", "--index-folders", str(CACHE / "layers"), str(tar), str(mp)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        t0 = time.perf_counter()
        while not os.path.ismount(mp):
            if p.poll() is not None:
                raise RuntimeError(f"ratarmount exited {p.returncode}: {p.stderr.read()[-500:]!r}")
            if time.perf_counter() - t0 > 600:
                raise RuntimeError("ratarmount did not mount")
            time.sleep(0.05)
        return p

    def umount(p):
        subprocess.run(["fusermount", "-u", str(mp)], stderr=subprocess.DEVNULL)
        if os.path.ismount(mp):
            subprocess.run(["umount", "-l", str(mp)], stderr=subprocess.DEVNULL)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    try:
        p = mount()                     # first mount builds the index (not timed as a read)
        umount(p)
        drop_caches()
        p = mount()
        try:
            r["warm"] = readers.read_all(mp, files)
            r["hot"] = readers.read_all(mp, files)
        finally:
            umount(p)
        drop_caches()
        p = mount()
        try:
            r["rand_warm"] = readers.random_reads(mp, samples)
            r["rand_hot"] = readers.random_reads(mp, samples)
        finally:
            umount(p)
    finally:
        umount_all_under(d)
        shutil.rmtree(d, ignore_errors=True)
    return r


# ---------------------------------------------------------------------------- 4 metadata

def metadata(b: Bench) -> dict:
    out = {"images": []}
    for tag in b.meta_images:
        layout = b.work / "nydus-oci"
        if not (layout / f".{tag}").exists():
            convert(f"oci:{images.OCI}:{tag}", f"oci:{layout}:{tag}", b.work / "convwork")
            (layout / f".{tag}").write_text("")
        native = b.native[tag]
        nfiles = sum(len(f) + len(dn) for _, dn, f in os.walk(native))
        res = {"image": tag, "entries": nfiles, "runs": {"nydus": [], "native": []}}
        log.info("metadata %s (%d entries)", tag, nfiles)
        for rep in range(b.reps):
            d = b.tmp("meta")
            drop_caches()
            try:
                with Mount(d / "mnt", d, image=f"oci:{layout}:{tag}", cache_dir=d / "cache") as m:
                    r = {"mount_ready_s": m.ready_s, "rss_ready": m.rss()}
                    r.update(_meta_walks(m.mp))
                    r["rss_after"] = m.rss()
            finally:
                umount_all_under(d)
                shutil.rmtree(d, ignore_errors=True)
            res["runs"]["nydus"].append(r)
            drop_caches()
            res["runs"]["native"].append(_meta_walks(native))
            log.info("  rep %d: %s", rep, {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})
        res["median"] = {k: {m: median([r[m] for r in v]) for m in v[0]} for k, v in res["runs"].items()}
        res["serve"] = {"forkserver": _serve_ready(b, layout, tag, b.reps),
                        "exec": _serve_ready(b, layout, tag, b.reps, fork_server=False)}
        log.info("  added to serve: %s", res["serve"])
        out["images"].append(res)
    return out


def _serve_ready(b: Bench, layout: Path, tag: str, reps: int, fork_server: bool = True) -> dict:
    """Mount-ready of a mount added to a running `nydusd serve`: POST /api/v1/mount until its
    answer (the supervisor answers once the mount's API says RUNNING). Fork server (default)
    or a new interpreter per mount (NYDUS_PY_NO_FORKSERVER=1, the old way)."""
    from nydus_py.daemon.api import call_sync
    d = b.tmp("serve")
    sock, mp = d / "sup.sock", d / "mnt"
    mp.mkdir()
    env = {**os.environ, **({} if fork_server else {"NYDUS_PY_NO_FORKSERVER": "1"})}
    sup = subprocess.Popen([str(NYDUSD), "serve", "--apisock", str(sock), "--cache-dir", str(d / "cache"),
                            "--state-dir", str(d / "state"), "--log-level", "warn"],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    times = []
    try:
        t0 = time.perf_counter()
        while not sock.exists():
            if sup.poll() is not None or time.perf_counter() - t0 > 60:
                raise RuntimeError("nydusd serve did not start")
            time.sleep(0.02)
        body = json.dumps({"source": f"oci:{layout}:{tag}"}).encode()
        for _ in range(reps):
            drop_caches()
            t = time.perf_counter()
            code, raw = call_sync(str(sock), "POST", f"/api/v1/mount?mountpoint={mp}", body, timeout=120)
            times.append(time.perf_counter() - t)
            if code != 200:
                raise RuntimeError(f"serve mount failed: {raw[-300:]!r}")
            call_sync(str(sock), "DELETE", f"/api/v1/mount?mountpoint={mp}", timeout=60)
    finally:
        try:
            call_sync(str(sock), "PUT", "/api/v1/daemon/exit", timeout=30)
            sup.wait(60)
        except Exception:       # noqa: BLE001 (cleanup: kill below)
            sup.kill()
            sup.wait()
        umount_all_under(d)
        shutil.rmtree(d, ignore_errors=True)
    return {"mount_ready_s": median(times), "runs": times}


def _meta_walks(root: Path) -> dict:
    return {"find_1": readers.timed_cmd(["find", str(root)]), "find_2": readers.timed_cmd(["find", str(root)]),
            "ls_lR_1": readers.timed_cmd(["ls", "-lR", str(root)]),
            "ls_lR_2": readers.timed_cmd(["ls", "-lR", str(root)])}


# ---------------------------------------------------------------------------- 5 storage

def storage(b: Bench) -> dict:
    out = {"images": b.storage_images, "gzip_oci": {}, "estargz": {}, "nydus": {}, "nydus_chunk_dict": "n/a"}
    seen = {}
    for tag in b.storage_images:
        for lay in b.layer_meta[tag]:
            seen[lay["digest"]] = lay["size"]
        out["gzip_oci"][tag] = image_bytes(b, tag)
    out["gzip_oci"]["stored_total"] = sum(seen.values())
    seen = {}
    for tag in b.storage_images:
        repo = f"bench/store-{tag}"
        convert(b.ref(f"bench/{tag}", "oci"), b.ref(repo, "nydus"), b.work / "convwork")
        m = registry_manifest(b.registry.host, repo, "nydus")
        for lay in m["layers"]:
            seen[lay["digest"]] = lay["size"]
        out["nydus"][tag] = _sum_layers(m)
    out["nydus"]["stored_total"] = sum(seen.values())
    if has_chunk_dict():
        # each image converted with the previous one as its chunk dictionary
        try:
            seen, prev, per = {}, None, {}
            for tag in b.storage_images:
                repo = f"bench/store-dict-{tag}"
                extra = ("--chunk-dict", b.ref(f"bench/store-dict-{prev}", "nydus"), "--chunk-dict-insecure") if prev else ()
                convert(b.ref(f"bench/{tag}", "oci"), b.ref(repo, "nydus"), b.work / "convwork", extra)
                m = registry_manifest(b.registry.host, repo, "nydus")
                for lay in m["layers"]:
                    seen[lay["digest"]] = lay["size"]
                per[tag] = _sum_layers(m)
                prev = tag
            out["nydus_chunk_dict"] = {**per, "stored_total": sum(seen.values())}
        except Exception as e:   # the feature is new; report, don't fail the scenario
            out["nydus_chunk_dict"] = f"error: {e}"[:300]
    seen = {}
    for tag in b.storage_images:
        r = _estargz(b, tag, f"bench/store-esgz-{tag}")
        if r is None:
            out["estargz"] = "n/a (ctr-remote missing)"
            break
        for dg, sz in zip(r["layers"], r["layer_sizes"]):
            seen[dg] = sz
        out["estargz"][tag] = r["bytes"]
    if isinstance(out["estargz"], dict):
        out["estargz"]["stored_total"] = sum(seen.values())
    # issue 11's realistic series (perf/series.py has every mode; these are the table's rows)
    from . import seriesrun
    out["series"] = seriesrun.run(SERIES_MODES, b.work / "series")
    return out


SERIES_MODES = ["gzip", "estargz", "plain", "prev", "cdc-plain", "cdc-prev"]
