"""nydusify convert --chunk-dict: an image converted against an earlier one stores only chunks
the earlier one lacks, references the rest (its blobs become layers of the new manifest), and
mounts to the same tree umoci unpacks."""

from __future__ import annotations

from pathlib import Path

import pytest

from converter.compare import compare_trees
from tests.fixtures.chunk_dict import (
    MiB,
    app_layer,
    base_layer,
    dict_blobs,
    extra_layer,
    manifest,
    own_blobs,
)
from tests.fixtures.cli import Mount, nydusify
from tests.fixtures.containerd import push_oci_layout
from tests.fixtures.imagegen import Image
from tests.fixtures.umoci import umoci_reference

pytestmark = pytest.mark.e2e

def mount_and_compare(tmp: Path, src: Path, tag: str, image: str, *extra: str) -> list[str]:
    ref = umoci_reference(src, tag, tmp / f"umoci-{tag}")
    m = Mount(image, tmp / f"mnt-{tag}", tmp / f"cache-{tag}")
    m.args[-1:-1] = list(extra)
    with m as mnt:
        return compare_trees(ref.rootfs, mnt, ignore_mtime=ref.volatile_mtimes)


def test_image_on_top_of_the_dictionary_stores_only_its_new_layer(tmp_path):
    src = tmp_path / "src"
    base, app = base_layer(), app_layer(1)
    Image([base, app]).write_oci(src, "a")
    Image([base, app, extra_layer()]).write_oci(src, "b")
    nydusify("convert", "--compressor", "none", "--source", f"oci:{src}:a", "--target", f"oci:{tmp_path}/A:a")
    r = nydusify("convert", "--compressor", "none", "--source", f"oci:{src}:b",
                 "--target", f"oci:{tmp_path}/B:b", "--chunk-dict", f"oci:{tmp_path}/A:a")
    assert "chunk dict" in r.stderr
    a, b = manifest(tmp_path / "A", "a"), manifest(tmp_path / "B", "b")
    # B's own data is the new layer's new bytes only: extra/again is in the dictionary
    assert [l["size"] for l in own_blobs(b)] == [2 * MiB]
    assert "io.nydus-py.source-layer" in own_blobs(b)[0]["annotations"]
    # the dictionary blobs it references are layers of B, present in B's layout
    assert [l["digest"] for l in dict_blobs(b)] == [l["digest"] for l in own_blobs(a)]
    assert all("io.nydus-py.source-layer" not in l["annotations"] for l in dict_blobs(b))
    for l in b["layers"]:
        assert (tmp_path / "B/blobs/sha256" / l["digest"].split(":")[1]).is_file()
    assert mount_and_compare(tmp_path, src, "b", f"oci:{tmp_path}/B:b") == []


def test_rebuilt_layer_stores_only_changed_chunks(tmp_path):
    """v2 of an app: its layer changes a little, so its blob is new; without a dictionary the
    whole layer is stored again, with one only the changed chunks are."""
    src = tmp_path / "src"
    base = base_layer()
    Image([base, app_layer(1)]).write_oci(src, "v1")
    Image([base, app_layer(2)]).write_oci(src, "v2")
    shared = tmp_path / "images"       # one layout for all versions: blobs shared by digest
    nydusify("convert", "--source", f"oci:{src}:v1", "--target", f"oci:{shared}:v1")
    before = sum(p.stat().st_size for p in (shared / "blobs").rglob("*"))
    nydusify("convert", "--source", f"oci:{src}:v2", "--target", f"oci:{shared}:v2",
             "--chunk-dict", f"bootstrap:oci:{shared}:v1")
    added_with = sum(p.stat().st_size for p in (shared / "blobs").rglob("*")) - before
    nydusify("convert", "--source", f"oci:{src}:v2", "--target", f"oci:{tmp_path}/plain:v2")
    plain = manifest(tmp_path / "plain", "v2")
    added_without = sum(l["size"] for l in own_blobs(plain)
                        if l["digest"] not in {x["digest"] for x in own_blobs(manifest(shared, "v1"))})
    v2 = manifest(shared, "v2")
    changed = MiB + len(b"print('version 2')\n")          # app/new.bin + app/main.py
    assert [l["annotations"]["io.nydus-py.uncompressed-size"] for l in own_blobs(v2)] == [str(changed)]
    assert added_without > 4 * MiB > 1.1 * MiB > added_with
    assert mount_and_compare(tmp_path, src, "v2", f"oci:{shared}:v2") == []


