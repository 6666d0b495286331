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
from tests.e2e.test_convert_mount import nydusify
from tests.fixtures.imagegen import feature_image
from tests.fixtures.s3 import moto_s3  # noqa: F401 (fixture)

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
