"""Workloads run against a tree (a FUSE mount, a local dir, ratarmount): read every file,
random 4 KiB preads, find, ls -lR."""

from __future__ import annotations

import os
import random
import stat
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
