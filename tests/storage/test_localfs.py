"""LocalFsBackend specifics beyond the conformance suite: alt_dirs fallback, short reads,
descriptor hygiene."""

from __future__ import annotations

import hashlib
import os

import pytest

from nydus_py.errors import BackendError, BlobNotFoundError
from nydus_py.storage.localfs import LocalFsBackend

DATA = bytes(range(256)) * 64
BID = "sha256:" + hashlib.sha256(DATA).hexdigest()
HEX = BID.split(":")[1]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_blob_missing_from_dir_is_found_in_the_first_alt_dir_that_has_it(tmp_path):
    for d in ("primary", "nas1", "nas2"):
        (tmp_path / d).mkdir()
    (tmp_path / "nas2" / HEX).write_bytes(DATA)
    b = LocalFsBackend(tmp_path / "primary", [tmp_path / "nas1", tmp_path / "nas2"])
    assert b.read_range(BID, 10, 100) == DATA[10:110]
    b.close()


def test_truncated_primary_copy_falls_back_to_alt_dir_copy(tmp_path):
    (tmp_path / "primary").mkdir()
    (tmp_path / "nas").mkdir()
    (tmp_path / "primary" / HEX).write_bytes(DATA[:1000])      # partial copy
    (tmp_path / "nas" / HEX).write_bytes(DATA)
    b = LocalFsBackend(tmp_path / "primary", [tmp_path / "nas"])
    assert b.read_range(BID, 0, 10) == DATA[:10]                # served by primary
    assert b.read_range(BID, 5000, 3000) == DATA[5000:8000]     # beyond primary's end: nas
    assert b.read_range(BID, 0, len(DATA)) == DATA
    b.close()


def test_file_truncated_after_open_is_a_short_read_error_naming_blob_and_range(tmp_path):
    p = tmp_path / HEX
    p.write_bytes(DATA)
    b = LocalFsBackend(tmp_path)
    assert b.read_range(BID, 0, 4) == DATA[:4]                  # fd now cached with full size
    os.truncate(p, 100)
    with pytest.raises(BackendError) as ei:
        b.read_range(BID, 50, 200)
    msg = str(ei.value)
    assert BID in msg and "[50, 250)" in msg and "short read" in msg
    # The failed descriptor was dropped: the next call re-resolves and sees the new size.
    assert b.blob_size(BID) == 100
    b.close()


def test_repeated_failures_do_not_leak_descriptors(tmp_path):
    (tmp_path / HEX).write_bytes(DATA[:10])
    b = LocalFsBackend(tmp_path)
    b.read_range(BID, 0, 1)
    before = _open_fds()
    for _ in range(50):
        with pytest.raises(BackendError):
            b.read_range(BID, 0, 100)
    assert _open_fds() <= before
    b.close()
    assert _open_fds() < before


def test_blob_size_missing_everywhere_names_all_dirs(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    b = LocalFsBackend(tmp_path / "a", [tmp_path / "b"])
    with pytest.raises(BlobNotFoundError) as ei:
        b.blob_size(BID)
    assert str(tmp_path / "a") in str(ei.value) and str(tmp_path / "b") in str(ei.value)


def test_no_reads_after_close(tmp_path):
    (tmp_path / HEX).write_bytes(DATA)
    b = LocalFsBackend(tmp_path)
    b.read_range(BID, 0, 1)
    b.close()
    with pytest.raises(BackendError):
        b.read_range(BID, 0, 1)
