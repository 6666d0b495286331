"""The BlobBackend contract (nydus_py/storage/backend.py), run against every backend and every
wrapper stack. A new backend (registry, s3) adds one entry to BACKENDS: a function that stores
blobs wherever the backend reads them and returns the backend."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from nydus_py.errors import BackendError, BlobNotFoundError
from nydus_py.metrics import Metrics
from nydus_py.retry import RetryPolicy
from nydus_py.storage.backend import BlobBackend, close_backend
from nydus_py.storage.localfs import LocalFsBackend
from nydus_py.storage.wrappers import MeteredBackend, RetryingBackend


def _blob_id(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _localfs_flat(tmp: Path, blobs: dict[str, bytes]) -> BlobBackend:
    for bid, data in blobs.items():
        (tmp / bid.split(":")[1]).write_bytes(data)
    return LocalFsBackend(tmp)


def _localfs_oci_layout(tmp: Path, blobs: dict[str, bytes]) -> BlobBackend:
    d = tmp / "blobs" / "sha256"
    d.mkdir(parents=True)
    for bid, data in blobs.items():
        (d / bid.split(":")[1]).write_bytes(data)
    return LocalFsBackend(tmp)


def _localfs_in_alt_dir(tmp: Path, blobs: dict[str, bytes]) -> BlobBackend:
    (tmp / "empty").mkdir()
    (tmp / "mirror").mkdir()
    _localfs_flat(tmp / "mirror", blobs)
    return LocalFsBackend(tmp / "empty", [tmp / "mirror"])


def _wrapped_localfs(tmp: Path, blobs: dict[str, bytes]) -> BlobBackend:
    return RetryingBackend(MeteredBackend(_localfs_flat(tmp, blobs), Metrics().backend),
                           RetryPolicy(limit=2, backoff=0))


BACKENDS = {
    "localfs-flat": _localfs_flat,
    "localfs-oci-layout": _localfs_oci_layout,
    "localfs-alt-dir": _localfs_in_alt_dir,
    "retrying-metered-localfs": _wrapped_localfs,
}

BIG = os.urandom(300_000)
SMALL = b"hello, nydus"
EMPTY = b""


@pytest.fixture(params=sorted(BACKENDS))
def backend(request, tmp_path):
    b = BACKENDS[request.param](tmp_path, {_blob_id(x): x for x in (BIG, SMALL, EMPTY)})
    yield b
    close_backend(b)


def test_implements_the_protocol(backend):
    assert isinstance(backend, BlobBackend)


def test_blob_size_is_exact(backend):
    assert backend.blob_size(_blob_id(BIG)) == len(BIG)
    assert backend.blob_size(_blob_id(SMALL)) == len(SMALL)
    assert backend.blob_size(_blob_id(EMPTY)) == 0


@pytest.mark.parametrize("offset,length", [
    (0, len(BIG)), (0, 1), (1, 4095), (4096, 65536), (len(BIG) - 1, 1), (123_457, 100_000), (17, 0),
    (len(BIG), 0),
])
def test_read_range_returns_exactly_the_range(backend, offset, length):
    assert backend.read_range(_blob_id(BIG), offset, length) == BIG[offset:offset + length]


def test_read_past_end_is_a_permanent_error_naming_blob_and_range(backend):
    bid = _blob_id(SMALL)
    with pytest.raises(BackendError) as ei:
        backend.read_range(bid, 5, len(SMALL))
    assert ei.value.permanent
    assert bid in str(ei.value) and f"[5, {5 + len(SMALL)})" in str(ei.value)
    with pytest.raises(BackendError):
        backend.read_range(_blob_id(EMPTY), 0, 1)


def test_missing_blob_is_blob_not_found(backend):
    missing = _blob_id(b"not stored anywhere")
    with pytest.raises(BlobNotFoundError) as ei:
        backend.read_range(missing, 0, 1)
    assert ei.value.permanent and missing in str(ei.value)
    with pytest.raises(BlobNotFoundError):
        backend.blob_size(missing)


@pytest.mark.parametrize("bad", ["sha256:../../etc/passwd", "sha256:" + "A" * 64, "md5:abcd", "", "sha256:"])
def test_malformed_blob_id_is_a_permanent_backend_error(backend, bad):
    with pytest.raises(BackendError) as ei:
        backend.read_range(bad, 0, 1)
    assert ei.value.permanent


def test_negative_range_is_a_caller_bug(backend):
    with pytest.raises(ValueError):
        backend.read_range(_blob_id(BIG), -1, 10)
    with pytest.raises(ValueError):
        backend.read_range(_blob_id(BIG), 0, -10)


def test_concurrent_reads_from_threads_get_their_own_ranges(backend):
    bid = _blob_id(BIG)
    errors = []

    def worker(seed: int) -> None:
        for i in range(50):
            off = (seed * 7919 + i * 104_729) % (len(BIG) - 5000)
            n = 1 + (seed * 31 + i) % 5000
            if backend.read_range(bid, off, n) != BIG[off:off + n]:
                errors.append((off, n))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
