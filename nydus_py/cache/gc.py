"""Cache directory layout and housekeeping shared by the daemon (eviction) and `nydusd cache gc`.

Layout (defined here, once; ChunkCache writes what this module reads). An entry is one blob *as
one chunk table describes it*, named by its key:

    KEY = <blob sha256 hex> "-" <chunk table sha256 hex>     (see entry.table_digest)
    KEY.data   sparse file of the blob's uncompressed size; chunk i lives at its offset
    KEY.meta   HEADER (96 bytes) + one RECORD (16 bytes) per chunk, at 96 + 16 * index

    HEADER  magic b"NYPYBCM\\0", version u16 (2), record size u16, chunk_count u32,
            uncompressed size u64, blob sha256 (32 bytes), chunk table sha256 (32 bytes), 8 zero
    RECORD  ready u8 (1 = chunk stored), 3 bytes zero, size u32, xxh3-64 of the data u64

Files of layout version 1 (`<blob hex>.data/.meta`, keyed by the blob only) are garbage to this
version: `scan` lists them as invalid, so eviction and gc remove them first.

Every file is opened relative to the directory's fd with O_NOFOLLOW (cache/safedir.py). An entry
is created or replaced under an flock of the directory itself (cache/entry.py: install),
as `.KEY.data.new` / `.KEY.meta.new` renamed into place.

Who uses an entry: every process that has an entry's cache files open holds a POSIX record lock
(`lockf`, F_RDLCK over the whole `.meta` file) for as long as it does. So "no mount is using
this entry" is exactly "F_WRLCK on its meta file can be taken without waiting", which is how
`remove_if_unused` decides, and it holds the write lock while it unlinks, so a daemon opening
the entry at that moment waits and then notices (st_nlink == 0) that it must create fresh files.

POSIX record locks belong to the process and vanish when *any* descriptor of the file is
closed by it. Callers inside a daemon must therefore never probe an entry they have open
themselves (ChunkCache passes its open entries as `skip`).

LRU order between entries is the meta file's mtime: a store writes records (bumping it), and
ChunkCache touches it when it opens and closes an entry, so it reflects the last mount that used
it. Within an open entry, ChunkCache keeps per-chunk recency in memory (see there).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
from dataclasses import dataclass, field
from typing import Iterable

from nydus_py.config.parse import parse_size  # noqa: F401  (re-exported: one size parser)
from nydus_py.cache import safedir

log = logging.getLogger(__name__)

META_MAGIC = b"NYPYBCM\x00"
META_VERSION = 2
HEADER = struct.Struct("<8sHHIQ32s32s8x")
RECORD = struct.Struct("<BxxxIQ")
READY = 1
_HEX = frozenset("0123456789abcdef")


def entry_key(blob_hex: str, table: bytes) -> str:
    """The name stem of the cache entry of blob `blob_hex` read through chunk table `table`."""
    return f"{blob_hex}-{table.hex()}"


def file_name(key: str, ext: str) -> str:
    return f"{key}.{ext}"


@dataclass
class BlobUsage:
    key: str              # entry key (see module docstring); a bare blob hex for v1 leftovers
    used: int             # bytes of ready chunks (0 for garbage)
    disk: int             # bytes allocated on disk (data + meta)
    mtime: float          # last use (meta mtime)
    valid: bool           # a well-formed meta file with a matching data file


@dataclass
class GcReport:
    before: int = 0                 # accounted bytes (ready chunks) before
    after: int = 0
    removed_blobs: list[str] = field(default_factory=list)
    removed_bytes: int = 0
    busy_blobs: list[str] = field(default_factory=list)   # over the limit but in use
    removed_images: list[str] = field(default_factory=list)   # bootstrap digests (images.py)
    busy_images: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"before_bytes": self.before, "after_bytes": self.after,
                "removed_blobs": self.removed_blobs, "removed_bytes": self.removed_bytes,
                "busy_blobs": self.busy_blobs, "removed_images": self.removed_images,
                "busy_images": self.busy_images}


def _is_hex(name: str) -> bool:
    return len(name) == 64 and _HEX.issuperset(name)


def is_key(stem: str) -> bool:
    """An entry key, or the bare blob hex of a layout-1 leftover."""
    blob, dash, table = stem.partition("-")
    return _is_hex(blob) and (not dash or _is_hex(table))


def used_in_meta(meta: bytes) -> int | None:
    """Bytes of ready chunks described by a meta file's content, None if it is malformed."""
    if len(meta) < HEADER.size:
        return None
    magic, version, rsize, count, _usize, _sha, _table = HEADER.unpack_from(meta, 0)
    if magic != META_MAGIC or version != META_VERSION or rsize != RECORD.size:
        return None
    used = 0
    recs = memoryview(meta)[HEADER.size:HEADER.size + count * RECORD.size]
    for ready, size, _ in RECORD.iter_unpack(recs[:len(recs) - len(recs) % RECORD.size]):
        if ready == READY:
            used += size
    return used


