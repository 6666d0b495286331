"""Blobs in local directories: nydusd's flat `<dir>/<hex>` layout or an OCI layout dir
(`<dir>/blobs/sha256/<hex>`), with `alt_dirs` (NAS mirrors) tried in order when a blob is
missing from the first directory or reading it fails.

One descriptor per blob, opened on first use and kept (an image has at most a few hundred
blobs); reads are `os.pread`, so threads share a descriptor. Each handle counts the threads
using it and is closed only when it has been dropped (failed, replaced, `close()`) AND nobody is
inside a pread on it: closing earlier could let the fd number be reused and another file's
bytes be returned.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from nydus_py.errors import BackendError, BlobNotFoundError, ConfigError
from nydus_py.storage.backend import blob_hex, check_range, range_error

if TYPE_CHECKING:
    from nydus_py.config.schema import LocalFsConfig

# errnos where the same read may well succeed later (network filesystems, flaky disks).
TRANSIENT_ERRNOS = frozenset({
    errno.EIO, errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ESTALE, errno.ENOTCONN,
    errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.ENETDOWN, errno.ENETUNREACH, errno.ECONNRESET,
    errno.ENOLCK, errno.ENOMEM, errno.EMFILE, errno.ENFILE,
})


class _Handle:
    __slots__ = ("fd", "size", "path", "root", "users", "dead")

    def __init__(self, fd: int, size: int, path: str, root: int):
        self.fd, self.size, self.path, self.root = fd, size, path, root
        self.users = 1      # threads using it right now (the creator counts)
        self.dead = False   # no longer in the table: close when the last user is done


def _os_error(blob_id: str, what: str, e: OSError) -> BackendError:
    return BackendError(f"blob {blob_id}: {what}: {e.strerror or e}",
                        permanent=e.errno not in TRANSIENT_ERRNOS)


class LocalFsBackend:
    """`BlobBackend` over local directories (see storage/backend.py for the contract)."""

    @classmethod
    def from_config(cls, config: "LocalFsConfig") -> "LocalFsBackend":
        # The primary dir must exist at startup; alt_dirs may be NAS mounts that come later.
        if not os.path.isdir(config.dir):
            raise ConfigError(f"backend.config.dir: {config.dir} is not a directory")
        return cls(config.dir, config.alt_dirs)

    def __init__(self, dir: str | os.PathLike, alt_dirs: Sequence[str | os.PathLike] = ()):
        self.roots = [Path(dir), *(Path(d) for d in alt_dirs)]
        self._lock = threading.Lock()
        self._handles: dict[str, _Handle] = {}
        self._closed = False

    def __repr__(self) -> str:
        return f"LocalFsBackend({', '.join(map(str, self.roots))})"

    # -- BlobBackend --------------------------------------------------------------------------
    def blob_size(self, blob_id: str) -> int:
        h = self._acquire(blob_id)
        self._release(h)
        return h.size

    def read_range(self, blob_id: str, offset: int, length: int) -> bytes:
        check_range(offset, length)
        h = self._acquire(blob_id)
        try:
            try:
                return self._pread(h, blob_id, offset, length)
            except BackendError as e:
                err = e
            # The first copy failed: try the following directories, in order.
            start = h.root + 1
            while start < len(self.roots):
                try:
                    alt = self._locate(blob_id, start)
                except BackendError:
                    break
                try:
                    data = self._pread(alt, blob_id, offset, length)
                except BackendError as e:
                    err = e
                    start = alt.root + 1
                    self._release(alt, kill=True)
                    continue
                self._swap(blob_id, h, alt)
                self._release(alt)
                return data
            # Nothing worked: drop the failed descriptor so the next call re-resolves from the
            # first directory (a remounted NAS gives ESTALE until reopened).
            self._swap(blob_id, h, None)
            raise err
        finally:
            self._release(h)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            handles = list(self._handles.values())
            self._handles.clear()
            for h in handles:
                self._kill(h)

    # -- internals ----------------------------------------------------------------------------
    def _acquire(self, blob_id: str) -> _Handle:
        with self._lock:
            h = self._handles.get(blob_id)
            if h is not None:
                h.users += 1
                return h
        h = self._locate(blob_id, 0)
        with self._lock:
            if self._closed:
                self._kill(h)
                raise BackendError(f"blob {blob_id}: backend is closed", permanent=True)
            cur = self._handles.get(blob_id)
            if cur is not None:           # another thread won the race
                self._kill(h)
                cur.users += 1
                return cur
            self._handles[blob_id] = h
            return h

    def _release(self, h: _Handle, kill: bool = False) -> None:
        with self._lock:
            h.users -= 1
            if kill:
                h.dead = True
            self._close_if_unused(h)

    def _kill(self, h: _Handle) -> None:
        """Caller holds the lock."""
        h.dead = True
        self._close_if_unused(h)

    @staticmethod
    def _close_if_unused(h: _Handle) -> None:
        if h.dead and h.users == 0 and h.fd >= 0:
            try:
                os.close(h.fd)
            except OSError:
                pass
            h.fd = -1

    def _swap(self, blob_id: str, old: _Handle, new: _Handle | None) -> None:
        """Replace the table's handle `old` by `new`, or drop it; a loser is closed when unused."""
        with self._lock:
            if self._handles.get(blob_id) is old and not self._closed:
                self._kill(old)
                if new is None:
                    del self._handles[blob_id]
                else:
                    self._handles[blob_id] = new
            elif new is not None:
                self._kill(new)

    def _locate(self, blob_id: str, start: int) -> _Handle:
        hexid = blob_hex(blob_id)
        failure: BackendError | None = None
        for i in range(start, len(self.roots)):
            root = self.roots[i]
            for path in (root / hexid, root / "blobs" / "sha256" / hexid):
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    failure = failure or _os_error(blob_id, f"cannot open {path}", e)
                    continue
                try:
                    size = os.fstat(fd).st_size
                except OSError as e:
                    os.close(fd)
                    failure = failure or _os_error(blob_id, f"cannot stat {path}", e)
                    continue
                return _Handle(fd, size, str(path), i)
        if failure is not None:
            raise failure
        where = ", ".join(str(r) for r in self.roots[start:])
        raise BlobNotFoundError(f"blob {blob_id} not found in {where}")

    def _pread(self, h: _Handle, blob_id: str, offset: int, length: int) -> bytes:
        if offset + length > h.size:
            raise range_error(blob_id, offset, length, h.size, h.path)
        if length == 0:
            return b""
        try:
            data = os.pread(h.fd, length, offset)
            if len(data) < length:  # large reads may come back in pieces; 0 means EOF
                parts = [data]
                got = len(data)
                while got < length:
                    more = os.pread(h.fd, length - got, offset + got)
                    if not more:
                        break
                    parts.append(more)
                    got += len(more)
                data = b"".join(parts)
        except OSError as e:
            raise _os_error(blob_id, f"read [{offset}, {offset + length}) of {h.path}", e) from None
        if len(data) != length:
            raise BackendError(
                f"blob {blob_id}: short read of [{offset}, {offset + length}) from {h.path}: "
                f"got {len(data)} bytes (file truncated?)", permanent=True)
        return data

