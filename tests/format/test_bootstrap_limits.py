"""A bootstrap is untrusted input (issue 9 section 2): every count, size and offset is checked
against the limits (format/limits.py) and the other columns, wrong types are one FormatError
line, memory stays about the bootstrap's size; walks and error paths stay finite and O(depth)
even over a bootstrap that skipped the load-time checks."""

from __future__ import annotations

import contextlib
import hashlib
import stat
import struct
import tracemalloc

import msgpack
import pytest
import zstandard

from nydus_py.errors import FormatError, IntegrityError
from nydus_py.format import compression
from nydus_py.format.bootstrap import (
    CHUNK,
    INODE,
    ROOT_INO,
    Bootstrap,
    BootstrapWriter,
    ChunkSpec,
    compress_layer,
)
from nydus_py.format.limits import MAX_CHUNK_SIZE
from nydus_py.io import prefetch as pf

DIR, REG = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o644


@contextlib.contextmanager
def _peak_memory():
    """Traces the block's allocations: the dict it gives has "peak" (bytes) once it ends."""
    mem: dict[str, int] = {}
    tracemalloc.start()
    try:
        yield mem
        mem["peak"] = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _writer(n_files: int = 2) -> tuple[BootstrapWriter, int, list[int]]:
    """root/ with dir a/ holding n_files one-chunk files; returns (writer, a, files)."""
    w = BootstrapWriter(chunk_size=4096)
    specs = [ChunkSpec(hashlib.sha256(b"%d" % i).digest(), i * 10, 10, i * 4096, 4096, True)
             for i in range(n_files)]
    w.add_blob(blob_id="sha256:" + "a" * 64, compressor="zstd", compressed_size=10 * n_files,
               uncompressed_size=4096 * n_files, chunks=specs)
    root = w.add_inode(mode=DIR, uid=0, gid=0, mtime_ns=0)
    a = w.add_inode(mode=DIR, uid=0, gid=0, mtime_ns=0)
    w.add_dirent(root, b"a", a)
    files = []
    for i in range(n_files):
        f = w.add_inode(mode=REG, uid=0, gid=0, mtime_ns=0, size=4096, chunk_ids=[i])
        w.add_dirent(a, b"f%05d" % i, f)
        files.append(f)
    return w, a, files


def _doc(w: BootstrapWriter) -> dict:
    return msgpack.unpackb(w.to_bytes(), raw=False)


def _refused(doc_or_bytes, match: str) -> str:
    data = doc_or_bytes if isinstance(doc_or_bytes, bytes) else msgpack.packb(doc_or_bytes, use_bin_type=True)
    with pytest.raises(FormatError, match=match) as e:
        Bootstrap.from_bytes(data)
    line = str(e.value)
    assert line.strip() and "\n" not in line
    if not isinstance(doc_or_bytes, bytes):
        # the checks slice the columns out of the document's bytes (validate.Raw); a document
        # given as a map (columns as bytes of their own) must get the same verdict
        with pytest.raises(FormatError, match=match):
            Bootstrap(doc_or_bytes)
    return line


def _patch(col: bytes, rec: struct.Struct, index: int, field: int, value: int) -> bytes:
    vals = list(rec.unpack_from(col, index * rec.size))
    vals[field] = value
    out = bytearray(col)
    rec.pack_into(out, index * rec.size, *vals)
    return bytes(out)


class Unchecked(Bootstrap):
    """A Bootstrap that skips the load-time column checks: what the walks must survive."""

    def _check(self, prefetch, source) -> None:
        pass


# -- cycles and tree shape ------------------------------------------------------------------
def test_directory_cycles_are_refused_at_load_with_one_line():
    w, a, _ = _writer()
    w.add_dirent(a, b"up", ROOT_INO)                    # a/up -> the root
    _refused(_doc(w), "root directory listed as a child")
    w, a, _ = _writer()
    w.add_dirent(a, b"self", a)                         # a directory as its own child
    _refused(_doc(w), "listed by more than one dirent")
    w, a, _ = _writer()
    b = w.add_inode(mode=DIR, uid=0, gid=0, mtime_ns=0)
    w.add_dirent(a, b"b", b)
    w.add_dirent(b, b"a", a)                            # a -> b -> a
    _refused(_doc(w), "listed by more than one dirent")


def test_a_directory_whose_parent_is_not_its_lister_or_itself_is_refused():
    w, a, _ = _writer()
    doc = _doc(w)
    doc["inodes"] = _patch(doc["inodes"], INODE, a - 1, 8, a)
    _refused(doc, "its own parent")
    doc = _doc(w)
    doc["inodes"] = _patch(doc["inodes"], INODE, a - 1, 8, 3)
    _refused(doc, "parent 3 listed in directory 1")


