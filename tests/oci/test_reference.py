import pytest

from nydus_py.errors import ConfigError
from nydus_py.oci.reference import Reference, parse

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text, host, repo, tag, digest", [
    ("busybox", "docker.io", "library/busybox", "latest", None),
    ("busybox:1.36", "docker.io", "library/busybox", "1.36", None),
    ("user/img", "docker.io", "user/img", "latest", None),
    ("docker.io/busybox", "docker.io", "library/busybox", "latest", None),
    ("index.docker.io/library/busybox:1", "docker.io", "library/busybox", "1", None),
    ("localhost/x", "localhost", "x", "latest", None),
    ("localhost:5000/x", "localhost:5000", "x", "latest", None),
    ("localhost:5000/a/b/c:v1.0-rc_1", "localhost:5000", "a/b/c", "v1.0-rc_1", None),
    ("[::1]:5000/x", "[::1]:5000", "x", "latest", None),
    ("[fe80::1]/x:t", "[fe80::1]", "x", "t", None),
    ("127.0.0.1:5000/ns/app", "127.0.0.1:5000", "ns/app", "latest", None),
    ("ghcr.io/org/app@" + D, "ghcr.io", "org/app", None, D),
    ("ghcr.io/org/app:v1@" + D, "ghcr.io", "org/app", "v1", D),
    ("busybox@" + D, "docker.io", "library/busybox", None, D),
    ("Registry.Example.com/a__b/c-d--e.f:Tag", "Registry.Example.com", "a__b/c-d--e.f", "Tag", None),
])
def test_parse_accepts_what_docker_accepts(text, host, repo, tag, digest):
    ref = parse(text)
    assert (ref.host, ref.repository, ref.tag, ref.digest) == (host, repo, tag, digest)


@pytest.mark.parametrize("text", [
    "busybox", "user/img:1", "localhost:5000/x", "[::1]:5000/x", "ghcr.io/org/app:v1@" + D, "busybox@" + D,
])
def test_str_round_trips(text):
    ref = parse(text)
    assert parse(str(ref)) == ref


def test_str_is_fully_qualified():
    assert str(parse("busybox")) == "docker.io/library/busybox:latest"
    assert str(parse("[::1]:5000/x@" + D)) == f"[::1]:5000/x@{D}"


def test_api_host_maps_docker_hub_only():
    assert parse("busybox").api_host == "registry-1.docker.io"
    assert parse("localhost:5000/x").api_host == "localhost:5000"
    assert parse("quay.io/x/y").api_host == "quay.io"


def test_ref_prefers_digest_over_tag():
    assert parse("a/b:t@" + D).ref == D
    assert parse("a/b:t").ref == "t"


def test_reference_is_frozen_and_hashable():
    ref = parse("busybox")
    with pytest.raises(Exception):
        ref.tag = "x"  # type: ignore[misc]
    assert {ref: 1}[Reference("docker.io", "library/busybox", "latest", None)] == 1


@pytest.mark.parametrize("text, why", [
    ("", "empty"),
    ("Busybox", "lowercase"),
    ("user/Img", "lowercase"),
    ("busybox:", "bad tag"),
    ("busybox:-x", "bad tag"),
    ("busybox:" + "t" * 129, "bad tag"),
    ("busybox@sha256:abc", "bad digest"),
    ("busybox@md5:" + "a" * 32, "bad digest"),
    ("host:99999/x", "bad port"),
    ("host:abc/x", "bad port"),
    ("-bad.host/x", "bad registry host"),
    ("[::1/x", "IPv6"),
    ("a//b", "bad repository"),
    ("a/b/", "bad repository"),
    ("a/-b", "bad repository"),
    ("a/b c", "whitespace"),
    ("localhost:5000/" + "a" * 250, "longer than 255"),
])
def test_parse_rejects_with_one_config_error_line(text, why):
    with pytest.raises(ConfigError) as e:
        parse(text)
    msg = str(e.value)
    assert why in msg and "\n" not in msg
    assert repr(text)[:20] in msg or text == ""
