"""The kernel keeps symlink targets (pyfuse3 patched to ask for FUSE_CAP_CACHE_SYMLINKS in INIT):
a path walk through an image's symlink costs one READLINK per link per mount, not one per walk.
Without the patch every `/bin/sh` exec through `bin -> usr/bin` asked the daemon again."""

from __future__ import annotations

import os

from tests.fixtures.cli import nydusify
from tests.fixtures.daemon import Daemon
from tests.fixtures.imagegen import Image, Layer


def test_symlink_targets_are_read_once_per_mount(tmp_path):
    layer = Layer()
    for d in ("usr", "usr/bin", "usr/lib"):
        layer.dir(d)
    layer.file("usr/bin/tool", b"#!/bin/true\n", mode=0o755)
    layer.file("usr/lib/data", b"payload\n")
    layer.symlink("bin", "usr/bin")
    layer.symlink("lib", "usr/lib")
    layer.symlink("usr/bin/alias", "tool")
    Image([layer]).write_oci(tmp_path / "src", "v1")
    nydusify("convert", "--source", f"oci:{tmp_path / 'src'}:v1", "--target", f"oci:{tmp_path / 'out'}:v1")
    with Daemon(tmp_path, "--image", f"oci:{tmp_path / 'out'}:v1", "--cache-dir",
                str(tmp_path / "cache")) as d:
        for _ in range(5):
            assert os.readlink(d.mnt / "bin") == "usr/bin"
            assert (d.mnt / "bin/alias").read_bytes() == b"#!/bin/true\n"   # two links walked
            assert (d.mnt / "lib/data").read_bytes() == b"payload\n"
            assert os.readlink(d.mnt / "usr/bin/alias") == "tool"
        # bin, lib and alias: each target asked for once, then served from the kernel's cache
        assert d.api("/api/v1/metrics")["readlinks"] == 3
