"""Filesystem semantics without mounting: the Vfs over a real bootstrap and a fake reader."""

import errno
import logging
import os
import stat

import pytest
import trio

from nydus_py.format.bootstrap import ROOT_INO, Bootstrap
from nydus_py.fs.vfs import FsError, Vfs
from tests.fixtures.rich_image import BIG_DIR_ENTRIES, CHUNK, MTIME, FakeReader, build_rich


@pytest.fixture(scope="module")
def rich():
    return build_rich()


@pytest.fixture
def vfs(rich):
    boot = Bootstrap.from_bytes(rich.bootstrap)
    return Vfs(boot, FakeReader(boot, rich.files))


def path(vfs: Vfs, p: str) -> int:
    ino = ROOT_INO
    for part in p.encode("utf-8", "surrogateescape").split(b"/"):
        ino = vfs.lookup(ino, part)
    return ino


def errno_of(fn, *args) -> int:
    with pytest.raises(FsError) as ei:
        fn(*args)
    return ei.value.errno


def test_root_is_fuse_root_and_a_directory_with_link_count_of_subdirs(vfs):
    st = vfs.getattr(ROOT_INO)
    assert stat.S_ISDIR(st.mode) and st.ino == 1
    assert st.nlink == 2 + 5


def test_regular_file_attributes_include_blocks_and_all_three_times(vfs, rich):
    st = vfs.getattr(path(vfs, "big"))
    assert st.size == len(rich.files["big"])
    assert st.blocks == -(-st.size // 512)
    assert st.blksize == CHUNK
    assert st.mtime_ns == st.atime_ns == st.ctime_ns == MTIME
    assert stat.S_IMODE(st.mode) == 0o644 and (st.uid, st.gid) == (0, 0)
    secret = vfs.getattr(path(vfs, "secret"))
    assert (stat.S_IMODE(secret.mode), secret.uid, secret.gid) == (0o600, 1000, 1000)


def test_hardlinks_share_the_inode_and_report_the_link_count(vfs):
    a, b, c = path(vfs, "hard1"), path(vfs, "sub/hard2"), path(vfs, "sub/hard3")
    assert a == b == c
    assert vfs.getattr(a).nlink == 3


def test_devices_and_fifo_keep_type_and_rdev(vfs):
    null = vfs.getattr(path(vfs, "dev/null"))
    assert stat.S_ISCHR(null.mode) and null.rdev == os.makedev(1, 3)
    sda = vfs.getattr(path(vfs, "dev/sda"))
    assert stat.S_ISBLK(sda.mode) and sda.rdev == os.makedev(8, 0)
    assert stat.S_ISFIFO(vfs.getattr(path(vfs, "dev/fifo")).mode)


def test_lookup_misses_and_non_directories(vfs):
    assert errno_of(vfs.lookup, ROOT_INO, b"nope") == errno.ENOENT
    assert errno_of(vfs.lookup, path(vfs, "big"), b"x") == errno.ENOTDIR
    assert errno_of(vfs.lookup, ROOT_INO, b"x" * 300) == errno.ENAMETOOLONG
    assert errno_of(vfs.getattr, 10**6) == errno.ENOENT


def test_dot_and_dotdot_lookup(vfs):
    sub = path(vfs, "sub")
    assert vfs.lookup(sub, b".") == sub
    assert vfs.lookup(sub, b"..") == ROOT_INO
    assert vfs.lookup(ROOT_INO, b"..") == ROOT_INO


def test_readdir_lists_dot_entries_first_with_their_inodes(vfs):
    sub = path(vfs, "sub")
    entries = list(vfs.readdir(sub))
    assert [(e.name, e.ino) for e in entries[:2]] == [(b".", sub), (b"..", ROOT_INO)]
    assert [e.name for e in entries[2:]] == [b"hard2", b"hard3"]
    assert [e.next for e in entries] == [1, 2, 3, 4]


def test_readdir_resumes_at_every_offset_without_skipping_or_repeating(vfs):
    many = path(vfs, "many")
    full = list(vfs.readdir(many))
    assert len(full) == BIG_DIR_ENTRIES + 2
    for cut in (0, 1, 2, 3, 57, len(full) - 1, len(full)):
        head = full[:cut]
        resume = head[-1].next if head else 0
        assert head + list(vfs.readdir(many, resume)) == full
    assert list(vfs.readdir(many, 10**9)) == []


def test_readdir_of_a_file_is_enotdir(vfs):
    with pytest.raises(FsError) as ei:
        list(vfs.readdir(path(vfs, "big")))
    assert ei.value.errno == errno.ENOTDIR


def test_readlink_returns_raw_target_bytes(vfs):
    assert vfs.readlink(path(vfs, "link")) == b"etc/hostname"
    assert vfs.readlink(path(vfs, "abslink")) == b"/etc/hostname"
    assert vfs.readlink(path(vfs, "dangling")) == b"nowhere\xff"
    assert errno_of(vfs.readlink, path(vfs, "big")) == errno.EINVAL


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC,
                                   os.O_RDONLY | os.O_APPEND, os.O_WRONLY | os.O_CREAT])