@pytest.mark.parametrize("name, match", [(b"a/b", "invalid name"), (b"x\0y", "invalid name"),
                                         (b".", "invalid name"), (b"..", "invalid name")])
def test_bad_names_are_refused(name, match):
    w, _a, _files = _writer()
    doc = _doc(w)
    doc["strings"] += name
    doc["dirents"] = _patch(doc["dirents"], struct.Struct("<III"), 1, 0, len(doc["strings"]) - len(name))
    doc["dirents"] = _patch(doc["dirents"], struct.Struct("<III"), 1, 1, len(name))
    _refused(doc, match)


def test_a_name_past_the_end_of_strings_is_refused_whatever_follows_the_column():
    """The checks read names out of the document's bytes: a name running past `strings` must
    not be read on into the next column (here `dirents`, whose bytes hold no '/' or NUL)."""
    w, _a, _files = _writer()
    doc = _doc(w)
    doc = {"strings": doc["strings"], **{k: v for k, v in doc.items() if k != "strings"}}
    n = len(doc["strings"])
    for off, ln in ((n - 1, 3), (n, 1), (n + 5, 2), (0xFFFFFFF0, 8)):
        bad = dict(doc)
        bad["dirents"] = _patch(doc["dirents"], struct.Struct("<III"), 1, 0, off)
        bad["dirents"] = _patch(bad["dirents"], struct.Struct("<III"), 1, 1, ln)
        _refused(bad, "beyond strings")


@pytest.mark.parametrize("bad", [None, 12345])
def test_overlapping_names_are_checked_without_joining_them(bad):
    """Names that overlap in `strings` (no converter writes them) add up to more than the
    column: joining them would allocate 255 bytes per dirent from a few bytes of bootstrap.
    They are checked one by one instead: the same verdicts, memory about the set of names."""
    n = 20000
    w, a, files = _writer(n)
    doc = _doc(w)
    dirents = bytearray(doc["dirents"])
    rec = struct.Struct("<III")
    first = len(doc["strings"])
    doc["strings"] += b"x" * (n + 255)
    for j in range(1, n + 1):            # dirent 0 is root/a; 1..n the files, all in a/
        _, _, ino = rec.unpack_from(dirents, j * 12)
        rec.pack_into(dirents, j * 12, first + j, 255, ino)
    if bad is not None:
        strings = bytearray(doc["strings"])
        strings[first + bad + 100] = ord("/")
        doc["strings"] = bytes(strings)
    doc["dirents"] = bytes(dirents)
    data = msgpack.packb(doc, use_bin_type=True)
    with _peak_memory() as mem:
        if bad is None:
            Bootstrap.from_bytes(data)
        else:
            with pytest.raises(FormatError, match="invalid name"):
                Bootstrap.from_bytes(data)
    assert mem["peak"] < len(data) + 255 * n // 2, mem["peak"]     # joined, the names alone were 2 x 255 x n


def test_a_million_directory_bootstrap_is_checked_in_memory_about_its_size(monkeypatch):
    """Per-directory values are arrays, names are deduplicated a slice at a time: a hostile
    bootstrap of many directories (the root listing 100k empty ones) is checked in ~2x its
    size (it was ~340 bytes per directory: lists of ints, a sort, one set of every name)."""
    from nydus_py.format import validate
    monkeypatch.setattr(validate, "NAMES_AT_ONCE", 4096)
    n = 100_000
    w = BootstrapWriter(chunk_size=4096)
    root = w.add_inode(mode=DIR, uid=0, gid=0, mtime_ns=0)
    for i in range(n):
        w.add_dirent(root, b"d%07d" % i, w.add_inode(mode=DIR, uid=0, gid=0, mtime_ns=0))
    data = w.to_bytes()
    with _peak_memory() as mem:
        b = Bootstrap.from_bytes(data)
    assert b.inode_count == n + 1 and b.lookup(ROOT_INO, b"d0099999") == n + 1
    assert mem["peak"] < 2 * len(data), (mem["peak"], len(data))


