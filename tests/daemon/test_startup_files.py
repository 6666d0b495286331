"""The daemon's read-ahead of its own start-up files: the list it records, the checks on reading
it back (it runs as root), and what it asks the kernel for."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import types
from importlib.machinery import ModuleSpec

import pytest

from nydus_py.daemon import startup_files as sf
from tests.fixtures.daemon import Daemon, nydusd_cmd, read_all, src_args


def _module(name: str, origin: str, cached: str | None = None) -> types.ModuleType:
    m = types.ModuleType(name)
    spec = ModuleSpec(name, None, origin=origin)
    spec.has_location = True
    spec.cached = cached
    m.__spec__ = spec
    return m


@pytest.fixture
def tree(tmp_path):
    """A root with two .pyc files, an extension module and a file outside any root."""
    root = tmp_path / "root"
    (root / "pkg" / "__pycache__").mkdir(parents=True)
    a = root / "pkg" / "__pycache__" / "a.cpython-311.pyc"
    b = root / "pkg" / "__pycache__" / "b.cpython-311.pyc"
    a.write_bytes(b"a" * 100)
    b.write_bytes(b"b" * 100)
    ext = root / "pkg" / "ext.cpython-311-x86_64-linux-gnu.so"
    ext.write_bytes(open(_a_real_extension(), "rb").read())
    outside = tmp_path / "elsewhere.cpython-311.pyc"
    outside.write_bytes(b"x")
    lst = tmp_path / "cache" / "startup-files.txt"
    lst.parent.mkdir()
    return types.SimpleNamespace(root=str(root), where=(str(root),), a=str(a), b=str(b), ext=str(ext),
                                 outside=str(outside), lst=str(lst))


def _a_real_extension() -> str:
    import _ssl
    return _ssl.__file__


def _modules(t) -> dict:
    return {"pkg.a": _module("pkg.a", t.a[:-4] + ".py", t.a),
            "pkg.ext": _module("pkg.ext", t.ext),
            "pkg.b": _module("pkg.b", t.b[:-4] + ".py", t.b),
            "far": _module("far", t.outside[:-4] + ".py", t.outside),
            "builtin": types.ModuleType("builtin")}


def test_record_lists_the_loaded_files_under_the_roots_in_import_order(tree):
    assert sf.record(tree.lst, _modules(tree), tree.where)
    assert open(tree.lst).read().split() == [tree.a, tree.ext, tree.b]
    assert sf.load(tree.lst, tree.where) == [tree.a, tree.ext, tree.b]


def test_record_rewrites_only_when_something_new_was_loaded_and_keeps_the_rest(tree):
    mods = _modules(tree)
    assert sf.record(tree.lst, {"pkg.b": mods["pkg.b"]}, tree.where)
    before = os.stat(tree.lst).st_mtime_ns
    assert not sf.record(tree.lst, {"pkg.b": mods["pkg.b"]}, tree.where)     # nothing new
    assert os.stat(tree.lst).st_mtime_ns == before
    assert sf.record(tree.lst, {"pkg.a": mods["pkg.a"]}, tree.where)
    assert sf.load(tree.lst, tree.where) == [tree.a, tree.b]                 # this start first
    os.unlink(tree.b)                                                        # gone (an upgrade)
    assert sf.record(tree.lst, {"pkg.ext": mods["pkg.ext"]}, tree.where)
    assert sf.load(tree.lst, tree.where) == [tree.ext, tree.a]


def test_a_module_without_bytecode_is_listed_by_its_source(tree):
    src = os.path.join(tree.root, "pkg", "c.py")
    with open(src, "w") as f:
        f.write("x = 1\n")
    mods = {"pkg.c": _module("pkg.c", src, os.path.join(tree.root, "pkg", "__pycache__", "c.cpython-311.pyc"))}
    assert sf.record(tree.lst, mods, tree.where)
    assert sf.load(tree.lst, tree.where) == [src]


def test_two_writers_at_once_leave_a_whole_list(tree):
    import threading
    mods = _modules(tree)
    barrier = threading.Barrier(2)
    results = []

    def write(names):
        barrier.wait()
        results.append(sf.record(tree.lst, {n: mods[n] for n in names}, tree.where))
    ts = [threading.Thread(target=write, args=(names,)) for names in (["pkg.a"], ["pkg.a", "pkg.b"])]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert any(results)
    assert set(sf.load(tree.lst, tree.where)) in ({tree.a}, {tree.a, tree.b})
    assert sorted(os.listdir(os.path.dirname(tree.lst))) == ["startup-files.txt"]    # no temp left


def test_record_later_records_after_the_delay(tree, monkeypatch):
    calls = []
    monkeypatch.setattr(sf, "record", lambda path=None: calls.append(path))
    t = sf.record_later(0.01, tree.lst)
    assert t.daemon
    t.join(5)
    assert calls == [tree.lst]


def test_record_never_raises(tree):
    class Odd(types.ModuleType):
        @property
        def __spec__(self):
            raise RuntimeError("odd module")
    assert sf.record(tree.lst, {"odd": Odd("odd")}, tree.where) is False


def test_record_is_bounded(tree, monkeypatch):
    monkeypatch.setattr(sf, "MAX_FILES", 2)
    assert sf.record(tree.lst, _modules(tree), tree.where)
    assert sf.load(tree.lst, tree.where) == [tree.a, tree.ext]


def test_paths_outside_the_roots_relative_unnormalised_or_of_other_kinds_are_dropped(tree):
    lines = [tree.a, "pkg/__pycache__/a.cpython-311.pyc", tree.root + "/pkg/../pkg/__pycache__/a.cpython-311.pyc",
             tree.root + "//pkg/__pycache__/a.cpython-311.pyc", tree.outside, tree.root + "/pkg/conf.txt",
             tree.root + "/pkg/tool.sh", tree.root + "x/evil.pyc", "", tree.b]
    with open(tree.lst, "w") as f:
        f.write("\n".join(lines) + "\n")
    assert sf.load(tree.lst, tree.where) == [tree.a, tree.b]


@pytest.mark.parametrize("how", ["group-writable", "other-writable-dir", "foreign-owner", "symlink",
                                 "too-big", "not-utf8", "missing", "directory"])
def test_a_list_that_cannot_be_trusted_is_not_used(tree, how):
    with open(tree.lst, "w") as f:
        f.write(tree.a + "\n")
    if how == "group-writable":
        os.chmod(tree.lst, 0o664)
    elif how == "other-writable-dir":
        os.chmod(os.path.dirname(tree.lst), 0o777)
    elif how == "foreign-owner":
        os.chown(tree.lst, 65534, 65534)
    elif how == "symlink":
        real = tree.lst + ".real"
        os.rename(tree.lst, real)
        os.symlink(real, tree.lst)
    elif how == "too-big":
        with open(tree.lst, "a") as f:
            f.write("#" * sf.MAX_LIST_BYTES)
    elif how == "not-utf8":
        with open(tree.lst, "ab") as f:
            f.write(b"\xff\xfe\n")
    elif how == "missing":
        os.unlink(tree.lst)
    elif how == "directory":
        os.unlink(tree.lst)
        os.mkdir(tree.lst)
    assert sf.load(tree.lst, tree.where) is None
    assert sf.start(tree.lst, tree.where) == 0


def test_start_asks_for_regular_files_only_and_for_the_loaded_segments_of_an_elf(tree, monkeypatch):
    fifo = os.path.join(tree.root, "pkg", "__pycache__", "fifo.cpython-311.pyc")
    os.mkfifo(fifo)                                     # would block a plain open for reading
    link = os.path.join(tree.root, "pkg", "__pycache__", "link.cpython-311.pyc")
    os.symlink("/etc/shadow", link)
    os.mkdir(os.path.join(tree.root, "pkg", "__pycache__", "dir.cpython-311.pyc"))
    with open(tree.lst, "w") as f:
        f.write("\n".join([fifo, link, tree.root + "/pkg/__pycache__/dir.cpython-311.pyc",
                           tree.root + "/pkg/__pycache__/none.cpython-311.pyc", tree.a, tree.ext]) + "\n")
    asked: list[tuple[int, int, int]] = []
    real = os.posix_fadvise

    def spy(fd, off, length, advice):
        st = os.fstat(fd)
        asked.append((st.st_ino, off, length))
        return real(fd, off, length, advice)
    monkeypatch.setattr(os, "posix_fadvise", spy)
    t0 = time.monotonic()
    assert sf.start(tree.lst, tree.where) == 6
    sf.finish()
    assert time.monotonic() - t0 < 5
    inodes = {st.st_ino for st in map(os.stat, (tree.a, tree.ext))}
    assert {a[0] for a in asked} == inodes
    assert (os.stat(tree.a).st_ino, 0, 0) in asked      # a .pyc: all of it
    size = os.path.getsize(tree.ext)
    ranges = [(off, n) for ino, off, n in asked if ino == os.stat(tree.ext).st_ino]
    with open(tree.ext, "rb") as f:
        assert ranges == sf.elf_load_ranges(f.read(sf.ELF_HEAD), size)
    assert ranges and ranges[0][0] == 0 and all(off + n <= size for off, n in ranges)


def test_elf_load_ranges_refuses_what_is_not_a_little_endian_elf64_with_headers_in_reach():
    with open(_a_real_extension(), "rb") as f:
        head = f.read(sf.ELF_HEAD)
    size = os.path.getsize(_a_real_extension())
    assert sf.elf_load_ranges(head, size)
    assert sf.elf_load_ranges(b"#!/bin/sh\n" + head[10:], size) is None
    assert sf.elf_load_ranges(head[:40], size) is None
    big_phnum = head[:56] + (sf.MAX_PHNUM + 1).to_bytes(2, "little") + head[58:]
    assert sf.elf_load_ranges(big_phnum, size) is None
    far_phoff = head[:32] + (1 << 40).to_bytes(8, "little") + head[40:]
    assert sf.elf_load_ranges(far_phoff, size) is None
    # segments past the end of a (truncated) file are clipped or dropped
    assert all(off + n <= 100 for off, n in sf.elf_load_ranges(head, 100))


def test_importing_the_cli_starts_nothing_and_the_console_script_reads_ahead():
    code = ("import threading\nimport nydus_py.daemon.cli\n"
            "print(threading.active_count())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
    code = ("import sys, threading\nfrom nydus_py.daemon import startup_files as sf\n"
            "n = sf.start()\nprint(n, len(sf._threads))\nsf.finish()\nprint(len(sf._threads))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    first, second = out.stdout.split("\n")[:2]
    n, threads = map(int, first.split())
    assert (threads > 0) == (n > 0) and second == "0"


def test_a_mount_records_what_it_loaded_for_the_next_start(tmp_path, image):
    if os.path.basename(nydusd_cmd()[0]) != "nydusd":
        pytest.skip("needs the installed nydusd console script")
    path = sf.list_path()
    saved = open(path, "rb").read() if os.path.exists(path) else None
    try:
        if saved is not None:
            os.unlink(path)
        with Daemon(tmp_path, *src_args(image), "--cache-dir", str(tmp_path / "cache")) as d:
            read_all(d.mnt, image[1])
        listed = sf.load()
        assert listed, "no list written"
        names = {os.path.basename(p).split(".")[0] for p in listed}
        assert {"_run", "reader", "ops", "mount"} <= names     # trio, our read path, the adapter
        assert any(p.endswith(".so") and "pyfuse3" in p for p in listed)
        # and the next start, reading it ahead, still works
        out = subprocess.run([*nydusd_cmd(), "--version"], capture_output=True, text=True, check=True)
        assert out.stdout.strip()
    finally:
        if saved is not None:
            with open(path + ".restore", "wb") as f:
                f.write(saved)
            os.replace(path + ".restore", path)
