"""nydusify as a Nydus user types it: its flag names, stdin prefetch list, --output-json and
progress lines for CI, check by `subject` with distinct exit codes, copy and mount; against
real OCI layouts, the docker-registry fixture, moto S3 and real FUSE mounts."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from converter.compare import compare_trees
from nydus_py.oci.layout import OCILayout
from tests.fixtures.containerd import push_oci_layout
from tests.fixtures.imagegen import feature_image, whiteout_image
from tests.fixtures.mounts import command, running
from tests.fixtures.umoci import umoci_reference

pytestmark = pytest.mark.e2e


def nydusify(*args, env=None, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([*command("nydusify"), *args], capture_output=True, text=True, timeout=600,
                       input=stdin if stdin is not None else "", env={**os.environ, **(env or {})},
                       check=False)
    if check:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("src") / "layout"
    feature_image().write_oci(d, "v1")
    return d


def test_convert_with_nydus_flags_env_stdin_output_json_and_ci_progress(src, tmp_path):
    import shutil
    out = tmp_path / "out.json"
    dst = tmp_path / "dst"
    shutil.copytree(src, dst)               # converted next to its source: check finds it by subject
    r = nydusify("convert", "--fs-chunk-size", "0x100000", "--compressor", "lz4_block",
                 "--prefetch-patterns", "--output-json", str(out),
                 env={"SOURCE": f"oci:{dst}:v1", "TARGET": f"oci:{dst}:nydus"},
                 stdin="/data/random\n/etc\n")
    # stderr is a pipe here: one progress line per layer, with the percentage of bytes done
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("nydusify: layer ")]
    assert len(lines) == 3 and lines[0].startswith("nydusify: layer 1/3 sha256:")
    assert lines[-1].endswith("[100%]")
    doc = json.loads(out.read_text())
    layout = OCILayout(dst)
    manifest = layout.read_json(layout.resolve("nydus"), "manifest")
    assert doc["manifest"]["digest"] == layout.resolve("nydus").digest
    src_layout = OCILayout(src)
    src_manifest = src_layout.read_json(src_layout.resolve("v1"), "source manifest")
    assert [x["source_digest"] for x in doc["layers"]] == [d["digest"] for d in src_manifest["layers"]]
    blobs = {d["digest"]: d["size"] for d in manifest["layers"][:-1]}
    assert {x["blob_digest"]: x["blob_size"] for x in doc["layers"] if x["blob_digest"]} == blobs
    assert all(x["elapsed"] >= 0 for x in doc["layers"]) and doc["total_elapsed"] > 0
    assert manifest["annotations"]["io.nydus-py.compressor"] == "lz4"
    assert manifest["annotations"]["io.nydus-py.chunk-size"] == str(0x100000)
    from nydus_py.format.bootstrap import Bootstrap
    boot = Bootstrap.from_bytes(layout.read_blob(
        next(_desc(d) for d in manifest["layers"][-1:]), "bootstrap", limit=1 << 30))
    assert boot.prefetch                            # the stdin list reached the bootstrap

    # nydusify check --target alone: the source is the manifest's subject (same layout)
    r = nydusify("check", "--target", f"oci:{dst}:nydus")
    assert "identical" in r.stderr


def _desc(d):
    from nydus_py.oci.layout import Descriptor
    return Descriptor.from_json(d, "layer")


def test_check_exit_codes_differs_vs_error(src, tmp_path):
    other = tmp_path / "other"
    whiteout_image().write_oci(other, "w")
    nydusify("convert", "--source", f"oci:{src}:v1", "--target", f"oci:{tmp_path}/dst:n", "--quiet")
    r = nydusify("check", "--source", f"oci:{other}:w", "--target", f"oci:{tmp_path}/dst:n", check=False)
    assert r.returncode == 1 and "difference(s)" in r.stderr
    r = nydusify("check", "--target", f"oci:{tmp_path}/missing:n", check=False)
    assert r.returncode == 2 and r.stderr.startswith("nydusify: error: ")


def test_target_suffix_names_the_target_after_the_source(src, tmp_path):
    import shutil
    shutil.copytree(src, tmp_path / "l")
    nydusify("convert", "--source", f"oci:{tmp_path}/l:v1", "--target-suffix", "-nydus", "--quiet")
    assert "v1-nydus" in OCILayout(tmp_path / "l").tags()


@pytest.mark.parametrize("flag, value", [("--fs-version", "6"), ("--oci-ref", None), ("--oci", None),
                                         ("--build-cache", "r/c:1"),
                                         ("--docker-v2-format", None), ("--nydus-image", "/bin/x")])
def test_nydusify_flags_without_meaning_are_refused_in_one_line(src, tmp_path, flag, value):
    r = nydusify("convert", "--source", f"oci:{src}:v1", "--target", f"oci:{tmp_path}/d:x", flag,
                 *([value] if value else []), check=False)
    assert r.returncode == 2 and r.stderr.startswith("nydusify: not supported by nydus-py: ")
    assert "because" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()


def test_sizes_in_flags(src, tmp_path):
    r = nydusify("convert", "--source", f"oci:{src}:v1", "--target", f"oci:{tmp_path}/d:x",
                 "--max-layer-size", "1K", check=False)
    assert r.returncode == 1 and r.stderr.startswith("nydusify: error: ")
    nydusify("convert", "--source", f"oci:{src}:v1", "--target", f"oci:{tmp_path}/d:x",
             "--max-layer-size", "1G", "--chunk-size", "64K", "--quiet")


# -- registry: copy, check by subject, mount ------------------------------------------------------
def test_copy_registry_to_registry_and_layout_then_mount(src, tmp_path, registry):
    push_oci_layout(src, "v1", registry.host, "compat/app")
    nydusify("convert", "--source", f"{registry.host}/compat/app:v1", "--source-insecure",
             "--target", f"{registry.host}/compat/app:v1-nydus", "--target-insecure", "--quiet")
    # check by subject against the registry (the source is in the same repository)
    r = nydusify("check", "--target", f"{registry.host}/compat/app:v1-nydus", "--target-insecure")
    assert "identical" in r.stderr
    # copy to another repository, then into a layout, byte for byte
    nydusify("copy", "--source", f"{registry.host}/compat/app:v1-nydus", "--source-insecure",
             "--target", f"{registry.host}/compat/copy:n", "--target-insecure")
    nydusify("copy", "--source", f"{registry.host}/compat/copy:n", "--source-insecure",
             "--target", f"oci:{tmp_path}/copied:n")
    layout = OCILayout(tmp_path / "copied")
    desc = layout.resolve("n")
    for d in layout.read_json(desc, "m")["layers"]:
        assert layout.has_blob(d["digest"])
    ref = umoci_reference(src, "v1", tmp_path / "umoci")
    mnt = tmp_path / "mnt"
    with running([*command("nydusd"), "mount", "--image", f"oci:{tmp_path}/copied:n", str(mnt)], mnt,
                 tmp_path / "log"):
        assert compare_trees(ref.rootfs, mnt, ignore_mtime=ref.volatile_mtimes) == []
    # nydusify mount --target, as Nydus's (foreground until SIGTERM)
    mnt2 = tmp_path / "image-fs"
    with running([*command("nydusify"), "mount", "--target", f"{registry.host}/compat/copy:n",
                  "--target-insecure", "--mount-path", str(mnt2)], mnt2, tmp_path / "log2"):
        assert (mnt2 / "etc/hostname").read_bytes() == (ref.rootfs / "etc/hostname").read_bytes()


def test_s3_image_mounts_by_reference_with_the_configs_backend(src, tmp_path, moto_s3):
    moto_s3.client().create_bucket(Bucket="compat")
    conf = moto_s3.backend_config("compat", object_prefix="n/")
    nydusify("convert", "--source", f"oci:{src}:v1", "--target", f"oci:{tmp_path}/dst:s3",
             "--backend-type", "s3", "--backend-config", json.dumps(conf), "--quiet")
    cfg = tmp_path / "nydusd.json"
    cfg.write_text(json.dumps({"device": {"backend": {"type": "s3", "config": conf}}}))
    ref = umoci_reference(src, "v1", tmp_path / "umoci")
    mnt = tmp_path / "mnt"
    with running([*command("nydusd"), "mount", "--image", f"oci:{tmp_path}/dst:s3", "--config", str(cfg),
                  "--cache-dir", str(tmp_path / "cache"), str(mnt)], mnt, tmp_path / "log"):
        assert compare_trees(ref.rootfs, mnt, ignore_mtime=ref.volatile_mtimes) == []
    r = nydusify("copy", "--source", f"oci:{tmp_path}/dst:s3", "--target", f"oci:{tmp_path}/c:x", check=False)
    assert r.returncode == 1 and "s3" in r.stderr and not (tmp_path / "c").exists()


def test_copy_layout_to_layout_verifies_every_blob(src, tmp_path):
    nydusify("convert", "--source", f"oci:{src}:v1", "--target", f"oci:{tmp_path}/a:n", "--quiet")
    nydusify("copy", "--source", f"oci:{tmp_path}/a:n", "--target", f"oci:{tmp_path}/b:n")
    a, b = OCILayout(tmp_path / "a"), OCILayout(tmp_path / "b")
    assert a.resolve("n").digest == b.resolve("n").digest
    layers = a.read_json(a.resolve("n"), "m")["layers"]
    data = a.blob_path(layers[0]["digest"])
    data.write_bytes(b"x" + data.read_bytes()[1:])          # same size, wrong content
    r = nydusify("copy", "--source", f"oci:{tmp_path}/a:n", "--target", f"oci:{tmp_path}/c:n", check=False)
    assert r.returncode == 1 and "digest mismatch" in r.stderr and not (tmp_path / "c").exists()


def _multi(tmp_path):
    import dataclasses
    from tests.fixtures.imagegen import write_multiplatform_oci
    amd = feature_image()
    arm = dataclasses.replace(whiteout_image(), architecture="arm64")
    write_multiplatform_oci(tmp_path / "multi", "m", [amd, arm])
    return amd, arm


def _mount_compare(tmp_path, image: str, src_layout, src_tag, name, *extra):
    ref = umoci_reference(src_layout, src_tag, tmp_path / f"umoci-{name}")
    mnt = tmp_path / f"mnt-{name}"
    with running([*command("nydusd"), "mount", *extra, "--image", image, str(mnt)], mnt, tmp_path / f"log-{name}"):
        assert compare_trees(ref.rootfs, mnt, ignore_mtime=ref.volatile_mtimes) == []


def test_all_platforms_and_platform_list_give_an_index(tmp_path, registry):
    amd, arm = _multi(tmp_path)
    out = tmp_path / "out.json"
    nydusify("convert", "--source", f"oci:{tmp_path}/multi:m", "--target", f"oci:{tmp_path}/n:m",
             "--all-platforms", "--output-json", str(out), "--quiet")
    layout = OCILayout(tmp_path / "n")
    index = layout.read_json(layout.resolve("m"), "index")
    assert [e["platform"]["architecture"] for e in index["manifests"]] == ["amd64", "arm64"]
    doc = json.loads(out.read_text())
    assert set(doc["platforms"]) == {"linux/amd64", "linux/arm64"} and doc["index"]["digest"] == layout.resolve("m").digest
    # each platform's image is the source's: mount the converted entry by digest via a tag
    from nydus_py.oci.layout import Descriptor, OCILayoutWriter
    w = OCILayoutWriter(tmp_path / "n")
    for e in index["manifests"]:
        w.tag(Descriptor.from_json(e, "e"), e["platform"]["architecture"])
    for tag in ("amd64", "arm64"):
        img = amd if tag == "amd64" else arm
        img.write_oci(tmp_path / f"single-{tag}", "s")
        _mount_compare(tmp_path, f"oci:{tmp_path}/n:{tag}", tmp_path / f"single-{tag}", "s", tag)
    # the same to a registry with --platform a,b; the index lands under the tag
    push = subprocess.run(["skopeo", "copy", "--quiet", "--all", "--dest-tls-verify=false",
                           f"oci:{tmp_path}/multi:m", f"docker://{registry.host}/compat/multi:m"],
                          capture_output=True, text=True, check=False)
    assert push.returncode == 0, push.stderr
    nydusify("convert", "--source", f"{registry.host}/compat/multi:m", "--source-insecure",
             "--target", f"{registry.host}/compat/multi:m-nydus", "--target-insecure",
             "--platform", "linux/amd64,linux/arm64", "--quiet")
    from nydus_py.oci.reference import parse as parse_reference
    from nydus_py.oci.registry import RegistryClient, RegistryConfig
    r = parse_reference(f"{registry.host}/compat/multi:m-nydus")
    with RegistryClient(config=RegistryConfig.for_reference(r, scheme="http")) as c:
        data, media_type, _ = c.get_manifest(r.repository, "m-nydus")
    assert media_type == "application/vnd.oci.image.index.v1+json"
    assert len(json.loads(data)["manifests"]) == 2


def test_nydus_sample_registry_config_without_host_mounts_by_reference(src, tmp_path, registry):
    push_oci_layout(src, "v1", registry.host, "compat/sample")
    nydusify("convert", "--source", f"{registry.host}/compat/sample:v1", "--source-insecure",
             "--target", f"{registry.host}/compat/sample:n", "--target-insecure", "--quiet")
    cfg = tmp_path / "nydusd-config.json"      # the shape of Nydus's misc/configs/nydusd-config.json
    cfg.write_text(json.dumps({
        "device": {"backend": {"type": "registry", "config": {
            "timeout": 5, "connect_timeout": 5, "retry_limit": 2, "skip_verify": False}},
            "cache": {"type": "blobcache", "config": {"work_dir": str(tmp_path / "cache")}}},
        "mode": "direct", "digest_validate": False, "iostats_files": False, "enable_xattr": True,
        "fs_prefetch": {"enable": True, "threads_count": 8, "merging_size": 1048576, "prefetch_all": True}}))
    ref = umoci_reference(src, "v1", tmp_path / "umoci")
    mnt = tmp_path / "mnt"
    with running([*command("nydusd"), "mount", "--plain-http", "--image", f"{registry.host}/compat/sample:n",
                  "--config", str(cfg), str(mnt)], mnt, tmp_path / "log"):
        assert compare_trees(ref.rootfs, mnt, ignore_mtime=ref.volatile_mtimes) == []
