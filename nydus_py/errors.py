"""The one exception tree of nydus-py.

    NydusError                      base; carries an errno for FUSE and a `permanent` flag
    ├── ConfigError                 bad CLI option or config file field (EINVAL)
    ├── InputError                  the image we were given is bad (EINVAL)
    │   ├── ImageFormatError        malformed manifest/index/config/layout, unsupported media type
    │   ├── LayerError              malformed/truncated tar or compression, hostile entry, bomb
    │   └── DigestMismatchError     content does not hash to the digest that names it
    ├── FormatError                 bootstrap unreadable, wrong magic or version (EIO)
    ├── BackendError                storage failure (EIO); `permanent=False` means retrying may help
    │   ├── BlobNotFoundError       the blob does not exist (ENOENT-ish, permanent)
    │   └── AuthError               401/403 or bad credentials (permanent)
    ├── IntegrityError              a fetched or cached chunk failed verification (EIO)
    └── CacheError                  the local chunk cache failed (disk full, I/O) (EIO/ENOSPC)

Every message names the file, layer or blob involved, so the one line a user sees is enough.
"""

from __future__ import annotations

import errno as _errno


class NydusError(Exception):
    errno: int = _errno.EIO
    permanent: bool = True

    def __init__(self, message: str, *, permanent: bool | None = None, errno: int | None = None):
        super().__init__(message)
        if permanent is not None:
            self.permanent = permanent
        if errno is not None:
            self.errno = errno


class ConfigError(NydusError):
    errno = _errno.EINVAL


class InputError(NydusError):
    errno = _errno.EINVAL


class ImageFormatError(InputError):
    pass


class LayerError(InputError):
    pass


class DigestMismatchError(InputError):
    pass


class FormatError(NydusError):
    pass


class BackendError(NydusError):
    permanent = False
    retry_after: float | None = None     # seconds the server asked us to wait (HTTP Retry-After)


class BlobNotFoundError(BackendError):
    permanent = True
    errno = _errno.EIO


class AuthError(BackendError):
    permanent = True


class IntegrityError(NydusError):
    pass


class CacheError(NydusError):
    pass
