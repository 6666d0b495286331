"""Read ahead the daemon's own start-up files, in parallel, before the imports need them.

On a host whose page cache does not hold nydusd's Python files (the first container after a
boot, or after memory pressure), `nydusd mount` spends ~0.15 s of its mount-ready time in
serial disk reads: the import system opens and reads ~270 .pyc and .so files one after the
other. Their names are known from the previous start, so this module asks the kernel for all of
them at once (open + POSIX_FADV_WILLNEED from a few threads: many reads in flight instead of
one) while the interpreter goes on importing.

The list is written by the daemon itself (`record`, a few seconds after mount-ready and at
exit) next to its bytecode, in `nydus_py/daemon/__pycache__/`, as one absolute path per line:
derived data of this installation, like a .pyc. Only the files of loaded modules that live under this interpreter's
prefixes or this package's directory are listed. Reading it is defensive, because the daemon
runs as root: the list must be a regular file owned by us in a directory owned by us, neither
writable by anyone else, and of bounded size; each path must be absolute, normalised, under one
of the same roots and end in .pyc, .py or .so; each file is opened without following a final
symlink, without blocking (a FIFO cannot stall us) and only read ahead if it is a regular file,
and of a shared object only the segments the loader maps. Nothing read ahead is executed or even
looked at: a wrong list costs disk reads, never behaviour.

Only modules the interpreter has loaded before any of ours are imported here, and threading.
"""

from __future__ import annotations

import os
import stat
import sys
import threading
import time

MAX_FILES = 1500            # the daemon loads ~400 modules; room for every code path
MAX_LIST_BYTES = 256 * 1024
THREADS = 4                 # reads in flight at once; the disk, not the CPU, is the limit
# After mount-ready, the list is recorded this much later: the ~6 ms it takes (450 modules)
# stay off the container's first requests, and the modules its first run imports are in it.
RECORD_DELAY = 5.0
SUFFIXES = (".pyc", ".py", ".so")
ELF_HEAD = 4096             # an ELF file's header and program headers: where the loader looks
MAX_PHNUM = 64
PT_LOAD = 1

_threads: list[threading.Thread] = []


def list_path() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__",
                        f"startup-files.{sys.implementation.cache_tag}.txt")


