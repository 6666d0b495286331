"""Workloads run against a tree (a FUSE mount, a local dir, ratarmount): read every file,
random 4 KiB preads, find, ls -lR."""

from __future__ import annotations

import os
import random
import stat
import statistics
import subprocess
import time
from pathlib import Path

BUF = bytearray(1 << 20)


def list_files(root: Path) -> list[tuple[str, int]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for n in sorted(filenames):
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                out.append((os.path.relpath(p, root), st.st_size))
    return out


def read_all(root: Path, files: list[tuple[str, int]]) -> dict:
    """Open and read every regular file once, in walk order."""
    mv = memoryview(BUF)
    total = 0
    t0 = time.perf_counter()
    for rel, _ in files:
        fd = os.open(os.path.join(root, rel), os.O_RDONLY)
        try:
            while True:
                n = os.readv(fd, [mv])
                if not n:
                    break
                total += n
        finally:
            os.close(fd)
    s = time.perf_counter() - t0
    return {"seconds": s, "bytes": total, "files": len(files), "mb_s": total / s / 1e6 if s else None}


def random_samples(files: list[tuple[str, int]], n: int, seed: int = 5) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    big = [(f, s) for f, s in files if s >= 4096]
    weights = [s for _, s in big]
    picks = rng.choices(big, weights=weights, k=n)
    return [(f, rng.randrange(0, s - 4096 + 1) & ~4095) for f, s in picks]


def random_reads(root: Path, samples: list[tuple[str, int]]) -> dict:
    lat = []
    for rel, off in samples:
        fd = os.open(os.path.join(root, rel), os.O_RDONLY)
        try:
            t0 = time.perf_counter()
            os.pread(fd, 4096, off)
            lat.append(time.perf_counter() - t0)
        finally:
            os.close(fd)
    lat.sort()
    return {"p50_us": lat[len(lat) // 2] * 1e6, "p99_us": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e6,
            "n": len(lat), "seconds": sum(lat)}


def timed_cmd(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - t0


def concurrent_random_reads(root: Path, samples: list[tuple[str, int]], threads: int = 32) -> dict:
    """`threads` readers, each opening its share of `samples` and doing one 4 KiB pread per
    file, all started together. p50/p99 over every pread, and per reader: the slowest
    reader's p99 and total time against the fastest's (a starved reader shows there)."""
    import threading
    shares = [samples[i::threads] for i in range(threads)]
    lats: list[list[float]] = [[] for _ in range(threads)]
    spans = [0.0] * threads
    go = threading.Event()

    def reader(i: int) -> None:
        go.wait()
        t_start = time.perf_counter()
        for rel, off in shares[i]:
            fd = os.open(os.path.join(root, rel), os.O_RDONLY)
            try:
                t0 = time.perf_counter()
                os.pread(fd, 4096, off)
                lats[i].append(time.perf_counter() - t0)
            finally:
                os.close(fd)
        spans[i] = time.perf_counter() - t_start

    ts = [threading.Thread(target=reader, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    t0 = time.perf_counter()
    go.set()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    every = sorted(x for lat in lats for x in lat)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(len(xs) * q))] * 1e6

    per_p99 = [pct(sorted(lat), 0.99) for lat in lats if lat]
    return {"p50_us": pct(every, 0.5), "p99_us": pct(every, 0.99), "n": len(every), "threads": threads,
            "seconds": wall, "ops_s": len(every) / wall if wall else None,
            "worst_reader_p99_us": max(per_p99), "slowest_reader_s": max(spans), "fastest_reader_s": min(spans)}


LATER_STARTS = 9                # starts after the first, whose median chroot_start reports


def chroot_start(root: Path, argv: list[str], later: int = LATER_STARTS) -> list[float]:
    """Wall time of running `argv` chrooted into `root`: [the first start, the median of the
    `later` starts that follow]. The first pays for page-ins; the later ones show the per-exec
    cost of the filesystem, ~20 ms each, so one sample alone would be mostly noise."""
    import shutil
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    out = []
    for _ in range(1 + later):
        t0 = time.perf_counter()
        subprocess.run([chroot, str(root), *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       check=True, env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/"})
        out.append(time.perf_counter() - t0)
    return [out[0], statistics.median(out[1:])]
