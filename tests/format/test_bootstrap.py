import hashlib
import stat

import msgpack
import pytest

from nydus_py.errors import FormatError
from nydus_py.format.bootstrap import ROOT_INO, Bootstrap, BootstrapWriter, ChunkSpec


def _sample() -> bytes:
    w = BootstrapWriter(chunk_size=4, meta={"source": "test"})
    digs = [hashlib.sha256(bytes([i])).digest() for i in range(3)]
    w.add_blob(blob_id="sha256:" + "a" * 64, compressor="zstd", compressed_size=30,
               uncompressed_size=10, chunks=[ChunkSpec(digs[0], 0, 10, 0, 4, True),
                                             ChunkSpec(digs[1], 10, 20, 4, 4, True)])
    w.add_blob(blob_id="sha256:" + "b" * 64, compressor="none", compressed_size=2,
               uncompressed_size=2, chunks=[ChunkSpec(digs[2], 0, 2, 0, 2, False)])
    root = w.add_inode(mode=stat.S_IFDIR | 0o755, uid=0, gid=0, mtime_ns=5)
    etc = w.add_inode(mode=stat.S_IFDIR | 0o700, uid=1, gid=2, mtime_ns=1_500_000_001)
    f = w.add_inode(mode=stat.S_IFREG | 0o4755, uid=70000, gid=3, size=10, mtime_ns=7,
                    chunk_ids=[0, 1, 2], xattrs={b"security.capability": b"\x00\x01\xff"})
    ln = w.add_inode(mode=stat.S_IFLNK | 0o777, uid=0, gid=0, mtime_ns=9, symlink=b"../x\xff")
    dev = w.add_inode(mode=stat.S_IFCHR | 0o600, uid=0, gid=0, mtime_ns=9, rdev=0x0103)
    w.add_dirent(root, b"etc", etc)
    w.add_dirent(root, b"link", ln)
    w.add_dirent(etc, b"zfile", f)
    w.add_dirent(etc, b"afile\xfe", f)  # hardlink, non-UTF-8 name
    w.add_dirent(root, b"null", dev)
    w.prefetch = [f]
    return w.to_bytes()


def test_roundtrip_attributes_names_and_chunks():
    bs = Bootstrap.from_bytes(_sample())
    assert bs.inode_count == 5 and bs.chunk_count == 3
    assert [n for _, n, _ in bs.readdir(ROOT_INO)] == [b"etc", b"link", b"null"]
    etc = bs.lookup(ROOT_INO, b"etc")
    a = bs.attr(etc)
    assert stat.S_IMODE(a.mode) == 0o700 and a.nlink == 2 and a.mtime_ns == 1_500_000_001
    f = bs.lookup(etc, b"zfile")
    assert bs.lookup(etc, b"afile\xfe") == f
    fa = bs.attr(f)
    assert fa.nlink == 2 and fa.uid == 70000 and fa.size == 10 and stat.S_IMODE(fa.mode) == 0o4755
    assert list(bs.file_chunk_ids(f)) == [0, 1, 2]
    c2 = bs.chunk(2)
    assert (c2.blob, c2.index, c2.compressed, c2.size) == (1, 0, False, 2)
    assert bs.xattrs(f) == {b"security.capability": b"\x00\x01\xff"}
    assert bs.readlink(bs.lookup(ROOT_INO, b"link")) == b"../x\xff"
    assert bs.attr(bs.lookup(ROOT_INO, b"null")).rdev == 0x0103
    assert bs.attr(ROOT_INO).nlink == 3
    assert bs.lookup(ROOT_INO, b"nope") is None and bs.lookup(f, b"x") is None
    assert list(bs.prefetch) == [f]
    assert bs.path_of(f) in ("/etc/zfile", "/etc/afile\\xfe")


def test_same_input_gives_identical_bytes():
    assert _sample() == _sample()


def test_rejects_garbage_and_wrong_version():
    with pytest.raises(FormatError):
        Bootstrap.from_bytes(b"\xc1garbage")
    doc = msgpack.unpackb(_sample(), raw=False)
    doc["version"] = 99
    with pytest.raises(FormatError, match="version"):
        Bootstrap.from_bytes(msgpack.packb(doc, use_bin_type=True))
    doc["version"] = 1
    doc["inodes"] = doc["inodes"][:-3]
    with pytest.raises(FormatError, match="inodes"):
        Bootstrap.from_bytes(msgpack.packb(doc, use_bin_type=True))


def test_writer_rejects_wrong_chunk_count():
    w = BootstrapWriter(chunk_size=4)
    w.add_inode(mode=stat.S_IFDIR | 0o755, uid=0, gid=0, mtime_ns=0)
    with pytest.raises(ValueError):
        w.add_inode(mode=stat.S_IFREG | 0o644, uid=0, gid=0, mtime_ns=0, size=5, chunk_ids=[0])


def test_compressed_layer_form_loads_and_garbage_zstd_is_format_error():
    from nydus_py.format.bootstrap import compress_layer
    layer = compress_layer(_sample())
    assert len(layer) < len(_sample())
    assert Bootstrap.from_bytes(layer).inode_count == 5
    with pytest.raises(FormatError, match="zstd"):
        Bootstrap.from_bytes(layer[:10])


def test_higher_zstd_level_is_smaller_and_decodes_the_same():
    import os as _os
    from nydus_py.format import compression
    data = b"".join(_os.urandom(16) * 64 + bytes(range(256)) * 4 for _ in range(256))
    fast, small = compression.compress("zstd", data), compression.compress("zstd", data, 19)
    assert len(small) <= len(fast)
    assert compression.decompress("zstd", small, len(data), "t") == data
