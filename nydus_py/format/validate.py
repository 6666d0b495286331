"""Load-time checks of a bootstrap's columns (the header fields are checked in bootstrap.py).

Runs once per mount, before the mount, so it must cost little for 100k files: it works on
whole columns with C-speed bytes operations (strided slices, translate, count, compare) and
touches Python objects only per directory, per distinct name and per chunk, never per inode.
Only the error path, which names the first bad record, loops in Python.

Checked here, at load (a violation refuses the bootstrap with one line naming the record):
  - every inode's type is valid, st_mode fits 16 bits, st_size fits a signed 64-bit value and
    mtime in nanoseconds fits a signed 64-bit value; the root is a directory;
  - chunks: the `blob` column partitions the table exactly as the blobs' chunk_start /
    chunk_count say, flags are known, compressed sizes are at most MAX_CHUNK_SIZE, and a blob's
    chunks lie back to back in order inside its uncompressed size (they are placed in the
    blob's cache file at those offsets);
  - the tree: directories' dirent ranges tile the dirent table without overlap; every dirent
    names an inode that exists, with a name of 1..MAX_NAME_LEN bytes, inside `strings`, without
    '/' or NUL and not '.' or '..'; every directory is listed by exactly one dirent, whose
    directory is its `parent`; the root is nobody's child and no other directory is its own
    parent. A walk from the root then reaches each directory once (two paths to a directory
    would need two dirents naming it), so cycles and shared subtrees are impossible; files
    may be listed many times (hardlinks);
  - the prefetch list: at most one entry per inode (each entry is checked where it is used);
  - v3 (variable-size chunks, `check_variable`): every chunk's size is 1..MAX_CHUNK_SIZE; the
    regular files' chunk-ref ranges tile `chunk_refs` in inode order; every ref names a chunk;
    each file's `chunk_offsets` start at 0 and each is the previous plus that chunk's size,
    the last chunk ending exactly at the file's size (no gap, overlap or empty chunk). One
    pass per column at C speed (map/compress/accumulate/array compare), no per-file bytecode.
Checked in O(1) where a record is used (bootstrap.py; a violation is EIO for that file):
chunk sizes and offsets against chunk_size and the blob's sizes, chunk ids, a file's chunk
refs against its size, symlink and xattr ranges and lengths.
"""

from __future__ import annotations

import operator
import re
import stat
import sys
from array import array
from collections import deque
from collections.abc import Iterable, Sequence
from itertools import accumulate, compress, islice, repeat

from nydus_py.errors import FormatError
from nydus_py.format import limits as L

INODE_SIZE, DIRENT_SIZE, CHUNK_REC, XATTR_SIZE = 68, 12, 32, 16

# mode byte 1 (bits 8..15) → file type class: d(ir) r(egular) l(ink) o(ther) x (invalid)
_TYPES = bytearray(b"x" * 256)
for _t, _c in ((stat.S_IFDIR, b"d"), (stat.S_IFREG, b"r"), (stat.S_IFLNK, b"l"),
               (stat.S_IFCHR, b"o"), (stat.S_IFBLK, b"o"), (stat.S_IFIFO, b"o"),
               (stat.S_IFSOCK, b"o")):
    for _low in range(16):
        _TYPES[(_t >> 8) | _low] = _c[0]
_TYPES_TABLE = bytes(_TYPES)
_DIR = re.compile(b"d")
_REGULAR = bytes(1 if c == ord("r") else 0 for c in range(256))    # type class → is regular
_HIGH_BIT = re.compile(b"[\x80-\xff]")
_NSEC_TOP = re.compile(b"[\x3b-\xff]")
NAMES_AT_ONCE = 1 << 18     # dirents whose names _check_names dedups and checks together


def _col(mv: memoryview, stride: int, field: int) -> array:
    """Field `field` (in u32 units) of every record of a u32-strided column, as an array."""
    a = array("I")
    if len(mv):
        a.frombytes(mv.cast("I")[field::stride].tobytes())
    if sys.byteorder != "little":
        a.byteswap()
    return a


