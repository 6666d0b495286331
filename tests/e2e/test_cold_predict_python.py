"""Cold start of a CPython, real FUSE + real registry: the first read of the interpreter makes the
daemon fetch, besides the libraries, the standard-library files every start imports (io/pystart.py:
encodings, sitecustomize, the site directory's .pth files), at once and verified; nothing else.
The image is the interpreter running these tests, at its own paths, with a slice of its library."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.e2e.test_cold_predict import Mounted, _head, converted_behind_proxy
from tests.fixtures.daemon import wait_for
from tests.fixtures.imagegen import Content, Layer
from tests.fixtures.registry import Fault

pytestmark = pytest.mark.e2e
EXE = Path(os.path.realpath(sys._base_executable))       # type: ignore[attr-defined]
STDLIB = Path(sysconfig.get_paths(vars={"installed_base": sys.base_prefix,
                                         "base": sys.base_prefix})["stdlib"])
TAG = sys.implementation.cache_tag
START = ("encodings/__init__", "encodings/aliases", "encodings/utf_8")


def _libraries(exe: Path) -> list[str]:
    """The paths ldd resolves for `exe` (the loader included), as named and as the file is."""
    out = subprocess.run(["ldd", str(exe)], capture_output=True, text=True, check=True).stdout
    paths = []
    for line in out.splitlines():
        parts = line.split()
        p = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
        if p.startswith("/"):
            paths.append(p)
    return paths


def _start_files() -> dict[str, bytes]:
    """The start-up modules' sources and cached bytecode as this interpreter has them."""
    out = {}
    for mod in START:
        d, _, base = mod.rpartition("/")
        for p in (STDLIB / f"{mod}.py", STDLIB / d / "__pycache__" / f"{base}.{TAG}.pyc"):
            if p.exists():
                out[str(p)[1:]] = p.read_bytes()
    return out


class Tree:
    """A layer with every parent directory added once, symlinks kept as on the host."""

    def __init__(self):
        self.layer = Layer()
        self.dirs: set[str] = set()

    def parents(self, rel: str) -> None:
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.dirs:
                self.dirs.add(d)
                self.layer.dir(d)

    def host(self, path: str) -> None:
        """`path` from the host, following its symlinks into the tree as well."""
        p = Path(path)
        while True:
            rel = str(p)[1:]
            self.parents(rel)
            if p.is_symlink():
                target = os.readlink(p)
                self.layer.symlink(rel, target)
                p = p.parent / target if not target.startswith("/") else Path(target)
                p = Path(os.path.normpath(p))
                continue
            self.layer.file(rel, p.read_bytes(), mode=0o755)
            return

    def file(self, rel: str, data: bytes | Content) -> None:
        self.parents(rel)
        self.layer.file(rel, data)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    if not EXE.name.startswith("python3.") or not (STDLIB / "encodings/__init__.py").exists():
        pytest.skip("needs a CPython 3.x named python3.N with its library on disk")
    tmp = tmp_path_factory.mktemp("coldpy")
    t = Tree()
    for p in [str(EXE), *_libraries(EXE)]:
        t.host(p)
    start = _start_files()
    assert len(start) >= 3, start
    for rel, data in start.items():
        t.file(rel, data)
    site = STDLIB / "site-packages"
    extra = {f"{str(STDLIB)[1:]}/sitecustomize.py": b"import sys\nsys.customized = 1\n",
             f"{str(site)[1:]}/probe.pth": b"# a .pth file site.py reads\n",
             f"{str(STDLIB)[1:]}/os.py": (STDLIB / "os.py").read_bytes()}   # getpath's landmark
    for rel, data in extra.items():
        t.file(rel, data)
    t.parents(f"{str(STDLIB)[1:]}/lib-dynload/x")         # getpath's exec_prefix landmark
    # site.py reads .pth files in the locale's encoding: ASCII in this image without locales
    t.file(f"{str(STDLIB)[1:]}/encodings/ascii.py", (STDLIB / "encodings/ascii.py").read_bytes())
    # not read while python starts: never fetched by the prediction
    t.file(f"{str(site)[1:]}/module.py", b"x = 1\n")
    t.file(f"{str(STDLIB)[1:]}/encodings/latin_1.py", (STDLIB / "encodings/latin_1.py").read_bytes())
    t.file("usr/share/filler", Content.random(2 << 20, seed=4))
    with converted_behind_proxy(t.layer, tmp) as proxy:
        yield proxy, {**start, **extra}


def test_the_interpreters_start_up_files_are_fetched_with_it(image, tmp_path):
    proxy, wanted = image
    try:
        with Mounted(tmp_path, proxy.host) as m:
            _head(m.mnt / str(EXE)[1:])                   # what exec reads first
            wait_for(lambda: m.metrics().get("predict_triggers", 0) >= 1
                     and m.metrics().get("predict_active") == 0, "prediction done", log=m.log)
            got = m.metrics()
            assert got["predict_errors"] == 0, got
            misses = got["chunk_misses"]
            # with every data request failing, each start-up file still reads back exactly
            proxy.add(Fault.http(500), method="GET", path=r"/blobs/sha256:", times=None)
            for rel, data in wanted.items():
                if rel.endswith("/os.py"):
                    continue                              # a landmark: only stat()ed
                assert (m.mnt / rel).read_bytes() == data, rel
            assert m.metrics()["chunk_misses"] == misses
            for rel in ("usr/share/filler", f"{str(STDLIB)[1:]}/site-packages/module.py",
                        f"{str(STDLIB)[1:]}/encodings/latin_1.py"):
                with pytest.raises(OSError):
                    (m.mnt / rel).read_bytes()
    finally:
        proxy.clear()


def test_the_interpreter_starts_in_the_image(image, tmp_path):
    proxy, _ = image
    with Mounted(tmp_path, proxy.host) as m:
        r = subprocess.run(["chroot", str(m.mnt), str(EXE), "-X", "utf8", "-c",
                            "import sys; print(sys.customized, sys.getfilesystemencoding())"],
                           capture_output=True, text=True, timeout=60,
                           env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["1", "utf-8"]
        got = m.metrics()
        assert got["predict_errors"] == 0, got
