#!/usr/bin/env python3
"""Bytes fetched from the blob backend for one cold `python3 -c 'print("hello")'` in a converted
image in a local OCI layout (no network shaping: bytes and requests only, not time; a fresh
chunk cache and a fresh mount, so the page cache plays no part).

    sudo .venv/bin/python perf/coldbytes.py oci:DIR:TAG [oci:DIR2:TAG2 ...]

Used to check that batch chunks (a batch is fetched whole) do not make cold start fetch more.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib.nydus import Mount          # noqa: E402



def api(sock: Path, path: str) -> dict:
    out = subprocess.run(["curl", "-s", "--unix-socket", str(sock), f"http://localhost{path}"],
                         capture_output=True, check=True).stdout
    return json.loads(out)


def measure(image: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="coldbytes-", dir=Path(__file__).parent / ".cache") as t:
        tmp = Path(t)
        sock = tmp / "api.sock"

        with Mount(tmp / "mnt", tmp / "work", image=image, cache_dir=tmp / "cache",
                   extra=("--apisock", sock)) as m:
            subprocess.run(["chroot", str(m.mp), "python3", "-c", 'print("hello")'], check=True,
                           capture_output=True)
            b = api(sock, "/api/v1/metrics/backend")
    return {"image": image, "backend": b}


if __name__ == "__main__":
    for img in sys.argv[1:]:
        print(json.dumps(measure(img)))