def test_open_for_writing_is_erofs(vfs, flags):
    assert errno_of(vfs.open, path(vfs, "big"), flags) == errno.EROFS


def test_open_read_only_is_allowed_and_directories_are_eisdir(vfs):
    vfs.open(path(vfs, "big"), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    assert errno_of(vfs.open, path(vfs, "etc"), os.O_RDONLY) == errno.EISDIR


def test_xattrs_listed_and_read_as_bytes_missing_is_enodata(vfs):
    ino = path(vfs, "etc/hostname")
    assert sorted(vfs.listxattr(ino)) == [b"security.capability", b"user.origin"]
    assert vfs.getxattr(ino, b"user.origin") == b"nydus-py"
    assert errno_of(vfs.getxattr, ino, b"user.none") == errno.ENODATA
    assert vfs.listxattr(path(vfs, "big")) == []


def test_statfs_counts_inodes_and_file_bytes_and_has_nothing_free(vfs, rich):
    s = vfs.statfs()
    assert s.files == vfs.bootstrap.inode_count
    unique = sum(len(v) for k, v in rich.files.items() if k not in ("sub/hard2", "sub/hard3"))
    assert s.blocks == -(-unique // s.frsize)
    assert s.bfree == s.bavail == s.ffree == 0


def test_read_clamps_to_file_size_and_delegates(vfs, rich):
    ino = path(vfs, "big")
    data = rich.files["big"]

    async def main():
        assert await vfs.read(ino, 0, 10) == data[:10]
        assert await vfs.read(ino, len(data) - 5, 4096) == data[-5:]
        assert await vfs.read(ino, len(data), 10) == b""
        assert await vfs.read(ino, len(data) + 100, 10) == b""
        assert await vfs.read(path(vfs, "empty"), 0, 4096) == b""
    trio.run(main)
    assert (ino, len(data) - 5, 5) in vfs.reader.calls
    assert all(size > 0 for _, _, size in vfs.reader.calls)


def test_read_error_becomes_eio_and_logs_the_path(vfs, caplog):
    ino = path(vfs, "big")
    vfs.reader.fail.add(ino)

    async def main():
        with pytest.raises(FsError) as ei:
            await vfs.read(ino, 0, 100)
        return ei.value.errno
    with caplog.at_level(logging.ERROR, logger="nydus_py.fs.vfs"):
        assert trio.run(main) == errno.EIO
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "/big" in lines[0] and "digest mismatch" in lines[0]
    assert vfs.read_errors == 1

    async def other():
        return await vfs.read(path(vfs, "text"), 0, 8)
    assert trio.run(other) == b"abcdefgh"


def test_image_without_any_xattr_answers_enosys_so_the_kernel_stops_asking(rich):
    from tests.fixtures.nydus_build import build
    plain = Bootstrap.from_bytes(build({"a": b"x"}).bootstrap)
    v = Vfs(plain, object())
    assert errno_of(v.listxattr, ROOT_INO) == errno.ENOSYS
    assert errno_of(v.getxattr, ROOT_INO, b"user.x") == errno.ENOSYS
    hidden = Vfs(Bootstrap.from_bytes(rich.bootstrap), object(), xattrs=False)
    assert errno_of(hidden.listxattr, ROOT_INO) == errno.ENOSYS
