"""The BlobBackend contract (tests/fixtures/backend_contract.py) against localfs in its layouts
and the wrapper stack. A new backend's module runs the same contract with its own `backend`
fixture."""

from __future__ import annotations

from pathlib import Path

import pytest

from nydus_py.metrics import Metrics
from nydus_py.retry import RetryPolicy
from nydus_py.storage.backend import BlobBackend, close_backend
from nydus_py.storage.localfs import LocalFsBackend
from nydus_py.storage.wrappers import MeteredBackend, RetryingBackend
from tests.fixtures.backend_contract import BIG, EMPTY, SMALL, blob_id, contract_tests

globals().update(contract_tests())


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


@pytest.fixture(params=sorted(BACKENDS))
def backend(request, tmp_path):
    b = BACKENDS[request.param](tmp_path, {blob_id(x): x for x in (BIG, SMALL, EMPTY)})
    yield b
    close_backend(b)
