"""What an ELF file will make the dynamic loader read next: its interpreter (PT_INTERP) and the
libraries it names (DT_NEEDED), found in the image tree the way ld.so searches (DT_RUNPATH /
DT_RPATH, then the standard directories). Pure: bytes come from a `get(offset, n)` callback
that raises `NeedBytes` for bytes not fetched yet, so the caller (io/predict.py) fetches the
chunk holding them and asks again. No I/O, no trio.

Everything here reads an image's bytes, so everything is hostile input: every count, size and
offset is bounded before use (program headers, dynamic entries, names, libraries), anything
malformed means "not an ELF we predict for" (None / fewer names), never an exception other
than NeedBytes, and the tree walk follows at most MAX_LINKS symlinks and never leaves the image.
"""

from __future__ import annotations

import posixpath
import stat
import struct
from dataclasses import dataclass
from typing import Callable

from nydus_py.errors import NydusError
from nydus_py.format.bootstrap import ROOT_INO, Bootstrap

ELF_MAGIC = b"\x7fELF"
MAX_PHNUM = 128                 # program headers looked at (real files: < 16)
MAX_DYNAMIC = 64 << 10          # bytes of PT_DYNAMIC read (real files: < 1 KiB)
MAX_NAME = 256                  # bytes of one library name / interpreter path / run path
MAX_NEEDED = 64                 # DT_NEEDED entries used per file
MAX_LINKS = 40                  # symlinks followed per lookup (the kernel's bound)
PT_LOAD, PT_DYNAMIC, PT_INTERP = 1, 2, 3
DT_NULL, DT_NEEDED, DT_STRTAB, DT_STRSZ, DT_RPATH, DT_RUNPATH = 0, 1, 5, 10, 15, 29
EM_386, EM_X86_64, EM_AARCH64 = 3, 62, 183

# ld.so's default search path after the run paths (glibc, Debian/Ubuntu multiarch first)
_MULTIARCH = {EM_X86_64: b"x86_64-linux-gnu", EM_AARCH64: b"aarch64-linux-gnu", EM_386: b"i386-linux-gnu"}
_LIB64 = {EM_X86_64, EM_AARCH64}


class NeedBytes(Exception):
    """`get` does not have [offset, offset + n) yet."""

    def __init__(self, offset: int, n: int):
        super().__init__(offset, n)
        self.offset, self.n = offset, n


Get = Callable[[int, int], bytes]   # up to n bytes at offset (fewer only at end of file)


@dataclass(frozen=True)
class ElfDeps:
    machine: int
    interp: bytes | None            # PT_INTERP path
    needed: tuple[bytes, ...]       # DT_NEEDED names, in order
    runpath: tuple[bytes, ...]      # DT_RUNPATH (or DT_RPATH when there is no RUNPATH) entries


def is_elf(head: bytes | bytearray | memoryview) -> bool:
    return bytes(head[:4]) == ELF_MAGIC


def _cstr(b: bytes) -> bytes:
    return b.split(b"\0", 1)[0]


def parse(get: Get) -> ElfDeps | None:
    """The dependencies of the ELF file behind `get`; None when it is not an ELF executable or
    shared object we understand. Raises NeedBytes (only) when bytes are missing."""
    h = get(0, 64)
    if len(h) < 52 or h[:4] != ELF_MAGIC or h[4] not in (1, 2) or h[5] not in (1, 2):
        return None
    is64, end = h[4] == 2, "<" if h[5] == 1 else ">"
    if is64 and len(h) < 64:
        return None
    if is64:
        e_type, machine, _, _, phoff, _, _, _, phentsize, phnum = struct.unpack_from(end + "HHIQQQIHHH", h, 16)
        want = 56
    else:
        e_type, machine, _, _, phoff, _, _, _, phentsize, phnum = struct.unpack_from(end + "HHIIIIIHHH", h, 16)
        want = 32
    if e_type not in (2, 3) or phentsize != want or not 0 < phnum <= MAX_PHNUM:
        return None
    ph = get(phoff, phentsize * phnum)
    if len(ph) < phentsize * phnum:
        return None
    loads: list[tuple[int, int, int]] = []     # (vaddr, offset, filesz)
    interp = dynamic = None
    for i in range(phnum):
        if is64:
            p_type, _, p_off, p_vaddr, _, p_filesz = struct.unpack_from(end + "IIQQQQ", ph, i * want)
        else:
            p_type, p_off, p_vaddr, _, p_filesz = struct.unpack_from(end + "IIIII", ph, i * want)
        if p_type == PT_LOAD:
            loads.append((p_vaddr, p_off, p_filesz))
        elif p_type == PT_INTERP and interp is None:
            interp = (p_off, min(p_filesz, MAX_NAME))
        elif p_type == PT_DYNAMIC and dynamic is None:
            dynamic = (p_off, min(p_filesz, MAX_DYNAMIC))
    path = _cstr(get(*interp)) if interp is not None and interp[1] > 0 else None
    if dynamic is None or dynamic[1] <= 0:
        return ElfDeps(machine, path or None, (), ())
    needed, runpath = _dynamic(get, get(*dynamic), is64, end, loads)
    return ElfDeps(machine, path or None, needed, runpath)