@pytest.mark.parametrize("bad_at", [5, 4099, 9000])
def test_names_checked_a_slice_at_a_time_still_find_the_bad_one(monkeypatch, bad_at):
    """Dirents whose names are checked in slices of NAMES_AT_ONCE: a bad name in any slice,
    the first, a middle or the last, is named with its dirent."""
    from nydus_py.format import validate
    monkeypatch.setattr(validate, "NAMES_AT_ONCE", 4096)
    n = 9001
    w, _a, files = _writer(n)
    doc = _doc(w)
    doc["strings"] += b"no/slash"
    doc["dirents"] = _patch(doc["dirents"], struct.Struct("<III"), bad_at, 0, len(doc["strings"]) - 8)
    doc["dirents"] = _patch(doc["dirents"], struct.Struct("<III"), bad_at, 1, 8)
    assert f"dirent {bad_at} (in directory" in _refused(doc, "invalid name b'no/slash'")


@pytest.mark.parametrize("nsec", [0, 999_999_999, 0x3AFFFFFF, 0x3B000000])
def test_mtime_nsec_below_one_second_is_kept(nsec):
    w, _a, files = _writer()
    doc = _doc(w)
    doc["inodes"] = _patch(doc["inodes"], INODE, files[0] - 1, 6, nsec)
    b = Bootstrap.from_bytes(msgpack.packb(doc, use_bin_type=True))
    assert b.attr(files[0]).mtime_ns % 1_000_000_000 == nsec


@pytest.mark.parametrize("nsec", [1_000_000_000, 0x3BFFFFFF, 0xFFFFFFFF])
def test_mtime_nsec_of_a_second_or_more_is_refused(nsec):
    w, _a, files = _writer()
    doc = _doc(w)
    doc["inodes"] = _patch(doc["inodes"], INODE, files[1] - 1, 6, nsec)
    assert f"inode {files[1]}: mtime_nsec {nsec}" in _refused(doc, "is not below 10")


@pytest.mark.parametrize("flags", [2, 4, 0x80, 0x100, 0x01000000])
def test_unknown_chunk_flags_are_refused(flags):
    w, _a, _files = _writer(3)
    doc = _doc(w)
    doc["chunks"] = _patch(doc["chunks"], CHUNK, 1, 5, flags)    # v1 knows only "compressed"
    assert f"chunk 1: unknown flags 0x{flags:x}" in _refused(doc, "unknown flags")


def test_walks_and_path_of_end_on_a_cyclic_bootstrap_that_skipped_the_checks():
    w, a, files = _writer(3)
    b = w.add_inode(mode=DIR, uid=0, gid=0, mtime_ns=0)
    w.add_dirent(a, b"b", b)
    w.add_dirent(b, b"a", a)                            # a -> b -> a -> ...
    w.add_dirent(b, b"root", ROOT_INO)
    bs = Unchecked(msgpack.unpackb(w.to_bytes(), raw=False))
    paths = list(bs.iter_paths())
    assert len(paths) < 20
    plan = pf.plan(bs, paths=["/a"], prefetch_all=True)
    assert sorted(plan.inodes) == sorted(files)
    assert bs.path_of(files[0]).endswith("/a/f00000")
    doc = msgpack.unpackb(w.to_bytes(), raw=False)      # parent pointers in a cycle too
    doc["inodes"] = _patch(_patch(doc["inodes"], INODE, a - 1, 8, b), INODE, b - 1, 8, a)
    assert "a" in Unchecked(doc).path_of(files[0])


def test_path_of_costs_o_depth_not_o_directory_size():
    """The log line of a failing read names the file: it used to list the parent directory
    (decoding every name) per level, so failing reads in a big directory were quadratic."""
    w, _a, files = _writer(3000)
    bs = Bootstrap.from_bytes(w.to_bytes())
    calls = 0
    name = bs._name

    def counting(off, ln):
        nonlocal calls
        calls += 1
        return name(off, ln)
    bs._name = counting
    for f in files[-100:]:
        assert bs.path_of(f) == f"/a/f{f - 3:05d}"
    assert calls <= 2 * 100                             # one name per level


# -- counts, sizes, offsets -----------------------------------------------------------------
def test_blob_chunk_count_must_match_the_chunk_table():
    w, _, _ = _writer()
    doc = _doc(w)
    doc["blobs"][0]["chunk_count"] = 1 << 31            # the cache would size bitmaps by it
    _refused(doc, "chunk_count adds up to")
    doc = _doc(w)
    doc["blobs"][0]["chunk_start"] = 1
    _refused(doc, "chunk_start")


def test_prefetch_list_is_a_view_checked_against_the_inodes():
    w, _, files = _writer()
    w.prefetch = files
    bs = Bootstrap.from_bytes(w.to_bytes())
    assert isinstance(bs.prefetch, memoryview) and list(bs.prefetch) == files
    doc = _doc(w)
    doc["prefetch"] = struct.pack("<III", 99, 0, files[0])
    plan = pf.plan(Bootstrap(doc))                      # checked where used: skipped, counted
    assert plan.inodes == (files[0],) and plan.errors == 2
    doc["prefetch"] = bytes(4 * 1000)                   # more entries than inodes
    _refused(doc, "prefetch: 1000 entries")