def roots() -> tuple[str, ...]:
    """Where listed files may live: this interpreter's prefixes and this package's parent."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = []
    for r in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, here):
        r = os.path.normpath(os.path.abspath(r))
        if r not in out and r != "/":
            out.append(r)
    return tuple(out)


def acceptable(path: str, where: tuple[str, ...]) -> bool:
    if not path.startswith("/") or os.path.normpath(path) != path or not path.endswith(SUFFIXES):
        return False
    return any(path.startswith(r + "/") for r in where)


def _trusted(st: os.stat_result) -> bool:
    return st.st_uid == os.geteuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def load(path: str | None = None, where: tuple[str, ...] | None = None) -> list[str] | None:
    """The listed paths that pass the checks, in order; None if there is no usable list."""
    path = path or list_path()
    try:
        if not _trusted(os.stat(os.path.dirname(path))):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not _trusted(st) or st.st_size > MAX_LIST_BYTES:
            return None
        data = os.read(fd, MAX_LIST_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        lines = data.decode().splitlines()
    except UnicodeDecodeError:
        return None
    where = where or roots()
    return [p for p in lines[:MAX_FILES] if acceptable(p, where)]


def elf_load_ranges(head: bytes, size: int) -> list[tuple[int, int]] | None:
    """(offset, length) of the PT_LOAD segments of a little-endian ELF64 file whose program
    headers are within `head`: what the loader maps. None if `head` is not such a file.
    Not `io/elfdeps.parse`, which reads the same headers: that module imports the bootstrap
    format (and struct) at import, and this runs before any import it would speed up."""
    if len(head) < 64 or head[:6] != b"\x7fELF\x02\x01":
        return None
    phoff = int.from_bytes(head[32:40], "little")
    phentsize = int.from_bytes(head[54:56], "little")
    phnum = int.from_bytes(head[56:58], "little")
    if phentsize < 56 or phnum > MAX_PHNUM or phoff + phnum * phentsize > len(head):
        return None
    out = []
    for i in range(phnum):
        ph = head[phoff + i * phentsize:phoff + i * phentsize + 56]
        if int.from_bytes(ph[0:4], "little") != PT_LOAD:
            continue
        off, length = int.from_bytes(ph[8:16], "little"), int.from_bytes(ph[32:40], "little")
        if off < size:
            out.append((off, min(length, size - off)))
    return out


def _advise(fd: int, size: int, is_so: bool) -> None:
    if not is_so:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        return
    # A shared object: only its loaded segments. Extension modules are often built with debug
    # information (zstandard's: 11.6 MB of which 0.95 MB is loaded), and reading all of it
    # would take the disk from the imports this is meant to speed up.
    ranges = elf_load_ranges(os.pread(fd, ELF_HEAD, 0), size)
    if ranges is None:
        return
    for off, length in ranges:
        os.posix_fadvise(fd, off, length, os.POSIX_FADV_WILLNEED)


def _read_ahead(paths: list[str]) -> None:
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                _advise(fd, st.st_size, p.endswith(".so"))
        except OSError:
            pass
        finally:
            os.close(fd)


def start(path: str | None = None, where: tuple[str, ...] | None = None) -> int:
    """Starts reading ahead what the list names; returns how many files it will ask for.
    Never raises: a start without read-ahead is only slower."""
    paths = load(path, where)
    if not paths:
        return 0
    try:
        for i in range(min(THREADS, len(paths))):
            # interleaved: each thread walks the list in import order
            t = threading.Thread(target=_read_ahead, args=(paths[i::THREADS],),
                                 name="startup-readahead", daemon=True)
            t.start()
            _threads.append(t)
    except RuntimeError:        # no thread to be had (a pids limit): go on without
        pass
    return len(paths)


def finish(timeout: float = 2.0) -> None:
    """Waits for the read-ahead threads (they only submit reads: a few ms). Called before the
    daemon forks, so that the child starts with no other thread."""
    while _threads:
        _threads.pop().join(timeout)


def loaded_files(modules: dict | None = None, where: tuple[str, ...] | None = None) -> list[str]:
    """The .pyc/.so files the loaded modules came from, in import order, under `roots()`."""
    where = where or roots()
    out: list[str] = []
    seen: set[str] = set()
    for m in list((modules if modules is not None else sys.modules).values()):
        spec = getattr(m, "__spec__", None)
        if spec is None or not getattr(spec, "has_location", False):
            continue
        # the .pyc when there is one (what the import read), else the source or extension
        f = spec.cached if isinstance(spec.cached, str) and os.path.exists(spec.cached) else spec.origin
        if not isinstance(f, str):
            continue
        f = os.path.normpath(os.path.abspath(f))
        if f not in seen and acceptable(f, where):
            seen.add(f)
            out.append(f)
    return out


def record_later(delay: float = RECORD_DELAY, path: str | None = None) -> threading.Thread:
    """`record` in a daemon thread after `delay` seconds (a daemon that exits sooner records
    at its exit)."""
    def run() -> None:
        time.sleep(delay)
        record(path)
    t = threading.Thread(target=run, name="startup-files", daemon=True)
    t.start()
    return t


def record(path: str | None = None, modules: dict | None = None,
           where: tuple[str, ...] | None = None) -> bool:
    """Adds what this process has loaded to the list; True if the list was (re)written.
    Nothing is written when every loaded file is already listed (every start but the first
    after an install or upgrade). Never raises: a read-only installation just has no list."""
    try:
        return _record(path or list_path(), modules, where)
    except Exception:       # noqa: BLE001 (an odd module object must not cost the daemon)
        return False


def _record(path: str, modules: dict | None, where: tuple[str, ...] | None) -> bool:
    files = loaded_files(modules, where)
    old = (load(path, where) if os.path.exists(path) else None) or []
    known = set(old)
    if all(f in known for f in files):
        return False
    new = set(files)
    lines: list[bytes] = []
    size = 0
    for p in files + [p for p in old if p not in new and os.path.exists(p)]:
        line = (p + "\n").encode()
        if len(lines) == MAX_FILES or size + len(line) > MAX_LIST_BYTES:
            break
        lines.append(line)
        size += len(line)
    # one name per writer: the mount-ready thread and the exit may both write
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not _trusted(os.stat(os.path.dirname(path))):
            return False
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError:
        return False
    try:
        try:
            os.write(fd, b"".join(lines))
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return True
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return False
