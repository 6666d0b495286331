"""One cache entry's files: its key, its header, and creating or replacing them safely.

The layout is defined in cache/gc.py; the policy (who may replace what, and why the key holds
the chunk table's digest) in chunk_cache.py's docstring and docs/operations.md "Trust model".
Every file is opened under the cache directory's fd with O_NOFOLLOW (cache/safedir.py).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import stat
import threading
import weakref

from nydus_py.cache import gc as gc_mod
from nydus_py.cache import safedir
from nydus_py.cache.gc import HEADER, META_MAGIC, META_VERSION, RECORD
from nydus_py.errors import CacheError
from nydus_py.format.bootstrap import CHUNK, CHUNK_COMPRESSED, BlobInfo, Bootstrap

log = logging.getLogger(__name__)

_TABLE_MAGIC = b"nydus-py chunk table v1\0"
# the bytes of a CHUNK row that describe the chunk itself (not its blob's index in a bootstrap)
_ROW_BLOB = range(4)
_ROW_FLAGS = 28
_KEEP_COMPRESSED = bytes(b & CHUNK_COMPRESSED for b in range(256))
assert CHUNK.size == 32 and CHUNK_COMPRESSED < 256


# table_digest's results per bootstrap (a 100k-chunk table costs ~5 ms): the mount computes
# them in its image-opening thread, while the main thread is still importing (daemon/mount.py)
_DIGESTS: weakref.WeakKeyDictionary[Bootstrap, dict[int, bytes]] = weakref.WeakKeyDictionary()
_DIGESTS_LOCK = threading.Lock()


def table_digest(bootstrap: Bootstrap, blob: int) -> bytes:
    """_table_digest, computed once per bootstrap and blob."""
    with _DIGESTS_LOCK:
        known = _DIGESTS.get(bootstrap)
        if known is not None and blob in known:
            return known[blob]
    digest = _table_digest(bootstrap, blob)
    with _DIGESTS_LOCK:
        _DIGESTS.setdefault(bootstrap, {})[blob] = digest
    return digest


def _table_digest(bootstrap: Bootstrap, blob: int) -> bytes:
    """sha256 of the chunk table of blob `blob` as `bootstrap` describes it: the blob's digest,
    compressor, sizes and chunk count, then per chunk (in index order) its compressed
    offset/size, uncompressed offset/size, compressed flag and sha256. The blob's position in
    the bootstrap is left out (it differs between images sharing the blob). Part of the cache
    key: see the module docstring. Chunks never overlap in the uncompressed data nor leave it
    (the bootstrap loader refuses such a table, format/validate.py), so storing one chunk can
    never change another."""
    info = bootstrap.blobs[blob]
    rows, digests = bootstrap.blob_chunk_rows(blob)
    canon = bytearray(rows)
    zero = bytes(len(rows) // CHUNK.size)
    for i in _ROW_BLOB:                       # strided slice assignment: no per-chunk Python
        canon[i::CHUNK.size] = zero
    canon[_ROW_FLAGS::CHUNK.size] = bytes(canon[_ROW_FLAGS::CHUNK.size]).translate(_KEEP_COMPRESSED)
    for i in range(_ROW_FLAGS + 1, CHUNK.size):
        canon[i::CHUNK.size] = zero
    h = hashlib.sha256(_TABLE_MAGIC)
    h.update(f"{info.id}\0{info.compressor}\0{info.compressed_size}\0{info.uncompressed_size}\0"
             f"{info.chunk_count}\0".encode())
    h.update(canon)
    h.update(digests)
    return h.digest()



def header(blob: BlobInfo, hexid: str, table: bytes) -> bytes:
    return HEADER.pack(META_MAGIC, META_VERSION, RECORD.size, blob.chunk_count,
                       blob.uncompressed_size, bytes.fromhex(hexid), table)


def untabled(blob: BlobInfo) -> bytes:
    """The table part of the key when a caller gives none (unit tests with one image)."""
    return hashlib.sha256(f"untabled\0{blob.id}\0{blob.uncompressed_size}\0"
                          f"{blob.chunk_count}".encode()).digest()


def open_existing(dir_fd: int, key: str) -> tuple[int, int] | None:
    """(data fd, meta fd) of the entry, or None if either file does not exist."""
    flags = os.O_RDWR
    try:
        data_fd = safedir.open_file(gc_mod.file_name(key, "data"), flags, dir_fd)
    except FileNotFoundError:
        return None
    try:
        meta_fd = safedir.open_file(gc_mod.file_name(key, "meta"), flags, dir_fd)
    except FileNotFoundError:
        os.close(data_fd)
        return None
    except OSError:
        os.close(data_fd)
        raise
    return data_fd, meta_fd


def valid(data_fd: int, meta_fd: int, head: bytes, size: int) -> bool:
    st_meta, st_data = os.fstat(meta_fd), os.fstat(data_fd)
    return (stat.S_ISREG(st_meta.st_mode) and stat.S_ISREG(st_data.st_mode)
            and st_data.st_size == size and os.pread(meta_fd, HEADER.size, 0) == head)


def install(dir_fd: int, key: str, blob: BlobInfo, head: bytes, what: str) -> None:
    """Creates the entry's files, or replaces them if their header is bad and nobody has
    them open: new files under temporary names, renamed into place, all under an flock of
    the directory. Never truncates a file in place. CacheError(EBUSY) when a bad
    entry is in use by another process (that blob is then read uncached).
    The flock is of the directory itself: it excludes other processes (each ChunkCache has its
    own open directory); within one, ChunkCache.open_blob's lock serialises the callers."""
    tmp_data, tmp_meta = f".{key}.data.new", f".{key}.meta.new"
    fds: list[int] = []
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        old = open_existing(dir_fd, key)
        if old is not None:
            fds.extend(old)
            if valid(old[0], old[1], head, blob.uncompressed_size):
                return                      # somebody else created it meanwhile
            try:
                fcntl.lockf(old[1], fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    raise CacheError(f"{what}: the cache entry has a bad header and another "
                                     "process has it open; not touching it",
                                     errno=errno.EBUSY) from None
                raise
            log.warning("%s: entry %s does not match (other version, or interrupted); "
                        "replacing it", what, key[:12])
        for name in (tmp_data, tmp_meta):   # leftovers of a creator that died
            try:
                os.unlink(name, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
        create = os.O_RDWR | os.O_CREAT | os.O_EXCL
        data_fd = safedir.open_file(tmp_data, create, dir_fd)
        fds.append(data_fd)
        meta_fd = safedir.open_file(tmp_meta, create, dir_fd)
        fds.append(meta_fd)
        os.ftruncate(data_fd, blob.uncompressed_size)
        os.ftruncate(meta_fd, HEADER.size + blob.chunk_count * RECORD.size)
        if os.pwrite(meta_fd, head, 0) != len(head):
            raise OSError(errno.ENOSPC, "short write of the header")
        # data first: a process that opens new data + old meta finds a bad header and
        # comes here, where it waits for us
        os.rename(tmp_data, gc_mod.file_name(key, "data"), src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.rename(tmp_meta, gc_mod.file_name(key, "meta"), src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as e:
        for name in (tmp_data, tmp_meta):
            try:
                os.unlink(name, dir_fd=dir_fd)
            except OSError:
                pass
        raise CacheError(f"{what}: cannot create the cache files: {e.strerror}",
                         errno=e.errno) from None
    finally:
        for fd in fds:
            os.close(fd)
        fcntl.flock(dir_fd, fcntl.LOCK_UN)
