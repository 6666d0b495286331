"""nydusify --backend-type s3 → data blobs in a real S3 API (moto server); nydusd reads them
back lazily through the s3 backend."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from converter.compare import compare_trees
from nydus_py.oci.layout import OCILayout
from tests.fixtures.umoci import umoci_reference
from tests.fixtures.cli import nydusify
from tests.fixtures.imagegen import feature_image

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


def test_blobs_go_to_s3_and_mount_reads_them(tmp_path, moto_s3):
    moto_s3.client().create_bucket(Bucket="blobs")
    conf = moto_s3.backend_config("blobs", object_prefix="nydus/")
    feature_image().write_oci(tmp_path / "src", "f")
    nydusify("convert", "--source", f"oci:{tmp_path}/src:f", "--target", f"oci:{tmp_path}/dst:f",
             "--backend-type", "s3", "--backend-config", json.dumps(conf))
    layout = OCILayout(tmp_path / "dst")
    manifest = layout.read_json(layout.resolve("f"), "manifest")
    assert len(manifest["layers"]) == 1          # only the bootstrap travels with the image
    assert manifest["annotations"]["io.nydus-py.blob-backend"] == "s3"
    keys = [o["Key"] for o in moto_s3.client().list_objects_v2(Bucket="blobs")["Contents"]]
    assert keys and all(k.startswith("nydus/") for k in keys)

    boot = tmp_path / "bootstrap"
    boot.write_bytes(layout.blob_path(manifest["layers"][0]["digest"]).read_bytes())
    cfg = tmp_path / "nydusd.json"
    cfg.write_text(json.dumps({"device": {"backend": {"type": "s3", "config": conf}}}))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run([str(BIN / "nydusd"), "mount", "--bootstrap", str(boot), "--config", str(cfg),
                        "--cache-dir", str(tmp_path / "cache"), "--daemon", str(mnt)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    try:
        ref = umoci_reference(tmp_path / "src", "f", tmp_path / "umoci")
        assert compare_trees(ref.rootfs, mnt, ignore_mtime=ref.volatile_mtimes) == []
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


def test_bad_s3_credentials_are_one_clear_line(tmp_path, moto_s3):
    moto_s3.client().create_bucket(Bucket="blobs2")
    conf = moto_s3.backend_config("blobs2", access_key_secret="wrong")
    feature_image().write_oci(tmp_path / "src", "f")
    r = subprocess.run([str(BIN / "nydusify"), "convert", "--source", f"oci:{tmp_path}/src:f",
                        "--target", f"oci:{tmp_path}/dst:f", "--backend-type", "s3",
                        "--backend-config", json.dumps(conf)], capture_output=True, text=True)
    assert r.returncode == 1
    errors = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("nydusify: layer ")]
    assert len(errors) == 1 and "nydusify: error:" in r.stderr   # progress lines aside (no tty)
    assert not (tmp_path / "dst").exists()


def _mount_s3_and_compare(tmp_path: Path, layout_dir: Path, tag: str, src: Path, conf: dict) -> list[str]:
    layout = OCILayout(layout_dir)
    manifest = layout.read_json(layout.resolve(tag), "manifest")
    assert len(manifest["layers"]) == 1          # only the bootstrap, dictionary blobs included
    boot = tmp_path / f"bootstrap-{tag}"
    boot.write_bytes(layout.blob_path(manifest["layers"][0]["digest"]).read_bytes())
    cfg = tmp_path / f"nydusd-{tag}.json"
    cfg.write_text(json.dumps({"device": {"backend": {"type": "s3", "config": conf}}}))
    mnt = tmp_path / f"mnt-{tag}"
    mnt.mkdir()
    r = subprocess.run([str(BIN / "nydusd"), "mount", "--bootstrap", str(boot), "--config", str(cfg),
                        "--cache-dir", str(tmp_path / f"cache-{tag}"), "--daemon", str(mnt)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    try:
        ref = umoci_reference(src, tag, tmp_path / f"umoci-{tag}")
        return compare_trees(ref.rootfs, mnt, ignore_mtime=ref.volatile_mtimes)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


def test_chunk_dicts_with_s3_blobs_store_only_new_chunks_and_mount(tmp_path, moto_s3):
    """A series into S3: b uses a (itself S3-backed) as its dictionary; c uses a's S3-backed
    image and an ordinary image (blobs in the layout, copied into S3) as two dictionaries."""
    from tests.fixtures.chunk_dict import app_layer, base_layer, extra_layer
    from tests.fixtures.imagegen import Image
    client = moto_s3.client()
    client.create_bucket(Bucket="series")
    conf = moto_s3.backend_config("series")
    s3 = ["--backend-type", "s3", "--backend-config", json.dumps(conf)]
    src = tmp_path / "src"
    base = base_layer()
    Image([base, app_layer(1)]).write_oci(src, "a")
    Image([base, app_layer(2)]).write_oci(src, "b")
    Image([base, app_layer(2), extra_layer()]).write_oci(src, "c")
    Image([extra_layer()]).write_oci(src, "x")

    def stored() -> int:
        return sum(o["Size"] for o in client.list_objects_v2(Bucket="series").get("Contents", []))

    nydusify("convert", "--source", f"oci:{src}:a", "--target", f"oci:{tmp_path}/A:a", *s3)
    after_a = stored()
    nydusify("convert", "--source", f"oci:{src}:b", "--target", f"oci:{tmp_path}/B:b", *s3,
             "--chunk-dict", f"oci:{tmp_path}/A:a")
    assert 0 < stored() - after_a < (1 << 20) + 4096     # app/new.bin (1 MiB) and main.py
    nydusify("convert", "--source", f"oci:{src}:x", "--target", f"oci:{tmp_path}/X:x")   # in-image
    before_c = stored()
    nydusify("convert", "--source", f"oci:{src}:c", "--target", f"oci:{tmp_path}/C:c", *s3,
             "--chunk-dict", f"oci:{tmp_path}/B:b", "--chunk-dict", f"oci:{tmp_path}/X:x")
    # nothing of c is new: x's blob (extra/fresh) is copied into S3 from X's layout, once
    x_blob = sum(p.stat().st_size for p in (tmp_path / "X/blobs/sha256").iterdir()
                 if p.stat().st_size > (1 << 20))
    assert stored() - before_c == x_blob
    for layout, tag in ((tmp_path / "B", "b"), (tmp_path / "C", "c")):
        assert _mount_s3_and_compare(tmp_path, layout, tag, src, conf) == []


def test_s3_backed_dictionary_needs_an_s3_target(tmp_path, moto_s3):
    moto_s3.client().create_bucket(Bucket="dict-only")
    conf = moto_s3.backend_config("dict-only")
    feature_image().write_oci(tmp_path / "src", "f")
    nydusify("convert", "--source", f"oci:{tmp_path}/src:f", "--target", f"oci:{tmp_path}/A:f",
             "--backend-type", "s3", "--backend-config", json.dumps(conf))
    r = subprocess.run([str(BIN / "nydusify"), "convert", "--source", f"oci:{tmp_path}/src:f",
                        "--target", f"oci:{tmp_path}/B:f", "--chunk-dict", f"oci:{tmp_path}/A:f"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "--backend-type s3" in r.stderr
    assert not (tmp_path / "B").exists()
