"""converter.decompress and converter.tar: decompression and the tar reader, including hostile and malformed input."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import tarfile
import tracemalloc
import zlib

import pytest
import zstandard

from converter.decompress import open_layer_stream
from converter.tar import EntryKind, iter_entries, normalize, parse_pax_time, st_mode
from nydus_py.errors import DigestMismatchError, LayerError
from nydus_py.oci import digest as dg
from nydus_py.oci import mediatypes as mt
from tests.fixtures.tarbuild import END, header, info, member, pax, read_all, tar_of

WHAT = "layer 3 (sha256:abcdef012345…)"


def one(tar: bytes):
    [(e, data)] = read_all(tar, WHAT)
    return e, data


def layer_error(tar: bytes, *fragments: str):
    with pytest.raises(LayerError) as ei:
        read_all(tar, WHAT)
    msg = str(ei.value)
    assert msg.startswith(WHAT), msg
    for f in fragments:
        assert f in msg, msg
    return msg


# -- basic types and metadata ---------------------------------------------------------------------

def test_all_basic_types_and_metadata_from_tarfile():
    tar = tar_of(
        info("./", tarfile.DIRTYPE, mode=0o1755, mtime=5),
        info("etc/", tarfile.DIRTYPE, mode=0o755, uid=1, gid=2),
        (info("etc/passwd", size=5, mode=0o4755, uid=1000, gid=100, mtime=1_700_000_000), b"root\n"),
        info("etc/link", tarfile.LNKTYPE, linkname="etc/passwd"),
        info("etc/sym", tarfile.SYMTYPE, linkname="../usr/x"),
        info("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
        info("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0),
        info("run/fifo", tarfile.FIFOTYPE, mode=0o2644),
    )
    got = read_all(tar)
    by = {e.path: (e, d) for e, d in got}
    root, _ = by[()]
    assert root.kind is EntryKind.DIR and root.mode == 0o1755 and root.mtime_ns == 5 * 10**9
    f, data = by[(b"etc", b"passwd")]
    assert (f.kind, f.mode, f.uid, f.gid, f.size, data) == (EntryKind.REG, 0o4755, 1000, 100, 5, b"root\n")
    assert f.mtime_ns == 1_700_000_000 * 10**9
    link, _ = by[(b"etc", b"link")]
    assert link.kind is EntryKind.HARDLINK and link.link_path == (b"etc", b"passwd") and link.size == 0
    sym, _ = by[(b"etc", b"sym")]
    assert sym.kind is EntryKind.SYMLINK and sym.linkname == b"../usr/x" and sym.link_path is None
    chr_, _ = by[(b"dev", b"null")]
    assert (chr_.kind, chr_.devmajor, chr_.devminor, chr_.mode) == (EntryKind.CHR, 1, 3, 0o666)
    blk, _ = by[(b"dev", b"sda")]
    assert (blk.kind, blk.devmajor, blk.devminor) == (EntryKind.BLK, 8, 0)
    fifo, _ = by[(b"run", b"fifo")]
    assert fifo.kind is EntryKind.FIFO and fifo.mode == 0o2644
    assert st_mode(EntryKind.REG, 0o4755) == 0o104755


def test_mode_keeps_only_permission_bits():
    e, _ = one(member(b"f", b"", mode=0o100755) + END)
    assert e.mode == 0o755


def test_data_read_in_pieces_and_skipped_when_unread():
    payload = os.urandom(3000)
    tar = member(b"a", payload) + member(b"b", b"second") + END
    entries = iter_entries(io.BytesIO(tar), WHAT)
    a = next(entries)
    assert a.read(1000) == payload[:1000]     # partial read, then move on
    b = next(entries)
    assert b.read(100) == b"second" and b.read(100) == b""
    assert list(entries) == []


def test_read_after_next_entry_is_refused():
    entries = iter_entries(io.BytesIO(member(b"a", b"x" * 10) + member(b"b") + END), WHAT)
    a = next(entries)
    next(entries)
    with pytest.raises(RuntimeError):
        a.read(1)


# -- names ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,path", [
    (b"./", ()), (b"/", ()), (b".", ()), (b"/etc/passwd", (b"etc", b"passwd")),
    (b"./a/./b//c/", (b"a", b"b", b"c")), (b"a/../b", (b"b",)), (b"a/b/../../c", (b"c",)),
])
def test_names_are_normalized(name, path):
    assert normalize(name) == path


def test_non_utf8_names_stay_bytes():
    tar = member(b"caf\xe9/\xff\xfe.bin", b"x") + member(b"l", type=b"2", linkname=b"\x80target") + END
    (f, _), (l, _) = read_all(tar)
    assert f.path == (b"caf\xe9", b"\xff\xfe.bin") and l.linkname == b"\x80target"


def test_non_utf8_pax_path_and_gnu_long_names():
    long = b"d/" + b"\xe9" * 150
    tar = pax([(b"path", long), (b"linkpath", b"t\xff" * 80)]) + member(b"short", type=b"2") + END
    e, _ = one(tar)
    assert e.path == (b"d", b"\xe9" * 150) and e.linkname == b"t\xff" * 80
    gnu = tar_of((info("x/" + "y" * 200 + "\udce9", size=2), b"hi"), info("x/" + "z" * 150, tarfile.LNKTYPE,
                 linkname="x/" + "y" * 200 + "\udce9"), format=tarfile.GNU_FORMAT)
    assert b"././@LongLink" in gnu
    (f, data), (l, _) = read_all(gnu)
    assert f.path == (b"x", b"y" * 200 + b"\xe9") and data == b"hi"
    assert l.kind is EntryKind.HARDLINK and l.link_path == f.path and l.path == (b"x", b"z" * 150)


def test_pre_go18_gnu_header_with_a_prefix_is_named_as_go_names_it():
    """Go before 1.8 wrote a ustar prefix into GNU headers, over atime/ctime; Go's reader (so
    containerd, umoci) puts the entry at prefix/name when those fields do not parse."""
    long_dir = b"usr/share/" + b"d" * 120
    tar = member(b"file", b"x", magic=b"ustar  \0", prefix=long_dir) + END
    e, _ = one(tar)
    assert e.path == tuple(long_dir.split(b"/")) + (b"file",)


def test_gnu_header_with_numeric_atime_ctime_has_no_prefix():
    # a real GNU header: atime and ctime are octal numbers, not a path
    tar = member(b"file", b"x", magic=b"ustar  \0", prefix=b"00000000001\x0000000000002\0") + END
    e, _ = one(tar)
    assert e.path == (b"file",)


def test_pre_go18_prefix_that_is_not_ascii_is_ignored():
    tar = member(b"file", b"x", magic=b"ustar  \0", prefix=b"caf\xc3\xa9/dir") + END
    e, _ = one(tar)
    assert e.path == (b"file",)


def test_star_header_prefix_stops_before_its_times():
    # the 131-byte prefix is full (no NUL), the atime that follows must not join it
    tar = member(b"file", b"x", prefix=b"p" * 131, patch={476: b"00000000001\0", 508: b"tar\0"}) + END
    e, _ = one(tar)
    assert e.path == (b"p" * 131, b"file")


def test_ustar_prefix_joins_name():
    e, _ = one(member(b"file", b"", prefix=b"some/deep/dir") + END)
    assert e.path == (b"some", b"deep", b"dir", b"file")


def test_v7_directory_with_trailing_slash():
    e, _ = one(member(b"olddir/", type=b"\0", magic=bytes(8)) + END)
    assert e.kind is EntryKind.DIR and e.path == (b"olddir",)


# -- PAX -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,ns", [
    (b"1700000000.123456789", 1_700_000_000_123_456_789),
    (b"1700000000.1234567891234", 1_700_000_000_123_456_789),
    (b"1700000000.5", 1_700_000_000_500_000_000),
    (b"-1.5", -1_500_000_000),
    (b"-7", -7_000_000_000),
    (b"42.", 42_000_000_000),
])
def test_pax_time_is_nanosecond_exact(text, ns):
    assert parse_pax_time(text) == ns


@pytest.mark.parametrize("text, ns", [
    (b"10000000000.5", 10_000_000_000 * 10**9 + 500_000_000),          # year 2286
    (b"9223372036854775807", (2**63 - 1) * 10**9),                     # the largest Go accepts
    (b"-10000000000.25", -(10_000_000_000 * 10**9 + 250_000_000)),    # year 1653
])
def test_pax_times_beyond_int64_nanoseconds_are_kept_exact(text, ns):
    """Seconds must fit int64 (Go's parsePAXTime); nanoseconds need not (years < 1678, > 2262)."""
    assert parse_pax_time(text) == ns
    e, _ = one(pax([(b"mtime", text)]) + member(b"f", b"x") + END)
    assert e.mtime_ns == ns


def test_header_mtime_beyond_int64_nanoseconds_is_kept():
    sec = 20_000_000_000            # year 2603, base-256 in the 12-byte field
    e, _ = one(member(b"f", b"x", mtime=sec) + END)
    assert e.mtime_ns == sec * 10**9


def test_pax_mtime_uid_gid_size_override_header():
    big = 3_000_000_000
    tar = pax([(b"mtime", b"1234567890.000000001"), (b"uid", b"%d" % big), (b"gid", b"70000"),
               (b"size", b"4")]) + member(b"f", b"data", size=999) + END
    e, data = one(tar)
    assert (e.mtime_ns, e.uid, e.gid, e.size, data) == (1234567890_000_000_001, big, 70000, 4, b"data")


def test_binary_xattrs_are_exact():
    cap = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\n=\xff"
    tar = pax([(b"SCHILY.xattr.security.capability", cap), (b"SCHILY.xattr.user.empty", b""),
               (b"LIBARCHIVE.xattr.user.%E9t%3D", b"AAEC/w"),          # unpadded base64 of 00 01 02 ff
               (b"LIBARCHIVE.xattr.security.capability", b"eA==")])    # SCHILY wins
    e, _ = one(tar + member(b"bin/ping", b"") + END)
    # an empty PAX value unsets the record (POSIX pax; Go's reader and so umoci drop it)
    assert e.xattrs == {b"security.capability": cap, b"user.\xe9t=": b"\x00\x01\x02\xff"}


def test_pax_empty_value_deletes_and_global_header_ignored():
    tar = (pax([(b"comment", b"git archive")], type=b"g")
           + pax([(b"path", b"from-pax"), (b"path", b"")]) + member(b"from-header", b"") + END)
    e, _ = one(tar)
    assert e.path == (b"from-header",)


def test_overlayfs_xattrs_are_dropped():
    """trusted.overlay.* is overlayfs' own metadata (opaque, redirect, metacopy...): an image
    that carries it could steer the overlay mounted above the image."""
    tar = pax([(b"SCHILY.xattr.trusted.overlay.opaque", b"y"), (b"SCHILY.xattr.trusted.overlay.redirect", b"/x"),
               (b"SCHILY.xattr.trusted.overlayish", b"kept"), (b"SCHILY.xattr.user.overlay.opaque", b"y")])
    e, _ = one(tar + member(b"d/", type=b"5") + END)
    assert e.xattrs == {b"trusted.overlayish": b"kept", b"user.overlay.opaque": b"y"}


def test_tarfile_pax_roundtrip_xattrs_and_ids():
    ti = info("f", size=1, uid=5_000_000, gid=2**40, mtime=1.25,
              pax_headers={"SCHILY.xattr.user.k": "v\u00e9"})
    e, data = one(tar_of((ti, b"z")))
    assert (e.uid, e.gid, e.mtime_ns, e.xattrs, data) == (5_000_000, 2**40, 1_250_000_000,
                                                          {b"user.k": "v\u00e9".encode()}, b"z")


# -- numbers -------------------------------------------------------------------------------------

def test_ids_above_65535_and_base256_above_2_21():
    e, _ = one(member(b"a", uid=70000, gid=2**21 - 1) + END)
    assert (e.uid, e.gid) == (70000, 2**21 - 1)
    e, _ = one(member(b"b", uid=2**21, gid=2**40 + 7, mtime=-86400) + END)   # base-256 fields
    assert (e.uid, e.gid, e.mtime_ns) == (2**21, 2**40 + 7, -86400 * 10**9)


def test_base256_size():
    e, data = one(member(b"big", b"12345", patch={124: b"\x80" + bytes(10) + b"\x05"}) + END)
    assert e.size == 5 and data == b"12345"


# -- special typeflags ---------------------------------------------------------------------------

def test_contiguous_unknown_volume_dumpdir_and_hardlink_size():
    tar = (member(b"V-label", b"", type=b"V")
           + member(b"contig", b"abc", type=b"7")
           + member(b"weird", b"xyz", type=b"8")     # unknown, not a vendor type: a file (POSIX)
           + member(b"dumped/", b"a\0b\0\0", type=b"D")
           + header(b"hl", type=b"1", linkname=b"contig", size=1000)   # no data follows (as Go)
           + member(b"after", b"ok") + END)
    got = [(e.path, e.kind, d) for e, d in read_all(tar)]
    assert got == [((b"contig",), EntryKind.REG, b"abc"), ((b"weird",), EntryKind.REG, b"xyz"),
                   ((b"dumped",), EntryKind.DIR, b""), ((b"hl",), EntryKind.HARDLINK, b""),
                   ((b"after",), EntryKind.REG, b"ok")]


@pytest.mark.parametrize("typeflag", [b"X", b"A", b"I", b"Z"])
def test_vendor_typeflags_are_refused_not_stray_files(typeflag):
    """Solaris writes its extended header as 'X' (the records of 'x'); read as a regular file
    (POSIX's rule for unknown types) it became a stray file in the image. Go's reader returns it
    as an unknown type, which containerd and umoci refuse: so do we, with the entry named."""
    records = b"30 SCHILY.xattr.user.k=value\n"
    tar = member(b"./PaxHeaders.1/f", records, type=typeflag) + member(b"f", b"data") + END
    layer_error(tar, "entry './PaxHeaders.1/f'", f"typeflag '{typeflag.decode()}' is a vendor extension")


def test_whiteouts_opaque_and_aufs_metadata():
    tar = (member(b"a/.wh.gone") + member(b"a/.wh..wh..opq") + member(b".wh..wh..opq")
           + member(b"a/.wh..wh.plnk/123", b"x") + member(b".wh..wh.aufs") + member(b"kept") + END)
    got = [(e.kind, e.path, e.size) for e, _ in read_all(tar)]
    assert got == [(EntryKind.WHITEOUT, (b"a", b"gone"), 0), (EntryKind.OPAQUE, (b"a",), 0),
                   (EntryKind.OPAQUE, (), 0), (EntryKind.REG, (b"a", b".wh..wh.plnk", b"123"), 1),
                   (EntryKind.REG, (b"kept",), 0)]


@pytest.mark.parametrize("name", [b".wh.", b"d/.wh..", b"d/.wh..."])
def test_invalid_whiteout_names(name):
    layer_error(member(name) + END, "invalid whiteout name")


# -- GNU sparse ----------------------------------------------------------------------------------

SPARSE_SPANS = [(4096, 3), (10000, 2), (20000, 1)]
SPARSE_SIZE = 30000


def sparse_expected() -> bytes:
    buf = bytearray(SPARSE_SIZE)
    buf[4096:4099], buf[10000:10002], buf[20000:20001] = b"abc", b"de", b"f"
    return bytes(buf)


def old_gnu_sparse() -> bytes:
    area = b"".join(b"%011o\0%011o\0" % s for s in SPARSE_SPANS[:1])
    ext = bytearray(512)
    ext[0:48] = b"".join(b"%011o\0%011o\0" % s for s in SPARSE_SPANS[1:])
    patch = {386: area, 482: b"\x01", 483: b"%011o\0" % SPARSE_SIZE}
    h = header(b"sparse", type=b"S", size=6, magic=b"ustar  \0", patch=patch)
    return h + bytes(ext) + b"abcdef" + bytes(506)


@pytest.mark.parametrize("style", ["gnu", "pax0.0", "pax0.1", "pax1.0"])
def test_gnu_sparse_is_expanded(style):
    if style == "gnu":
        tar = old_gnu_sparse()
    elif style == "pax0.0":
        recs = [(b"GNU.sparse.size", b"%d" % SPARSE_SIZE)]
        for off, n in SPARSE_SPANS:
            recs += [(b"GNU.sparse.offset", b"%d" % off), (b"GNU.sparse.numbytes", b"%d" % n)]
        tar = pax(recs + [(b"path", b"sparse")]) + member(b"GNUSparse/x", b"abcdef")
    elif style == "pax0.1":
        m = b",".join(b"%d,%d" % s for s in SPARSE_SPANS)
        tar = pax([(b"GNU.sparse.size", b"%d" % SPARSE_SIZE), (b"GNU.sparse.map", m),
                   (b"path", b"sparse")]) + member(b"x", b"abcdef")
    else:
        mp = b"3\n" + b"".join(b"%d\n%d\n" % s for s in SPARSE_SPANS)
        data = mp + bytes(-len(mp) % 512) + b"abcdef"
        tar = pax([(b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0"),
                   (b"GNU.sparse.name", b"sparse"), (b"GNU.sparse.realsize", b"%d" % SPARSE_SIZE)]) \
            + member(b"./GNUSparseFile.0/sparse", data)
    (e, data), (after, _) = read_all(tar + member(b"after", b"") + END, piece=4000)
    assert e.path == (b"sparse",) and e.size == SPARSE_SIZE and data == sparse_expected()
    assert after.path == (b"after",)


@pytest.mark.skipif(not shutil.which("tar"), reason="GNU tar not installed")
@pytest.mark.parametrize("fmt", [["--format=gnu"], ["--format=pax", "--sparse-version=0.1"],
                                 ["--format=pax", "--sparse-version=1.0"]])
def test_gnu_tar_sparse_archives(tmp_path, fmt):
    src = tmp_path / "s.bin"
    with open(src, "wb") as f:
        f.seek(1 << 20)
        f.write(b"hello")
        f.seek(3 << 20)
        f.write(b"world")
        f.truncate(4 << 20)
    out = subprocess.run(["tar", *fmt, "--sparse", "-C", str(tmp_path), "-cf", "-", "s.bin"],
                         check=True, capture_output=True).stdout
    [(e, data)] = read_all(out, piece=1 << 20)
    assert e.size == 4 << 20 and data == src.read_bytes()


def test_sparse_map_inconsistent_with_data():
    tar = pax([(b"GNU.sparse.size", b"100"), (b"GNU.sparse.map", b"10,5"), (b"path", b"s")]) \
        + member(b"x", b"abc") + END
    layer_error(tar, "entry 's'", "sparse map describes 5")
    tar = pax([(b"GNU.sparse.size", b"10"), (b"GNU.sparse.map", b"8,5"), (b"path", b"s")]) \
        + member(b"x", b"abcde") + END
    layer_error(tar, "exceed the file size")


# -- end of archive ------------------------------------------------------------------------------

@pytest.mark.parametrize("ending", [b"", bytes(512), END, END + bytes(9216), END + b"junk after"])
def test_archive_endings_accepted(ending):
    got = read_all(member(b"a", b"1") + ending)
    assert [e.path for e, _ in got] == [(b"a",)]


def test_zero_block_then_garbage_rejected():
    layer_error(member(b"a") + bytes(512) + member(b"b"), "zero block followed by a non-zero block")


# -- errors --------------------------------------------------------------------------------------

def test_path_escaping_the_root():
    msg = layer_error(member(b"ok") + member(b"../../etc/passwd", b"x") + END)
    assert msg == f"{WHAT}: entry '../../etc/passwd' escapes the image root"
    layer_error(member(b"/../x") + END, "entry '/../x' escapes the image root")
    layer_error(member(b"a/../../x") + END, "escapes the image root")


def test_hardlink_target_escaping_the_root():
    layer_error(member(b"evil", type=b"1", linkname=b"../../../etc/shadow") + END,
                "entry 'evil'", "hardlink target '../../../etc/shadow' escapes the image root")


def test_empty_and_nul_names():
    layer_error(member(b"") + END, "empty name")
    layer_error(pax([(b"path", b"a\0b")]) + member(b"x") + END, "NUL")
    layer_error(member(b"s", type=b"2", linkname=b"") + END, "entry 's'", "empty or NUL-containing target")


def test_bad_checksum_names_previous_entry():
    bad = bytearray(member(b"second", b"zz"))
    bad[0] ^= 0x01
    layer_error(member(b"first", b"x") + bytes(bad) + END, "after entry 'first'", "bad header checksum")


def test_garbage_instead_of_tar():
    layer_error(b"this is not a tar archive at all".ljust(2048, b"!"), "bad header checksum")


def test_invalid_numeric_field():
    layer_error(member(b"a", patch={124: b"12x45678901\0"}) + END, "invalid numeric field")


def test_truncated_member_data_names_entry():
    tar = member(b"first") + member(b"victim", b"x" * 2000)
    layer_error(tar[:-1000], "entry 'victim'", "truncated")


def test_truncated_header():
    layer_error(member(b"a", b"x") + header(b"b")[:300], "truncated header")


def test_bad_pax_record():
    for recs in (b"5 a=b\n", b"99 path=x\n", b"x path=y\n", b"8 novalu\n"):
        tar = member(b"PaxHeaders/x", recs, type=b"x") + member(b"f") + END
        layer_error(tar, "malformed PAX record")
    tar = pax([(b"uid", b"-5")]) + member(b"f") + END
    layer_error(tar, "entry 'f'", "bad PAX uid")
    tar = pax([(b"mtime", b"1e9")]) + member(b"f") + END
    layer_error(tar, "bad PAX time")


def test_negative_size_rejected():
    layer_error(member(b"neg", size=-5) + END, "negative size")


def test_huge_pax_header_is_a_bounded_error():
    tracemalloc.start()
    try:
        tar = header(b"PaxHeaders/x", type=b"x", size=1 << 30) + bytes(4096)
        layer_error(tar, "exceeds the 1048576 byte limit")
        tar = header(b"././@LongLink", type=b"L", size=1 << 30) + bytes(4096)
        layer_error(tar, "exceeds")
        assert tracemalloc.get_traced_memory()[1] < 16 << 20
    finally:
        tracemalloc.stop()


def test_truncated_extended_header():
    tar = pax([(b"path", b"x" * 600)])
    layer_error(tar[:900], "truncated extended header")


def test_extended_header_without_entry():
    layer_error(pax([(b"path", b"x")]) + END, "extended header, without its entry")


def test_multivolume_refused():
    layer_error(member(b"part", b"x", type=b"M") + END, "unsupported GNU typeflag 'M'")


# -- decompression -------------------------------------------------------------------------------

TAR = member(b"a", b"A" * 5000) + member(b"b", b"B" * 100) + END


def stream_entries(blob: bytes, media_type: str, **kw):
    s = open_layer_stream(io.BytesIO(blob), media_type, WHAT, **kw)
    return [(e.path, d) for e, d in ((e, e.read(1 << 20)) for e in iter_entries(s, WHAT))]


EXPECTED = [((b"a",), b"A" * 5000), ((b"b",), b"B" * 100)]


def test_gzip_multi_member_and_trailing_zero_padding():
    blob = gzip.compress(TAR[:3000]) + gzip.compress(TAR[3000:]) + bytes(100)
    assert stream_entries(blob, mt.OCI_LAYER_GZIP) == EXPECTED


def test_zstd_multi_frame_with_checksum_and_skippable_frame():
    c = zstandard.ZstdCompressor(write_checksum=True)
    skippable = (0x184D2A53).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"12345"
    blob = c.compress(TAR[:1000]) + skippable + zstandard.ZstdCompressor().compress(TAR[1000:])
    assert stream_entries(blob, mt.OCI_LAYER_ZSTD) == EXPECTED


@pytest.mark.parametrize("blob", [TAR, gzip.compress(TAR), zstandard.ZstdCompressor().compress(TAR)])
def test_docker_media_types_are_sniffed(blob):
    assert stream_entries(blob, mt.DOCKER_LAYER_GZIP) == EXPECTED
    assert stream_entries(blob, "application/octet-stream") == EXPECTED


def test_plain_tar_media_type():
    assert stream_entries(TAR, mt.OCI_LAYER_TAR) == EXPECTED


def test_declared_codec_mismatch():
    with pytest.raises(LayerError, match="not gzip"):
        stream_entries(TAR, mt.OCI_LAYER_GZIP)
    with pytest.raises(LayerError, match="not zstd"):
        stream_entries(gzip.compress(TAR), mt.OCI_LAYER_ZSTD)


@pytest.mark.parametrize("codec", ["gzip", "zstd"])
@pytest.mark.parametrize("cut", [0.5, 0.97])
def test_truncated_compressed_layer(codec, cut):
    tar = member(b"r", os.urandom(20000)) + END
    blob = gzip.compress(tar) if codec == "gzip" else zstandard.ZstdCompressor().compress(tar)
    mtype = mt.OCI_LAYER_GZIP if codec == "gzip" else mt.OCI_LAYER_ZSTD
    with pytest.raises(LayerError, match=r"^layer 3 .*(truncated|corrupt)"):
        stream_entries(blob[:int(len(blob) * cut)], mtype)


def test_zstd_cut_at_a_block_boundary_is_detected():
    c = zstandard.ZstdCompressor()
    frame1 = c.compress(TAR)
    # a whole first frame, then only the header of a second one: the decoder alone says nothing
    blob = frame1 + c.compress(b"x" * 1000)[:6]
    with pytest.raises(LayerError, match="truncated zstd"):
        stream_entries(blob, mt.OCI_LAYER_ZSTD)


@pytest.mark.parametrize("codec", ["gzip", "zstd"])
def test_corrupt_compressed_layer(codec):
    tar = member(b"r", os.urandom(20000)) + END
    blob = bytearray(gzip.compress(tar) if codec == "gzip" else zstandard.ZstdCompressor(write_checksum=True).compress(tar))
    blob[len(blob) // 2] ^= 0xFF
    mtype = mt.OCI_LAYER_GZIP if codec == "gzip" else mt.OCI_LAYER_ZSTD
    with pytest.raises(LayerError, match="corrupt"):
        stream_entries(bytes(blob), mtype)


def test_trailing_garbage_after_zstd():
    blob = zstandard.ZstdCompressor().compress(TAR) + b"garbage!"
    with pytest.raises(LayerError, match="zstd"):
        stream_entries(blob, mt.OCI_LAYER_ZSTD)


def test_corrupt_blob_is_reported_as_digest_mismatch():
    blob = gzip.compress(member(b"r", os.urandom(20000)) + END)
    good = dg.of_bytes(blob)
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 0xFF
    raw = dg.VerifyingReader(io.BytesIO(bytes(bad)), good, len(bad), WHAT)
    s = open_layer_stream(raw, mt.OCI_LAYER_GZIP, WHAT)
    with pytest.raises(DigestMismatchError, match="^layer 3 .*digest mismatch"):
        for e in iter_entries(s, WHAT):
            e.read(1 << 20)


def _gzip_zeros(total: int, name: bytes = b"zeros") -> bytes:
    comp = zlib.compressobj(1, zlib.DEFLATED, 31)
    out = [comp.compress(header(name, size=total))]
    zero = bytes(1 << 20)
    for _ in range(total >> 20):
        out.append(comp.compress(zero))
    out.append(comp.compress(END))
    out.append(comp.flush())
    return b"".join(out)


def test_compression_bomb_hits_the_limit():
    blob = _gzip_zeros(64 << 20)
    with pytest.raises(LayerError, match=r"more than 10485760 uncompressed bytes"):
        stream_entries(blob, mt.OCI_LAYER_GZIP, max_uncompressed=10 << 20)


def test_large_gzip_layer_streams_in_bounded_memory():
    total = 300 << 20
    blob = _gzip_zeros(total)
    assert len(blob) < 2 << 20
    tracemalloc.start()
    try:
        s = open_layer_stream(io.BytesIO(blob), mt.OCI_LAYER_GZIP, WHAT)
        seen = 0
        for e in iter_entries(s, WHAT):
            assert e.size == total
            while piece := e.read(1 << 20):
                seen += len(piece)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen == total
    assert peak < 24 << 20, f"peak {peak >> 20} MiB"