def _col64(mv: memoryview, rec: int, byte_off: int, n: int) -> array:
    """A u64 field at `byte_off` of `n` records of `rec` bytes (rec a multiple of 8)."""
    a = array("Q")
    if n:
        a.frombytes(mv[byte_off:byte_off + rec * (n - 1) + 8].cast("Q")[::rec // 8].tobytes())
    if sys.byteorder != "little":
        a.byteswap()
    return a


class Raw:
    """A column's bytes for strided byte slices (`every`) at C speed, without copying the
    column when it lies inside a bytes object we hold: the decompressed document that
    bootstrap.from_bytes parsed (docparse gives each column's offset in it). Slices of a
    memoryview would be ~9x slower, and copying the columns cost ~9 ms and ~12 MB of fresh
    pages per 100k-entry mount."""

    __slots__ = ("buf", "base", "end")

    def __init__(self, mv: memoryview, at: tuple[bytes, int] | None = None):
        if at is None:
            self.buf, self.base = mv.tobytes(), 0
        else:
            self.buf, self.base = at
        self.end = self.base + len(mv)

    def every(self, byte_off: int, rec: int) -> bytes:
        """Byte `byte_off` of every `rec`-byte record: the column's bytes[byte_off::rec]."""
        return self.buf[self.base + byte_off:self.end:rec]


def _zero(raw: Raw, rec: int, byte_off: int, width: int) -> bool:
    """Whether the `width` bytes at `byte_off` of every record of `raw` are zero."""
    n = (raw.end - raw.base) // rec
    return all(raw.every(byte_off + k, rec).count(0) == n for k in range(width))


def _at(source: tuple[bytes, dict[str, int]] | None, key: str) -> tuple[bytes, int] | None:
    if source is None or key not in source[1]:
        return None
    return source[0], source[1][key]


def _first(values: Iterable) -> int:
    return next(i for i, bad in enumerate(values) if bad)


def _fail(msg: str) -> FormatError:
    return FormatError(f"bootstrap: {msg}")


def check(*, blobs: Sequence, inodes: memoryview, dirents: memoryview, chunks: memoryview,
          digests: memoryview, strings: memoryview, prefetch: memoryview, max_flags: int = 1,
          source: tuple[bytes, dict[str, int]] | None = None) -> None:
    """`max_flags`: the highest CHUNK flags value the bootstrap's version knows (v2: 3, batch).
    `source`: the document's bytes and the offset in them of each column, by document key
    (the columns are views of it; see Raw)."""
    n_chunks = len(chunks) // CHUNK_REC
    _check_chunks(blobs, chunks, n_chunks, max_flags, _at(source, "chunks"))
    if len(digests) != n_chunks * 32:
        raise _fail(f"digests: {len(digests)} bytes for {n_chunks} chunks (32 each)")
    types, parents = _check_inodes(inodes, _at(source, "inodes"))
    _check_tree(types, parents, inodes, dirents, strings, _at(source, "dirents"))
    n = len(types)
    if len(prefetch) // 4 > n:
        raise _fail(f"prefetch: {len(prefetch) // 4} entries for {n} inodes")
    # Each entry's range is checked where it is used (prefetch.plan skips and counts an entry
    # that names no inode): a pass over a list of 100k entries here would cost more than
    # the whole tree check.


def _check_chunks(blobs: Sequence, mv: memoryview, n: int, max_flags: int = 1,
                  at: tuple[bytes, int] | None = None) -> None:
    total = 0
    for i, b in enumerate(blobs):
        if b.chunk_start != total:
            raise _fail(f"blobs[{i}].chunk_start: {b.chunk_start}, expected {total} "
                        "(a blob's chunks follow the previous blob's)")
        total += b.chunk_count
    if total != n:
        raise _fail(f"blobs: chunk_count adds up to {total}, but the chunk table has {n} records")
    if not n:
        return
    raw = Raw(mv, at)
    for k in range(4):      # the blob column, byte by byte, against the blobs' ranges
        want = b"".join(bytes([(i >> 8 * k) & 0xff]) * b.chunk_count for i, b in enumerate(blobs))
        got = raw.every(k, CHUNK_REC)
        if got != want:
            i = _first(map(operator.ne, got, want))
            raise _fail(f"chunk {i}: blob index {_col(mv, 8, 0)[i]} is not the blob whose "
                        "chunk range holds it")
    if not _zero(raw, CHUNK_REC, 15, 1):        # comp_size's top byte: < 16 MiB needs no pass
        csize = _col(mv, 8, 3)
        if max(csize) > L.MAX_CHUNK_SIZE:
            i = csize.index(max(csize))
            raise _fail(f"chunk {i}: compressed size {csize[i]} exceeds {L.MAX_CHUNK_SIZE}")
    known = bytes(range(max_flags + 1))     # what is left after deleting these is unknown
    if not _zero(raw, CHUNK_REC, 29, 3) or raw.every(28, CHUNK_REC).translate(None, known):
        flags = _col(mv, 8, 7)
        i = _first(f > max_flags for f in flags)
        raise _fail(f"chunk {i}: unknown flags 0x{flags[i]:x}")
    # A blob's chunks lie back to back, in order, inside its uncompressed size: they are
    # written to the blob's cache file at these offsets (docs/format.md "Data blobs").
    off, size = _col64(mv, CHUNK_REC, 16, n), _col(mv, 8, 6)
    for bi, b in enumerate(blobs):
        s, e = b.chunk_start, b.chunk_start + b.chunk_count
        if s == e:
            continue
        if off[e - 1] + size[e - 1] > b.uncompressed_size:
            raise _fail(f"chunk {e - 1}: bytes {off[e - 1]}+{size[e - 1]} beyond blob {bi}'s "
                        f"uncompressed_size {b.uncompressed_size}")
        expect = array("Q", accumulate(size[s:e - 1], initial=off[s]))
        if expect != off[s:e]:
            i = s + _first(map(operator.ne, expect, off[s:e]))
            raise _fail(f"chunk {i}: uncompressed offset {off[i]}, expected {expect[i - s]} "
                        f"(a blob's chunks lie back to back in order)")


def _check_inodes(mv: memoryview, at: tuple[bytes, int] | None = None) -> tuple[bytes, array]:
    n = len(mv) // INODE_SIZE
    if n < 1:
        raise _fail("inodes: empty (no root directory)")
    raw = Raw(mv, at)
    if not _zero(raw, INODE_SIZE, 2, 2):
        i = _first(a or b for a, b in zip(raw.every(2, INODE_SIZE), raw.every(3, INODE_SIZE)))
        raise _fail(f"inode {i + 1}: mode 0x{_col(mv, 17, 0)[i]:x} is not a 16-bit st_mode")
    types = raw.every(1, INODE_SIZE).translate(_TYPES_TABLE)
    bad = types.find(b"x")
    if bad >= 0:
        raise _fail(f"inode {bad + 1}: mode 0o{_col(mv, 17, 0)[bad]:o} has no valid file type")
    if types[0] != ord("d"):
        raise _fail("inode 1 (the root) is not a directory")
    if _HIGH_BIT.search(raw.every(23, INODE_SIZE)):
        i = _first(b >= 0x80 for b in raw.every(23, INODE_SIZE))
        raise _fail(f"inode {i + 1}: size does not fit a signed 64-bit st_size")
    # Any i64 mtime_sec is valid: PAX times before 1678 and after 2262 are kept exactly
    # (converter/tar), and pyfuse3 takes st_mtime_ns as a Python int of any size.
    # 10^9 is 0x3b9aca00: a top byte below 0x3b settles it without a pass over 100k ints
    if _NSEC_TOP.search(raw.every(35, INODE_SIZE)):
        nsec = _col(mv, 17, 8)
        if max(nsec) >= 1_000_000_000:
            i = nsec.index(max(nsec))
            raise _fail(f"inode {i + 1}: mtime_nsec {nsec[i]} is not below 10^9")
    if not _zero(raw, INODE_SIZE, 52, 4):
        i = _first(_col(mv, 17, 13))
        raise _fail(f"inode {i + 1}: data_start does not fit 32 bits")
    return types, _col(mv, 17, 11)


def _check_tree(types: bytes, parents: array, inodes: memoryview, mv: memoryview,
                strings: memoryview, dirents_at: tuple[bytes, int] | None = None) -> None:
    # Per-directory values live in arrays (4 bytes each), not lists of ints (~40 each, more
    # with a sort): a hostile bootstrap of millions of directories cost ~340 bytes per
    # directory here, 4 GB for one at the size limit.
    n, d = len(types), len(mv) // DIRENT_SIZE
    start, count = _col(inodes, 17, 12), _col(inodes, 17, 14)
    at = array("I", (m.start() for m in _DIR.finditer(types)))     # O(directories), not O(inodes)
    # The directories' ranges tile [0, d) without overlap; owner[j] = the directory of dirent j
    # (0 until one claims it).
    owner = array("I", bytes(4 * d))
    for i in at:
        s, c = start[i], count[i]
        if not c:
            continue
        if s + c > d:
            raise _fail(f"inode {i + 1}: dirents {s}+{c} beyond the dirent table ({d})")
        if owner[s:s + c].count(0) != c:
            raise _fail(f"inode {i + 1}: dirents {s}+{c} overlap another directory's")
        owner[s:s + c] = array("I", [i + 1]) * c
    if d and owner.count(0):
        raise _fail(f"dirents: record {owner.index(0)} belongs to no directory")
    if parents[0] > 1:
        raise _fail(f"inode 1 (the root): parent {parents[0]}, expected 0 or 1")
    for i in islice(at, 1, None):
        if parents[i] == i + 1:
            raise _fail(f"inode {i + 1}: a directory that is its own parent")
    if not d:
        return
    raw = Raw(mv, dirents_at)
    ino = _col(mv, 3, 2)
    try:        # the type class of every child: 0 maps to b"x", > n raises
        child_types = bytes(map((b"x" + types).__getitem__, ino))
    except IndexError:
        child_types = b""
    if len(child_types) != d or b"x" in child_types:
        i = _first(not 1 <= x <= n for x in ino)
        raise _fail(f"dirent {i} (in directory {owner[i]}): inode {ino[i]} out of range (1..{n})")
    if not (_zero(raw, DIRENT_SIZE, 5, 3) and raw.every(4, DIRENT_SIZE).count(0) == 0):
        ln = _col(mv, 3, 1)
        i = _first(not 1 <= x <= L.MAX_NAME_LEN for x in ln)
        raise _fail(f"dirent {i} (in directory {owner[i]}): name of {ln[i]} bytes "
                    f"(1..{L.MAX_NAME_LEN})")
    _check_names(mv, owner, strings)
    # every directory listed once, by the directory its `parent` names; never the root
    where = array("I", (m.start() for m in _DIR.finditer(child_types)))
    kids = array("I", map(ino.__getitem__, where))
    if 1 in kids:
        i = ino.index(1)
        raise _fail(f"dirent {i} (in directory {owner[i]}): the root directory listed as a child")
    seen = bytearray(n + 1)         # one byte per inode, not a set of ints
    for c in kids:
        if seen[c]:
            raise _fail(f"inode {c}: a directory listed by more than one dirent")
        seen[c] = 1
    del seen
    listers = array("I", map(owner.__getitem__, where))
    got = array("I", map(parents.__getitem__, map(operator.sub, kids, repeat(1))))
    if got != listers:
        k = _first(map(operator.ne, got, listers))
        raise _fail(f"inode {kids[k]}: a directory with parent {got[k]} listed in "
                    f"directory {listers[k]}")


class _Pairs:
    """(offset, length) of each packed name_off | name_len << 32, iterable more than once
    without a list of tuples beside the set."""

    def __init__(self, packed: set[int]):
        self.packed = packed

    def __iter__(self):
        return ((p & 0xFFFFFFFF, p >> 32) for p in self.packed)


def _check_names(mv: memoryview, owner: array, strings: memoryview) -> None:
    """Each distinct (offset, length) once: inside `strings`, no '/' or NUL, not '.' or '..'.
    NAMES_AT_ONCE dirents at a time: the set of a slice's distinct names costs ~100 bytes a
    name, so a bootstrap of millions of distinct names is checked in bounded memory (a name
    repeated across slices is checked once per slice)."""
    d = len(mv) // DIRENT_SIZE
    column = strings.tobytes()      # names are sliced out of it, one copy either way
    for a in range(0, d, NAMES_AT_ONCE):
        b = min(d, a + NAMES_AT_ONCE)
        part = mv[a * DIRENT_SIZE:b * DIRENT_SIZE]
        items: Iterable[tuple[int, int]]
        if sys.byteorder == "little":
            # name_off | name_len << 32 as one u64 per dirent (even and odd records are
            # 8-aligned from offsets 0 and 12): a set of ints, no tuples
            distinct: set[int] = set()
            m = b - a
            for first, k in ((0, (m + 1) // 2), (DIRENT_SIZE, m // 2)):
                if k:
                    distinct.update(part[first:first + 24 * (k - 1) + 8].cast("Q")[::3])
            items = _Pairs(distinct)
        else:
            items = set(zip(_col(part, 3, 0), _col(part, 3, 1)))
        if _names_ok(items, column):
            continue
        for o, n in items:      # the error path (or overlapping names): which name, and why
            name = column[o:o + n]
            if len(name) != n or b"/" in name or b"\0" in name or name == b"." or name == b"..":
                off, ln = _col(mv, 3, 0), _col(mv, 3, 1)
                i = _first(x == o and y == n for x, y in zip(off, ln))
                what = "beyond strings" if len(name) != n else f"invalid name {name!r}"
                raise _fail(f"dirent {i} (in directory {owner[i]}): {what}")


def _names_ok(items: Iterable[tuple[int, int]], column: bytes) -> bool:
    """All names at once (a loop cost ~8 ms for the python image's 7k distinct names): joined
    with '/', they are as long as their lengths plus the separators exactly when none runs
    past the column (a slice there comes out short), and hold exactly those separators when
    none holds a '/'. Only when the names add up to at most the column's length, as a
    converter writes them (each distinct name stored once): names that overlap would make
    the join bigger than the bootstrap (a hostile one: millions of 255-byte names over the
    same bytes), and are left to the loop, which allocates nothing. False: look closer."""
    total = k = 0
    for _, n in items:
        total += n
        k += 1
    if not k or total > len(column):
        return not k
    names = [column[o:o + n] for o, n in items]
    joined = b"/".join(names)
    return len(joined) == total + k - 1 and joined.count(b"/") == k - 1 and b"\0" not in joined \
        and not names.count(b".") and not names.count(b"..")


def check_variable(*, inodes: memoryview, refs: memoryview, offsets: memoryview,
                   chunks: memoryview, source: tuple[bytes, dict[str, int]] | None = None) -> None:
    """v3 chunk layout (module docstring); runs after `check` (inode types are valid)."""
    n_refs, n_chunks = len(refs) // 4, len(chunks) // CHUNK_REC
    if len(offsets) != 8 * n_refs:
        raise _fail(f"chunk_offsets: {len(offsets)} bytes for {n_refs} chunk refs (8 each)")
    size = _col(chunks, 8, 6)
    if n_chunks and (min(size) == 0 or max(size) > L.MAX_CHUNK_SIZE):
        i = _first(not 0 < s <= L.MAX_CHUNK_SIZE for s in size)
        raise _fail(f"chunk {i}: size {size[i]} is not 1..{L.MAX_CHUNK_SIZE}")
    n = len(inodes) // INODE_SIZE
    reg = Raw(inodes, _at(source, "inodes")).every(1, INODE_SIZE).translate(_TYPES_TABLE).translate(_REGULAR)
    start = list(compress(_col(inodes, 17, 12), reg))
    count = list(compress(_col(inodes, 17, 14), reg))
    fsize = list(map(operator.or_, compress(_col(inodes, 17, 4), reg),
                     map(operator.lshift, compress(_col(inodes, 17, 5), reg), repeat(32))))

    def ino(k: int) -> int:         # the k-th regular inode (error messages only)
        return list(compress(range(1, n + 1), reg))[k]

    # the regular files' ranges tile chunk_refs in inode order
    if not count:
        if n_refs:
            raise _fail(f"chunk_refs: {n_refs} refs in an image without regular files")
        return
    ends = list(accumulate(count))
    if start != [0] + ends[:-1] or (ends[-1] if ends else 0) != n_refs:
        k = _first(map(operator.ne, start, [0] + ends[:-1])) \
            if start != [0] + ends[:-1] else len(start) - 1
        raise _fail(f"inode {ino(k)}: chunk refs {start[k]}+{count[k]} do not follow the previous "
                    f"file's (v3: regular files' refs tile chunk_refs in inode order, {n_refs} refs)")
    if any(compress(fsize, map(operator.not_, count))):
        k = _first(s and not c for s, c in zip(fsize, count))
        raise _fail(f"inode {ino(k)}: size {fsize[k]} with no chunks")
    if not n_refs:
        return
    ids = _col(refs, 1, 0)
    try:
        sz = array("Q", map(size.__getitem__, ids))
    except IndexError:
        j = _first(c >= n_chunks for c in ids)
        raise _fail(f"chunk ref {j}: chunk id {ids[j]} out of range ({n_chunks} chunks)") from None
    off = array("Q", offsets.tobytes())
    if sys.byteorder != "little":
        off.byteswap()
    try:
        nxt = array("Q", map(operator.add, off, sz))      # where each chunk ends in its file
    except OverflowError:
        j = _first(o + s >= 1 << 64 for o, s in zip(off, sz))
        raise _fail(f"chunk ref {j}: offset {off[j]} + size {sz[j]} overflows") from None
    # Inside a file each chunk starts where the previous one ended, and after a file's last
    # chunk comes the next file's first, at 0: so the offsets column, shifted by one, must
    # equal the chunk ends with a 0 put at each file's last chunk (one scatter per file, then
    # array equality at C speed; only an error names the first bad ref)
    last = [e - 1 for e in compress(ends, count)]
    expect = nxt[:]
    deque(map(expect.__setitem__, last, repeat(0)), maxlen=0)
    if off[0] != 0 or expect != off[1:] + array("Q", [0]):
        bad = 0 if off[0] else _first(map(operator.ne, expect, off[1:] + array("Q", [0])))
        at = 0 if off[0] else bad + 1
        raise _fail(f"chunk ref {at}: offset {off[at] if at < n_refs else 0} does not follow the chunk "
                    f"before it (v3: a file's chunks start at 0 and follow each other without gap or "
                    f"overlap)")
    want = list(compress(fsize, count))
    got = list(map(nxt.__getitem__, last))
    if got != want:
        k = _first(map(operator.ne, got, want))
        f = list(compress(range(len(count)), count))[k]
        raise _fail(f"inode {ino(f)}: chunks end at {got[k]}, size is {want[k]}")