def test_registry_dictionary_in_the_same_registry_is_mounted_not_uploaded(tmp_path, registry):
    src = tmp_path / "src"
    base, app = base_layer(), app_layer(1)
    Image([base, app]).write_oci(src, "a")
    Image([base, app, extra_layer()]).write_oci(src, "b")
    host = registry.host
    push_oci_layout(src, "a", host, "dict/a")
    push_oci_layout(src, "b", host, "dict/b")
    nydusify("convert", "--plain-http", "--source", f"{host}/dict/a:a", "--target", f"{host}/dict/a:nydus")
    puts = registry.count_requests("PUT", r"/v2/dict/b/blobs/uploads/")
    mounts = registry.count_requests("POST", r"/v2/dict/b/blobs/uploads/\?\S*mount=")
    dict_gets = registry.count_requests("GET", r"/v2/dict/a/blobs/")
    nydusify("convert", "--plain-http", "--source", f"{host}/dict/b:b", "--target", f"{host}/dict/b:nydus",
             "--chunk-dict", f"bootstrap:registry:{host}/dict/a:nydus")
    # uploaded: B's new blob, its bootstrap and its config; A's two blobs were mounted, and
    # nothing but A's bootstrap was downloaded from the dictionary
    assert registry.count_requests("PUT", r"/v2/dict/b/blobs/uploads/") - puts == 3
    assert registry.count_requests("POST", r"/v2/dict/b/blobs/uploads/\?\S*mount=") - mounts == 2
    assert registry.count_requests("GET", r"/v2/dict/a/blobs/") - dict_gets == 1
    assert mount_and_compare(tmp_path, src, "b", f"{host}/dict/b:nydus", "--plain-http") == []
    # the same dictionary for an OCI layout target: its blobs are downloaded into the layout
    nydusify("convert", "--source", f"oci:{src}:b", "--target", f"oci:{tmp_path}/B:b",
             "--chunk-dict", f"{host}/dict/a:nydus", "--chunk-dict-insecure")
    b = manifest(tmp_path / "B", "b")
    assert len(dict_blobs(b)) == 2
    for l in b["layers"]:
        assert (tmp_path / "B/blobs/sha256" / l["digest"].split(":")[1]).is_file()
    (tmp_path / "oci").mkdir()
    assert mount_and_compare(tmp_path / "oci", src, "b", f"oci:{tmp_path}/B:b") == []


def test_oci_dictionary_for_a_registry_target_uploads_its_blobs(tmp_path, registry):
    src = tmp_path / "src"
    base = base_layer()
    Image([base]).write_oci(src, "a")
    Image([base, extra_layer()]).write_oci(src, "b")
    nydusify("convert", "--source", f"oci:{src}:a", "--target", f"oci:{tmp_path}/A:a")
    nydusify("convert", "--plain-http", "--source", f"oci:{src}:b", "--target", f"{registry.host}/x/b:n",
             "--chunk-dict", f"oci:{tmp_path}/A:a")
    assert mount_and_compare(tmp_path, src, "b", f"{registry.host}/x/b:n", "--plain-http") == []


def test_dictionary_that_is_not_a_nydus_py_image_is_one_error_line(tmp_path):
    src = tmp_path / "src"
    Image([base_layer()]).write_oci(src, "a")
    for bad in (f"oci:{src}:a", f"oci:{tmp_path}/missing:x", "bootstrap:local:/tmp/x.boot"):
        r = nydusify("convert", "--source", f"oci:{src}:a", "--target", f"oci:{tmp_path}/out:a",
                     "--chunk-dict", bad, check=False)
        assert r.returncode == 1, r.stderr
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("nydusify: error: "), r.stderr
        assert not (tmp_path / "out").exists()
    assert "not a nydus-py image" in nydusify(
        "convert", "--source", f"oci:{src}:a", "--target", f"oci:{tmp_path}/out:a",
        "--chunk-dict", f"oci:{src}:a", check=False).stderr
