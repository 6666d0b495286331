"""The realistic dedup series (issue 11): the same app rebuilt over time, where layer digests
change but most content does not. Built offline from the machine's apt mirror, cached in
perf/.cache/ like the other images (rootfs `s-*`, layers `s-*.tar.gz`, OCI tags `series-*`).

    series-1  the `python` image (base + python3 perl gcc libc6-dev), as the other scenarios
    series-2  the same app rebuilt: a second debootstrap run, packages installed in reverse
              order, mtimes not clamped (so every layer digest differs; content mostly not)
    series-3  series-2's app rebuilt with one package added (curl): a new app layer
    series-4  a different python app on series-2's base (python3 python3-yaml python3-requests)

A registry dedups only identical layer blobs, so it stores all four app layers and two bases.
"""

from __future__ import annotations

import contextlib
import shutil

from . import images
from .images import PYTHON_PKGS, SUITE, _apt_clean, apt_mirror, derive, gzip_layer, rootfs
from .util import log, run

TAGS = ["series-1", "series-2", "series-3", "series-4"]
REBUILD_EPOCH = 1 << 40        # "no clamp": the rebuild keeps its real install-time mtimes
APP_B = ["python3", "python3-yaml", "python3-requests"]


@contextlib.contextmanager
def _epoch(value: int):
    old, images.EPOCH = images.EPOCH, value
    try:
        yield
    finally:
        images.EPOCH = old


def _debootstrap(name: str) -> None:
    dst = rootfs(name)
    if dst.exists():
        return
    tmp = rootfs(name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    log.info("debootstrap --variant=minbase %s (series rebuild)", SUITE)
    run(["debootstrap", "--variant=minbase", SUITE, tmp, apt_mirror()], timeout=3600)
    _apt_clean(tmp)
    tmp.rename(dst)


def build_series() -> dict[str, list[dict]]:
    """Tags series-1..4 in the perf OCI layout; returns layer metadata per tag."""
    debian = images.build_debian_images()
    _debootstrap("s-base")
    derive("s-base", "s-python", list(reversed(PYTHON_PKGS)), slim=True, one_at_a_time=True)
    derive("s-base", "s-python-curl", list(reversed(PYTHON_PKGS)) + ["curl"], slim=True, one_at_a_time=True)
    derive("s-base", "s-app", APP_B, slim=True, one_at_a_time=True)
    with _epoch(REBUILD_EPOCH):
        lb = gzip_layer("s-base", rootfs("s-base"), None)
        lp = gzip_layer("s-python", rootfs("s-python"), rootfs("s-base"))
        lc = gzip_layer("s-python-curl", rootfs("s-python-curl"), rootfs("s-base"))
        la = gzip_layer("s-app", rootfs("s-app"), rootfs("s-base"))
    out = {"series-1": debian["python"], "series-2": [lb, lp], "series-3": [lb, lc], "series-4": [lb, la]}
    stamp = images.OCI / ".perf-series"
    if not stamp.exists():
        for tag, lays in out.items():
            images._write_image(tag, lays, ["/bin/bash"])
        stamp.write_text("ok\n")
    return out
