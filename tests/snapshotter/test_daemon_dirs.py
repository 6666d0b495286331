"""What the snapshotter's DaemonManager puts on disk for an image, against a real registry.

The bootstrap download is bounded: a descriptor size of 0 or over MAX_BOOTSTRAP_SIZE is
refused before any request, and a registry serving more bytes than the descriptor says is
cut off at the descriptor's size. Each refusal is one line and leaves no bootstrap (nor a
partial one) in the image directory.

Every directory the snapshotter makes has an explicit mode, whatever the umask."""

from __future__ import annotations

import hashlib
import os
import stat

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


@pytest.fixture()
def umask_000():
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def test_snapshotter_dirs_have_explicit_modes_under_umask_000(tmp_path, registry, umask_000):
    """Under umask 000 the root, its subdirectories, an image's directory (where its nydusd
    keeps its cache) and its mountpoint were 0777: nydusd, as root, then refused the cache
    dir below a directory every user can write."""
    root = prepare_root(tmp_path / "new" / "root")
    assert _mode(tmp_path / "new") == 0o755
    for d in (root, root / "snapshots", root / "images", root / "mnt"):
        assert _mode(d) == 0o700, d
    cfg = RemoteConfig(root=root, nydusd=("/bin/false",), recover_interval=0)
    store = Store(tmp_path / "metadata.db")
    resolver = Resolver(cfg)
    try:
        ref = parse_reference(f"{registry.host}/trust/boot:v1")
        digest = "sha256:" + hashlib.sha256(BLOB).hexdigest()
        resolver.client(ref).push_blob(ref.repository, BLOB, digest, len(BLOB))
        dm = DaemonManager(cfg, store, resolver)
        layer = RemoteLayer(REMOTE_BOOTSTRAP, ref, "sha256:" + "cd" * 32, digest, len(BLOB))
        with pytest.raises(RemoteError, match="nydusd failed"):     # /bin/false: no daemon
            dm.ensure(layer)
        assert _mode(dm.image_dir(layer.image_id)) == 0o700
        assert _mode(dm.mountpoint(layer.image_id)) == 0o755
        assert _mode(dm.api_sock(layer.image_id).parent) == 0o700
        assert _mode(dm.image_dir(layer.image_id) / "nydusd.json") == 0o600
    finally:
        resolver.close()
        store.close()
