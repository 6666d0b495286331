#!/usr/bin/env python3
"""Profile nydusd (py-spy) under one benchmark workload, to find what dominates a miss.

    .venv/bin/python perf/profile.py warm      # read every file, chunk cache warm, page cache dropped
    .venv/bin/python perf/profile.py hot       # read every file again (page cache)
    .venv/bin/python perf/profile.py ls        # ls -lR twice
    .venv/bin/python perf/profile.py cold      # cold start of python3 -c print over a 20 ms RTT proxy
    options: --image python|files100k  --rtt 20  --patch flush,xattr (try ops changes, see below)

Prints py-spy's top functions (own time and total) and the workload's time; writes a flame
graph to perf/results/profile-<workload>.svg. Needs the images from a previous perf/run.

--patch runs nydusd through a launcher that monkeypatches the FUSE adapter before starting, to
measure a proposed change without editing nydus_py/: `flush` answers ENOSYS (the kernel then
stops sending FLUSH on every close), `xattr` answers ENOSYS to getxattr/listxattr when the
image has no xattrs (the kernel then stops asking, e.g. for ls -l's ACL probe).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import images, readers                                    # noqa: E402
from benchlib.net import DelayProxy, Registry                          # noqa: E402
from benchlib import nydus as nyd                                       # noqa: E402
from benchlib.util import CACHE, RESULTS, VENV_BIN, drop_caches, run, umount_all_under   # noqa: E402

LAUNCHER = r'''
import errno, sys, pyfuse3
from nydus_py.fs import ops
patch = set(sys.argv.pop(1).split(","))
if "flush" in patch:
    async def flush(self, fh):
        raise pyfuse3.FUSEError(errno.ENOSYS)
    ops.NydusOperations.flush = flush
if "xattr" in patch:
    orig_get, orig_list = ops.NydusOperations.getxattr, ops.NydusOperations.listxattr
    async def getxattr(self, inode, name, ctx=None):
        if not getattr(self.vfs, "_perf_has_xattrs", True):
            raise pyfuse3.FUSEError(errno.ENOSYS)
        return await orig_get(self, inode, name, ctx)
    async def listxattr(self, inode, ctx=None):
        if not getattr(self.vfs, "_perf_has_xattrs", True):
            raise pyfuse3.FUSEError(errno.ENOSYS)
        return await orig_list(self, inode, ctx)
    ops.NydusOperations.getxattr, ops.NydusOperations.listxattr = getxattr, listxattr
    orig_init = ops.NydusOperations.__init__
    def __init__(self, vfs):
        orig_init(self, vfs)
        vfs._perf_has_xattrs = False   # the benchmark layers carry no xattrs (tarfile writes none)
    ops.NydusOperations.__init__ = __init__
from nydus_py.daemon.cli import main
sys.exit(main())
'''


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("workload", choices=["warm", "hot", "ls", "cold"])
    ap.add_argument("--image", default="python")
    ap.add_argument("--rtt", type=float, default=20.0)
    ap.add_argument("--patch", default="")
    ap.add_argument("--no-profile", action="store_true")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nydprof-", dir="/var/tmp"))
    layout = CACHE / "nydus-oci"          # converted images for profiling (cached)
    try:
        if not (layout / f".{a.image}").exists():
            nyd.convert(f"oci:{images.OCI}:{a.image}", f"oci:{layout}:{a.image}", work / "conv")
            (layout / f".{a.image}").write_text("")
        if a.patch:
            launcher = work / "nydusd_patched.py"
            launcher.write_text(LAUNCHER)
            wrapper = work / "nydusd"
            wrapper.write_text(f"#!/bin/sh\nexec {VENV_BIN}/python {launcher} {a.patch} \"$@\"\n")
            wrapper.chmod(0o755)
            nyd.NYDUSD = wrapper
        mp, cache = work / "mnt", work / "cache"
        if a.workload == "cold":
            return _cold(a, work, layout)
        files = readers.list_files(images.rootfs(a.image)) if a.image != "files100k" else None
        if a.workload in ("warm", "hot"):
            with nyd.Mount(mp, work / "w0", image=f"oci:{layout}:{a.image}", cache_dir=cache) as m:
                readers.read_all(m.mp, files)              # fill the chunk cache
        drop_caches()
        with nyd.Mount(mp, work / "w1", image=f"oci:{layout}:{a.image}", cache_dir=cache) as m:
            if a.workload == "hot":
                readers.read_all(m.mp, files)
            spy = _spy(m.pid, a.workload, work) if not a.no_profile else None
            t0 = time.perf_counter()
            if a.workload == "ls":
                t1 = readers.timed_cmd(["ls", "-lR", str(m.mp)])
                t2 = readers.timed_cmd(["ls", "-lR", str(m.mp)])
                print(f"ls -lR: {t1:.2f}s then {t2:.2f}s")
            else:
                r = readers.read_all(m.mp, files)
                print(f"read_all {a.workload}: {r['seconds']:.2f}s {r['mb_s']:.1f} MB/s")
            _stop_spy(spy, time.perf_counter() - t0)
    finally:
        umount_all_under(work)
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _cold(a, work: Path, layout: Path) -> int:
    reg_root = work / "registry"
    with Registry(reg_root) as reg:
        run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:{a.image}",
             f"docker://{reg.host}/prof/{a.image}:nydus"])
        with DelayProxy(reg.host, a.rtt) as proxy:
            drop_caches()
            t0 = time.perf_counter()
            with nyd.Mount(work / "mnt", work / "w", registry=(proxy.host, f"prof/{a.image}", "nydus"),
                           cache_dir=work / "cache") as m:
                t1 = time.perf_counter()
                spy = _spy(m.pid, "cold", work) if not a.no_profile else None
                t2 = time.perf_counter()
                run(["chroot", m.mp, "python3", "-c", 'print("hello")'])
                t3 = time.perf_counter()
                _stop_spy(spy, t3 - t2)
            print(f"cold start: mount-ready {t1 - t0:.2f}s, python3 hello {t3 - t2:.2f}s, "
                  f"{proxy.bytes_down / 1e6:.1f} MB fetched, {proxy.connections} connections")
    return 0


def _spy(pid: int, name: str, work: Path):
    if not pid:
        return None
    RESULTS.mkdir(parents=True, exist_ok=True)
    raw = work / f"{name}.txt"
    p = subprocess.Popen([str(VENV_BIN / "py-spy"), "record", "--pid", str(pid), "--rate", "200", "--threads",
                          "--format", "raw", "-o", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    return p, raw, name


def _stop_spy(spy, seconds: float) -> None:
    if spy is None:
        return
    p, raw, name = spy
    p.send_signal(2)
    p.wait(60)
    if not raw.exists():
        print("py-spy produced nothing")
        return
    own, total, n = {}, {}, 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        c = int(count)
        frames = stack.split(";")
        n += c
        leaf = frames[-1]
        own[leaf] = own.get(leaf, 0) + c
        for f in set(frames):
            total[f] = total.get(f, 0) + c
    print(f"py-spy: {n} samples over {seconds:.1f}s (all threads, idle included)")
    print("top own time:")
    for f, c in sorted(own.items(), key=lambda x: -x[1])[:15]:
        print(f"  {100 * c / n:5.1f}%  {f}")
    print("top total time:")
    for f, c in sorted(total.items(), key=lambda x: -x[1])[:25]:
        print(f"  {100 * c / n:5.1f}%  {f}")
    shutil.copy(raw, RESULTS / f"profile-{name}.txt")


if __name__ == "__main__":
    sys.exit(main())
