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


# ---------------------------------------------------------------------------- registry images

@pytest.fixture(scope="module")
def registry_image(tmp_path_factory):
    """A two-layer image converted into a real docker-registry (two data blobs)."""
    from tests.fixtures.cli import nydusify
    from tests.fixtures.containerd import push_oci_layout
    from tests.fixtures.imagegen import Content, Image, Layer
    from tests.fixtures.registry import RegistryServer

    tmp = tmp_path_factory.mktemp("warm")
    a, b = Layer(), Layer()
    a.file("a", Content.random(3 << 20, seed=1))
    b.file("b", Content.random(1 << 20, seed=2))
    Image([a, b]).write_oci(tmp / "src", "v1")
    with RegistryServer(tmp / "registry") as reg:
        push_oci_layout(tmp / "src", "v1", reg.host, "warm/app")
        nydusify("convert", "--plain-http", "--source", f"{reg.host}/warm/app:v1",
                 "--target", f"{reg.host}/warm/app:nydus")
        yield reg


def test_a_warm_open_probes_the_blobs_with_the_manifest_and_reads_without_a_head(registry_image):
    """warm=True: connections open (one HEAD each, WARM_THREADS of them) as soon as the
    manifest names the blobs, and their sizes come from it: the first ranged read is one GET."""
    from tests.fixtures.daemon import wait_for
    from tests.fixtures.registry import FaultProxy

    px = FaultProxy(registry_image.host)
    opened = image_source.open_registry(f"{px.host}/warm/app:nydus", plain_http=True, warm=True)
    try:
        assert opened.warmed and len(opened.bootstrap.blobs) == 2
        wait_for(lambda: px.count("HEAD", "/blobs/") >= image_source.WARM_THREADS, "warm-up HEADs")
        assert px.count("HEAD", "/blobs/") == image_source.WARM_THREADS
        gets = px.count("GET", "/blobs/")           # the bootstrap
        for blob in opened.bootstrap.blobs:
            assert len(opened.backend.read_range(blob.id, 0, 16)) == 16
        assert px.count("GET", "/blobs/") == gets + 2
        assert px.count("HEAD", "/blobs/") == image_source.WARM_THREADS
    finally:
        image_source.close_backend(opened.backend)
        px.close()


def test_a_failed_open_closes_the_blob_backend_it_made(registry_image, monkeypatch):
    closed = []
    real = image_source.close_backend
    monkeypatch.setattr(image_source, "close_backend", lambda b: (closed.append(b), real(b)))
    with pytest.raises(ImageFormatError):
        image_source.open_registry(f"{registry_image.host}/warm/app:v1", plain_http=True, warm=True)
    assert len(closed) == 1
