"""What the snapshotter's DaemonManager puts on disk for an image, against a real registry.

The bootstrap download is bounded: a descriptor size of 0 or over MAX_BOOTSTRAP_SIZE is
refused before any request, and a registry serving more bytes than the descriptor says is
cut off at the descriptor's size. Each refusal is one line and leaves no bootstrap (nor a
partial one) in the image directory.

Every directory the snapshotter makes has an explicit mode, whatever the umask."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import sys

import pytest

from nydus_py.format.limits import MAX_BOOTSTRAP_SIZE
from nydus_py.oci.reference import parse as parse_reference
from nydus_py.snapshotter.core import prepare_root
from nydus_py.snapshotter.daemons import DaemonManager
from nydus_py.snapshotter.remote import DEDICATED, SHARED, RemoteConfig, RemoteError, RemoteLayer
from nydus_py.snapshotter.resolver import Resolver
from nydus_py.snapshotter.store import REMOTE_BOOTSTRAP, Store

BLOB = b"not really a bootstrap, but 64 bytes of it is all we need here.."


@contextlib.contextmanager
def _daemons(tmp_path, **config):
    """A DaemonManager over ROOT=tmp_path/root (recover_interval 0 unless given); its store
    and resolver are closed on the way out."""
    cfg = RemoteConfig(root=prepare_root(tmp_path / "root"), **{"recover_interval": 0, **config})
    store = Store(tmp_path / "metadata.db")
    resolver = Resolver(cfg)
    try:
        yield DaemonManager(cfg, store, resolver)
    finally:
        resolver.close()
        store.close()


def _blob_layer(dm: DaemonManager, registry, tag: str, image_hex: str) -> RemoteLayer:
    """BLOB pushed to the registry as the bootstrap layer of image sha256:<image_hex>."""
    ref = parse_reference(f"{registry.host}/trust/boot:{tag}")
    digest = "sha256:" + hashlib.sha256(BLOB).hexdigest()
    dm.resolver.client(ref).push_blob(ref.repository, BLOB, digest, len(BLOB))
    return RemoteLayer(REMOTE_BOOTSTRAP, ref, "sha256:" + image_hex, digest, len(BLOB))


@pytest.fixture()
def manager(tmp_path, registry):
    with _daemons(tmp_path, nydusd=("/bin/false",)) as dm:
        layer = _blob_layer(dm, registry, "v1", "00" * 32)
        yield dm, layer.ref, layer.digest


def assert_nothing_left(dm: DaemonManager, layer: RemoteLayer) -> None:
    """A refused image leaves no image dir (an empty one used to stay), bootstrap or partial
    one, mountpoint, API socket, nor a record for a later start."""
    root = dm.config.root
    assert not dm.image_dir(layer.image_id).exists()
    assert not dm.mountpoint(layer.image_id).exists()
    assert not dm.api_sock(layer.image_id).exists()
    assert dm.store.get_image(layer.image_id) is None
    assert sorted(os.listdir(root / "images")) == [] and sorted(os.listdir(root / "mnt")) == []
    # shared: the supervisor stays up (shared mode keeps it while the snapshotter runs) but
    # serves nothing
    if dm.shared._process_alive():
        assert dm.shared.mounts() == {}


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
    assert_nothing_left(dm, layer)
    registry.sync_log()
    fetched = registry.count_requests("GET", rf"/blobs/{digest}") - before
    if size in (0, MAX_BOOTSTRAP_SIZE + 1):
        assert "descriptor size" in msg and fetched == 0   # refused before asking the registry
    else:
        assert fetched >= 1                                 # served 64 bytes against a 63-byte descriptor


def test_a_nydusd_that_exits_0_without_mounting_is_refused(tmp_path, registry):
    """A dedicated nydusd that reports success but mounted nothing: one line naming the
    mountpoint, and nothing left behind."""
    # writes its own (soon dead) pid where asked, as `nydusd mount --daemon` does, and exits 0
    stub = ("/bin/sh", "-c", 'while [ $# -gt 0 ]; do [ "$1" = --pid-file ] && echo $$ > "$2"; shift; done; '
            'exit 0', "nydusd")
    with _daemons(tmp_path, nydusd=stub) as dm:
        layer = _blob_layer(dm, registry, "v2", "cd" * 32)
        with pytest.raises(RemoteError, match="exited 0 but .* is not mounted"):
            dm.ensure(layer)
        assert_nothing_left(dm, layer)


@pytest.mark.parametrize("mode", [DEDICATED, SHARED])
def test_a_bootstrap_nydusd_refuses_leaves_nothing_behind(tmp_path, registry, mode):
    """The real nydusd, dedicated or shared, refuses BLOB (its digest is right, but it is no
    bootstrap): the error names why, and the image's directories and record are gone; the
    shared supervisor serves nothing and stops with the snapshotter (close), leaving only its
    logs, as after any stop."""
    with _daemons(tmp_path, daemon_mode=mode, daemon_timeout=60) as dm:
        try:
            layer = _blob_layer(dm, registry, "v1", "ef" * 32)
            with pytest.raises(RemoteError, match="bootstrap"):
                dm.ensure(layer)
            assert_nothing_left(dm, layer)
            assert dm.shared._process_alive() == (mode == SHARED)
            dm.close()
            assert dm.shared.pid() == 0 and not dm.shared._process_alive()
            root = dm.config.root
            assert set(os.listdir(root / "shared")) <= {"nydusd.log", "nydusd.err"} \
                if (root / "shared").exists() else True
        finally:
            if dm.shared._process_alive():     # failed: no supervisor outlives the test
                dm.shared.stop()


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
    probe_out = tmp_path / "modes.json"
    # stands in for nydusd: records the modes of what it was given, then fails
    probe = ("import json, os, sys; a = sys.argv; m = lambda p: os.lstat(p).st_mode & 0o7777; "
             "c = a[a.index('--config') + 1]; s = a[a.index('--apisock') + 1]; "
             f"open({str(probe_out)!r}, 'w').write(json.dumps({{'image_dir': m(os.path.dirname(c)), "
             "'config': m(c), 'api_dir': m(os.path.dirname(s)), 'mountpoint': m(a[-1])})); "
             "sys.exit(1)")
    cfg = RemoteConfig(root=root, nydusd=(sys.executable, "-c", probe), recover_interval=0)
    store = Store(tmp_path / "metadata.db")
    resolver = Resolver(cfg)
    try:
        ref = parse_reference(f"{registry.host}/trust/boot:v1")
        digest = "sha256:" + hashlib.sha256(BLOB).hexdigest()
        resolver.client(ref).push_blob(ref.repository, BLOB, digest, len(BLOB))
        dm = DaemonManager(cfg, store, resolver)
        layer = RemoteLayer(REMOTE_BOOTSTRAP, ref, "sha256:" + "cd" * 32, digest, len(BLOB))
        with pytest.raises(RemoteError, match="nydusd failed"):     # the probe: no daemon
            dm.ensure(layer)
        modes = json.loads(probe_out.read_text())       # what nydusd found, before the cleanup
        assert modes == {"image_dir": 0o700, "config": 0o600, "api_dir": 0o700, "mountpoint": 0o755}
        assert not dm.image_dir(layer.image_id).exists()     # refused: removed again
    finally:
        resolver.close()
        store.close()


def test_releasing_shared_images_collects_their_unused_image_state(tmp_path):
    """Shared mode: when an image is released, the shared cache loses what no running image
    uses: blobs, and now also learned prefetch lists (and kept bootstraps), which used to pile
    up forever; the state a running mount holds stays."""
    from nydus_py.cache import images
    from nydus_py.io import learned as ll
    cfg = RemoteConfig(root=prepare_root(tmp_path / "root"), nydusd=("/bin/false",),
                       recover_interval=0, daemon_mode=SHARED)
    store = Store(tmp_path / "metadata.db")
    try:
        dm = DaemonManager(cfg, store, Resolver(cfg))
        cache = dm.shared.cache_dir
        cache.mkdir(parents=True, mode=0o700)
        used, gone = ("sha256:" + h * 64 for h in "12")
        for digest in (used, gone):
            ll.save_local(str(cache), ll.LearnedList(digest, (3,)))
        assert images.hold(cache, used)        # as the running mount of `used` does
        try:
            dm.gc_shared_cache()
            assert sorted(p.name for p in (cache / "prefetch").iterdir()) == ["1" * 64 + ".json"]
        finally:
            images.release(cache, used)
        dm.gc_shared_cache()
        assert list((cache / "prefetch").iterdir()) == []
    finally:
        store.close()


def test_a_shared_nydusd_that_cannot_start_is_reported_at_the_next_image(tmp_path, registry, caplog):
    """Shared mode starts its nydusd with the snapshotter, in the background: when it cannot
    start, that is one error line then, and the next image's Prepare tries again and fails
    with the reason (nothing left behind)."""
    with _daemons(tmp_path, nydusd=("/bin/false",), daemon_mode=SHARED, daemon_timeout=20) as dm, \
            contextlib.closing(dm):
        with caplog.at_level("ERROR"):
            dm.start_shared()
            assert dm._starter is not None
            dm._starter.join(30)
        assert any("shared nydusd exited 1" in r.getMessage() for r in caplog.records)
        layer = _blob_layer(dm, registry, "v3", "ce" * 32)
        with pytest.raises(RemoteError, match="shared nydusd exited 1"):
            dm.ensure(layer)
        assert_nothing_left(dm, layer)
    assert not dm.shared._process_alive()


def test_the_monitor_starts_an_idle_shared_nydusd_again(tmp_path):
    """Shared mode keeps its nydusd while the snapshotter runs: killed while it serves no
    image, the liveness monitor starts it again (not the next image's Prepare)."""
    import signal
    from nydus_py.snapshotter.process import pid_alive
    with _daemons(tmp_path, daemon_mode=SHARED, daemon_timeout=60) as dm, contextlib.closing(dm):
        dm.start_shared()
        assert dm._starter is not None
        dm._starter.join(90)
        first = dm.shared.pid()
        assert dm.shared.alive() and first
        assert dm.recover() == 0                 # alive: nothing to do
        os.kill(first, signal.SIGKILL)
        if dm.shared._proc is not None:
            dm.shared._proc.wait(30)
        assert not pid_alive(first)
        assert dm.recover() == 1
        assert dm.shared.alive() and dm.shared.pid() not in (0, first)
    assert not dm.shared._process_alive()
