"""What the snapshotter's DaemonManager puts on disk for an image, against a real registry.

The bootstrap download is bounded: a descriptor size of 0 or over MAX_BOOTSTRAP_SIZE is
refused before any request, and a registry serving more bytes than the descriptor says is
cut off at the descriptor's size. Each refusal is one line and leaves no bootstrap (nor a
partial one) in the image directory."""

from __future__ import annotations

import hashlib

import pytest

from nydus_py.format.limits import MAX_BOOTSTRAP_SIZE
from nydus_py.oci.reference import parse as parse_reference
from nydus_py.snapshotter.core import prepare_root
from nydus_py.snapshotter.daemons import DaemonManager
from nydus_py.snapshotter.remote import RemoteConfig, RemoteError, RemoteLayer
from nydus_py.snapshotter.resolver import Resolver
from nydus_py.snapshotter.store import REMOTE_BOOTSTRAP, Store

BLOB = b"not really a bootstrap, but 64 bytes of it is all we need here.."


@pytest.fixture()
def manager(tmp_path, registry):
    cfg = RemoteConfig(root=prepare_root(tmp_path / "root"), nydusd=("/bin/false",), recover_interval=0)
    store = Store(tmp_path / "metadata.db")
    resolver = Resolver(cfg)
    ref = parse_reference(f"{registry.host}/trust/boot:v1")
    digest = "sha256:" + hashlib.sha256(BLOB).hexdigest()
    resolver.client(ref).push_blob(ref.repository, BLOB, digest, len(BLOB))
    try:
        yield DaemonManager(cfg, store, resolver), ref, digest
    finally:
        resolver.close()
        store.close()


@pytest.mark.parametrize("size", [0, MAX_BOOTSTRAP_SIZE + 1, len(BLOB) - 1])
def test_bootstrap_download_is_bounded_by_its_descriptor(manager, registry, size):
    dm, ref, digest = manager
    layer = RemoteLayer(REMOTE_BOOTSTRAP, ref, "sha256:" + "ab" * 32, digest, size)
    registry.sync_log()
    before = registry.count_requests("GET", rf"/blobs/{digest}")
    with pytest.raises(RemoteError) as ei:
        dm.ensure(layer)
    msg = str(ei.value)
    assert "\n" not in msg and digest in msg, msg
    d = dm.image_dir(layer.image_id)
    assert not (d / "bootstrap").exists() and not (d / "bootstrap.part").exists()
    assert dm.store.get_image(layer.image_id) is None      # nothing recorded for a later start
    registry.sync_log()
    fetched = registry.count_requests("GET", rf"/blobs/{digest}") - before
    if size in (0, MAX_BOOTSTRAP_SIZE + 1):
        assert "descriptor size" in msg and fetched == 0   # refused before asking the registry
    else:
        assert fetched >= 1                                 # served 64 bytes against a 63-byte descriptor

