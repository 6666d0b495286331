"""Tar-level fuzzing: mutated layers through open_layer_stream → iter_entries → Tree → Builder.

The only acceptable outcomes for any input are success or a NydusError subclass (LayerError,
DigestMismatchError) — never another exception type (which would surface as a traceback),
never a hang (each case runs under a SIGALRM deadline) and never unbounded memory (tracemalloc
peak per case). Success must also be coherent: every regular file yields exactly `size`
bytes, and the bootstrap can be laid out (numbers fit its fields).

Mutations: header bytes flipped (checksum fixed up or not), truncation at every block boundary
(and inside blocks) of small archives, plain and gzip/zstd-compressed, random PAX records (bad
and huge lengths, missing '=', non-numeric/negative/huge numbers, duplicate keys, empty values,
NUL bytes, sparse keys), GNU long names/links whose size disagrees with their data, sparse maps
(old GNU, PAX 0.0/0.1/1.0) pointing beyond the file, spliced blocks, corrupted compressed
bytes.

NYDUS_TAR_FUZZ_SEEDS=N (default 100) cases per mutation family.
"""

from __future__ import annotations

import gzip
import io
import os
import random
import signal
import tempfile
import tracemalloc
from pathlib import Path

import pytest
import zstandard

from converter.builder import Builder, BuildOptions
from converter.decompress import open_layer_stream
from converter import tar as tarlayer
from nydus_py.errors import NydusError
from nydus_py.oci import mediatypes as mt
from tests.fixtures.tarbuild import END, header, member, pax, pax_record
from tests.fixtures.imagegen import CAP_NET_BIND_SERVICE, Content, Layer

BLOCK = 512
SEEDS = int(os.environ.get("NYDUS_TAR_FUZZ_SEEDS", "100"))
MAX_LAYER = 64 << 20           # a sparse/size bomb must be refused against this, quickly
DEADLINE_S = 5
MAX_PEAK = 48 << 20
WHAT = "layer 0 (sha256:fuzz)"


class Hang(BaseException):
    pass


def _alarm(signum, frame):
    raise Hang(f"no result within {DEADLINE_S} s")


def run_layers(layers: list[tuple[bytes, str]], tmp: Path) -> str:
    """Convert the layers (data, media type) like nydusify does; returns "ok" or the error
    class name. Anything but a NydusError propagates (the test fails with it)."""
    builder = Builder(BuildOptions(chunk_size=0x1000, compressor="none", workers=1,
                                   max_layer_size=MAX_LAYER), tmp)
    try:
        for i, (data, media_type) in enumerate(layers):
            stream = open_layer_stream(io.BytesIO(data), media_type, WHAT, max_uncompressed=MAX_LAYER)
            builder.add_layer(_checked(tarlayer.iter_entries(stream, WHAT, max_size=MAX_LAYER)), i,
                              "sha256:fuzz", WHAT)
        builder.finish()
    except NydusError as e:
        assert str(e).strip() and "\n" not in str(e).strip(), repr(str(e))   # one clear line
        return type(e).__name__
    return "ok"


def _checked(entries):
    """Entries unchanged, asserting that a regular file never yields more data than its size
    (fewer is caught by the builder: a LayerError)."""
    for e in entries:
        if e.kind is tarlayer.EntryKind.REG and e._data is not None:
            e._data = _Counted(e._data, e)
        yield e


class _Counted:
    def __init__(self, inner, entry):
        self.inner, self.entry, self.got = inner, entry, 0

    def read(self, n=-1):
        b = self.inner.read(n)
        self.got += len(b)
        assert self.got <= self.entry.size, f"{self.entry.describe()}: more data than its size"
        return b


@pytest.fixture
def harness(tmp_path, monkeypatch):
    old = signal.signal(signal.SIGALRM, _alarm)
    tracemalloc.start()
    n = [0]

    def run(layers) -> str:
        if isinstance(layers, bytes):
            layers = [(layers, mt.OCI_LAYER_TAR)]
        n[0] += 1
        work = tmp_path / f"c{n[0]}"
        work.mkdir()
        tracemalloc.reset_peak()
        signal.setitimer(signal.ITIMER_REAL, DEADLINE_S)
        try:
            return run_layers(layers, work)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            peak = tracemalloc.get_traced_memory()[1]
            assert peak < MAX_PEAK, f"peak memory {peak} bytes"
            for p in work.iterdir():
                p.unlink()
            work.rmdir()
    yield run
    tracemalloc.stop()
    signal.signal(signal.SIGALRM, old)


