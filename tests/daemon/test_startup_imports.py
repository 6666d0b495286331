"""What `nydusd mount` imports before it is ready (an OCI-layout image): nothing only an error
line or a rarer codec needs. importlib.metadata (via an unpatched pyfuse3's version lookup),
lz4 and difflib cost start-up time and files read from disk on every mount (docs/architecture.md,
"pyfuse3 patch, third part")."""

from __future__ import annotations

import subprocess
import sys

MOUNT_PATH = ("nydus_py.daemon.cli", "nydus_py.daemon.mount", "pyfuse3", "trio", "nydus_py.image_source",
              "nydus_py.io.reader", "nydus_py.fs.ops", "nydus_py.cache.chunk_cache")
NOT_AT_START = ("importlib.metadata", "lz4", "difflib")


def test_mount_path_imports_nothing_it_does_not_need():
    code = (f"import sys\nfor m in {MOUNT_PATH!r}: __import__(m)\n"
            f"print(' '.join(m for m in {NOT_AT_START!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == []


def test_pyfuse3_version_is_still_there_when_asked():
    import pyfuse3
    assert pyfuse3.__version__.split("+")[0].count(".") == 2
    assert getattr(pyfuse3, "NYDUS_PATCH", 0) >= 3