def _read_meta(dir_fd: int, name: str) -> bytes | None:
    try:
        fd = safedir.open_file(name, os.O_RDONLY, dir_fd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        return os.pread(fd, st.st_size, 0)
    except OSError:
        return None
    finally:
        os.close(fd)


def scan(work_dir: str | os.PathLike | int, skip: Iterable[str] = ()) -> list[BlobUsage]:
    """Every entry (and stray file group) in `work_dir` (a path or a directory fd) except the
    keys in `skip`. Reads meta files without locking (a racing writer only makes the number
    slightly stale)."""
    with _Dir(work_dir) as dfd:
        if dfd < 0:
            return []
        skip = set(skip)
        names: dict[str, list[str]] = {}
        with os.scandir(dfd) as it:
            entries = list(it)
        for e in entries:
            stem, dot, ext = e.name.partition(".")
            if dot and ext in ("data", "meta") and is_key(stem) and stem not in skip:
                names.setdefault(stem, []).append(ext)
        out = []
        for key, exts in sorted(names.items()):
            disk, mtime, used, valid = 0, 0.0, 0, False
            for ext in exts:
                try:
                    st = os.stat(file_name(key, ext), dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                disk += st.st_blocks * 512
                if ext == "meta":
                    mtime = st.st_mtime
            if "meta" in exts and "data" in exts:
                meta = _read_meta(dfd, file_name(key, "meta"))
                u = used_in_meta(meta) if meta is not None else None
                if u is not None:
                    used, valid = u, True
            out.append(BlobUsage(key, used, disk, mtime, valid))
        return out


class _Dir:
    """A directory fd for the duration of a `with`: borrowed if given an fd, else opened
    (O_NOFOLLOW on the last component; -1 if the directory does not exist)."""

    def __init__(self, where: str | os.PathLike | int):
        self.where = where
        self.fd = -1
        self.own = False

    def __enter__(self) -> int:
        if isinstance(self.where, int):
            return self.where
        try:
            self.fd = os.open(self.where, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            self.own = True
        except FileNotFoundError:
            self.fd = -1
        return self.fd

    def __exit__(self, *exc) -> None:
        if self.own:
            os.close(self.fd)


def remove_if_unused(work_dir: str | os.PathLike | int, key: str) -> bool:
    """Deletes an entry's cache files if no process has them open (see module docstring)."""
    with _Dir(work_dir) as dfd:
        if dfd < 0:
            return False
        meta = file_name(key, "meta")
        try:
            fd = safedir.open_file(meta, os.O_RDWR, dfd)
        except FileNotFoundError:
            fd = -1
        except OSError as e:
            log.warning("cache gc: cannot open %s: %s", meta, e.strerror)
            return False
        try:
            if fd >= 0:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno in (errno.EAGAIN, errno.EACCES):
                        return False        # a mount has it open
                    raise
            for ext in ("data", "meta"):
                try:
                    os.unlink(file_name(key, ext), dir_fd=dfd)
                except FileNotFoundError:
                    pass
            return True
        finally:
            if fd >= 0:
                os.close(fd)        # releases the lock


def _remove_stale_temps(work_dir: str | os.PathLike) -> int:
    """`.KEY.data.new` / `.KEY.meta.new` exist only while a creator holds the directory's flock
    (entry.install); if we can take it, any of them is a dead creator's leftover."""
    freed = 0
    with _Dir(work_dir) as dfd:
        if dfd < 0:
            return 0
        try:
            fcntl.flock(dfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return 0                    # somebody is creating an entry right now
        try:
            with os.scandir(dfd) as it:
                names = [e.name for e in it]
            for name in names:
                stem, _, ext = name[1:].partition(".")
                if name.startswith(".") and ext in ("data.new", "meta.new") and is_key(stem):
                    try:
                        freed += os.stat(name, dir_fd=dfd, follow_symlinks=False).st_blocks * 512
                        os.unlink(name, dir_fd=dfd)
                    except FileNotFoundError:
                        pass
        finally:
            fcntl.flock(dfd, fcntl.LOCK_UN)
    return freed


def collect(work_dir: str | os.PathLike, max_size: int = 0, *, skip: Iterable[str] = (),
            extra_used: int = 0, image_max_age: float | None = None) -> GcReport:
    """Removes unused blobs, least recently used first, until the accounted size (plus
    `extra_used`, e.g. the caller's own open blobs) is at most `max_size`. Malformed leftovers
    (a data file without meta, a meta file of another version) go first. `max_size=0` removes
    every unused blob. Also removes the temporary files of an entry creation that died. With
    `image_max_age`, also the image state (kept bootstraps, learned prefetch lists) that no
    mount uses and that was last used longer ago than that many seconds (cache/images.py)."""
    report = _collect_blobs(work_dir, max_size, skip, extra_used)
    if image_max_age is not None:
        from nydus_py.cache import images
        r = images.collect(work_dir, image_max_age)
        report.removed_images, report.busy_images = r.removed, r.busy
        report.removed_bytes += r.removed_bytes
    return report


def _collect_blobs(work_dir: str | os.PathLike, max_size: int, skip: Iterable[str],
                   extra_used: int) -> GcReport:
    blobs = scan(work_dir, skip)
    report = GcReport(before=extra_used + sum(b.used for b in blobs))
    report.removed_bytes += _remove_stale_temps(work_dir)
    total = report.before
    for b in sorted(blobs, key=lambda b: (b.valid, b.mtime)):
        if b.valid and total <= max_size:
            break
        if remove_if_unused(work_dir, b.key):
            report.removed_blobs.append(b.key)
            report.removed_bytes += b.disk
            total -= b.used
        elif b.valid:
            report.busy_blobs.append(b.key)
    report.after = total
    if report.removed_blobs:
        log.info("cache %s: removed %d unused blobs (%d bytes on disk); %d bytes accounted now",
                 work_dir, len(report.removed_blobs), report.removed_bytes, total)
    return report