# --------------------------------------------------------------------------- base archives

def base_archives() -> list[bytes]:
    """Small valid layers using most of the vocabulary."""
    p = Layer(compression="none", fmt="pax")
    p.dir("./")
    p.dir("etc", mode=0o2755, gid=42)
    p.file("etc/f", b"hello\n", xattrs={"user.a": b"\0\xff", "security.capability": CAP_NET_BIND_SERVICE})
    p.file("etc/" + "long" * 40, b"long name via PAX", mtime_ns=1_700_000_000_123_456_789)
    p.hardlink("etc/hl", "etc/f")
    p.symlink("etc/sl", "f")
    p.char("dev/null", 1, 3)
    p.fifo("dev/fifo")
    p.sparse_file("sparse", 3 * 4096, [(0, 10), (8192, 20)], seed=1)
    p.file("big", Content.random(9000, seed=2), uid=3_000_000)
    p.whiteout("gone")
    p.opaque("etc")

    g = Layer(compression="none", fmt="gnu")
    g.dir("g")
    g.file("g/" + "n" * 150, b"gnu long name")
    g.symlink("g/ll", "t" * 150)
    g.hardlink("g/hl-long", "g/" + "n" * 150)
    g.sparse_file("g/sparse", 4 * 4096, [(0, 5), (4096, 5), (8192, 5), (12288, 5), (16000, 5)], seed=3)
    g.file("g/neg-mtime", b"old", mtime_ns=-86_400 * 10**9, uid=2**22)

    small = Layer(compression="none")
    small.file("a", b"x" * 700)
    small.dir("d")
    small.symlink("d/s", "../a")
    return [p.tar_bytes(), g.tar_bytes(), small.tar_bytes()]


def header_offsets(tar: bytes) -> list[int]:
    """Offsets of blocks whose checksum is valid (the headers)."""
    out = []
    for off in range(0, len(tar) - BLOCK + 1, BLOCK):
        blk = tar[off:off + BLOCK]
        if blk == bytes(BLOCK):
            continue
        try:
            chk = int(blk[148:156].strip(b" \0") or b"-1", 8)
        except ValueError:
            continue
        if chk == sum(blk[:148]) + 256 + sum(blk[156:]):
            out.append(off)
    return out


def fix_checksum(buf: bytearray, off: int) -> None:
    buf[off + 148:off + 156] = b" " * 8
    buf[off + 148:off + 156] = b"%06o\0 " % sum(buf[off:off + BLOCK])


def compress(data: bytes, codec: str) -> tuple[bytes, str]:
    if codec == "gzip":
        return gzip.compress(data, mtime=0), mt.OCI_LAYER_GZIP
    if codec == "zstd":
        return zstandard.ZstdCompressor().compress(data), mt.OCI_LAYER_ZSTD
    return data, mt.OCI_LAYER_TAR


BASES = base_archives()
FIELDS = [(0, 100), (100, 8), (108, 8), (116, 8), (124, 12), (136, 12), (156, 1), (157, 100),
          (257, 8), (329, 8), (337, 8), (345, 155), (386, 96), (482, 1), (483, 12)]
INTERESTING = [b"\0", b" ", b"\x80", b"\xff", b"7", b"8", b"x", b"L", b"K", b"S", b"g", b"1", b"2",
               b"5", b"D", b"V", b"M", b"/", b".", b"-"]


# --------------------------------------------------------------------------- tests

def test_bases_are_valid(harness):
    for tar in BASES:
        assert harness(tar) == "ok"
    assert harness([(t, mt.OCI_LAYER_TAR) for t in BASES]) == "ok"