def test_a_bootstrap_of_zeros_from_a_tiny_layer_costs_no_more_than_its_size():
    """The attack of the issue: a ~1 KB zstd layer whose prefetch column decompresses to
    tens of MB was materialised as a list of ints (about 9x its size)."""
    w, _, _ = _writer()
    doc = _doc(w)
    doc["prefetch"] = bytes(64 << 20)
    layer = compress_layer(msgpack.packb(doc, use_bin_type=True))
    assert len(layer) < 16 << 10
    with _peak_memory() as mem:
        with pytest.raises(FormatError, match="prefetch"):
            Bootstrap.from_bytes(layer)
    assert mem["peak"] < 3 * (64 << 20)


def test_chunk_records_are_checked_where_used():
    w, _, _files = _writer()
    doc = _doc(w)
    doc["blobs"][0]["uncompressed_size"] = 1 << 31
    doc["chunks"] = _patch(doc["chunks"], CHUNK, 1, 4, MAX_CHUNK_SIZE * 64)  # uncomp_size 1 GiB
    bs = Bootstrap.from_bytes(msgpack.packb(doc, use_bin_type=True))
    with pytest.raises(FormatError, match="chunk 1"):
        bs.chunk(1)
    doc["chunks"] = _patch(doc["chunks"], CHUNK, 1, 2, MAX_CHUNK_SIZE + 1)    # stored size
    _refused(doc, "compressed size")


def test_zstd_chunk_cannot_expand_beyond_the_declared_size():
    bomb = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(64 << 20))
    assert len(bomb) < 4096
    with _peak_memory() as mem:
        with pytest.raises(IntegrityError, match="declares 67108864 bytes"):
            compression.decompress("zstd", bomb, 4096, "blob x chunk 0")
    assert mem["peak"] < 1 << 20


def test_zstd_layer_size_field_is_bounded_and_checked():
    w, _, _ = _writer()
    layer = bytearray(compress_layer(w.to_bytes()))
    with pytest.raises(FormatError, match="truncated"):
        Bootstrap.from_bytes(bytes(layer[:-8]))
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(w.to_bytes())
    with pytest.raises(FormatError, match="content size"):
        Bootstrap.from_bytes(no_size)


# -- types and msgpack shape ----------------------------------------------------------------
@pytest.mark.parametrize("key, value, match", [
    ("chunk_size", "4096", "chunk_size"), ("chunk_size", 3000, "power of two"),
    ("chunk_size", 1 << 30, "chunk_size"), ("chunk_size", True, "chunk_size"),
    ("blobs", {"a": 1}, "blobs"), ("blobs", [1], r"blobs\[0\]"), ("inodes", "x", "inodes"),
    ("inodes", b"\0" * 67, "inodes"), ("digester", "md5", "digester"), ("meta", [1], "meta"),
    ("version", 1.0, "version"), ("prefetch", [1, 2], "prefetch"), ("strings", None, "strings"),
])
def test_wrong_field_types_are_one_line(key, value, match):
    w, _, _ = _writer()
    doc = _doc(w)
    doc[key] = value
    _refused(doc, match)


@pytest.mark.parametrize("field, value, match", [
    ("id", "../../etc/passwd", "not a digest"), ("id", 5, "not a string"),
    ("compressor", "gzip", "unknown compressor"), ("compressed_size", -1, "compressed_size"),
    ("uncompressed_size", 1 << 60, "uncompressed_size"), ("extra", 1, "unknown field"),
])
def test_blob_fields_are_checked(field, value, match):
    w, _, _ = _writer()
    doc = _doc(w)
    doc["blobs"][0][field] = value
    _refused(doc, match)


def test_msgpack_structure_is_bounded_before_it_is_built():
    w, _, _ = _writer()
    doc = _doc(w)
    big = b"\xdd" + struct.pack(">I", 50_000_000) + b"\x00" * 50_000_000   # 50M fixints
    raw = msgpack.packb(doc, use_bin_type=True)
    evil = b"\xde" + struct.pack(">H", len(doc) + 1) + raw[1:] + msgpack.packb("x") + big
    with _peak_memory() as mem:
        _refused(evil, "limit")
    assert mem["peak"] < 8 << 20
    _refused(raw + b"\x00", "trailing")
    _refused(b"\xc7\x01\x05x", "unsupported msgpack type")
