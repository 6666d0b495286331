"""Bootstrap fuzzing: case generation, the per-case check, and the worker process that runs
cases under hard caps. Driven by tests/format/test_bootstrap_fuzz.py (and, for real FUSE
mounts of accepted mutations, tests/e2e/test_hostile_bootstrap.py).

A case is a family name and a seed; `case(family, seed)` gives the same bytes every time, so a
failure is reproduced with `python -m tests.format.bootstrap_fuzz FAMILY SEED 1 DIR`.
Families:
  bytes      byte-level mutations of the real (rich) bootstrap: flips, runs of 0x00/0xff,
             truncation, insertion, spliced ranges (header and columns alike)
  fields     msgpack-structure mutations: a record field of a column set to an edge value
             (0, 1, n-1, n, n+1, 2^31, 2^32-1, random), header fields and blob fields given
             edge values or wrong types, keys dropped, columns truncated or duplicated
  zstd       the zstd layer form of `fields` cases, and byte flips of a zstd layer
  structure  hand-made hostile shapes: directory cycles, a directory as its own child,
             names with '/', NUL, '.', '..' or empty, huge/negative counts, offsets out of
             range, a prefetch list of GiBs, bad chunk sizes (seed picks the shape)
  cdc        the rich bootstrap as format v3 (variable-size chunks, `chunk_offsets`): field
             mutations (the offsets column included) and hostile v3 shapes: chunk offsets with
             gaps, overlaps, a non-zero first offset, sizes not adding up to the file size,
             zero-size or > MAX_CHUNK_SIZE chunks, refs not tiling chunk_refs, 16M offsets
The check (`exercise`): the bootstrap is either refused with a one-line FormatError, or it
loads, and then every inode is looked at through Vfs (getattr, readdir + lookup of every
name, readlink, xattrs, path_of), prefetch is planned with prefetch_all, and files are read
through the real FileReader over the real blob: every read returns bytes that hash to the
chunks the bootstrap names, or fails with FsError(EIO). Anything else fails the case.

The worker (`main`) runs cases in one process under RLIMIT_AS, with a SIGALRM deadline and a
tracemalloc peak bound per case; it prints one line per case (`OK family seed outcome`) and
exits non-zero with the case named on the first failure.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import random
import resource
import signal
import stat
import struct
import sys
import tracemalloc
from pathlib import Path

import msgpack
import trio

from nydus_py.errors import FormatError
from nydus_py.format.bootstrap import (
    CHUNK,
    DIRENT,
    INODE,
    ROOT_INO,
    XATTR,
    Bootstrap,
    compress_layer,
)
from nydus_py.fs.vfs import FsError, Vfs
from nydus_py.io import prefetch as pf

FAMILIES = ("bytes", "fields", "zstd", "structure", "cdc")
DEADLINE_S = 10              # per case; a hang fails the case
AS_LIMIT = 3 << 30           # the worker's address space (imports + trio threads + cases)
MAX_READ_FILES = 24          # files read per accepted case (plus the biggest)
EDGES = (0, 1, 2, 255, 4095, 4096, 65535, 1 << 20, (1 << 31) - 1, 1 << 31, (1 << 32) - 1)
COLUMNS = {"inodes": INODE, "dirents": DIRENT, "chunks": CHUNK, "xattrs": XATTR,
           "chunk_refs": struct.Struct("<I"), "prefetch": struct.Struct("<I")}
COLUMNS_V3 = {**COLUMNS, "chunk_offsets": struct.Struct("<Q")}
_ORIGINAL: bytes | None = None


class Hang(BaseException):
    pass


def original() -> bytes:
    global _ORIGINAL
    if _ORIGINAL is None:
        from tests.fixtures.rich_image import build_rich
        r = build_rich()
        doc = msgpack.unpackb(r.bootstrap, raw=False)
        bs = Bootstrap.from_bytes(r.bootstrap)
        doc["prefetch"] = b"".join(ino.to_bytes(4, "little") for _, ino in list(bs.iter_paths())[:20])
        _ORIGINAL = msgpack.packb(doc, use_bin_type=True)
    return _ORIGINAL


def rich_blob() -> tuple[str, bytes]:
    from tests.fixtures.rich_image import build_rich
    r = build_rich()
    return r.blob_id, r.blob


# -- case generation ------------------------------------------------------------------------
def case(family: str, seed: int) -> bytes:
    rnd = random.Random(f"{family}:{seed}")
    base = original()
    if family == "bytes":
        return _mutate_bytes(base, rnd)
    if family == "fields":
        return msgpack.packb(_mutate_doc(msgpack.unpackb(base, raw=False), rnd), use_bin_type=True)
    if family == "zstd":
        if rnd.random() < 0.5:
            doc = _mutate_doc(msgpack.unpackb(base, raw=False), rnd)
            return compress_layer(msgpack.packb(doc, use_bin_type=True))
        return _mutate_bytes(compress_layer(base), rnd)
    if family == "structure":
        return msgpack.packb(_structure(msgpack.unpackb(base, raw=False), seed, rnd),
                             use_bin_type=True)
    if family == "cdc":
        doc = as_v3(msgpack.unpackb(base, raw=False))
        doc = _mutate_doc(doc, rnd, COLUMNS_V3) if seed % 2 else _structure_v3(doc, seed // 2, rnd)
        return msgpack.packb(doc, use_bin_type=True)
    raise ValueError(family)


def as_v3(doc: dict) -> dict:
    """The same image as format v3: each file's chunk offsets are k * chunk_size (a fixed-size
    layout is a valid variable one), so the real rich blob still serves it."""
    bs = Bootstrap(doc)
    offs = bytearray(len(doc["chunk_refs"]) * 2)
    for ino in range(1, bs.inode_count + 1):
        raw = bs._raw(ino)
        if stat.S_ISREG(raw[0]):
            for k in range(raw[10]):
                struct.pack_into("<Q", offs, (raw[9] + k) * 8, k * bs.chunk_size)
    return dict(doc, version=3, chunk_offsets=bytes(offs))


def _structure_v3(doc: dict, shape: int, rnd: random.Random) -> dict:
    bs = Bootstrap(doc)
    files = [i for i in range(1, bs.inode_count + 1)
             if stat.S_ISREG(bs._raw(i)[0]) and bs._raw(i)[10] > 1]
    ino = rnd.choice(files)
    start, count = bs._raw(ino)[9], bs._raw(ino)[10]
    k = rnd.randrange(count)
    offs = bytearray(doc["chunk_offsets"])
    (cur,) = struct.unpack_from("<Q", offs, (start + k) * 8)
    shape %= 7
    if shape == 0:                                      # a gap or an overlap
        struct.pack_into("<Q", offs, (start + k) * 8, max(cur + rnd.choice((-1, 1, 4096, -4096)), 0))
    elif shape == 1:                                    # the first chunk not at 0
        struct.pack_into("<Q", offs, start * 8, rnd.choice((1, 4096, (1 << 64) - 1)))
    elif shape == 2:                                    # sizes not adding up to the file size
        _set(doc, "inodes", ino - 1, 4, bs._raw(ino)[4] + rnd.choice((1, -1, 4096)))
    elif shape == 3:                                    # a zero-size or a huge chunk
        cid = bs.file_chunk_ids(ino)[k]
        _set(doc, "chunks", cid, 4, rnd.choice((0, (1 << 24) + 1, (1 << 32) - 1)))
    elif shape == 4:                                    # refs not tiling chunk_refs
        _set(doc, "inodes", ino - 1, 9, start + rnd.choice((1, -1, 1 << 20)))
    elif shape == 5:                                    # every offset of a file the same
        for j in range(count):
            struct.pack_into("<Q", offs, (start + j) * 8, 0)
    else:                                               # 16M chunk offsets for 16M refs
        doc["chunk_refs"] = struct.pack("<I", 0) * (16 << 20)
        offs = bytearray(struct.pack("<Q", 0) * (16 << 20))
    doc["chunk_offsets"] = bytes(offs)
    return doc


def _mutate_bytes(data: bytes, rnd: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rnd.choice((1, 1, 2, 4, 16))):
        kind = rnd.randrange(6)
        i = rnd.randrange(len(b)) if b else 0
        if kind == 0 and b:
            b[i] ^= 1 << rnd.randrange(8)
        elif kind == 1 and b:
            b[i] = rnd.randrange(256)
        elif kind == 2:
            b[i:i + rnd.randrange(1, 16)] = bytes([rnd.choice((0, 0xFF))]) * rnd.randrange(1, 16)
        elif kind == 3:
            del b[rnd.randrange(len(b) + 1):]
        elif kind == 4:
            b[i:i] = rnd.randbytes(rnd.randrange(1, 9))
        elif kind == 5 and len(b) > 2:
            j = rnd.randrange(len(b))
            b[i:i + 8] = b[j:j + 8]
    return bytes(b)


def _edge(rnd: random.Random, n: int) -> int:
    return rnd.choice((*EDGES, n - 1, n, n + 1, rnd.randrange(1 << 32)))


def _mutate_doc(doc: dict, rnd: random.Random, columns: dict = COLUMNS) -> dict:
    for _ in range(rnd.choice((1, 1, 1, 2, 3))):
        kind = rnd.randrange(10)
        if kind < 5:                                    # a field of a column record
            key = rnd.choice(list(columns))
            rec = columns[key]
            col = bytearray(doc[key])
            n = len(col) // rec.size
            if not n:
                continue
            i = rnd.randrange(n)
            vals = list(rec.unpack_from(col, i * rec.size))
            f = rnd.randrange(len(vals))
            fmt = rec.format[1 + f] if rec.format[0] in "<>=!@" else rec.format[f]
            bits = {"I": 32, "Q": 64, "q": 63}[fmt]
            v = _edge(rnd, n) if rnd.random() < 0.8 else rnd.randrange(1 << bits)
            vals[f] = v % (1 << bits) if fmt != "q" else v
            rec.pack_into(col, i * rec.size, *vals)
            doc[key] = bytes(col)
        elif kind == 5:                                 # a blob field
            if doc["blobs"]:
                b = rnd.choice(doc["blobs"])
                b[rnd.choice(list(b))] = rnd.choice((-1, 0, 1 << 32, 1 << 62, "x", None, [], b"\0",
                                                     _edge(rnd, 100)))
        elif kind == 6:                                 # a header field: edge value or type
            key = rnd.choice(("chunk_size", "version", "digester", "meta", "blobs", "magic"))
            doc[key] = rnd.choice((0, -1, 1 << 40, 3, 4096, "4096", None, [], {}, b"x", 1.5,
                                   True, [{}] * 3))
        elif kind == 7:                                 # a key dropped or retyped
            key = rnd.choice(list(doc))
            if rnd.random() < 0.5:
                del doc[key]
            else:
                doc[key] = rnd.choice((None, 0, "", [], {}, b""))
        elif kind == 8:                                 # a column truncated or doubled
            key = rnd.choice(list(COLUMNS))
            col = doc[key]
            doc[key] = col[:rnd.randrange(len(col) + 1)] if rnd.random() < 0.5 else col + col
        else:                                           # a string region rewritten
            s = bytearray(doc["strings"])
            if s:
                i = rnd.randrange(len(s))
                s[i:i + 2] = rnd.choice((b"/", b"\0", b".", b"..", b"", b"//"))
                doc["strings"] = bytes(s)
    return doc


def _set(doc: dict, key: str, index: int, field: int, value: int) -> None:
    rec = COLUMNS[key]
    if rec.format[1 + field].isupper():                # unsigned: -1 is the field's maximum
        value %= 1 << (8 * struct.calcsize("<" + rec.format[1 + field]))
    col = bytearray(doc[key])
    vals = list(rec.unpack_from(col, index * rec.size))
    vals[field] = value
    rec.pack_into(col, index * rec.size, *vals)
    doc[key] = bytes(col)


def _structure(doc: dict, seed: int, rnd: random.Random) -> dict:
    inodes = doc["inodes"]
    n = len(inodes) // INODE.size
    dirs = [i + 1 for i in range(n) if stat.S_ISDIR(INODE.unpack_from(inodes, i * INODE.size)[0])]
    nd = len(doc["dirents"]) // DIRENT.size
    shape = seed % 14
    j = rnd.randrange(nd)
    if shape == 0:                                      # a dirent pointing back at the root
        _set(doc, "dirents", j, 2, ROOT_INO)
    elif shape == 1:                                    # a directory as its own child
        d = rnd.choice(dirs[1:])
        start = INODE.unpack_from(inodes, (d - 1) * INODE.size)[9]
        _set(doc, "dirents", start, 2, d)
    elif shape == 2:                                    # a cycle: a child dir lists its parent
        d = rnd.choice(dirs[1:])
        start = INODE.unpack_from(inodes, (d - 1) * INODE.size)[9]
        _set(doc, "dirents", start, 2, rnd.choice(dirs))
    elif shape == 3:                                    # parent pointers in a cycle
        a, b = rnd.sample(dirs[1:], 2)
        _set(doc, "inodes", a - 1, 8, b)
        _set(doc, "inodes", b - 1, 8, a)
    elif shape in (4, 5, 6, 7, 8):                      # a name with / NUL . .. or empty
        name = (b"a/b", b"x\0", b".", b"..", b"")[shape - 4]
        doc["strings"] = doc["strings"] + name
        _set(doc, "dirents", j, 0, len(doc["strings"]) - len(name))
        _set(doc, "dirents", j, 1, len(name))
    elif shape == 9:                                    # huge / negative counts
        b = doc["blobs"][0]
        b[rnd.choice(("chunk_count", "chunk_start", "compressed_size", "uncompressed_size"))] = \
            rnd.choice((-1, -(1 << 40), (1 << 32) - 1, 1 << 63))
    elif shape == 10:                                   # offsets out of range
        key, field = rnd.choice((("dirents", 0), ("inodes", 9), ("xattrs", 2), ("chunks", 1),
                                 ("chunks", 3), ("chunk_refs", 0)))
        rec = COLUMNS[key]
        if len(doc[key]) >= rec.size:
            _set(doc, key, rnd.randrange(len(doc[key]) // rec.size), field,
                 rnd.choice(((1 << 32) - 1, 1 << 31, 1 << 20)))
    elif shape == 11:                                   # a prefetch list of 64 MiB
        doc["prefetch"] = struct.pack("<I", 2) * (16 << 20)
    elif shape == 12:                                   # chunk sizes beyond chunk_size
        c = rnd.randrange(len(doc["chunks"]) // CHUNK.size)
        _set(doc, "chunks", c, rnd.choice((2, 4)), rnd.choice((1 << 30, (1 << 32) - 1, 0)))
    else:                                               # a directory listed twice
        d = rnd.choice(dirs[1:])
        _set(doc, "dirents", j, 2, d)
    return doc


# -- the check ------------------------------------------------------------------------------
class Env:
    """A real FileReader over the real blob, reused across cases (its cache is per case)."""

    def __init__(self, work: Path):
        from nydus_py.storage.localfs import LocalFsBackend
        self.work = work
        blob_id, blob = rich_blob()
        blobs = work / "blobs"
        blobs.mkdir(parents=True, exist_ok=True)
        (blobs / blob_id.split(":", 1)[1]).write_bytes(blob)
        self.backend = LocalFsBackend(str(blobs))
        self.n = 0

    def reader(self, bs: Bootstrap):
        from nydus_py.cache.chunk_cache import ChunkCache
        from nydus_py.io.reader import FileReader
        self.n += 1
        cache_dir = self.work / f"cache{self.n}"
        cache = ChunkCache(str(cache_dir))
        return FileReader(bs, self.backend, cache, limiter=trio.CapacityLimiter(2)), cache, cache_dir


def exercise(data: bytes, env: Env) -> str:
    """'refused', or 'ok <eio count>' after checking everything (module docstring)."""
    try:
        bs = Bootstrap.from_bytes(data)
    except FormatError as e:
        line = str(e)
        assert line.strip() and "\n" not in line, f"not one line: {line!r}"
        return "refused"
    reader, cache, cache_dir = env.reader(bs)
    vfs = Vfs(bs, reader)
    eio = 0
    try:
        n = bs.inode_count
        assert sum(1 for _ in bs.iter_paths()) <= len(bs._dirents) // DIRENT.size + 1
        for ino in range(1, n + 1):
            try:
                st = vfs.getattr(ino)
                assert -(1 << 63) <= st.mtime_ns < 1 << 63 and 0 <= st.size < 1 << 63
                if stat.S_ISDIR(st.mode):
                    for e in vfs.readdir(ino):
                        if e.name not in (b".", b".."):
                            try:        # an unsorted directory may not find it: ENOENT
                                vfs.lookup(ino, e.name)
                            except FsError as le:
                                assert le.errno in (errno.ENOENT, errno.ENAMETOOLONG), le
                elif stat.S_ISLNK(st.mode):
                    vfs.readlink(ino)
                try:
                    vfs.listxattr(ino)
                except FsError as e:
                    if e.errno != errno.ENOSYS:
                        raise
                assert isinstance(bs.path_of(ino), str)
            except FsError as e:
                assert e.errno in (errno.EIO, errno.ENOENT, errno.ENOTDIR), e
                eio += 1
        plan = pf.plan(bs, paths=["/", "/many", "/etc/hostname"], prefetch_all=True)
        assert len(plan.chunks) <= bs.chunk_count
        files = [i for i in range(1, n + 1) if stat.S_ISREG(bs.attr(i).mode)]
        files = files[:MAX_READ_FILES] + sorted(files, key=lambda i: -bs.attr(i).size)[:1]
        eio += trio.run(_read_all, vfs, bs, files)
    finally:
        cache.close()
        for p in sorted(cache_dir.glob("*")):
            p.unlink()
        cache_dir.rmdir()
    return f"ok {eio}"


async def _read_all(vfs: Vfs, bs: Bootstrap, files: list[int]) -> int:
    eio = 0
    for ino in files:
        size = bs.attr(ino).size
        spans = [(0, min(size, 1 << 20))] + ([(size - 4096, 4096)] if size > 1 << 20 else [])
        for off, length in spans:
            try:
                data = await vfs.read(ino, off, length)
            except FsError as e:
                assert e.errno == errno.EIO, e
                eio += 1
                continue
            _verify(bs, ino, off, data, min(length, size - off))
    return eio


def _verify(bs: Bootstrap, ino: int, off: int, data: bytes, want: int) -> None:
    """Bytes returned for a read are exactly the chunks the bootstrap names for the file."""
    assert len(data) == want, (ino, off, len(data), want)
    cs, ids, offs = bs.chunk_size, bs.file_chunk_ids(ino), bs.file_chunk_offsets(ino)
    k0 = bs.chunk_index(ino, off) if data else 0
    for k in range(k0, bs.chunk_index(ino, off + len(data) - 1) + 1 if data else k0):
        c = bs.chunk(ids[k])
        base = k * cs if offs is None else offs[k]
        lo, hi = max(base, off), min(base + c.size, off + len(data))
        if lo == base and hi - lo == c.size:
            assert hashlib.sha256(data[lo - off:hi - off]).digest() == c.digest, (ino, k)


# -- the worker -----------------------------------------------------------------------------
def _alarm(signum, frame):
    raise Hang(f"no result within {DEADLINE_S} s")


def main(argv: list[str]) -> int:
    family, start, count, work = argv[0], int(argv[1]), int(argv[2]), Path(argv[3])
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))
    logging.disable(logging.CRITICAL)       # the expected EIO lines would drown the report
    signal.signal(signal.SIGALRM, _alarm)
    env = Env(work)
    original()
    for seed in range(start, start + count):
        data = case(family, seed)
        tracemalloc.start()
        signal.alarm(DEADLINE_S)
        try:
            outcome = exercise(data, env)
            peak = tracemalloc.get_traced_memory()[1]
        except BaseException as e:     # noqa: BLE001  (any other outcome fails the case)
            signal.alarm(0)
            import traceback
            traceback.print_exc()
            print(f"FAIL {family} {seed}: {type(e).__name__}: {e}", flush=True)
            return 1
        finally:
            signal.alarm(0)
            tracemalloc.stop()
        bound = 32 * len(data) + (64 << 20)     # memory stays O(bootstrap size)
        if peak > bound:
            print(f"FAIL {family} {seed}: peak {peak} bytes > {bound}", flush=True)
            return 1
        changed = "same" if data == original() else "changed"
        print(f"OK {family} {seed} {outcome} {changed}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
