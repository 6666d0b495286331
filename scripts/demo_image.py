"""Builds the demo image: Debian's busybox-static plus ~40 MB of real files from this host."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fixtures.imagegen import busybox_image  # noqa: E402

if __name__ == "__main__":
    dest = sys.argv[1]
    budget = int(sys.argv[2]) if len(sys.argv) > 2 else 40 << 20
    busybox_image("gzip", extra_budget=budget).write_oci(dest, "latest")
