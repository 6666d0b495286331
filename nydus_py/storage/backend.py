"""The storage contract: a BlobBackend knows blobs and byte ranges, nothing about chunks.

Contract (every backend, and every wrapper in wrappers.py, keeps it; tests/storage/
test_backend_conformance.py checks it):

- `blob_id` is the blob's OCI digest, "sha256:<64 hex>". A malformed id is a permanent
  BackendError (it never reaches a path or URL).
- `blob_size(blob_id) -> int` is the blob's size in bytes.
- `read_range(blob_id, offset, length) -> bytes` returns exactly `length` bytes starting at
  `offset`, or raises. `length == 0` returns b"". Negative values are a ValueError (a bug in
  the caller). A range that runs past the end of the blob is a permanent BackendError naming
  the blob and the range; it is never silently shortened.
- Errors are `nydus_py.errors` types only:
    BlobNotFoundError   the blob does not exist anywhere the backend looks (permanent)
    AuthError           credentials refused (permanent)
    BackendError        anything else; `permanent=False` when a retry may help (timeouts,
                        5xx, EIO on a network filesystem), True otherwise
  A backend does not retry by itself; RetryingBackend does that, for transient errors only.
- Calls are blocking and thread-safe: the read path calls them from trio worker threads,
  several at a time. They never touch the trio event loop.
- Data is returned as fetched; verifying it is the caller's job (chunk digests).
- Optional: `hint_sizes(sizes)` (blob sizes known from a verified manifest: no HEAD before
  the first read) and `probe_blob(blob_id) -> int` (a HEAD even when the size is known: it
  opens a pooled connection ahead of the first read). See hint_blob_sizes, image_source.
- `close()` releases descriptors/sessions; no call may follow or overlap it. Backends that
  hold nothing may omit it: use `close_backend(b)`.

Cross-cutting behaviour (retry, metrics, later rate limits) lives in wrappers with this same
interface, not in flags of each backend.
"""

from __future__ import annotations

import os
from typing import Mapping, Protocol, runtime_checkable

from nydus_py.errors import BackendError
from nydus_py.oci import digest as dg


@runtime_checkable
class BlobBackend(Protocol):
    def blob_size(self, blob_id: str) -> int: ...

    def read_range(self, blob_id: str, offset: int, length: int) -> bytes: ...


@runtime_checkable
class BlobSink(Protocol):
    """Where the converter writes a finished blob: S3Backend (a bucket) and
    oci.registry.RepositorySink (a registry repository). `put_blob` returns "exists" when the
    blob was already there, else "uploaded" (or "mounted": a registry's cross-repository
    mount); the caller vouches that the file hashes to `blob_id`."""

    def put_blob(self, blob_id: str, path: str | os.PathLike[str]) -> str: ...

    def has_blob(self, blob_id: str) -> bool: ...


def close_backend(backend: object) -> None:
    close = getattr(backend, "close", None)
    if close is not None:
        close()


def innermost(backend: object) -> object:
    """The concrete backend under the wrappers (storage/wrappers.py keeps it in `inner`)."""
    while (inner := getattr(backend, "inner", None)) is not None:
        backend = inner
    return backend


def add_size_hints(known: dict[str, int], sizes: Mapping[str, int]) -> None:
    """`hint_sizes` of a backend with a size cache (call it under that cache's lock): sizes
    already known (asked of the backend) stay; anything but a non-negative int is dropped."""
    for blob_id, size in sizes.items():
        if isinstance(size, int) and size >= 0:
            known.setdefault(blob_id, size)


def hint_blob_sizes(backend: object, sizes: Mapping[str, int]) -> None:
    """Tells a backend that keeps blob sizes (registry, S3) the sizes of blobs it is about to
    read, from the verified manifest's descriptors, so that its first range read of each
    blob does not wait for a HEAD. Blobs are named by digest, so every backend serving one
    has the same size for it; a backend without a size cache ignores the hint."""
    hint = getattr(innermost(backend), "hint_sizes", None)
    if hint is not None and sizes:
        hint(sizes)


def blob_hex(blob_id: str) -> str:
    """The hex part of a sha256 blob id; anything else is a permanent BackendError."""
    try:
        algo, hexpart = dg.parse(blob_id)
    except Exception:
        raise BackendError(f"invalid blob id {blob_id!r}", permanent=True) from None
    if algo != "sha256":
        raise BackendError(f"blob {blob_id}: only sha256 blob ids are supported", permanent=True)
    return hexpart


def check_range(offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise ValueError(f"invalid range offset={offset} length={length}")


def range_error(blob_id: str, offset: int, length: int, size: int, where: str = "") -> BackendError:
    at = f" in {where}" if where else ""
    return BackendError(
        f"blob {blob_id}{at}: range [{offset}, {offset + length}) is beyond its size {size}",
        permanent=True)