def _dynamic(get: Get, dyn: bytes, is64: bool, end: str, loads) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    fmt = end + ("qQ" if is64 else "iI")
    size = struct.calcsize(fmt)
    needed: list[int] = []
    strtab = strsz = None
    runpath = rpath = None
    for i in range(len(dyn) // size):
        tag, val = struct.unpack_from(fmt, dyn, i * size)
        if tag == DT_NULL:
            break
        if tag == DT_NEEDED and len(needed) < MAX_NEEDED:
            needed.append(val)
        elif tag == DT_STRTAB and strtab is None:
            strtab = val
        elif tag == DT_STRSZ and strsz is None:
            strsz = val
        elif tag == DT_RUNPATH and runpath is None:
            runpath = val
        elif tag == DT_RPATH and rpath is None:
            rpath = val
    if strtab is None or not strsz:
        return (), ()
    base = None
    for vaddr, off, filesz in loads:    # the string table's vaddr → file offset
        if vaddr <= strtab < vaddr + filesz:
            base = off + (strtab - vaddr)
            break
    if base is None:
        return (), ()

    def name(at: int) -> bytes:
        if not 0 <= at < strsz:
            return b""
        return _cstr(get(base + at, min(MAX_NAME, strsz - at)))
    names = tuple(n for n in (name(v) for v in needed) if n)
    rp = runpath if runpath is not None else rpath
    paths = tuple(p for p in name(rp).split(b":") if p) if rp is not None else ()
    return names, paths


# -- finding the files in the image ---------------------------------------------------------

def lookup_path(bs: Bootstrap, path: bytes) -> int | None:
    """The inode `path` names in the image, following symlinks (also the last one) inside the
    image root as the kernel would in a chroot; None if absent or a loop."""
    if not path.startswith(b"/"):
        return None
    todo = [p for p in path.split(b"/") if p]
    stack = [ROOT_INO]              # the directories walked (for "..")
    links = 0
    try:
        while todo:
            part = todo.pop(0)
            if part == b".":
                continue
            if part == b"..":
                if len(stack) > 1:
                    stack.pop()
                continue
            ino = bs.lookup(stack[-1], part)
            if ino is None:
                return None
            mode = bs.attr(ino).mode
            if stat.S_ISLNK(mode):
                links += 1
                if links > MAX_LINKS:
                    return None
                target = bs.readlink(ino)
                if target.startswith(b"/"):
                    stack = [ROOT_INO]
                todo = [p for p in target.split(b"/") if p] + todo
                continue
            if todo and not stat.S_ISDIR(mode):
                return None
            stack.append(ino)
    except (KeyError, ValueError, NydusError):   # a bad record: no prediction, never an error
        return None
    return stack[-1]


def search_dirs(machine: int, runpath: tuple[bytes, ...], origin: bytes) -> list[bytes]:
    """ld.so's directories for a library of `machine`: the run paths ($ORIGIN expanded), then
    the multiarch and standard directories."""
    out = []
    for p in runpath:
        p = p.replace(b"${ORIGIN}", origin).replace(b"$ORIGIN", origin)
        if p.startswith(b"/") and b"$" not in p:
            out.append(p)
    arch = _MULTIARCH.get(machine)
    if arch is not None:
        out += [b"/lib/" + arch, b"/usr/lib/" + arch]
    if machine in _LIB64:
        out += [b"/lib64", b"/usr/lib64"]
    out += [b"/lib", b"/usr/lib", b"/usr/local/lib"]
    return out


def resolve(bs: Bootstrap, deps: ElfDeps, own_path: bytes) -> list[int]:
    """Inodes of the regular files `deps` names (interpreter first), each once."""
    found: list[int] = []
    origin = posixpath.dirname(own_path) or b"/"

    def add(ino: int | None) -> bool:
        if ino is None:
            return False
        try:
            if not stat.S_ISREG(bs.attr(ino).mode):
                return False
        except KeyError:
            return False
        if ino not in found:
            found.append(ino)
        return True
    if deps.interp:
        add(lookup_path(bs, deps.interp))
    dirs = search_dirs(deps.machine, deps.runpath, origin)
    for name in deps.needed:
        if b"/" in name:
            add(lookup_path(bs, name if name.startswith(b"/") else origin + b"/" + name))
            continue
        for d in dirs:
            if add(lookup_path(bs, d + b"/" + name)):
                break
    return found


# Files the GNU C library itself reads while nearly any program starts: the dynamic loader's
# cache, the time zone (tzset: /etc/localtime and its zoneinfo target), the C.UTF-8 locale's
# character classes (setlocale with LANG=C.UTF-8, the container default, and what Python
# coerces the C locale to: PEP 538) and the charset converters' index, next to libc (the
# first multibyte conversion). Each is found at most once per mount, and only files of at
# most RUNTIME_MAX bytes are taken (a full locale-archive is megabytes: left to the reads).
GLIBC_SONAME = b"libc.so.6"
GLIBC_RUNTIME = (b"/etc/ld.so.cache", b"/etc/localtime", b"/usr/lib/locale/C.utf8/LC_CTYPE",
                 b"/usr/lib/locale/C.UTF-8/LC_CTYPE")
RUNTIME_MAX = 1 << 20


def glibc_runtime(bs: Bootstrap, libc_path: bytes) -> list[int]:
    """Inodes of the regular files in GLIBC_RUNTIME and `<libc's dir>/gconv/gconv-modules.cache`
    present in the image (symlinks followed inside it), each at most RUNTIME_MAX bytes."""
    paths = [*GLIBC_RUNTIME, posixpath.dirname(libc_path) + b"/gconv/gconv-modules.cache"]
    found: list[int] = []
    for p in paths:
        add_small_file(bs, lookup_path(bs, p), found, RUNTIME_MAX)
    return found


def add_small_file(bs: Bootstrap, ino: int | None, found: list[int], limit: int) -> bool:
    """Appends `ino` to `found` if it is a regular file of 1..`limit` bytes not there yet."""
    if ino is None or ino in found:
        return False
    try:
        attr = bs.attr(ino)
    except KeyError:
        return False
    if not (stat.S_ISREG(attr.mode) and 0 < attr.size <= limit):
        return False
    found.append(ino)
    return True
