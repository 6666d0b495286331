"""The pyfuse3 adapter, called directly (no mount): only FUSEError leaves a handler."""

import errno
import logging
import os

import pyfuse3
import pytest
import trio

from nydus_py.format.bootstrap import ROOT_INO, Bootstrap
from nydus_py.fs.ops import TIMEOUT, NydusOperations
from nydus_py.fs.vfs import Vfs
from tests.fixtures.rich_image import FakeReader, build_rich


@pytest.fixture(scope="module")
def rich():
    return build_rich()


@pytest.fixture
def ops(rich):
    boot = Bootstrap.from_bytes(rich.bootstrap)
    return NydusOperations(Vfs(boot, FakeReader(boot, rich.files)))


def run(fn, *args):
    return trio.run(fn, *args)


def fuse_errno(fn, *args) -> int:
    with pytest.raises(pyfuse3.FUSEError) as ei:
        trio.run(fn, *args)
    return ei.value.errno


def test_lookup_gives_entry_with_long_timeouts(ops):
    e = run(ops.lookup, ROOT_INO, b"big", None)
    assert e.st_ino > 1 and e.entry_timeout == TIMEOUT and e.attr_timeout == TIMEOUT


def test_lookup_miss_is_a_cached_negative_entry(ops):
    e = run(ops.lookup, ROOT_INO, b"missing", None)
    assert e.st_ino == 0 and e.entry_timeout == TIMEOUT


def test_getattr_of_unknown_inode_is_enoent(ops):
    assert fuse_errno(ops.getattr, 999_999, None) == errno.ENOENT


def test_open_keeps_page_cache_and_refuses_writes(ops):
    ops.no_open = False     # pyfuse3 without the fh-zero patch
    ino = run(ops.lookup, ROOT_INO, b"big", None).st_ino
    fi = run(ops.open, ino, os.O_RDONLY, None)
    assert fi.fh == ino and fi.keep_cache and not fi.direct_io
    assert fuse_errno(ops.open, ino, os.O_RDWR, None) == errno.EROFS


def test_no_open_answers_enosys_after_the_checks_and_reads_by_inode(ops):
    """With the patched pyfuse3: ENOSYS means "opened; stop sending OPEN" to the kernel, so
    the checks still come first; read() and readdir() then get the inode as fh."""
    ops.no_open = True
    ino = run(ops.lookup, ROOT_INO, b"big", None).st_ino
    assert fuse_errno(ops.open, ino, os.O_RDONLY, None) == errno.ENOSYS
    assert fuse_errno(ops.open, ino, os.O_RDWR, None) == errno.EROFS
    assert fuse_errno(ops.opendir, ROOT_INO, None) == errno.ENOSYS
    assert run(ops.read, ino, 0, 5) == run(ops.vfs.read, ino, 0, 5) != b""


@pytest.mark.parametrize("name, args", [
    ("setattr", (2, None, None, None, None)), ("mknod", (1, b"x", 0o644, 0, None)),
    ("mkdir", (1, b"x", 0o755, None)), ("unlink", (1, b"big", None)), ("rmdir", (1, b"etc", None)),
    ("symlink", (1, b"x", b"y", None)), ("rename", (1, b"big", 1, b"x", 0, None)),
    ("link", (2, 1, b"x", None)), ("create", (1, b"x", 0o644, os.O_WRONLY, None)),
    ("write", (2, 0, b"x")), ("setxattr", (2, b"user.x", b"y", None)),
    ("removexattr", (2, b"user.x", None)),
])
def test_every_write_operation_is_erofs(ops, name, args):
    assert fuse_errno(getattr(ops, name), *args) == errno.EROFS


def test_getxattr_missing_is_enodata(ops):
    ino = run(ops.lookup, ROOT_INO, b"big", None).st_ino
    assert fuse_errno(ops.getxattr, ino, b"user.nope", None) == errno.ENODATA


def test_unexpected_exception_becomes_eio_with_traceback(ops, caplog):
    class Boom:
        async def read(self, ino, off, size):
            raise ZeroDivisionError("bug")
    ops.vfs.reader = Boom()
    ino = run(ops.lookup, ROOT_INO, b"big", None).st_ino
    with caplog.at_level(logging.ERROR, logger="nydus_py.fs.ops"):
        assert fuse_errno(ops.read, ino, 0, 10) == errno.EIO
    assert any(r.exc_info and "ZeroDivisionError" in r.exc_text for r in caplog.records) or \
        any(r.exc_info for r in caplog.records)


def test_statfs_reports_inode_count(ops):
    s = run(ops.statfs, None)
    assert s.f_files == ops.vfs.bootstrap.inode_count and s.f_bfree == 0
