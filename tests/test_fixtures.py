"""The image generator writes what we ask for, and umoci (the reference) unpacks it that way."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile

import pytest

from converter.compare import compare_trees
from nydus_py.errors import DigestMismatchError
from nydus_py.oci import mediatypes as mt
from nydus_py.oci.layout import Descriptor, OCILayout
from tests.fixtures import imagegen as g
from tests.fixtures.umoci import UmociError, umoci_reference

T0 = g.T0_NS


def _members(layer: g.Layer) -> dict[str, tarfile.TarInfo]:
    tf = tarfile.open(fileobj=io.BytesIO(layer.tar_bytes()), encoding="utf-8", errors="surrogateescape")
    return {m.name: m for m in tf.getmembers()}


def test_pax_layer_round_trips_through_python_tarfile():
    layer = g.feature_image().layers[0]
    m = _members(layer)
    assert m["data/ns-mtime"].pax_headers["mtime"] == "1700000000.123456789"
    assert m["data/hugeids"].uid == 3_000_000 and m["data/hugeids"].gid == 4_000_000
    assert m[g.LONG_255_PATH].isfile() and m[g.LONG_PREFIX_PATH].isfile()
    assert m["data/long-target"].linkname == "t" * 150
    assert m["data/latin1-\udce9t\udce9"].isfile()
    assert m["dev/bignum"].devmajor == 300 and m["dev/bignum"].devminor == 70000
    assert m["usr/bin/suid"].mode == 0o4755 and m["tmp"].mode == 0o1777
    sparse = m["data/sparse-pax"]
    assert sparse.size == 5 << 20 and sparse.sparse == [(0, 4096), (1 << 20, 8192), (3 << 20, 100)]


def test_gnu_layer_round_trips_through_python_tarfile():
    layer = g.Layer(compression="none", fmt="gnu")
    layer.file(g.GNU_LONG_PATH, b"x", uid=3_000_000, gid=2_097_152)
    layer.symlink("l", "y" * 150)
    layer.sparse_file("s", 1 << 20, [(i * 65536, 512) for i in range(30)], seed=1)
    m = _members(layer)
    assert m[g.GNU_LONG_PATH].uid == 3_000_000 and m[g.GNU_LONG_PATH].gid == 2_097_152
    assert m["l"].linkname == "y" * 150
    assert m["s"].size == 1 << 20 and len(m["s"].sparse) == 30
    tf = tarfile.open(fileobj=io.BytesIO(layer.tar_bytes()))
    data = tf.extractfile("s").read()
    assert data[65536:65536 + 512] == g.Content.random(512, seed=2).read_all()
    assert data[512:65536] == b"\0" * (65536 - 512)


def test_output_is_deterministic(tmp_path):
    d1 = g.feature_image().write_oci(tmp_path / "a", "t")
    d2 = g.feature_image().write_oci(tmp_path / "b", "t")
    assert d1.digest == d2.digest


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_layer_blobs_match_descriptors_and_diff_ids(tmp_path, compression):
    img = g.Image([g.Layer(compression=compression)])
    img.layers[0].file("f", g.Content.random(100_000))
    img.write_oci(tmp_path, "t")
    cfg_desc, layers = g.image_layer_digests(tmp_path, "t")
    lay = OCILayout(tmp_path)
    cfg = lay.read_json(cfg_desc, "config")
    assert layers[0].media_type == g.COMPRESSION_MEDIA_TYPES[compression]
    assert lay.read_blob(layers[0], limit=1 << 30)  # digest and size verified
    assert cfg["rootfs"]["diff_ids"] == [g.sha256_digest(img.layers[0].tar_bytes())]


def test_feature_image_unpacks_with_umoci_as_declared(feature_reference):
    root = os.fsencode(feature_reference.rootfs)
    p = lambda s: os.path.join(root, os.fsencode(s) if isinstance(s, str) else s)  # noqa: E731
    assert os.lstat(p("data/ns-mtime")).st_mtime_ns == T0 + 123_456_789
    assert os.lstat(p("usr/bin/sh")).st_mtime_ns == T0 + 555_000_001          # symlink mtime
    assert os.lstat(p("data")).st_mtime_ns == T0 + 999                        # declared dir mtime
    assert os.getxattr(p("data/xattr-file"), "user.binary") == bytes(range(256))
    assert "user.empty" not in os.listxattr(p("data/xattr-file"))            # umoci drops it
    assert os.getxattr(p("usr/bin/cap"), "security.capability") == g.CAP_NET_BIND_SERVICE
    st = os.lstat(p("data/hl-a"))
    assert st.st_nlink == 3 and os.lstat(p("data/sub/hl-c")).st_ino == st.st_ino
    assert os.lstat(p("long/hl-to-long")).st_ino == os.lstat(p(g.LONG_PAX_PATH)).st_ino
    dev = os.lstat(p("dev/bignum"))
    assert stat.S_ISCHR(dev.st_mode) and (os.major(dev.st_rdev), os.minor(dev.st_rdev)) == (300, 70000)
    assert stat.S_ISBLK(os.lstat(p("dev/sda")).st_mode) and stat.S_ISFIFO(os.lstat(p("dev/fifo")).st_mode)
    assert open(p(b"data/latin1-\xe9t\xe9"), "rb").read() == b"latin1 name"
    assert os.path.exists(p(b"gnu/\xe9" + b"g" * 120)) and os.path.exists(p(g.LONG_255_PATH))
    hid = os.lstat(p("data/hugeids"))
    assert (hid.st_uid, hid.st_gid) == (3_000_000, 4_000_000)
    assert os.lstat(p("usr/bin/suid")).st_mode == stat.S_IFREG | 0o4755
    sparse = open(p("data/sparse-pax"), "rb").read()
    assert len(sparse) == 5 << 20 and sparse[4096:1 << 20] == bytes((1 << 20) - 4096)
    assert open(p("etc/hostname"), "rb").read() == b"rewritten in layer 2\n"   # upper layer wins
    usr = os.lstat(p("usr"))
    assert (usr.st_mode, usr.st_uid, usr.st_mtime_ns) == (stat.S_IFDIR | 0o700, 5, T0 + 3)
    assert os.readlink(p("gnu/longlink")) == b"y" * 150
    assert b"implicit" in feature_reference.volatile_mtimes


def test_two_umoci_unpacks_are_equal_except_volatile_mtimes(feature_oci, feature_reference, tmp_path):
    again = umoci_reference(*feature_oci, tmp_path / "bundle")
    ignore = feature_reference.volatile_mtimes | again.volatile_mtimes
    assert compare_trees(feature_reference.rootfs, again.rootfs, ignore_mtime=ignore) == []


def test_whiteout_image_follows_layer_semantics(tmp_path, unpack_with_umoci):
    g.whiteout_image().write_oci(tmp_path / "oci", "wh")
    root = unpack_with_umoci(tmp_path / "oci", "wh").rootfs
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    assert names == ["deep", "deep/implicit", "deep/implicit/parents", "deep/implicit/parents/x2",
                     "etc", "etc/keep", "links", "links/a", "links/b", "links/c", "links/d",
                     "links/x", "opq", "opq/new", "readd", "readd/thing", "swap", "swap/d", "swap/f"]
    assert (root / "readd/thing").read_bytes() == b"new thing"
    assert (root / "swap/f").read_bytes() == b"file again" and os.readlink(root / "swap/d") == "f"
    a = os.lstat(root / "links/a")
    assert a.st_nlink == 3 and os.lstat(root / "links/d").st_ino == a.st_ino
    assert os.lstat(root / "links/b").st_nlink == 1 and os.lstat(root / "links/x").st_nlink == 1
    assert os.lstat(root / "opq").st_mtime_ns == T0 + 10


def test_docker_archive_is_the_same_image(tmp_path, unpack_with_umoci):
    img = g.whiteout_image()
    img.write_oci(tmp_path / "oci", "x")
    img.write_docker_archive(tmp_path / "img.tar", "nydus-test:x")
    with tarfile.open(tmp_path / "img.tar") as tf:
        manifest = json.load(tf.extractfile("manifest.json"))
    assert manifest[0]["RepoTags"] == ["nydus-test:x"] and len(manifest[0]["Layers"]) == 3
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        pytest.fail("skopeo is required")
    subprocess.run([skopeo, "--insecure-policy", "copy", "-q", f"docker-archive:{tmp_path}/img.tar",
                    f"oci:{tmp_path}/from-docker:x"], check=True, capture_output=True)
    a, b = unpack_with_umoci(tmp_path / "oci", "x"), unpack_with_umoci(tmp_path / "from-docker", "x")
    assert compare_trees(a.rootfs, b.rootfs, ignore_mtime=a.volatile_mtimes | b.volatile_mtimes) == []


def test_multiplatform_index_has_two_platforms(tmp_path):
    amd, arm = g.Image([g.Layer()], architecture="amd64"), g.Image([g.Layer()], architecture="arm64")
    amd.layers[0].file("arch", b"amd64")
    arm.layers[0].file("arch", b"arm64")
    g.write_multiplatform_oci(tmp_path, "multi", [amd, arm])
    lay = OCILayout(tmp_path)
    idx_desc = lay.resolve("multi")
    assert idx_desc.media_type == mt.OCI_INDEX
    idx = lay.read_json(idx_desc, "index")
    assert [m["platform"] for m in idx["manifests"]] == [
        {"architecture": "amd64", "os": "linux"}, {"architecture": "arm64", "os": "linux"}]
    for m in idx["manifests"]:
        assert lay.read_json(Descriptor.from_json(m, "index entry"), "manifest")["layers"]


def test_busybox_image_runs(tmp_path, unpack_with_umoci):
    g.busybox_image(extra_budget=1 << 20).write_oci(tmp_path, "bb")
    ref = unpack_with_umoci(tmp_path, "bb")
    out = subprocess.run([ref.rootfs / "bin/busybox", "echo", "hi"], capture_output=True, check=True)
    assert out.stdout == b"hi\n"
    assert os.readlink(ref.rootfs / "bin/ls") == "../bin/busybox"
    assert (ref.rootfs / "etc").is_dir() and ref.volatile_mtimes == frozenset()


def test_large_image_streams_content(tmp_path, unpack_with_umoci):
    g.large_image(8 << 20).write_oci(tmp_path, "big")
    root = unpack_with_umoci(tmp_path, "big").rootfs
    assert (root / "big/random").read_bytes() == g.Content.random(3 << 20, seed=1).read_all()
    assert (root / "big/random-copy").read_bytes() == (root / "big/random").read_bytes()
    assert (root / "big/zeros").read_bytes() == bytes(1 << 20)


@pytest.mark.parametrize("kind", ["hardlink_missing", "hardlink_escape", "bad_checksum",
                                  "truncated_tar", "truncated_gzip", "garbage"])
def test_broken_layers_fail_umoci(tmp_path, umoci, kind):
    g.Image([g.hostile_layer(kind)]).write_oci(tmp_path / "oci", "bad")
    with pytest.raises(UmociError):
        umoci_reference(tmp_path / "oci", "bad", tmp_path / "bundle")


@pytest.mark.parametrize("kind, lands_at", [
    ("dotdot", ["escape-dotdot", "escape-dotdot2"]),
    ("absolute", ["abs-file", "abs-link"]),
    ("symlink_write", ["tmp/pwned-through-symlink"]),
    ("symlink_dir_escape", ["tmp/pwned-through-relative-symlink"]),
])
def test_escaping_paths_are_confined_to_the_root_by_umoci(tmp_path, unpack_with_umoci, kind, lands_at):
    g.Image([g.hostile_layer(kind)]).write_oci(tmp_path / "oci", "bad")
    root = unpack_with_umoci(tmp_path / "oci", "bad").rootfs
    for rel in lands_at:
        assert os.path.lexists(root / rel), sorted(map(str, root.rglob("*")))
    assert not list(tmp_path.glob("escape*")) and not os.path.exists("/tmp/pwned-through-symlink")


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_bomb_layer_expands_to_declared_size(tmp_path, compression):
    size = 48 << 20
    g.Image([g.bomb_layer(size, compression)]).write_oci(tmp_path, "bomb")
    _, (desc,) = g.image_layer_digests(tmp_path, "bomb")
    assert desc.size < size // 500
    raw = OCILayout(tmp_path).blob_path(desc.digest).read_bytes()
    if compression == "gzip":
        data = gzip.decompress(raw)
    else:
        import zstandard
        data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw), read_across_frames=True).read()
    assert len(data) == 512 + size + 1024
    cfg = OCILayout(tmp_path).read_json(g.image_layer_digests(tmp_path, "bomb")[0], "config")
    assert cfg["rootfs"]["diff_ids"] == [g.sha256_digest(data)]


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_tampered_blobs_fail_digest_verification_only(tmp_path, compression):
    layer = g.Layer(compression=compression)
    layer.file("f", g.Content.random(5000))
    g.Image([layer]).write_oci(tmp_path, "t")
    desc = g.tamper_layer_blob(tmp_path, "t")
    lay = OCILayout(tmp_path)
    assert lay.blob_path(desc.digest).stat().st_size == desc.size
    with pytest.raises(DigestMismatchError):
        lay.read_blob(desc, limit=1 << 30)
    if compression == "gzip":   # still a valid stream: only the digest is wrong
        gzip.decompress(lay.blob_path(desc.digest).read_bytes())
    cfg = g.tamper_config(tmp_path, "t")
    with pytest.raises(DigestMismatchError):
        lay.read_json(cfg, "config")
