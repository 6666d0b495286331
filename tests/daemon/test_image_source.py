from pathlib import Path

import pytest

from nydus_py import image_source
from nydus_py.errors import ConfigError, FormatError, ImageFormatError
from nydus_py.oci import mediatypes as mt
from nydus_py.oci.layout import OCILayoutWriter
from tests.fixtures.rich_image import build_rich


@pytest.fixture(scope="module")
def rich():
    return build_rich()


def test_oci_ref_parsing(tmp_path):
    assert image_source.parse_oci_ref("oci:/a/b") == (Path("/a/b"), None)
    assert image_source.parse_oci_ref("oci:/a/b:v1") == (Path("/a/b"), "v1")
    odd = tmp_path / "with:colon"
    odd.mkdir()
    assert image_source.parse_oci_ref(f"oci:{odd}") == (odd, None)
    assert image_source.parse_oci_ref(f"oci:{odd}:t") == (odd, "t")
    with pytest.raises(ConfigError):
        image_source.parse_oci_ref("docker.io/library/alpine")


def test_open_oci_reads_bootstrap_and_serves_blobs_from_the_layout(tmp_path, rich):
    rich.write_oci(tmp_path / "img", tag="v1")
    opened = image_source.open_oci(f"oci:{tmp_path / 'img'}:v1")
    assert opened.bootstrap.inode_count > 300
    assert opened.backend.blob_size(rich.blob_id) == len(rich.blob)
    # the only image: no tag needed
    assert image_source.open_oci(f"oci:{tmp_path / 'img'}").bootstrap.inode_count == opened.bootstrap.inode_count


def test_open_oci_errors_are_one_clear_line(tmp_path, rich):
    with pytest.raises(ImageFormatError, match="no such directory"):
        image_source.open_oci(f"oci:{tmp_path / 'nope'}")
    root = rich.write_oci(tmp_path / "img")
    with pytest.raises(ImageFormatError, match="no image tagged 'other'"):
        image_source.open_oci(f"oci:{root}:other")
    rich.blob_path_in(root).unlink()
    # a missing data blob is the mount's decision (a warm cache may hold all of it)
    (missing,) = image_source.open_oci(f"oci:{root}").missing_blobs
    assert missing[0] == rich.blob_id and "is missing from" in missing[1] and "\n" not in missing[1]


def test_a_plain_oci_image_is_not_a_nydus_image(tmp_path):
    w = OCILayoutWriter(tmp_path / "plain")
    layer = w.put_bytes(b"not really a tar", mt.OCI_LAYER_GZIP)
    cfg = w.put_json({"os": "linux"}, mt.OCI_CONFIG)
    man = w.put_json({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "config": cfg.to_json(),
                      "layers": [layer.to_json()]}, mt.OCI_MANIFEST)
    w.tag(man, "latest")
    with pytest.raises(ImageFormatError, match="not a nydus-py image"):
        image_source.open_oci(f"oci:{tmp_path / 'plain'}")


def test_open_local_and_corrupt_bootstrap(tmp_path, rich):
    boot, blobs = rich.write_flat(tmp_path)
    opened = image_source.open_local(boot, blobs)
    assert opened.backend.read_range(rich.blob_id, 0, 4) == rich.blob[:4]
    boot.write_bytes(b"\x00garbage")
    with pytest.raises(FormatError, match=str(boot)):
        image_source.open_local(boot, blobs)
    with pytest.raises(ConfigError, match="blob directory does not exist"):
        image_source.open_local(boot, tmp_path / "none")
