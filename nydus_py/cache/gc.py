"""Cache directory housekeeping shared by the daemon (eviction) and `nydusd cache gc`.

Who uses a blob: every process that has a blob's cache files open holds a POSIX record lock
(`lockf`, F_RDLCK over the whole `.meta` file) for as long as it does. So "no mount is using
this blob" is exactly "F_WRLCK on its meta file can be taken without waiting", which is how
`remove_if_unused` decides, and it holds the write lock while it unlinks, so a daemon opening
the blob at that moment waits and then notices (st_nlink == 0) that it must create fresh files.

POSIX record locks belong to the process and vanish when *any* descriptor of the file is
closed by it. Callers inside a daemon must therefore never probe a blob they have open
themselves (ChunkCache passes its open blobs as `skip`).

LRU order between blobs is the meta file's mtime: a store writes records (bumping it), and
ChunkCache touches it when it opens and closes a blob, so it reflects the last mount that used
the blob. Within an open blob, ChunkCache keeps per-chunk recency in memory (see there).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from nydus_py.config.parse import parse_size  # noqa: F401  (re-exported: one size parser)

log = logging.getLogger(__name__)

META_MAGIC = b"NYPYBCM\x00"
META_VERSION = 1
HEADER = struct.Struct("<8sHHIQ32s8x")
RECORD = struct.Struct("<BxxxIQ")
READY = 1


@dataclass
class BlobUsage:
    hexid: str
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

    def to_dict(self) -> dict:
        return {"before_bytes": self.before, "after_bytes": self.after,
                "removed_blobs": self.removed_blobs, "removed_bytes": self.removed_bytes,
                "busy_blobs": self.busy_blobs}


def _is_hex(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


def used_in_meta(meta: bytes) -> int | None:
    """Bytes of ready chunks described by a meta file's content, None if it is malformed."""
    if len(meta) < HEADER.size:
        return None
    magic, version, rsize, count, _usize, _sha = HEADER.unpack_from(meta, 0)
    if magic != META_MAGIC or version != META_VERSION or rsize != RECORD.size:
        return None
    used = 0
    recs = memoryview(meta)[HEADER.size:HEADER.size + count * RECORD.size]
    for ready, size, _ in RECORD.iter_unpack(recs[:len(recs) - len(recs) % RECORD.size]):
        if ready == READY:
            used += size
    return used


def scan(work_dir: str | os.PathLike, skip: Iterable[str] = ()) -> list[BlobUsage]:
    """Every blob (and stray file group) in `work_dir` except the hex ids in `skip`.
    Reads meta files without locking (a racing writer only makes the number slightly stale)."""
    work = Path(work_dir)
    skip = set(skip)
    names: dict[str, list[str]] = {}
    try:
        entries = list(os.scandir(work))
    except FileNotFoundError:
        return []
    for e in entries:
        stem, dot, ext = e.name.partition(".")
        if dot and ext in ("data", "meta") and _is_hex(stem) and stem not in skip:
            names.setdefault(stem, []).append(ext)
    out = []
    for hexid, exts in sorted(names.items()):
        disk, mtime, used, valid = 0, 0.0, 0, False
        for ext in exts:
            try:
                st = os.stat(work / f"{hexid}.{ext}")
            except FileNotFoundError:
                continue
            disk += st.st_blocks * 512
            if ext == "meta":
                mtime = st.st_mtime
        if "meta" in exts and "data" in exts:
            try:
                u = used_in_meta((work / f"{hexid}.meta").read_bytes())
            except OSError:
                u = None
            if u is not None:
                used, valid = u, True
        out.append(BlobUsage(hexid, used, disk, mtime, valid))
    return out


def remove_if_unused(work_dir: str | os.PathLike, hexid: str) -> bool:
    """Deletes a blob's cache files if no process has them open (see module docstring)."""
    work = Path(work_dir)
    meta = work / f"{hexid}.meta"
    try:
        fd = os.open(meta, os.O_RDWR | os.O_CLOEXEC)
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
                os.unlink(work / f"{hexid}.{ext}")
            except FileNotFoundError:
                pass
        return True
    finally:
        if fd >= 0:
            os.close(fd)        # releases the lock


def collect(work_dir: str | os.PathLike, max_size: int = 0, *, skip: Iterable[str] = (),
            extra_used: int = 0) -> GcReport:
    """Removes unused blobs, least recently used first, until the accounted size (plus
    `extra_used`, e.g. the caller's own open blobs) is at most `max_size`. Malformed leftovers
    (a data file without meta, a meta file of another version) go first. `max_size=0` removes
    every unused blob."""
    blobs = scan(work_dir, skip)
    report = GcReport(before=extra_used + sum(b.used for b in blobs))
    total = report.before
    for b in sorted(blobs, key=lambda b: (b.valid, b.mtime)):
        if b.valid and total <= max_size:
            break
        if remove_if_unused(work_dir, b.hexid):
            report.removed_blobs.append(b.hexid)
            report.removed_bytes += b.disk
            total -= b.used
        elif b.valid:
            report.busy_blobs.append(b.hexid)
    report.after = total
    if report.removed_blobs:
        log.info("cache %s: removed %d unused blobs (%d bytes on disk); %d bytes accounted now",
                 work_dir, len(report.removed_blobs), report.removed_bytes, total)
    return report
