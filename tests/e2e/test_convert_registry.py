"""nydusify convert registry → registry against a real docker-registry on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nydus_py.oci import mediatypes as mt
from nydus_py.oci.auth import Credentials
from nydus_py.oci.layout import OCILayout
from nydus_py.oci.registry import RegistryClient, RegistryConfig
from tests.fixtures.cli import nydusify
from tests.fixtures.containerd import push_oci_layout
from tests.fixtures.imagegen import feature_image, whiteout_image
from tests.fixtures.registry import USERS

pytestmark = pytest.mark.e2e


def _manifest(host: str, repo: str, ref: str, **kw) -> tuple[dict, str]:
    with RegistryClient(config=RegistryConfig(host=host, scheme="http", **kw)) as c:
        data, media_type, digest = c.get_manifest(repo, ref)
    return json.loads(data), digest


def test_registry_to_registry_convert_then_check(tmp_path, registry):
    whiteout_image().write_oci(tmp_path / "src", "v1")
    src_digest = push_oci_layout(tmp_path / "src", "v1", registry.host, "app/wh")
    nydusify("convert", "--plain-http", "--source", f"{registry.host}/app/wh:v1",
             "--target", f"{registry.host}/app/wh:v1-nydus")
    m, _ = _manifest(registry.host, "app/wh", "v1-nydus")
    assert m["layers"][-1]["mediaType"] == mt.NYDUS_PY_BOOTSTRAP
    assert m["subject"]["digest"] == src_digest
    # the pushed image is a complete OCI image: pull it back into a layout and check the tree
    out = tmp_path / "pulled"
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                    f"docker://{registry.host}/app/wh:v1-nydus", f"oci:{out}:n"], check=True)
    r = nydusify("check", "--source", f"oci:{tmp_path}/src:v1", "--target", f"oci:{out}:n", check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_second_conversion_uploads_no_blob_again(tmp_path, registry):
    feature_image().write_oci(tmp_path / "src", "v1")
    push_oci_layout(tmp_path / "src", "v1", registry.host, "app/feat")
    args = ("convert", "--plain-http", "--source", f"{registry.host}/app/feat:v1")
    nydusify(*args, "--target", f"{registry.host}/app/feat:n1")
    before = registry.count_requests("PUT", r"/v2/app/feat/blobs/uploads/")
    nydusify(*args, "--target", f"{registry.host}/app/feat:n2")
    assert registry.count_requests("PUT", r"/v2/app/feat/blobs/uploads/") == before
    assert _manifest(registry.host, "app/feat", "n1")[1] == _manifest(registry.host, "app/feat", "n2")[1]


def test_merge_platform_pushes_an_index_with_both_manifests(tmp_path, registry):
    whiteout_image().write_oci(tmp_path / "src", "v1")
    src_digest = push_oci_layout(tmp_path / "src", "v1", registry.host, "app/merge")
    nydusify("convert", "--plain-http", "--merge-platform", "--source", f"{registry.host}/app/merge:v1",
             "--target", f"{registry.host}/other/merged:v1")
    index, _ = _manifest(registry.host, "other/merged", "v1")
    assert index["mediaType"] == mt.OCI_INDEX
    original, converted = index["manifests"]
    assert original["digest"] == src_digest
    assert converted["platform"]["os.features"] == ["nydus-py.remoteimage.v1"]
    # both manifests resolve in the target repository (the source was copied by cross-mount)
    _manifest(registry.host, "other/merged", original["digest"])
    _manifest(registry.host, "other/merged", converted["digest"])


def test_basic_auth_registry_with_docker_config(tmp_path, basic_registry):
    user, pw = next(iter(USERS.items()))
    cfg = tmp_path / "docker"
    cfg.mkdir()
    auth = base64.b64encode(f"{user}:{pw}".encode()).decode()
    (cfg / "config.json").write_text(json.dumps({"auths": {basic_registry.host: {"auth": auth}}}))
    whiteout_image().write_oci(tmp_path / "src", "v1")
    # push the source with explicit credentials, then convert with docker config auth
    layout = OCILayout(tmp_path / "src")
    desc = layout.resolve("v1")
    manifest = json.loads(layout.read_blob(desc))
    with RegistryClient(config=RegistryConfig(host=basic_registry.host, scheme="http",
                                              credentials=Credentials(username=user, password=pw))) as c:
        for d in [manifest["config"], *manifest["layers"]]:
            c.push_blob("sec/app", layout.blob_path(d["digest"]), d["digest"], d["size"])
        c.put_manifest("sec/app", "v1", layout.read_blob(desc), desc.media_type)
    r = subprocess.run([*nydusify_cmd(), "convert", "--plain-http", "--source", f"{basic_registry.host}/sec/app:v1",
                        "--target", f"{basic_registry.host}/sec/app:n"], capture_output=True, text=True,
                       env={**os.environ, "DOCKER_CONFIG": str(cfg)})
    assert r.returncode == 0, r.stderr
    bad = subprocess.run([*nydusify_cmd(), "convert", "--plain-http", "--source",
                          f"{basic_registry.host}/sec/app:v1", "--target", f"oci:{tmp_path}/x:y"],
                         capture_output=True, text=True,
                         env={**os.environ, "DOCKER_CONFIG": str(tmp_path / "nowhere")})
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1 and "nydusify: error:" in bad.stderr
    assert not (tmp_path / "x").exists()


def nydusify_cmd() -> list[str]:
    return [str(Path(sys.executable).parent / "nydusify")]
