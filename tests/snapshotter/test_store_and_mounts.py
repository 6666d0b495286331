"""Snapshot metadata and mount specs without containerd: the store's rules, the overlay
layout containerd expects, List filters, the gRPC adapter over a real unix socket, and the
nydus layer classification from labels + manifest."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import grpc  # noqa: E402

from nydus_py.oci import mediatypes as mt
from nydus_py.snapshotter import overlay
from nydus_py.snapshotter.core import Snapshotter, disk_usage
from nydus_py.snapshotter.remote import (LABEL_TARGET, STARGZ_DIGEST, STARGZ_REF, RemoteConfig,
                                         RemoteFileSystem, RemoteLayer)
from nydus_py.snapshotter.resolver import Resolver, layer_kind
from nydus_py.snapshotter.service import make_server, parse_filter
from nydus_py.snapshotter.store import (KIND_ACTIVE, KIND_COMMITTED, KIND_VIEW, REMOTE_BLOB,
                                        REMOTE_BOOTSTRAP, Snapshot, SnapshotExists,
                                        SnapshotNotFound, SnapshotPrecondition, Store)


@pytest.fixture()
def store(tmp_path):
    s = Store(tmp_path / "m.db")
    yield s
    s.close()


# ---------------------------------------------------------------------------- store

def test_commit_keeps_id_renames_key_and_replaces_labels(store):
    """containerd's testsuite (checkInfo/checkCommit): the commit's labels replace the active
    snapshot's, and a committed snapshot's Created equals its Updated."""
    a = store.create("a", "", KIND_ACTIVE, {"x": "1"})
    c = store.commit("a", "layer1", {"y": "2"}, size=10, inodes=3)
    assert (c.id, c.key, c.kind, c.labels, c.size) == (a.id, "layer1", KIND_COMMITTED, {"y": "2"}, 10)
    assert c.created_ns == c.updated_ns >= a.created_ns
    assert store.commit(store.create("b", "", KIND_ACTIVE, {"x": "1"}).key, "layer2", {}).labels == {}
    with pytest.raises(SnapshotNotFound):
        store.get("a")


def test_parent_must_exist_and_be_committed(store):
    with pytest.raises(SnapshotNotFound):
        store.create("b", "nope", KIND_ACTIVE, {})
    store.create("a", "", KIND_ACTIVE, {})
    with pytest.raises(SnapshotPrecondition):
        store.create("b", "a", KIND_ACTIVE, {})


def test_duplicate_keys_and_names_are_already_exists(store):
    store.create("a", "", KIND_ACTIVE, {})
    with pytest.raises(SnapshotExists):
        store.create("a", "", KIND_ACTIVE, {})
    store.create("b", "", KIND_ACTIVE, {})
    store.commit("a", "L", {})
    with pytest.raises(SnapshotExists):
        store.commit("b", "L", {})


def test_remove_refuses_while_children_exist(store):
    store.create("a", "", KIND_ACTIVE, {})
    store.commit("a", "L1", {})
    store.create("c", "L1", KIND_ACTIVE, {})
    with pytest.raises(SnapshotPrecondition):
        store.remove("L1")
    store.remove("c")
    assert store.remove("L1").key == "L1"
    assert store.all() == []


def test_update_labels_by_mask(store):
    store.create("a", "", KIND_ACTIVE, {"keep": "1", "drop": "2"})
    assert store.update_labels("a", {"new": "3"}, ["labels.new", "labels.drop"]).labels == {"keep": "1", "new": "3"}
    assert store.update_labels("a", {"only": "x"}, []).labels == {"only": "x"}
    with pytest.raises(SnapshotPrecondition):
        store.update_labels("a", {}, ["kind"])


def test_state_survives_reopen(tmp_path):
    s = Store(tmp_path / "m.db")
    s.create("a", "", KIND_ACTIVE, {"k": "v"})
    s.commit("a", "L", {})
    s.create("c", "L", KIND_VIEW, {})
    s.close()
    s2 = Store(tmp_path / "m.db")
    assert [(x.key, x.parent, x.kind) for x in s2.all()] == [("L", "", KIND_COMMITTED), ("c", "L", KIND_VIEW)]
    assert [p.key for p in s2.parents("c")] == ["L"]
    s2.close()


def test_failed_transaction_leaves_nothing(store):
    store.create("a", "", KIND_ACTIVE, {})
    with pytest.raises(SnapshotExists):
        store.create("a", "", KIND_COMMITTED, {"x": "y"})
    assert store.get("a").labels == {}


# ---------------------------------------------------------------------------- mount specs

def _snap(sid, kind, key="k"):
    return Snapshot(sid, key, "", kind, 0, 0, {})


def test_mounts_match_containerd_overlayfs_snapshotter(tmp_path):
    r = tmp_path
    assert overlay.mounts(r, _snap(1, KIND_ACTIVE), []) == [overlay.Mount("bind", f"{r}/snapshots/1/fs", ["rw", "rbind"])]
    assert overlay.mounts(r, _snap(1, KIND_VIEW), []) == [overlay.Mount("bind", f"{r}/snapshots/1/fs", ["ro", "rbind"])]
    assert overlay.mounts(r, _snap(3, KIND_VIEW), ["/l1"]) == [overlay.Mount("bind", "/l1", ["ro", "rbind"])]
    assert overlay.mounts(r, _snap(3, KIND_VIEW), ["/l1", "/l2"]) == [overlay.Mount("overlay", "overlay", ["lowerdir=/l1:/l2"])]
    assert overlay.mounts(r, _snap(3, KIND_ACTIVE), ["/l1", "/l2"]) == [overlay.Mount("overlay", "overlay", [
        "index=off", f"workdir={r}/snapshots/3/work", f"upperdir={r}/snapshots/3/fs", "lowerdir=/l1:/l2"])]


def test_lowers_of_a_nydus_image_are_its_mount_only(tmp_path):
    boot = Snapshot(5, "boot", "blob2", KIND_COMMITTED, 0, 0, {}, remote=REMOTE_BOOTSTRAP, image="img")
    blob2 = Snapshot(4, "blob2", "blob1", KIND_COMMITTED, 0, 0, {}, remote=REMOTE_BLOB)
    blob1 = Snapshot(3, "blob1", "", KIND_COMMITTED, 0, 0, {}, remote=REMOTE_BLOB)
    assert overlay.lower_dirs(tmp_path, [boot, blob2, blob1], lambda i: f"/mnt/{i}") == ["/mnt/img"]
    plain = [Snapshot(2, "b", "a", KIND_COMMITTED, 0, 0, {}), Snapshot(1, "a", "", KIND_COMMITTED, 0, 0, {})]
    assert overlay.lower_dirs(tmp_path, plain, None) == [f"{tmp_path}/snapshots/2/fs", f"{tmp_path}/snapshots/1/fs"]


# ---------------------------------------------------------------------------- core without containerd

def test_unpack_then_container_flow_creates_and_frees_dirs(tmp_path):
    sn = Snapshotter(tmp_path / "root")
    root = sn.root
    (m,) = sn.prepare("ex1", "", {})
    assert m.type == "bind" and m.source == f"{root}/snapshots/1/fs"
    Path(m.source, "file").write_bytes(b"x" * 5000)
    c = sn.commit("L1", "ex1", {})
    assert c.size >= 5000 and c.inodes == 2
    (m,) = sn.prepare("ctr", "L1", {})
    assert m.type == "overlay" and f"lowerdir={root}/snapshots/1/fs" in m.options
    assert sn.mounts("ctr") == [m]
    assert (root / "snapshots/2/work").is_dir()
    with pytest.raises(SnapshotPrecondition):
        sn.mounts("L1")
    sn.remove("ctr")
    sn.remove("L1")
    assert list((root / "snapshots").iterdir()) == []
    sn.close()


def test_cleanup_removes_orphan_dirs(tmp_path):
    sn = Snapshotter(tmp_path / "root")
    sn.prepare("a", "", {})
    (sn.root / "snapshots" / "99").mkdir()
    (sn.root / "snapshots" / "rm-7").mkdir()
    sn.cleanup()
    assert sorted(p.name for p in (sn.root / "snapshots").iterdir()) == ["1"]
    sn.close()


def test_disk_usage_counts_hardlinks_once(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 8192)
    os.link(tmp_path / "a", tmp_path / "b")
    size, inodes = disk_usage(tmp_path)
    assert inodes == 2 and 8192 <= size < 3 * 8192


class _FakeFS:
    """A RemoteFileSystem that records what the snapshotter asked of it."""

    def __init__(self, root, kinds):
        self.root, self.kinds, self.started, self.released = root, kinds, [], []
        self.cleaned = False

    def classify(self, labels):
        from nydus_py.oci.reference import parse
        kind = self.kinds.get(labels.get(LABEL_TARGET))
        return RemoteLayer(kind, parse("127.0.0.1:5000/r:t"), "sha256:" + "ab" * 32, "sha256:" + "cd" * 32, 1) if kind else None

    def mount(self, layer):
        self.started.append(layer.image_id)
        return self.mountpoint(layer.image_id)

    def mountpoint(self, image_id):
        return self.root / "mnt" / image_id

    def unmount(self, image_id):
        self.released.append(image_id)

    def start(self):
        pass

    def cleanup(self):
        self.cleaned = True

    def close(self):
        pass


def test_nydus_layers_become_remote_snapshots_and_release_daemon(tmp_path):
    fs = _FakeFS(tmp_path / "root", {"chain1": REMOTE_BLOB, "chain2": REMOTE_BOOTSTRAP})
    assert isinstance(fs, RemoteFileSystem)
    sn = Snapshotter(tmp_path / "root", fs=fs)
    with pytest.raises(SnapshotExists):
        sn.prepare("ex1", "", {LABEL_TARGET: "chain1"})
    with pytest.raises(SnapshotExists):
        sn.prepare("ex2", "chain1", {LABEL_TARGET: "chain2"})
    with pytest.raises(SnapshotExists):                   # second pull: no second daemon
        sn.prepare("ex3", "chain1", {LABEL_TARGET: "chain2"})
    assert fs.started == ["ab" * 32]
    info = sn.stat("chain2")
    assert info.kind == KIND_COMMITTED and info.labels["containerd.io/snapshot/remote"] == "nydus-py"
    (m,) = sn.prepare("ctr", "chain2", {})
    assert f"lowerdir={sn.root}/mnt/{'ab' * 32}" in m.options
    sn.remove("ctr")
    sn.remove("chain2")
    sn.remove("chain1")
    assert fs.released == ["ab" * 32]
    sn.close()


# ---------------------------------------------------------------------------- filters, labels

def test_list_filter_as_containerd_sends_it_for_remote_snapshots():
    m = parse_filter('labels."containerd.io/snapshot.ref"==sha256:abc,parent=="ns/2/sha256:p"')
    s = Snapshot(1, "k", "ns/2/sha256:p", KIND_COMMITTED, 0, 0, {"containerd.io/snapshot.ref": "sha256:abc"})
    assert m(s)
    assert not m(Snapshot(1, "k", "", KIND_COMMITTED, 0, 0, {"containerd.io/snapshot.ref": "sha256:abc"}))
    assert parse_filter("kind==committed")(s) and not parse_filter("kind!=committed")(s)
    with pytest.raises(SnapshotPrecondition):          # FilterError: INVALID_ARGUMENT, never "match all"
        parse_filter("some(unknown syntax")


def test_layer_kind_by_media_type_or_annotation():
    assert layer_kind({"mediaType": mt.NYDUS_PY_BOOTSTRAP}) == REMOTE_BOOTSTRAP
    assert layer_kind({"mediaType": "application/vnd.oci.image.layer.nydus-py.blob.v1"}) == REMOTE_BLOB
    assert layer_kind({"mediaType": "x", "annotations": {mt.ANNO_BLOB: "true"}}) == REMOTE_BLOB
    assert layer_kind({"mediaType": mt.OCI_LAYER_GZIP}) is None


def test_resolver_classifies_from_stargz_labels_with_cached_manifest(tmp_path):
    manifest = {"layers": [{"mediaType": mt.OCI_LAYER_GZIP, "digest": "sha256:" + "1" * 64, "size": 3},
                           {"mediaType": mt.NYDUS_PY_BOOTSTRAP, "digest": "sha256:" + "2" * 64, "size": 9}]}
    r = Resolver(RemoteConfig(root=tmp_path))
    calls = []

    def fake(ref):
        calls.append(ref)
        return manifest, "sha256:" + "f" * 64
    r._get_manifest_by_ref = fake
    base = {LABEL_TARGET: "chain", STARGZ_REF: "127.0.0.1:5000/a/b:t"}
    assert r.classify({**base, STARGZ_DIGEST: "sha256:" + "1" * 64}) is None
    layer = r.classify({**base, STARGZ_DIGEST: "sha256:" + "2" * 64})
    assert (layer.kind, layer.size, layer.image_id) == (REMOTE_BOOTSTRAP, 9, "f" * 64)
    assert r.classify({LABEL_TARGET: "chain"}) is None          # plain `ctr pull`: no reference
    assert r.scheme("127.0.0.1:5000") == "http" and r.scheme("registry.example:443") == "https"


# ---------------------------------------------------------------------------- gRPC adapter

def test_grpc_service_round_trip_and_error_codes(tmp_path):
    from google.protobuf import field_mask_pb2
    from nydus_py.snapshotter.proto import snapshots_pb2 as pb
    from nydus_py.snapshotter.proto import snapshots_pb2_grpc as pbg

    sn = Snapshotter(tmp_path / "root")
    sock = tmp_path / "s.sock"
    server = make_server(sn, str(sock))
    server.start()
    try:
        with grpc.insecure_channel(f"unix:{sock}") as ch:
            stub = pbg.SnapshotsStub(ch)
            r = stub.Prepare(pb.PrepareSnapshotRequest(key="a", labels={"l": "1"}))
            assert r.mounts[0].type == "bind" and list(r.mounts[0].options) == ["rw", "rbind"]
            stub.Commit(pb.CommitSnapshotRequest(name="L", key="a", labels={"l": "1"}))
            r = stub.View(pb.ViewSnapshotRequest(key="v", parent="L"))
            assert r.mounts[0].type == "bind" and "ro" in r.mounts[0].options
            info = stub.Stat(pb.StatSnapshotRequest(key="L")).info
            assert (info.name, info.kind, dict(info.labels)) == ("L", pb.COMMITTED, {"l": "1"})
            assert info.created_at.seconds > 0
            upd = stub.Update(pb.UpdateSnapshotRequest(info=pb.Info(name="L", labels={"m": "2"}),
                                                       update_mask=field_mask_pb2.FieldMask(paths=["labels.m"])))
            assert dict(upd.info.labels) == {"l": "1", "m": "2"}
            names = [i.name for resp in stub.List(pb.ListSnapshotsRequest()) for i in resp.info]
            assert names == ["L", "v"]
            names = [i.name for resp in stub.List(pb.ListSnapshotsRequest(filters=["kind==view"])) for i in resp.info]
            assert names == ["v"]
            assert stub.Usage(pb.UsageRequest(key="L")).inodes == 1
            for call, code in ((lambda: stub.Stat(pb.StatSnapshotRequest(key="nope"))), grpc.StatusCode.NOT_FOUND), \
                              ((lambda: stub.Prepare(pb.PrepareSnapshotRequest(key="v"))), grpc.StatusCode.ALREADY_EXISTS), \
                              ((lambda: stub.Remove(pb.RemoveSnapshotRequest(key="L"))), grpc.StatusCode.FAILED_PRECONDITION):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() == code
            stub.Remove(pb.RemoveSnapshotRequest(key="v"))
            stub.Remove(pb.RemoveSnapshotRequest(key="L"))
            stub.Cleanup(pb.CleanupRequest())
    finally:
        server.stop(0)
        sn.close()
