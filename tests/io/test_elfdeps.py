"""io/elfdeps.py: ELF interpreter/DT_NEEDED parsing (real and synthetic files, every class and
byte order, hostile headers fuzzed) and finding the libraries in an image tree."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from nydus_py.format.bootstrap import Bootstrap
from nydus_py.io import elfdeps
from nydus_py.io.elfdeps import NeedBytes, lookup_path, parse, resolve
from tests.fixtures.nydus_build import build


def getter(data: bytes, calls: list | None = None):
    def get(off: int, n: int) -> bytes:
        if calls is not None:
            calls.append((off, n))
        return data[off:off + n] if off >= 0 and n >= 0 else b""
    return get


def make_elf(*, is64: bool = True, little: bool = True, interp: bytes | None = b"/lib/ld.so",
             needed: tuple[bytes, ...] = (b"libfoo.so.1",), runpath: bytes | None = None,
             machine: int = elfdeps.EM_X86_64) -> bytes:
    """A minimal ELF: header, PT_LOAD (everything, vaddr 0x400000), PT_INTERP, PT_DYNAMIC."""
    e = "<" if little else ">"
    ehsize, phsize = (64, 56) if is64 else (52, 32)
    nph = 3
    strtab = b"\0" + b"".join(n + b"\0" for n in needed) + ((runpath + b"\0") if runpath else b"")
    interp_b = (interp + b"\0") if interp else b"\0"
    dyn_off = ehsize + nph * phsize
    ent = struct.calcsize(e + ("qQ" if is64 else "iI"))
    dyn_entries = []
    pos = 1
    for n in needed:
        dyn_entries.append((elfdeps.DT_NEEDED, pos))
        pos += len(n) + 1
    if runpath:
        dyn_entries.append((elfdeps.DT_RUNPATH, pos))
    str_off = dyn_off + (len(dyn_entries) + 3) * ent
    interp_off = str_off + len(strtab)
    base = 0x400000
    dyn_entries += [(elfdeps.DT_STRTAB, base + str_off), (elfdeps.DT_STRSZ, len(strtab)), (0, 0)]
    dyn = b"".join(struct.pack(e + ("qQ" if is64 else "iI"), t, v) for t, v in dyn_entries)
    total = interp_off + len(interp_b)
    ident = b"\x7fELF" + bytes([2 if is64 else 1, 1 if little else 2, 1]) + b"\0" * 9
    if is64:
        hdr = ident + struct.pack(e + "HHIQQQIHHHHHH", 3, machine, 1, 0, ehsize, 0, 0, ehsize,
                                  phsize, nph, 64, 0, 0)
        ph = (struct.pack(e + "IIQQQQQQ", elfdeps.PT_LOAD, 5, 0, base, base, total, total, 0x1000)
              + struct.pack(e + "IIQQQQQQ", elfdeps.PT_INTERP if interp else 6, 4, interp_off,
                            base + interp_off, 0, len(interp_b), len(interp_b), 1)
              + struct.pack(e + "IIQQQQQQ", elfdeps.PT_DYNAMIC, 6, dyn_off, base + dyn_off, 0,
                            len(dyn), len(dyn), 8))
    else:
        hdr = ident + struct.pack(e + "HHIIIIIHHHHHH", 3, machine, 1, 0, ehsize, 0, 0, ehsize,
                                  phsize, nph, 40, 0, 0)
        ph = (struct.pack(e + "IIIIIIII", elfdeps.PT_LOAD, 0, base, base, total, total, 5, 0x1000)
              + struct.pack(e + "IIIIIIII", elfdeps.PT_INTERP if interp else 6, interp_off,
                            base + interp_off, 0, len(interp_b), len(interp_b), 4, 1)
              + struct.pack(e + "IIIIIIII", elfdeps.PT_DYNAMIC, dyn_off, base + dyn_off, 0,
                            len(dyn), len(dyn), 6, 4))
    out = hdr + ph + dyn + strtab + interp_b
    assert len(hdr) == ehsize and len(out) == total
    return out


@pytest.mark.parametrize("is64", [True, False])
@pytest.mark.parametrize("little", [True, False])
def test_synthetic_every_class_and_byte_order(is64, little):
    data = make_elf(is64=is64, little=little, needed=(b"libm.so.6", b"libc.so.6"),
                    runpath=b"$ORIGIN/../lib:/opt/lib")
    d = parse(getter(data))
    assert d is not None
    assert d.interp == b"/lib/ld.so"
    assert d.needed == (b"libm.so.6", b"libc.so.6")
    assert d.runpath == (b"$ORIGIN/../lib", b"/opt/lib")


def test_static_or_not_elf():
    assert parse(getter(make_elf(interp=None, needed=()))).interp is None
    assert parse(getter(b"#!/bin/sh\necho hi\n")) is None
    assert parse(getter(b"")) is None
    assert parse(getter(b"\x7fELF")) is None


def test_host_binary():
    ls = Path("/bin/ls")
    if not ls.exists() or ls.read_bytes()[:4] != b"\x7fELF":
        pytest.skip("no ELF /bin/ls")
    d = parse(getter(ls.read_bytes()))
    assert d is not None and d.interp and d.interp.startswith(b"/")
    assert b"libc.so.6" in d.needed


def test_missing_bytes_are_asked_for():
    data = make_elf(needed=(b"libfoo.so.1",))
    have = data[:64]

    def get(off, n):
        if off + n > len(have) and off < len(data):
            raise NeedBytes(off, n)
        return have[off:off + n]
    with pytest.raises(NeedBytes) as e:
        parse(get)
    assert e.value.offset == 64             # the program headers, right after the header


def test_hostile_headers_fuzzed():
    """Mutated real and synthetic ELF files: parse returns None or bounded results, never
    raises, and never asks for more than the bounds allow at once."""
    seeds = [make_elf(is64=a, little=b, needed=(b"liba.so", b"libb.so"), runpath=b"/x")
             for a in (True, False) for b in (True, False)]
    ls = Path("/bin/ls")
    if ls.exists():
        seeds.append(ls.read_bytes()[:1 << 16])
    rnd = random.Random(1234)
    biggest = max(elfdeps.MAX_DYNAMIC, elfdeps.MAX_PHNUM * 56, elfdeps.MAX_NAME, 64)
    for i in range(4000):
        data = bytearray(rnd.choice(seeds))
        for _ in range(rnd.randint(1, 12)):
            pos = rnd.randrange(min(len(data), 512 if rnd.random() < 0.7 else len(data)))
            if rnd.random() < 0.5:
                data[pos] = rnd.randrange(256)
            else:   # a large or hostile 4/8-byte field
                val = rnd.choice([0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**63 - 1, 2**64 - 1,
                                  rnd.getrandbits(64)])
                width = rnd.choice([2, 4, 8])
                data[pos:pos + width] = (val & ((1 << 8 * width) - 1)).to_bytes(width, "little")
        calls: list = []
        d = parse(getter(bytes(data), calls))
        assert all(n <= biggest for _, n in calls), calls
        if d is not None:
            assert len(d.needed) <= elfdeps.MAX_NEEDED
            assert all(len(n) <= elfdeps.MAX_NAME for n in d.needed)
            assert d.interp is None or len(d.interp) <= elfdeps.MAX_NAME


def _tree() -> Bootstrap:
    built = build({"usr/lib/x86_64-linux-gnu/libc.so.6": b"c" * 100,
                   "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2": b"l" * 10,
                   "usr/lib/x86_64-linux-gnu/libz.so.1.2.13": b"z" * 10,
                   "opt/app/lib/libapp.so": b"a" * 10,
                   "opt/app/bin/app": b"x" * 10,
                   "usr/lib/libonly.so": b"o" * 10},
                  symlinks={"lib": b"usr/lib",
                            "lib64/ld-linux-x86-64.so.2": b"/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                            "usr/lib/x86_64-linux-gnu/libz.so.1": b"libz.so.1.2.13",
                            "loop/a": b"b", "loop/b": b"a",
                            "up": b"../../../../usr/lib"})
    return Bootstrap.from_bytes(built.bootstrap)


def test_lookup_follows_symlinks_inside_the_image():
    bs = _tree()
    libc = lookup_path(bs, b"/usr/lib/x86_64-linux-gnu/libc.so.6")
    assert libc is not None
    assert lookup_path(bs, b"/lib/x86_64-linux-gnu/libc.so.6") == libc
    ld = lookup_path(bs, b"/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
    assert lookup_path(bs, b"/lib64/ld-linux-x86-64.so.2") == ld
    assert lookup_path(bs, b"/up/x86_64-linux-gnu/libc.so.6") == libc   # ".." stops at the root
    assert lookup_path(bs, b"/loop/a") is None                           # a loop ends
    assert lookup_path(bs, b"/usr/lib/x86_64-linux-gnu/libc.so.6/x") is None
    assert lookup_path(bs, b"relative") is None


def test_resolve_like_ld_so():
    bs = _tree()
    deps = elfdeps.ElfDeps(elfdeps.EM_X86_64, b"/lib64/ld-linux-x86-64.so.2",
                           (b"libz.so.1", b"libapp.so", b"libc.so.6", b"libonly.so", b"libnone.so",
                            b"libc.so.6"),
                           (b"$ORIGIN/../lib",))
    got = resolve(bs, deps, b"/opt/app/bin/app")
    want = [lookup_path(bs, p) for p in (b"/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                                         b"/usr/lib/x86_64-linux-gnu/libz.so.1.2.13",
                                         b"/opt/app/lib/libapp.so",
                                         b"/usr/lib/x86_64-linux-gnu/libc.so.6",
                                         b"/usr/lib/libonly.so")]
    assert got == want


def test_glibc_runtime_files_are_found_through_the_image_and_bounded():
    built = build({"usr/lib/x86_64-linux-gnu/libc.so.6": b"c" * 100,
                   "usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache": b"g" * 10,
                   "usr/share/zoneinfo/Etc/UTC": b"TZif" * 4,
                   "usr/lib/locale/C.utf8/LC_CTYPE": b"t" * (elfdeps.RUNTIME_MAX + 1),
                   "usr/lib/locale/C.UTF-8/LC_CTYPE": b"u" * 10,
                   "etc/ld.so.cache": b""},
                  symlinks={"lib": b"usr/lib", "etc/localtime": b"../usr/share/zoneinfo/Etc/UTC"})
    bs = Bootstrap.from_bytes(built.bootstrap)
    got = elfdeps.glibc_runtime(bs, b"/lib/x86_64-linux-gnu/libc.so.6")
    want = [lookup_path(bs, p) for p in (b"/usr/share/zoneinfo/Etc/UTC",
                                         b"/usr/lib/locale/C.UTF-8/LC_CTYPE",
                                         b"/usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache")]
    assert got == want          # empty ld.so.cache and an LC_CTYPE over RUNTIME_MAX left out
    assert elfdeps.glibc_runtime(_tree(), b"/usr/lib/x86_64-linux-gnu/libc.so.6") == []
