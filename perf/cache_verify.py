"""Micro benchmark: what verifying cached chunks costs on the warm read path (ChunkCache.read).

    .venv/bin/python perf/cache_verify.py [--chunk-size 1M] [--total 256M] [--reps 3]

Rows (MB/s of chunk data served, page cache warm, one thread):
  first use     the first read of each chunk in a process: whole chunk read + xxh3 (default)
  verified      later reads: pread of what was asked only (default)
  sha256 once   what a sha256 first-use check would cost instead of xxh3 (read + sha256)
  digest_validate  validate=True: every read reads the whole chunk, xxh3 + sha256
Numbers are noisy on a shared machine: compare rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nydus_py.cache.chunk_cache import ChunkCache  # noqa: E402
from nydus_py.cache.gc import parse_size  # noqa: E402
from nydus_py.format.bootstrap import BlobInfo, Chunk  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunk-size", default="1M")
    ap.add_argument("--total", default="256M")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    cs, total = parse_size(args.chunk_size), parse_size(args.total)
    n = total // cs
    with tempfile.TemporaryDirectory(prefix="nydus-perf-cache-") as tmp:
        items = []
        for i in range(n):
            data = os.urandom(cs)
            items.append((Chunk(i, 0, i, i * cs, cs, i * cs, cs, False,
                                hashlib.sha256(data).digest()), data))
        info = BlobInfo("sha256:" + "ab" * 32, "none", n * cs, n * cs, 0, n)
        c = ChunkCache(tmp)
        c.store_many(c.open_blob(info), items)
        c.close()
        del items
        digests = []
        c = ChunkCache(tmp)
        h = c.open_blob(info)
        for i in range(n):     # collect digests (and warm the page cache) outside the timing
            digests.append(hashlib.sha256(os.pread(c._blobs[h].data_fd, cs, i * cs)).digest())
        c.close()
        rows: dict[str, list[float]] = {}

        def timed(name, fn):
            t0 = time.perf_counter()
            fn()
            rows.setdefault(name, []).append(n * cs / (time.perf_counter() - t0) / 1e6)

        for _ in range(args.reps):
            c = ChunkCache(tmp)
            h = c.open_blob(info)
            timed("first use (xxh3)", lambda c=c, h=h: [c.read(h, i, i * cs, cs) for i in range(n)])
            timed("verified (pread)", lambda c=c, h=h: [c.read(h, i, i * cs, cs) for i in range(n)])
            fd = c._blobs[h].data_fd
            timed("sha256 once (read+sha256)",
                  lambda fd=fd: [hashlib.sha256(os.pread(fd, cs, i * cs)).digest() for i in range(n)])
            c.close()
            c = ChunkCache(tmp, validate=True)
            h = c.open_blob(info)
            timed("digest_validate (every read)",
                  lambda c=c, h=h: [c.read(h, i, i * cs, cs, digest=digests[i]) for i in range(n)])
            c.close()
        print(f"chunk {cs} bytes, {n} chunks, {args.reps} reps: median MB/s")
        for name, v in rows.items():
            print(f"  {name:32s} {sorted(v)[len(v) // 2]:8.0f}")


if __name__ == "__main__":
    main()
