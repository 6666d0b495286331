"""converter.sources: references, OCI layouts (indexes, platforms), docker-archive tarballs."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import subprocess
import tarfile

import pytest
import zstandard

from converter.sources import (
    LayerInfo,
    SourceRef,
    open_source,
    parse_source,
    verify_diff_id,
)
from converter.sources import resolve as source_resolve
from converter.tar import iter_entries
from nydus_py.errors import (
    BlobNotFoundError,
    ConfigError,
    DigestMismatchError,
    ImageFormatError,
)
from nydus_py.oci import digest as dg
from nydus_py.oci import mediatypes as mt
from nydus_py.oci.layout import OCILayoutWriter
from tests.fixtures.tarbuild import END, member

TAR1 = member(b"etc/", type=b"5") + member(b"etc/hostname", b"box\n") + END
TAR2 = member(b"usr/bin/tool", b"#!/bin/sh\n", mode=0o755) + END
TAR3 = member(b"etc/.wh.hostname") + END


def files(img, layer) -> dict[bytes, bytes]:
    out = {}
    for e in iter_entries(img.open_layer_tar(layer), layer.what):
        out[b"/".join(e.path)] = e.read(1 << 20)
    return out


# -- parse_source --------------------------------------------------------------------------------

@pytest.mark.parametrize("s,ref", [
    ("oci:/tmp/img", SourceRef("oci", "/tmp/img")),
    ("oci:img:v1.2", SourceRef("oci", "img", "v1.2")),
    ("docker-archive:/x/a.tar", SourceRef("docker-archive", "/x/a.tar")),
    ("docker-archive:a.tar:busybox:latest", SourceRef("docker-archive", "a.tar", "busybox:latest")),
    ("docker-archive:a.tar:@1", SourceRef("docker-archive", "a.tar", "@1")),
])
def test_parse_source(s, ref):
    assert parse_source(s) == ref
    assert str(parse_source(s)) == s


@pytest.mark.parametrize("s,msg", [
    ("", "empty"), ("   ", "empty"), ("oci:", "missing path"), ("oci:dir:", "empty tag"),
    ("docker-archive:", "missing path"),
    ("docker://UPPER/case:1", "invalid"), ("localhost:5000/app:bad tag", "invalid"),
    ("dir:/tmp/x", "transport 'dir:' is not supported"),
    ("containers-storage:img", "not supported"),
])
def test_parse_source_rejects(s, msg):
    with pytest.raises(ConfigError, match=msg) as ei:
        parse_source(s)
    assert "\n" not in str(ei.value)


# -- OCI layout ----------------------------------------------------------------------------------

def _compress(tar: bytes, codec: str) -> tuple[bytes, str]:
    if codec == "gzip":
        return gzip.compress(tar), mt.OCI_LAYER_GZIP
    if codec == "zstd":
        return zstandard.ZstdCompressor().compress(tar), mt.OCI_LAYER_ZSTD
    return tar, mt.OCI_LAYER_TAR


def add_image(w: OCILayoutWriter, tars=(TAR1, TAR2), codecs=("gzip", "zstd"), *, docker=False,
              diff_ids=None, schema=2, config_type=None, layer_type=None, arch="amd64"):
    layers = []
    for tar, codec in zip(tars, codecs):
        blob, mtype = _compress(tar, codec)
        if docker and codec == "gzip":
            mtype = mt.DOCKER_LAYER_GZIP
        layers.append(w.put_bytes(blob, layer_type or mtype).to_json())
    cfg = {"architecture": arch, "os": "linux",
           "rootfs": {"type": "layers", "diff_ids": diff_ids if diff_ids is not None else [dg.of_bytes(t) for t in tars]}}
    cdesc = w.put_json(cfg, config_type or (mt.DOCKER_CONFIG if docker else mt.OCI_CONFIG))
    mtype = mt.DOCKER_MANIFEST if docker else mt.OCI_MANIFEST
    manifest = {"schemaVersion": schema, "mediaType": mtype, "config": cdesc.to_json(), "layers": layers}
    return w.put_json(manifest, mtype)


@pytest.fixture
def layout(tmp_path):
    return OCILayoutWriter(tmp_path / "oci")


def test_oci_layout_gzip_and_zstd_layers(layout):
    desc = add_image(layout)
    layout.tag(desc, "v1")
    img = open_source(parse_source(f"oci:{layout.root}:v1"))
    assert img.manifest_desc.digest == desc.digest and img.manifest_desc.media_type == mt.OCI_MANIFEST
    assert img.manifest["schemaVersion"] == 2 and img.config["architecture"] == "amd64"
    assert dg.of_bytes(img.config_bytes) == img.manifest["config"]["digest"]
    assert [(l.index, l.media_type, l.diff_id) for l in img.layers] == [
        (0, mt.OCI_LAYER_GZIP, dg.of_bytes(TAR1)), (1, mt.OCI_LAYER_ZSTD, dg.of_bytes(TAR2))]
    assert img.layers[0].what == f"layer 1/2 ({img.layers[0].digest[:19]}…)"
    assert files(img, img.layers[0]) == {b"etc": b"", b"etc/hostname": b"box\n"}
    assert files(img, img.layers[1]) == {b"usr/bin/tool": b"#!/bin/sh\n"}
    raw = img.open_layer(img.layers[0])
    assert dg.of_bytes(raw.read()) == img.layers[0].digest


def test_oci_single_untagged_image_and_docker_media_types(layout):
    layout.tag(add_image(layout, docker=True), None)
    img = open_source(parse_source(f"oci:{layout.root}"))
    assert img.layers[0].media_type == mt.DOCKER_LAYER_GZIP
    assert files(img, img.layers[0])[b"etc/hostname"] == b"box\n"


def test_oci_unknown_tag_lists_tags(layout):
    layout.tag(add_image(layout), "v1")
    with pytest.raises(ImageFormatError, match=r"no image tagged 'v2' \(tags: v1\)"):
        open_source(parse_source(f"oci:{layout.root}:v2"))


def test_oci_missing_layout_dir(tmp_path):
    with pytest.raises(ImageFormatError, match="not an OCI image layout"):
        open_source(parse_source(f"oci:{tmp_path / 'nope'}"))


def _index(w, entries: list[tuple], media_type=mt.OCI_INDEX):
    manifests = []
    for desc, plat in entries:
        d = desc.to_json()
        if plat is not None:
            d["platform"] = plat
        manifests.append(d)
    return w.put_json({"schemaVersion": 2, "mediaType": media_type, "manifests": manifests}, media_type)


def _multi(w, media_type=mt.OCI_INDEX):
    amd = add_image(w, arch="amd64")
    arm64 = add_image(w, (TAR1,), ("gzip",), arch="arm64")
    armv7 = add_image(w, (TAR2,), ("tar",), arch="arm")
    armv6 = add_image(w, (TAR3,), ("tar",), arch="arm")
    att = add_image(w, (TAR3,), ("gzip",), arch="unknown")
    idx = _index(w, [(amd, {"os": "linux", "architecture": "amd64"}),
                     (arm64, {"os": "linux", "architecture": "arm64", "variant": "v8"}),
                     (armv6, {"os": "linux", "architecture": "arm", "variant": "v6"}),
                     (armv7, {"os": "linux", "architecture": "arm"}),   # no variant: arm means v7
                     (att, {"os": "unknown", "architecture": "unknown"})], media_type)
    w.tag(idx, "multi")
    return amd, arm64, armv7, armv6


@pytest.mark.parametrize("machine,expect", [("x86_64", 0), ("aarch64", 1), ("armv7l", 2), ("armv6l", 3)])
def test_index_picks_the_host_platform(layout, monkeypatch, machine, expect):
    descs = _multi(layout)
    monkeypatch.setattr(source_resolve._platform, "machine", lambda: machine)
    img = open_source(parse_source(f"oci:{layout.root}:multi"))
    assert img.manifest_desc.digest == descs[expect].digest


@pytest.mark.parametrize("plat,expect", [("linux/amd64", 0), ("linux/arm64", 1), ("linux/arm64/v8", 1),
                                         ("linux/arm", 2), ("linux/arm/v6", 3), ("linux/aarch64", 1)])
def test_index_explicit_platform(layout, plat, expect):
    descs = _multi(layout, mt.DOCKER_MANIFEST_LIST)
    img = open_source(parse_source(f"oci:{layout.root}:multi"), platform=plat)
    assert img.manifest_desc.digest == descs[expect].digest


def test_index_platform_missing_lists_available(layout):
    _multi(layout)
    with pytest.raises(ImageFormatError) as ei:
        open_source(parse_source(f"oci:{layout.root}:multi"), platform="linux/s390x")
    assert str(ei.value).endswith("no image for platform linux/s390x; available: "
                                  "linux/amd64, linux/arm, linux/arm/v6, linux/arm64/v8")


@pytest.mark.parametrize("bad", ["linux", "linux/", "a/b/c/d", "/amd64"])
def test_bad_platform_option(layout, bad):
    _multi(layout)
    with pytest.raises(ConfigError, match="expected os/arch"):
        open_source(parse_source(f"oci:{layout.root}:multi"), platform=bad)


def test_nested_index(layout):
    amd = add_image(layout)
    inner = _index(layout, [(amd, {"os": "linux", "architecture": "amd64"})])
    outer = _index(layout, [(inner, None)])
    layout.tag(outer, "nested")
    img = open_source(parse_source(f"oci:{layout.root}:nested"), platform="linux/amd64")
    assert img.manifest_desc.digest == amd.digest


@pytest.mark.parametrize("kw,msg", [
    ({"schema": 1}, "schemaVersion 1, expected 2"),
    ({"diff_ids": ["sha256:" + "0" * 64]}, "1 diff_ids for 2 layers"),
    ({"config_type": "application/vnd.example.artifact+json"}, "not a container image"),
    ({"layer_type": "application/vnd.oci.image.layer.v1.tar+lz4"}, "unsupported media type"),
])
def test_manifest_and_config_validation(layout, kw, msg):
    layout.tag(add_image(layout, **kw), "bad")
    with pytest.raises(ImageFormatError, match=msg):
        open_source(parse_source(f"oci:{layout.root}:bad"))


def test_manifest_without_config(layout):
    d = layout.put_json({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "layers": []}, mt.OCI_MANIFEST)
    layout.tag(d, "x")
    with pytest.raises(ImageFormatError, match="no config descriptor"):
        open_source(parse_source(f"oci:{layout.root}:x"))


def _blob_file(layout, digest):
    return layout.blob_path(digest)


def test_corrupt_config_blob_is_a_digest_mismatch(layout):
    desc = add_image(layout)
    layout.tag(desc, "v1")
    cfg_digest = json.loads(_blob_file(layout, desc.digest).read_bytes())["config"]["digest"]
    p = _blob_file(layout, cfg_digest)
    data = bytearray(p.read_bytes())
    data[5] ^= 1
    p.write_bytes(bytes(data))
    with pytest.raises(DigestMismatchError, match="config sha256:"):
        open_source(parse_source(f"oci:{layout.root}:v1"))


@pytest.mark.parametrize("codec", ["tar", "gzip"])
def test_corrupt_layer_blob_is_a_digest_mismatch_naming_the_layer(layout, codec):
    desc = add_image(layout, (TAR1, TAR2), ("tar", codec))
    layout.tag(desc, "v1")
    img = open_source(parse_source(f"oci:{layout.root}:v1"))
    layer = img.layers[1]
    p = _blob_file(layout, layer.digest)
    data = bytearray(p.read_bytes())
    data[len(data) // 2 if codec == "gzip" else 520] ^= 0x20   # gzip body / file data byte
    p.write_bytes(bytes(data))
    with pytest.raises(DigestMismatchError) as ei:
        files(img, layer)
    assert str(ei.value).startswith(f"layer 2/2 ({layer.digest[:19]}…)")


def test_truncated_layer_blob_is_a_digest_mismatch(layout):
    layout.tag(add_image(layout, (TAR1,), ("gzip",)), "v1")
    img = open_source(parse_source(f"oci:{layout.root}:v1"))
    p = _blob_file(layout, img.layers[0].digest)
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(DigestMismatchError, match="^layer 1/1 .*size"):
        files(img, img.layers[0])


def test_wrong_diff_id_is_detected_on_the_uncompressed_stream(layout):
    wrong = dg.of_bytes(b"something else")
    layout.tag(add_image(layout, (TAR1,), ("gzip",), diff_ids=[wrong]), "v1")
    img = open_source(parse_source(f"oci:{layout.root}:v1"))
    with pytest.raises(DigestMismatchError, match=r"^layer 1/1 .*diff_id.*digest mismatch"):
        files(img, img.layers[0])


def test_missing_layer_blob(layout):
    layout.tag(add_image(layout), "v1")
    img = open_source(parse_source(f"oci:{layout.root}:v1"))
    _blob_file(layout, img.layers[1].digest).unlink()
    with pytest.raises(BlobNotFoundError, match="layer 2/2"):
        img.open_layer(img.layers[1])


def test_verify_diff_id_helper():
    layer = LayerInfo(0, dg.of_bytes(b"c"), mt.OCI_LAYER_GZIP, 1, dg.of_bytes(TAR1))
    assert verify_diff_id(io.BytesIO(TAR1), layer).read() == TAR1
    r = verify_diff_id(io.BytesIO(TAR2), layer)
    with pytest.raises(DigestMismatchError):
        r.finish()


# -- docker-archive ------------------------------------------------------------------------------

def _add(tf: tarfile.TarFile, name: str, data: bytes | None = None, **kw):
    ti = tarfile.TarInfo(name)
    for k, v in kw.items():
        setattr(ti, k, v)
    if data is not None:
        ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data) if data is not None else None)


def _config(tars) -> bytes:
    return json.dumps({"architecture": "amd64", "os": "linux",
                       "rootfs": {"type": "layers", "diff_ids": [dg.of_bytes(t) for t in tars]}}).encode()


def legacy_archive(path, images: list[tuple[list[str], list[bytes]]], compress_first=False):
    """`docker save` (pre-25) layout: ID/layer.tar, HEX.json, manifest.json; a layer shared by
    two images is stored once and symlinked, as docker does."""
    manifest = []
    with tarfile.open(path, "w") as tf:
        stored: dict[bytes, str] = {}
        for n, (tags, tars) in enumerate(images):
            cfg = _config(tars)
            cname = dg.of_bytes(cfg).split(":")[1] + ".json"
            _add(tf, cname, cfg)
            names = []
            for i, t in enumerate(tars):
                lid = f"{n}{i}" + "a" * 62
                blob = gzip.compress(t) if compress_first and i == 0 else t
                if t in stored:
                    _add(tf, f"{lid}/", type=tarfile.DIRTYPE)
                    _add(tf, f"{lid}/layer.tar", type=tarfile.SYMTYPE, linkname=f"../{stored[t]}")
                else:
                    _add(tf, f"{lid}/layer.tar", blob)
                    stored[t] = f"{lid}/layer.tar"
                names.append(f"{lid}/layer.tar")
            manifest.append({"Config": cname, "RepoTags": tags, "Layers": names})
        _add(tf, "manifest.json", json.dumps(manifest).encode())
    return path


def test_docker_archive_legacy(tmp_path):
    p = legacy_archive(tmp_path / "a.tar", [(["busybox:latest"], [TAR1, TAR2])])
    img = open_source(parse_source(f"docker-archive:{p}"))
    assert img.manifest_desc is None and img.name == f"docker-archive:{p}"
    assert img.manifest["config"]["digest"] == dg.of_bytes(img.config_bytes)
    assert [l.digest for l in img.layers] == [dg.of_bytes(TAR1), dg.of_bytes(TAR2)]
    assert [l.media_type for l in img.layers] == ["application/vnd.docker.image.rootfs.diff.tar"] * 2
    assert files(img, img.layers[1]) == {b"usr/bin/tool": b"#!/bin/sh\n"}


def test_docker_archive_picks_by_tag_or_index_and_follows_symlinked_layers(tmp_path):
    p = legacy_archive(tmp_path / "a.tar", [(["one:1"], [TAR1]), (["docker.io/library/two:latest"], [TAR1, TAR2])])
    with pytest.raises(ImageFormatError, match=r"2 images in the archive.*tags: one:1, docker.io/library/two:latest"):
        open_source(parse_source(f"docker-archive:{p}"))
    img = open_source(parse_source(f"docker-archive:{p}:two"))
    assert len(img.layers) == 2 and files(img, img.layers[0])[b"etc/hostname"] == b"box\n"
    assert len(open_source(parse_source(f"docker-archive:{p}:@0")).layers) == 1
    with pytest.raises(ImageFormatError, match="no image tagged 'three'"):
        open_source(parse_source(f"docker-archive:{p}:three"))
    with pytest.raises(ConfigError, match="no image @5"):
        open_source(parse_source(f"docker-archive:{p}:@5"))


def test_docker_archive_compressed_layer_is_sniffed_and_hashed(tmp_path):
    p = legacy_archive(tmp_path / "a.tar", [(["x:1"], [TAR1, TAR2])], compress_first=True)
    img = open_source(parse_source(f"docker-archive:{p}"))
    assert img.layers[0].media_type == mt.DOCKER_LAYER_GZIP and img.layers[0].digest != img.layers[0].diff_id
    assert files(img, img.layers[0])[b"etc/hostname"] == b"box\n"


def test_docker_archive_oci_style(tmp_path):
    """Docker 25+ `docker save`: blobs/sha256/HEX for config and layers, plus manifest.json."""
    p = tmp_path / "new.tar"
    cfg = _config([TAR1])
    with tarfile.open(p, "w") as tf:
        _add(tf, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        _add(tf, "blobs/sha256/" + dg.of_bytes(cfg)[7:], cfg)
        _add(tf, "blobs/sha256/" + dg.of_bytes(TAR1)[7:], TAR1)
        _add(tf, "manifest.json", json.dumps([{"Config": "blobs/sha256/" + dg.of_bytes(cfg)[7:],
                                                "RepoTags": ["n:1"],
                                                "Layers": ["blobs/sha256/" + dg.of_bytes(TAR1)[7:]]}]).encode())
    img = open_source(parse_source(f"docker-archive:{p}:n:1"))
    assert img.layers[0].digest == dg.of_bytes(TAR1)
    assert files(img, img.layers[0])[b"etc/hostname"] == b"box\n"


def test_docker_archive_bad_diff_id_names_the_layer(tmp_path):
    p = tmp_path / "a.tar"
    legacy_archive(p, [(["x:1"], [TAR1, TAR2])])
    data = bytearray(p.read_bytes())
    i = data.index(b"#!/bin/sh")
    data[i] ^= 0x01
    p.write_bytes(bytes(data))
    img = open_source(parse_source(f"docker-archive:{p}"))
    with pytest.raises(DigestMismatchError, match=r"^layer 2/2 \(sha256:.{12}…\).*digest mismatch"):
        files(img, img.layers[1])


def test_docker_archive_config_digest_checked(tmp_path):
    p = tmp_path / "a.tar"
    legacy_archive(p, [(["x:1"], [TAR1])])
    data = p.read_bytes().replace(b'"architecture": "amd64"', b'"architecture": "arm64"')
    p.write_bytes(data)
    with pytest.raises(DigestMismatchError, match="config"):
        open_source(parse_source(f"docker-archive:{p}"))


@pytest.mark.parametrize("content,msg", [(None, "no such file"), (b"not a tar" * 100, "not an uncompressed tar"),
                                         ("empty-tar", "manifest 'manifest.json' is missing")])
def test_docker_archive_errors(tmp_path, content, msg):
    p = tmp_path / "x.tar"
    if content == "empty-tar":
        with tarfile.open(p, "w") as tf:
            _add(tf, "repositories", b"{}")
    elif content is not None:
        p.write_bytes(content)
    with pytest.raises(ImageFormatError, match=msg):
        open_source(parse_source(f"docker-archive:{p}"))


@pytest.mark.skipif(not shutil.which("skopeo"), reason="skopeo not installed")
def test_skopeo_written_docker_archive(tmp_path, layout):
    layout.tag(add_image(layout, (TAR1, TAR2), ("gzip", "tar")), "v1")
    out = tmp_path / "skopeo.tar"
    subprocess.run(["skopeo", "--insecure-policy", "copy", "-q", f"oci:{layout.root}:v1",
                    f"docker-archive:{out}:example/app:v1"], check=True, capture_output=True, timeout=60)
    img = open_source(parse_source(f"docker-archive:{out}:example/app:v1"))
    assert [l.diff_id for l in img.layers] == [dg.of_bytes(TAR1), dg.of_bytes(TAR2)]
    got = {k: v for l in img.layers for k, v in files(img, l).items()}
    assert got[b"etc/hostname"] == b"box\n" and got[b"usr/bin/tool"] == b"#!/bin/sh\n"


@pytest.mark.parametrize("s,ref", [
    ("docker://docker.io/library/busybox:latest", "docker.io/library/busybox:latest"),
    ("busybox:latest", "docker.io/library/busybox:latest"),
    ("localhost:5000/app:1", "localhost:5000/app:1"),
    ("ghcr.io/org/app", "ghcr.io/org/app:latest"),
])
def test_parse_source_registry_references(s, ref):
    parsed = parse_source(s)
    assert parsed.transport == "docker" and str(parsed) == ref
