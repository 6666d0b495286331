"""Small helpers: subprocess with logging, timers, cache dropping, cleanup, statistics."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import statistics
import subprocess
import time
from pathlib import Path

log = logging.getLogger("perf")

ROOT = Path(__file__).resolve().parents[2]          # the repo
PERF = ROOT / "perf"
CACHE = PERF / ".cache"
RESULTS = PERF / "results"
VENV_BIN = ROOT / ".venv" / "bin"


def run(cmd, *, check: bool = True, capture: bool = False, timeout: float | None = 3600,
        env: dict | None = None, cwd=None, quiet: bool = False) -> subprocess.CompletedProcess:
    cmd = [str(c) for c in cmd]
    if not quiet:
        log.debug("$ %s", shlex.join(cmd))
    p = subprocess.run(cmd, stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                       stderr=subprocess.PIPE, timeout=timeout, env=env, cwd=cwd)
    if check and p.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited {p.returncode}: "
                           f"{p.stderr.decode(errors='replace')[-2000:]}")
    return p


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


class Timer:
    def __enter__(self) -> "Timer":
        self.t0 = time.perf_counter()
        self.s = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.s = time.perf_counter() - self.t0


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def percentile(xs, p: float):
    xs = sorted(xs)
    if not xs:
        return None
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def mounts_under(prefix) -> list[str]:
    prefix = str(prefix).rstrip("/") + "/"
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split(" ")[4].replace("\\040", " ")
            if mp.startswith(prefix) or mp + "/" == prefix:
                out.append(mp)
    return out


def umount_all_under(prefix) -> None:
    for mp in sorted(mounts_under(prefix), key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], stderr=subprocess.DEVNULL)


def du_bytes(paths) -> int:
    return sum(os.path.getsize(p) for p in paths)


@contextlib.contextmanager
def proc_mounts(root: Path):
    """/proc and /dev bind mounts inside a chroot, always undone."""
    done = []
    try:
        for what, args in (("proc", ["-t", "proc", "proc"]), ("dev", ["--bind", "/dev"])):
            mp = root / what
            mp.mkdir(exist_ok=True)
            run(["mount", *args, mp])
            done.append(mp)
        yield
    finally:
        for mp in reversed(done):
            subprocess.run(["umount", "-l", str(mp)], stderr=subprocess.DEVNULL)


def ctr_env(snapshotter_args: tuple[str, ...] = ()):
    """A private containerd for the eStargz and ctr peers and our snapshotter
    (tests/fixtures/containerd.py), or None when its tools are missing."""
    from tests.fixtures.containerd import ContainerdEnv, tools_missing
    if tools_missing():
        return None
    return ContainerdEnv(snapshotter_args=snapshotter_args)
