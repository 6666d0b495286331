"""Filesystem semantics over a Bootstrap and a FileReader, with no FUSE import.

This is where every decision about what a file "looks like" lives: attributes, directory
listings and their resume offsets, symlinks, xattrs, the read-only policy and how data-path
failures become errnos. `fs/ops.py` only translates these results into pyfuse3 types, so all
of this is tested without mounting (tests/fs/).

Errors leave as `FsError(errno)`; the adapter turns them into `FUSEError`. Anything else that
escapes is a bug, which the adapter logs with a traceback and reports as EIO.

Inode numbers are the bootstrap's (1 is the root, as for FUSE); hardlinks share one number.
Directory offsets (the `next` value of each readdir entry, which the kernel hands back to
resume a listing) are positional: 1 after ".", 2 after "..", 3+i after the i-th dirent. The
image is immutable, so a position always names the same entry.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from typing import Iterator, NamedTuple, Protocol

from nydus_py.errors import NydusError
from nydus_py.format.bootstrap import ROOT_INO, Bootstrap
from nydus_py.fs.access import AccessRecorder, Inflight
from nydus_py.io.learned import ChunkRecorder
from nydus_py.metrics import Metrics

log = logging.getLogger(__name__)

BLOCK = 512                     # st_blocks unit
STATFS_BSIZE = 4096
NAME_MAX = 255
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


class FsError(Exception):
    """A filesystem-level failure with the errno the caller should see."""

    def __init__(self, err: int, message: str = ""):
        super().__init__(message or os.strerror(err))
        self.errno = err


class Reader(Protocol):
    # any buffer: pyfuse3 replies from it as it is (FileReader serves cache hits without a copy)
    async def read(self, ino: int, offset: int, size: int) -> bytes | bytearray | memoryview: ...


class Stat(NamedTuple):
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int
    blksize: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


class StatFs(NamedTuple):
    bsize: int
    frsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    favail: int
    namemax: int


class DirEntry(NamedTuple):
    next: int       # the offset to resume after this entry
    name: bytes
    ino: int


class Vfs:
    """Read-only filesystem view of one image. Safe to share between concurrent requests."""

    def __init__(self, bootstrap: Bootstrap, reader: Reader, *, metrics: Metrics | None = None,
                 xattrs: bool = True, record_access: bool = False, image: str = ""):
        self.bootstrap = bootstrap
        self.image = image              # named in log lines
        # access_pattern / iostats_files: which files are read, first-read order
        self.access = AccessRecorder(bootstrap) if record_access else None
        self.learn: ChunkRecorder | None = None     # chunks read, for learned prefetch
        self.inflight = Inflight()
        self.xattrs = xattrs            # nydusd's enable_xattr: False hides all xattrs
        self.reader = reader
        self.metrics = metrics
        # Preferred I/O size: the chunk size, within sane bounds (cp and friends size buffers by it).
        self.blksize = min(max(bootstrap.chunk_size, 4096), 1 << 20)
        self._total_size: int | None = None
        self.read_errors = 0

    # -- metadata ---------------------------------------------------------------------------
    def _attr(self, ino: int):
        try:
            return self.bootstrap.attr(ino)
        except KeyError:
            raise FsError(errno.ENOENT, f"no inode {ino}") from None

    def getattr(self, ino: int) -> Stat:
        a = self._attr(ino)
        return Stat(ino=a.ino, mode=a.mode, nlink=a.nlink, uid=a.uid, gid=a.gid, rdev=a.rdev,
                    size=a.size, blocks=-(-a.size // BLOCK), blksize=self.blksize,
                    atime_ns=a.mtime_ns, mtime_ns=a.mtime_ns, ctime_ns=a.mtime_ns)

    def _dir(self, ino: int) -> None:
        if not stat.S_ISDIR(self._attr(ino).mode):
            raise FsError(errno.ENOTDIR)

    def lookup(self, parent: int, name: bytes) -> int:
        """The inode of `name` in directory `parent`; FsError(ENOENT) when absent."""
        self._dir(parent)
        if name == b".":
            return parent
        if name == b"..":
            return self.bootstrap.parent(parent) or ROOT_INO
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        ino = self.bootstrap.lookup(parent, name)
        if ino is None:
            raise FsError(errno.ENOENT)
        return ino

    def readdir(self, ino: int, offset: int = 0) -> Iterator[DirEntry]:
        """Entries after position `offset` (0 = from the start), "." and ".." first."""
        self._dir(ino)
        if offset < 0:
            raise FsError(errno.EINVAL)
        if offset == 0:
            yield DirEntry(1, b".", ino)
        if offset <= 1:
            yield DirEntry(2, b"..", self.bootstrap.parent(ino) or ROOT_INO)
        for i, name, child in self.bootstrap.readdir(ino, max(offset - 2, 0)):
            yield DirEntry(i + 3, name, child)

    def readlink(self, ino: int) -> bytes:
        self._count("readlinks")    # the kernel caches targets (FUSE_CAP_CACHE_SYMLINKS): one per link
        if not stat.S_ISLNK(self._attr(ino).mode):
            raise FsError(errno.EINVAL)
        try:
            return self.bootstrap.readlink(ino)
        except NydusError as e:
            raise self._bad_record("readlink", ino, e) from None

    def getxattr(self, ino: int, name: bytes) -> bytes:
        self._attr(ino)
        self._check_xattr_support()
        value = self._xattrs(ino).get(name)
        if value is None:
            raise FsError(errno.ENODATA)
        return value

    def listxattr(self, ino: int) -> list[bytes]:
        self._attr(ino)
        self._check_xattr_support()
        return list(self._xattrs(ino))

    def _xattrs(self, ino: int) -> dict[bytes, bytes]:
        try:
            return self.bootstrap.xattrs(ino)
        except NydusError as e:
            raise self._bad_record("xattrs of", ino, e) from None

    def _bad_record(self, op: str, ino: int, e: NydusError) -> FsError:
        """A record that failed its use-time check (format/validate.py): EIO for this inode,
        one log line, the mount serves on."""
        self._count("read_errors")
        log.error("%s %s (inode %d)%s failed: %s", op, self.bootstrap.path_of(ino), ino,
                  f" of image {self.image}" if self.image else "", e)
        return FsError(errno.EIO, str(e))

    def _check_xattr_support(self) -> None:
        """An image without a single xattr (or enable_xattr off) answers ENOSYS: the kernel then
        remembers that this mount has no xattrs and answers EOPNOTSUPP itself, instead of a
        round trip per file (`ls -l` asks for two xattrs of every file it lists; FUSE never
        caches the answers). That is what a filesystem without xattr support says anyway."""
        if not self.xattrs or self.bootstrap.xattr_count == 0:
            raise FsError(errno.ENOSYS)

    def statfs(self) -> StatFs:
        if self._total_size is None:
            self._total_size = self._sum_file_sizes()
        blocks = -(-self._total_size // STATFS_BSIZE)
        return StatFs(bsize=STATFS_BSIZE, frsize=STATFS_BSIZE, blocks=blocks, bfree=0, bavail=0,
                      files=self.bootstrap.inode_count, ffree=0, favail=0, namemax=NAME_MAX)

    def _sum_file_sizes(self) -> int:
        total = 0
        for ino in range(1, self.bootstrap.inode_count + 1):
            a = self.bootstrap.attr(ino)
            if stat.S_ISREG(a.mode):
                total += a.size
        return total

    # -- data -------------------------------------------------------------------------------
    def open(self, ino: int, flags: int) -> None:
        """Checks that `ino` may be opened with `flags`: read-only opens of regular files."""
        mode = self._attr(ino).mode
        if flags & WRITE_FLAGS:
            raise FsError(errno.EROFS)
        if stat.S_ISDIR(mode):
            raise FsError(errno.EISDIR)
        if not stat.S_ISREG(mode):
            raise FsError(errno.EINVAL)

    async def read(self, ino: int, offset: int, size: int) -> bytes | bytearray | memoryview:
        a = self._attr(ino)
        if not stat.S_ISREG(a.mode):
            raise FsError(errno.EINVAL)
        if offset < 0 or size < 0:
            raise FsError(errno.EINVAL)
        if offset >= a.size or size == 0:
            return b""
        size = min(size, a.size - offset)
        if self.access is not None:
            self.access.record(ino, size)
        if self.learn is not None:
            self.learn.record(ino, offset, size)
        token = self.inflight.begin("read", ino, offset, size)
        try:
            return await self.reader.read(ino, offset, size)
        except NydusError as e:
            self.read_errors += 1
            self._count("read_errors")     # nydusd: fs "fop_errors"
            where = self.bootstrap.path_of(ino)
            msg = str(e).removeprefix(f"{where}: ")      # the reader may name the file already
            log.error("read %s (inode %d, offset %d, size %d)%s failed: %s", where, ino, offset,
                      size, f" of image {self.image}" if self.image else "", msg)
            raise FsError(e.errno or errno.EIO, str(e)) from None
        finally:
            self.inflight.end(token)

    def _count(self, name: str) -> None:
        if self.metrics is not None:
            self.metrics.fs.inc(name)
