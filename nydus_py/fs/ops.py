"""pyfuse3 adapter: a protocol translation layer over `fs.vfs.Vfs`, nothing more.

Only `FUSEError` leaves a handler: `FsError` becomes its errno, and anything unexpected is
logged with a traceback and answered with EIO, so a bug costs one request, not the daemon.
The image is immutable, hence long entry/attr timeouts (negative lookups are cached too) and
`keep_cache` on open: after the first read the kernel page cache serves the data.
File and directory handles are the inode number itself; there is no per-open state, so with a
patched pyfuse3 (NO_OPEN below) the kernel is told to skip OPEN/OPENDIR altogether.
"""

from __future__ import annotations

import errno
import functools
import logging

import pyfuse3

from nydus_py.fs.vfs import FsError, Stat, Vfs

log = logging.getLogger(__name__)

TIMEOUT = 86400.0  # seconds; nothing in the image ever changes
# pyfuse3 built with scripts/pyfuse3-fh-zero-is-inode.patch passes the inode as `fh` to read()
# and readdir() when the kernel sent no OPEN/OPENDIR. Only then can OPEN/OPENDIR answer ENOSYS,
# which makes the kernel stop sending OPEN/RELEASE and OPENDIR/RELEASEDIR for the rest of the
# mount (fc->no_open, fc->no_opendir), keep file pages (FOPEN_KEEP_CACHE) and cache directory
# listings (FOPEN_CACHE_DIR). See docs/architecture.md, "pyfuse3 patch".
NO_OPEN = bool(getattr(pyfuse3, "FH_ZERO_IS_INODE", False))


def _guard(fn):
    """Maps FsError to FUSEError and turns any other exception into a logged EIO."""
    @functools.wraps(fn)
    async def wrapper(self, *args):
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except FsError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        except Exception:
            log.exception("internal error in %s%r", fn.__name__, args[:3])
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


def _erofs(name: str):
    async def handler(self, *args, **kwargs):
        raise pyfuse3.FUSEError(errno.EROFS)
    handler.__name__ = name
    return handler


def entry_attributes(st: Stat) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = st.ino
    e.generation = 0
    e.entry_timeout = TIMEOUT
    e.attr_timeout = TIMEOUT
    e.st_mode = st.mode
    e.st_nlink = st.nlink
    e.st_uid = st.uid
    e.st_gid = st.gid
    e.st_rdev = st.rdev
    e.st_size = st.size
    e.st_blksize = st.blksize
    e.st_blocks = st.blocks
    e.st_atime_ns = st.atime_ns
    e.st_mtime_ns = st.mtime_ns
    e.st_ctime_ns = st.ctime_ns
    return e


def _negative_entry() -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = 0          # "no such entry", cached by the kernel for entry_timeout
    e.entry_timeout = TIMEOUT
    return e


class NydusOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, vfs: Vfs, *, no_open: bool = NO_OPEN):
        super().__init__()
        self.vfs = vfs
        self.no_open = no_open

    @_guard
    async def lookup(self, parent_inode, name, ctx=None):
        try:
            ino = self.vfs.lookup(parent_inode, name)
        except FsError as e:
            if e.errno == errno.ENOENT:
                return _negative_entry()
            raise
        return entry_attributes(self.vfs.getattr(ino))

    async def forget(self, inode_list):
        pass  # every inode lives as long as the mount; nothing to release

    @_guard
    async def getattr(self, inode, ctx=None):
        return entry_attributes(self.vfs.getattr(inode))

    @_guard
    async def readlink(self, inode, ctx=None):
        return self.vfs.readlink(inode)

    @_guard
    async def opendir(self, inode, ctx=None):
        self.vfs.getattr(inode)
        if self.no_open:    # "no opendir handler": readdir gets fh 0, which pyfuse3 maps to inode
            raise pyfuse3.FUSEError(errno.ENOSYS)
        return inode

    @_guard
    async def readdir(self, fh, start_id, token):
        for entry in self.vfs.readdir(fh, start_id):
            attrs = entry_attributes(self.vfs.getattr(entry.ino))
            if not pyfuse3.readdir_reply(token, entry.name, attrs, entry.next):
                break

    async def releasedir(self, fh):
        pass

    @_guard
    async def open(self, inode, flags, ctx=None):
        self.vfs.open(inode, flags)
        if self.no_open:
            # The open is allowed; ENOSYS says so for this and every later open of the mount
            # (the ro mount refuses write opens before they reach us).
            raise pyfuse3.FUSEError(errno.ENOSYS)
        fi = pyfuse3.FileInfo(fh=inode)
        fi.keep_cache = True
        fi.direct_io = False
        return fi

    @_guard
    async def read(self, fh, off, size):
        return await self.vfs.read(fh, off, size)

    async def release(self, fh):
        pass

    async def flush(self, fh):
        # ENOSYS once: the kernel then stops sending FLUSH (a round trip on every close()) and
        # close() returns 0 (fs/fuse/file.c sets fc->no_flush). Nothing to flush here anyway.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_guard
    async def getxattr(self, inode, name, ctx=None):
        return self.vfs.getxattr(inode, name)

    @_guard
    async def listxattr(self, inode, ctx=None):
        return self.vfs.listxattr(inode)

    @_guard
    async def statfs(self, ctx=None):
        s = self.vfs.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = s.bsize
        out.f_frsize = s.frsize
        out.f_blocks = s.blocks
        out.f_bfree = s.bfree
        out.f_bavail = s.bavail
        out.f_files = s.files
        out.f_ffree = s.ffree
        out.f_favail = s.favail
        out.f_namemax = s.namemax
        return out

    # Everything that would change the tree: the image is read-only.
    setattr = _erofs("setattr")
    mknod = _erofs("mknod")
    mkdir = _erofs("mkdir")
    unlink = _erofs("unlink")
    rmdir = _erofs("rmdir")
    symlink = _erofs("symlink")
    rename = _erofs("rename")
    link = _erofs("link")
    create = _erofs("create")
    write = _erofs("write")
    setxattr = _erofs("setxattr")
    removexattr = _erofs("removexattr")