@pytest.mark.parametrize("base", range(len(BASES)))
def test_truncation_at_every_block_boundary(harness, base):
    tar = BASES[base]
    rng = random.Random(base)
    cuts = list(range(0, len(tar), BLOCK)) + [rng.randrange(len(tar)) for _ in range(20)]
    for cut in cuts:
        for codec in ("none", "gzip", "zstd"):
            data = tar[:cut]
            if codec != "none" and rng.random() < 0.5:
                data, media = compress(tar, codec)       # cut the compressed stream instead
                data = data[: max(0, len(data) * cut // len(tar))]
            else:
                data, media = compress(data, codec)
            harness([(data, media)])


def test_header_byte_flips(harness):
    rng = random.Random(1)
    for i in range(SEEDS * 4):
        tar = bytearray(rng.choice(BASES))
        heads = header_offsets(bytes(tar))
        for _ in range(rng.randint(1, 4)):
            off = rng.choice(heads) if rng.random() < 0.85 else rng.randrange(len(tar) // BLOCK) * BLOCK
            start, width = rng.choice(FIELDS)
            pos = off + start + rng.randrange(width)
            r = rng.random()
            if r < 0.4:
                tar[pos] = rng.randrange(256)
            elif r < 0.7 or width < 8:
                tar[pos:pos + 1] = rng.choice(INTERESTING)
            else:   # a whole numeric field: octal garbage, huge, base-256 positive/negative
                val = rng.choice([b"7" * (width - 1) + b"\0", b"\x80" + b"\xff" * (width - 1),
                                  b"\xff" * width, b"\x80" + bytes(width - 2) + b"\x01",
                                  b"-1".ljust(width, b"\0"), b" " * width, b"9" * width])
                tar[off + start:off + start + width] = val[:width]
            if rng.random() < 0.8:
                fix_checksum(tar, off)
        codec = rng.choice(["none", "none", "gzip", "zstd"])
        harness([compress(bytes(tar), codec)])


def _num_value(rng: random.Random) -> bytes:
    return rng.choice([b"0", b"1", b"-1", b"+5", b"12a", b"", b" 5", b"1e3", b"0x10", b"9" * 19,
                       b"9223372036854775807", b"9223372036854775808", b"9" * 40, b"4294967295",
                       b"4294967296", b"1.5", b"-1.5", b"1700000000.123456789123", b".5", b"5.",
                       b"\xff", b"1\0", b"00000000000000000000000000000000000000000001"])


PAX_KEYS = [b"path", b"linkpath", b"size", b"uid", b"gid", b"mtime", b"atime", b"uname",
            b"SCHILY.xattr.user.x", b"SCHILY.xattr.trusted.y", b"SCHILY.xattr.", b"SCHILY.xattr.foo",
            b"SCHILY.xattr.user." + b"n" * 300, b"LIBARCHIVE.xattr.user.z", b"LIBARCHIVE.xattr.%ff",
            b"GNU.sparse.major", b"GNU.sparse.minor", b"GNU.sparse.name", b"GNU.sparse.realsize",
            b"GNU.sparse.size", b"GNU.sparse.map", b"GNU.sparse.offset", b"GNU.sparse.numbytes",
            b"hdrcharset", b"comment"]


def _pax_value(rng: random.Random, key: bytes) -> bytes:
    r = rng.random()
    if r < 0.35:
        return _num_value(rng)
    if key in (b"path", b"linkpath", b"GNU.sparse.name") and r < 0.7:
        return rng.choice([b"a", b"../../x", b"/", b"", b"a\0b", b"x" * 300, b"d/.wh.x", b".wh..wh..opq",
                           b"a/" * 100, b"\xff\xfe"])
    if key == b"GNU.sparse.map":
        return b",".join(_num_value(rng) for _ in range(rng.choice([1, 2, 4, 5])))
    return rng.choice([b"v", b"", b"=", b"\0", b"x" * 70000, b"Zm9v", b"!!"])


def _random_record(rng: random.Random) -> bytes:
    key = rng.choice(PAX_KEYS)
    value = _pax_value(rng, key)
    rec = pax_record(key, value)
    r = rng.random()
    if r < 0.08:
        rec = b"%d" % (len(rec) + rng.choice([-3, -1, 1, 5, 10**6])) + rec[rec.index(b" "):]
    elif r < 0.12:
        rec = rec.replace(b"=", b"", 1)                       # missing '='
    elif r < 0.15:
        rec = rec[:-1]                                        # no newline
    elif r < 0.18:
        rec = b"99999999999999999999999 " + key + b"=v\n"   # huge length
    elif r < 0.2:
        rec = b" " + key + b"=v\n"                            # no length
    return rec


def _member_after_pax(rng: random.Random) -> bytes:
    kind = rng.choice(["file", "file", "dir", "symlink", "hardlink", "sparse", "gnusparse", "chr"])
    if kind == "file":
        data = rng.randbytes(rng.choice([0, 1, 511, 512, 513, 5000]))
        return member(b"f", data)
    if kind == "dir":
        return header(b"d/", type=b"5")
    if kind == "symlink":
        return header(b"s", type=b"2", linkname=b"f")
    if kind == "hardlink":
        return header(b"h", type=b"1", linkname=b"base")
    if kind == "chr":
        return header(b"c", type=b"3", devmajor=rng.choice([1, 4095, 4096]), devminor=rng.choice([3, 2**20]))
    if kind == "sparse":   # PAX 1.0 style data prefix
        n = rng.choice([0, 1, 2, 10**7])
        nums = [rng.choice([0, 5, 100, 10**12, 2**63]) for _ in range(2 * min(n, 3))]
        mp = b"%d\n" % n + b"".join(b"%d\n" % x for x in nums)
        mp = mp.ljust(-(-len(mp) // BLOCK) * BLOCK, b"\0")
        return member(b"GNUSparseFile.0/sp", mp + b"z" * rng.choice([0, 5, 10]))
    # old GNU sparse: random spans in the header, random realsize
    h = bytearray(header(b"gs", type=b"S", size=rng.choice([0, 10, 600]), magic=b"ustar  \0"))
    for i in range(4):
        if rng.random() < 0.6:
            h[386 + 24 * i:398 + 24 * i] = b"%011o\0" % rng.choice([0, 5, 4096, 8**11 - 1])
            h[398 + 24 * i:410 + 24 * i] = b"%011o\0" % rng.choice([0, 5, 10, 600, 8**11 - 1])
    h[483:495] = b"%011o\0" % rng.choice([0, 10, 4096, 8**11 - 1])
    h[482] = 1 if rng.random() < 0.2 else 0
    fix_checksum(h, 0)
    ext = bytes(BLOCK) if h[482] else b""
    return bytes(h) + ext + bytes(rng.choice([0, 1, 2]) * BLOCK)


def test_random_pax_records(harness):
    rng = random.Random(2)
    base = member(b"base", b"base file")
    for _ in range(SEEDS * 3):
        records = b"".join(_random_record(rng) for _ in range(rng.randint(1, 6)))
        if rng.random() < 0.3:   # a duplicate key, last wins
            records += records[: records.find(b"\n") + 1]
        typ = rng.choice([b"x", b"x", b"x", b"g"])
        hdr_size = len(records) if rng.random() < 0.85 else rng.choice([0, len(records) // 2, len(records) + 700])
        body = header(b"PaxHeaders/x", type=typ, size=hdr_size)
        body += records + bytes(-len(records) % BLOCK)
        tar = base + body + _member_after_pax(rng) + (END if rng.random() < 0.9 else b"")
        harness(tar)


def test_gnu_long_names_and_links_of_wrong_size(harness):
    rng = random.Random(3)
    for _ in range(SEEDS):
        typ = rng.choice([b"L", b"K"])
        value = rng.choice([b"n" * 150, b"", b"\0", b"a\0b", b"../x", b"x" * 5000, b"d/.wh.y"])
        declared = rng.choice([len(value) + 1, 0, len(value) + 1000, max(0, len(value) - 10), 2 << 20])
        data = value + b"\0"
        long = header(b"././@LongLink", type=typ, size=declared, magic=b"ustar  \0") + data + bytes(-len(data) % BLOCK)
        if rng.random() < 0.3:
            long *= 2            # stacked long names
        nxt = rng.choice([member(b"short", b"data", magic=b"ustar  \0"),
                          header(b"link", type=b"1", linkname=b"base", magic=b"ustar  \0"),
                          header(b"sym", type=b"2", linkname=b"x", magic=b"ustar  \0"), b""])
        harness(member(b"base", b"b") + long + nxt + END)


def test_sparse_maps_beyond_size(harness):
    rng = random.Random(4)
    for _ in range(SEEDS):
        recs = []
        style = rng.choice(["0.0", "0.1", "1.0"])
        size = rng.choice([0, 10, 4096, 2**40, 2**62])
        if style == "0.0":
            for _ in range(rng.randint(0, 3)):
                recs += [(b"GNU.sparse.offset", b"%d" % rng.choice([0, 5, 4096, 2**62])),
                         (b"GNU.sparse.numbytes", b"%d" % rng.choice([0, 5, 10, 2**62]))]
            recs.append((b"GNU.sparse.size", b"%d" % size))
            body = member(b"sp0", b"z" * rng.choice([0, 5, 10, 20]))
        elif style == "0.1":
            nums = [rng.choice([0, 5, 4096, 2**62]) for _ in range(rng.choice([2, 4, 3]))]
            recs += [(b"GNU.sparse.map", b",".join(b"%d" % n for n in nums)), (b"GNU.sparse.size", b"%d" % size)]
            body = member(b"sp1", b"z" * rng.choice([0, 5, 10]))
        else:
            recs += [(b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0"), (b"GNU.sparse.name", b"sp2"),
                     (b"GNU.sparse.realsize", b"%d" % size)]
            pairs = [(rng.choice([0, 5, 4096, 2**62]), rng.choice([0, 5, 10])) for _ in range(rng.randint(0, 3))]
            mp = b"%d\n" % len(pairs) + b"".join(b"%d\n%d\n" % p for p in pairs)
            mp = mp.ljust(-(-len(mp) // BLOCK) * BLOCK, b"\0")
            body = member(b"GNUSparseFile.0/sp2", mp + b"z" * sum(n for _, n in pairs))
        harness(pax(recs) + body + END)


def test_spliced_blocks_and_stacked_layers(harness):
    rng = random.Random(5)
    blocks = [t[i:i + BLOCK] for t in BASES for i in range(0, len(t), BLOCK)]
    for _ in range(SEEDS):
        tar = b"".join(rng.choice(blocks) for _ in range(rng.randint(1, 12)))
        if rng.random() < 0.5:
            harness([(rng.choice(BASES), mt.OCI_LAYER_TAR), (tar + END, mt.OCI_LAYER_TAR)])
        else:
            harness(tar)


def test_corrupted_compressed_bytes(harness):
    rng = random.Random(6)
    for _ in range(SEEDS):
        data, media = compress(rng.choice(BASES), rng.choice(["gzip", "zstd"]))
        buf = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        if rng.random() < 0.2:
            buf += rng.randbytes(rng.randint(1, 100))       # trailing garbage
        harness([(bytes(buf), media)])


# --------------------------------------------------------------------------- regressions found here
# Each of these crashed (struct.error / OverflowError / MemoryError out of the builder), was
# accepted into a tree no Linux filesystem can hold, or read differently from Go's archive/tar.

def _b256(value: int, width: int) -> bytes:
    b = bytearray(value.to_bytes(width, "big", signed=True))
    b[0] |= 0x80
    return bytes(b)


def _raise_from(harness, tar: bytes) -> None:
    with tempfile.TemporaryDirectory() as work:      # was mkdtemp(): one dir left in /tmp per case
        builder = Builder(BuildOptions(chunk_size=0x1000, compressor="none", workers=1,
                                       max_layer_size=MAX_LAYER), Path(work))
        stream = open_layer_stream(io.BytesIO(tar), mt.OCI_LAYER_TAR, WHAT, max_uncompressed=MAX_LAYER)
        builder.add_layer(tarlayer.iter_entries(stream, WHAT, max_size=MAX_LAYER), 0, "sha256:x", WHAT)
        builder.finish()


@pytest.mark.parametrize("tar, fragment", [
    (header(b"f", patch={108: _b256(2**60, 8)}) + END, "uid/gid .* out of range"),
    (pax([(b"uid", b"%d" % 2**32)]) + header(b"f") + END, "uid/gid .* out of range"),
    (pax([(b"gid", b"4294967295")]) + header(b"f") + END, "uid/gid .* out of range"),
    (pax([(b"uid", b"9" * 30)]) + header(b"f") + END, "bad PAX uid"),
    (header(b"f", patch={136: _b256(2**90, 12)}) + END, "numeric field out of range"),
    (header(b"f", patch={136: _b256(-2**90, 12)}) + END, "numeric field out of range"),
    (pax([(b"mtime", b"9" * 30)]) + header(b"f") + END, "PAX time out of range"),
    (pax([(b"mtime", b"%d" % 2**63)]) + header(b"f") + END, "PAX time out of range"),
    (pax([(b"size", b"9" * 39)]) + header(b"f") + END, "bad PAX size"),
    (header(b"d", type=b"3", patch={329: _b256(2**50, 8)}) + END, "device number .* out of range"),
    (header(b"d", type=b"4", devmajor=4096) + END, "device number 4096:0 out of range"),
    (header(b"d", type=b"3", devminor=2**20) + END, "device number 0:1048576 out of range"),
    (pax([(b"GNU.sparse.map", b"0,5"), (b"GNU.sparse.size", b"9" * 39)]) + member(b"f", b"x" * 5) + END,
     "bad PAX GNU.sparse.size"),
    (pax([(b"GNU.sparse.map", b"0,5"), (b"GNU.sparse.size", b"%d" % 2**62)]) + member(b"f", b"x" * 5) + END,
     "layer size limit; with sparse files expanded"),
    (pax([(b"SCHILY.xattr.user.a\0b", b"v")]) + header(b"f") + END, "NUL in the keyword"),
    (pax([(b"SCHILY.xattr.user." + b"n" * 300, b"v")]) + header(b"f") + END, "Linux limits"),
    (pax([(b"SCHILY.xattr.user.a", b"v" * 70000)]) + header(b"f") + END, "Linux limits"),
    (pax([(b"SCHILY.xattr.user.a", b"v")]) + header(b"s", type=b"2", linkname=b"t") + END,
     r"user.\* xattr on a symlink"),
    (pax([(b"SCHILY.xattr.user.a", b"v")]) + header(b"p", type=b"6") + END, r"user.\* xattr on a fifo"),
    (pax([(b"path", b"n" * 256)]) + header(b"f") + END, "name component longer than 255"),
    (pax([(b"linkpath", b"t" * 4096)]) + header(b"s", type=b"2") + END, "target longer than 4095"),
])
def test_regression_out_of_range_values_are_layer_errors(harness, tar, fragment):
    assert harness(tar) == "LayerError"
    with pytest.raises(NydusError, match=fragment):
        _raise_from(harness, tar)


def _entries(tar: bytes):
    return list(tarlayer.iter_entries(io.BytesIO(tar), WHAT))


def test_regression_gnu_long_name_wins_over_pax_path_as_in_go():
    long = header(b"././@LongLink", type=b"L", size=7, magic=b"ustar  \0") + b"gnu-nm\0".ljust(BLOCK, b"\0")
    link = header(b"././@LongLink", type=b"K", size=7, magic=b"ustar  \0") + b"gnu-lk\0".ljust(BLOCK, b"\0")
    [e] = _entries(pax([(b"path", b"pax-nm"), (b"linkpath", b"pax-lk")]) + long + link
                   + header(b"hdr", type=b"2", linkname=b"hdr-lk") + END)
    assert (e.path, e.linkname) == ((b"gnu-nm",), b"gnu-lk")
    empty = header(b"././@LongLink", type=b"L", size=1, magic=b"ustar  \0") + bytes(BLOCK)
    [e] = _entries(pax([(b"path", b"pax-nm")]) + empty + header(b"hdr") + END)
    assert e.path == (b"pax-nm",)        # an empty long name overrides nothing


def test_regression_second_pax_header_replaces_the_first_as_in_go():
    [e] = _entries(pax([(b"path", b"first"), (b"uid", b"5")]) + pax([(b"mtime", b"7")]) + header(b"hdr") + END)
    assert (e.path, e.uid, e.mtime_ns) == ((b"hdr",), 0, 7 * 10**9)


def test_regression_xattrs_outside_linux_namespaces_are_dropped():
    [e] = _entries(pax([(b"SCHILY.xattr.foo", b"1"), (b"SCHILY.xattr.user.ok", b"2"),
                        (b"SCHILY.xattr.os2.x", b"3")]) + header(b"f") + END)
    assert e.xattrs == {b"user.ok": b"2"}


def test_regression_whiteout_is_its_name_whatever_its_type():
    """A `.wh.` entry typed as a hardlink/symlink with a bad target is still just a whiteout
    (umoci looks at the name only); we used to validate the target and fail."""
    es = _entries(header(b"d/.wh.x", type=b"1", linkname=b"../../../etc") + header(b".wh.y", type=b"2")
                  + header(b"d/.wh..wh..opq", type=b"5") + END)
    assert [(e.kind.value, e.path) for e in es] == [("whiteout", (b"d", b"x")), ("whiteout", (b"y",)),
                                                    ("opaque", (b"d",))]


def test_regression_sparse_holes_count_against_the_layer_limit():
    """A 4 TiB sparse file stored in 5 bytes: the decompressed-size limit never saw it and the
    builder tried to allocate its chunk list."""
    tar = pax([(b"GNU.sparse.map", b"0,5"), (b"GNU.sparse.size", b"%d" % (4 << 40))]) + member(b"f", b"x" * 5) + END
    with pytest.raises(NydusError, match="layer size limit"):
        _entries(tar)
    [e] = list(tarlayer.iter_entries(io.BytesIO(tar), WHAT, max_size=8 << 40))
    assert e.size == 4 << 40
