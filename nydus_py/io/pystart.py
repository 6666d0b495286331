"""The files CPython reads while it starts, found in the image from the interpreter's path.

Every `python3 ...` reads the same few standard-library files before it runs a line of the
program: the `encodings` package with the alias table and the UTF-8 codec (the filesystem and
stdio encodings), `sitecustomize` when the distribution ships one (Debian does), the `.pth`
files of the site directories, and on Python < 3.11 (no frozen start-up modules) `site`, `os`,
`codecs`, `io` and their helpers. Each is one FUSE miss, and each is only read after the
previous import ran, so on a cold mount they are round trips one after another that nothing
read before them names. Knowing the interpreter's version (from its file name) and prefix
(its directory's parent) names them all; io/predict.py fetches them at once.

Only paths that exist in the image as regular files of at most MAX_FILE bytes are returned,
at most MAX_PTH `.pth` files per site directory: a wrong guess costs a few KB, never more.
"""

from __future__ import annotations

import posixpath
import re
import stat

from nydus_py.errors import NydusError
from nydus_py.format.bootstrap import Bootstrap
from nydus_py.io.elfdeps import add_small_file, lookup_path

MAX_FILE = 1 << 20
MAX_PTH = 16                    # .pth files taken per site directory
MAX_SCAN = 4096                 # directory entries looked at per listing

_VERSIONED = re.compile(rb"python(\d)\.(\d{1,2})")    # the executable and its library dir
_UNVERSIONED = (b"python", b"python3")

# read on every start: the codec search (encodings) for the UTF-8 filesystem/stdio encoding
ALWAYS = (b"encodings/__init__", b"encodings/aliases", b"encodings/utf_8")
# frozen into the interpreter from 3.11 on (Python/frozen.c), read from the library before
FROZEN_SINCE_311 = (b"abc", b"codecs", b"io", b"_collections_abc", b"_sitebuiltins", b"genericpath",
                    b"os", b"posixpath", b"site", b"stat")
CUSTOMIZE = (b"sitecustomize",)


def version_of(exe_path: bytes, bs: Bootstrap) -> tuple[int, int, bytes] | None:
    """(major, minor, library dir) of a CPython executable at `exe_path`, or None when the
    file is not named like one or its library is not in the image."""
    name = posixpath.basename(exe_path)
    prefix = posixpath.dirname(posixpath.dirname(exe_path))
    libdirs = [prefix + b"/lib", prefix + b"/lib64"] if prefix != b"/" else [b"/lib", b"/lib64"]
    m = _VERSIONED.fullmatch(name)
    if m:
        major, minor = int(m[1]), int(m[2])
        for d in libdirs:
            lib = d + b"/python%d.%d" % (major, minor)
            if _is_dir(bs, lib + b"/encodings"):
                return major, minor, lib
        return None
    if name not in _UNVERSIONED:
        return None
    found = []
    for d in libdirs:       # `python3` as the real file: the one versioned library beside it
        ino = lookup_path(bs, d)
        if ino is None:
            continue
        for i, entry, _ in bs.readdir(ino):
            if i >= MAX_SCAN:
                break
            m = _VERSIONED.fullmatch(entry)
            if m and _is_dir(bs, d + b"/" + entry + b"/encodings"):
                found.append((int(m[1]), int(m[2]), d + b"/" + entry))
    return found[0] if len(found) == 1 else None


def startup_files(bs: Bootstrap, exe_path: bytes) -> list[int]:
    """Inodes of the files a CPython at `exe_path` reads while it starts (module docstring);
    [] when it is not one, or when a record on the way is bad (no prediction, never an error)."""
    try:
        return _startup_files(bs, exe_path)
    except (KeyError, ValueError, NydusError):
        return []


def _startup_files(bs: Bootstrap, exe_path: bytes) -> list[int]:
    v = version_of(exe_path, bs)
    if v is None:
        return []
    major, minor, lib = v
    tag = b"cpython-%d%d" % (major, minor)
    modules = [*ALWAYS, *CUSTOMIZE]
    if (major, minor) < (3, 11):
        modules += FROZEN_SINCE_311
    paths = []
    for mod in modules:
        d, _, base = (lib + b"/" + mod).rpartition(b"/")
        # the cached bytecode, and the source: its mtime (or with hash-based .pyc files, its
        # bytes) is checked against the cache before the cache is used
        paths += [b"%s/__pycache__/%s.%s.pyc" % (d, base, tag), b"%s/%s.py" % (d, base)]
    found: list[int] = []
    for p in paths:
        add_small_file(bs, lookup_path(bs, p), found, MAX_FILE)
    for site in _site_dirs(lib, major, minor):
        ino = lookup_path(bs, site)
        if ino is None:
            continue
        taken = 0
        for i, entry, child in bs.readdir(ino):
            if i >= MAX_SCAN or taken >= MAX_PTH:
                break
            if entry.endswith(b".pth") and add_small_file(bs, child, found, MAX_FILE):
                taken += 1
    return found


def _site_dirs(lib: bytes, major: int, minor: int) -> list[bytes]:
    """site.getsitepackages() for this library, with Debian's dist-packages directories."""
    prefix = posixpath.dirname(posixpath.dirname(lib))
    ver = b"%d.%d" % (major, minor)
    dirs = [lib + b"/site-packages", lib + b"/dist-packages",
            prefix + b"/lib/python%d/dist-packages" % major]
    if prefix == b"/usr":
        dirs.append(b"/usr/local/lib/python" + ver + b"/dist-packages")
    return dirs


def _is_dir(bs: Bootstrap, path: bytes) -> bool:
    ino = lookup_path(bs, path)
    try:
        return ino is not None and stat.S_ISDIR(bs.attr(ino).mode)
    except KeyError:
        return False

