"""S3Backend against a real moto server on 127.0.0.1 (with IAM auth on): the shared
conformance suite, then uploads, prefixes, credentials and errors."""

from __future__ import annotations

import os

import pytest

from nydus_py.errors import AuthError, BackendError, BlobNotFoundError, ConfigError
from nydus_py.metrics import Metrics
from nydus_py.storage import s3 as s3mod
from nydus_py.storage.backend import close_backend, hint_blob_sizes, innermost
from nydus_py.config.schema import BackendConfig
from nydus_py.storage.factory import make_backend
from nydus_py.config.schema import S3BackendConfig
from nydus_py.storage.s3 import S3Backend
from tests.fixtures.backend_contract import BIG, EMPTY, SMALL, blob_id, contract_tests

# The conformance tests, collected again in this module against the `backend` fixture below.
globals().update(contract_tests())

BLOBS = {blob_id(x): x for x in (BIG, SMALL, EMPTY)}
BIG_ID = blob_id(BIG)
BUCKET = "nydus-blobs"


def s3_backend(server, **kw) -> S3Backend:
    return S3Backend(S3BackendConfig.from_dict(server.backend_config(BUCKET, **kw)))


@pytest.fixture(scope="module")
def stored(moto_s3, tmp_path_factory):
    """BLOBS uploaded with put_blob under two prefixes."""
    moto_s3.client().create_bucket(Bucket=BUCKET)
    d = tmp_path_factory.mktemp("s3-blobs")
    for prefix in ("", "nydus/v1/"):
        b = s3_backend(moto_s3, object_prefix=prefix)
        for bid, data in BLOBS.items():
            p = d / bid.split(":")[1]
            p.write_bytes(data)
            assert b.put_blob(bid, p) == "uploaded"
        b.close()
    return moto_s3


S3_BACKENDS = {
    "plain": lambda s: s3_backend(s),
    "prefixed": lambda s: s3_backend(s, object_prefix="nydus/v1/"),
    "factory": lambda s: make_backend(BackendConfig.from_dict(
        {"type": "s3", "config": s.backend_config(BUCKET, object_prefix="nydus/v1/")}), metrics=Metrics()),
}


@pytest.fixture(params=sorted(S3_BACKENDS))
def backend(request, stored):
    b = S3_BACKENDS[request.param](stored)
    yield b
    close_backend(b)


# ---------------------------------------------------------------------------- config

def test_config_from_nydusd_json_shape():
    c = BackendConfig.from_dict({"type": "s3", "config": {
        "endpoint": "s3.example.com:9000", "scheme": "http", "region": "eu-west-1", "bucket_name": "b1",
        "object_prefix": "p/", "access_key_id": "AK", "access_key_secret": "SK", "retry_limit": 4}})
    assert c.retry_limit == 4
    assert c.s3 == S3BackendConfig(endpoint="s3.example.com:9000", scheme="http", region="eu-west-1",
                                   bucket_name="b1", object_prefix="p/", access_key_id="AK",
                                   access_key_secret="SK")
    assert "SK" not in repr(c) and c.s3.force_path_style


def test_endpoint_with_scheme_sets_the_scheme():
    c = S3BackendConfig.from_dict({"endpoint": "http://127.0.0.1:9000", "bucket_name": "b"})
    assert (c.scheme, c.endpoint) == ("http", "127.0.0.1:9000")


@pytest.mark.parametrize("d,field", [
    ({}, "backend.config.bucket_name"),
    ({"bucket_name": "b", "bucket": "x"}, "backend.config.bucket"),
    ({"bucket_name": "b", "scheme": "ftp"}, "backend.config.scheme"),
    ({"bucket_name": "b", "access_key_id": "AK"}, "backend.config.access_key_secret"),
    ({"bucket_name": "b", "force_path_style": "yes"}, "backend.config.force_path_style"),
    ({"bucket_name": "b", "endpoint": "h:1/path"}, "backend.config.endpoint"),
    ({"bucket_name": "b", "timeout": -1}, "backend.config.timeout"),
])
def test_bad_s3_config_names_the_field(d, field):
    with pytest.raises(ConfigError) as ei:
        BackendConfig.from_dict({"type": "s3", "config": d})
    assert str(ei.value).startswith(field + ":"), str(ei.value)


# ---------------------------------------------------------------------------- behaviour

def test_object_key_is_prefix_plus_hex_digest(stored):
    keys = {o["Key"] for o in stored.client().list_objects_v2(Bucket=BUCKET)["Contents"]}
    hexes = {bid.split(":")[1] for bid in BLOBS}
    assert keys == hexes | {"nydus/v1/" + h for h in hexes}


def test_prefix_is_honoured_for_reads(stored, tmp_path):
    only = os.urandom(1000)
    bid = blob_id(only)
    (tmp_path / "blob").write_bytes(only)
    a = s3_backend(stored, object_prefix="other/")
    b = s3_backend(stored)
    try:
        a.put_blob(bid, tmp_path / "blob")
        assert a.read_range(bid, 10, 20) == only[10:30]
        with pytest.raises(BlobNotFoundError) as ei:
            b.read_range(bid, 0, 1)
        assert bid in str(ei.value) and BUCKET in str(ei.value)
    finally:
        a.close()
        b.close()


def test_put_blob_skips_an_object_that_exists(stored, tmp_path):
    b = s3_backend(stored, object_prefix="nydus/v1/")
    p = tmp_path / "x"
    p.write_bytes(SMALL)
    assert b.put_blob(blob_id(SMALL), p) == "exists"
    b.close()


def test_large_put_blob_goes_up_in_parts(stored, tmp_path, monkeypatch):
    monkeypatch.setattr(s3mod, "MULTIPART_THRESHOLD", 5 << 20)      # S3's minimum part size
    data = os.urandom((5 << 20) * 2 + 12345)
    bid = blob_id(data)
    p = tmp_path / "big"
    p.write_bytes(data)
    b = s3_backend(stored, object_prefix="mp/")
    try:
        assert b.put_blob(bid, p) == "uploaded"
        head = stored.client().head_object(Bucket=BUCKET, Key="mp/" + bid.split(":")[1])
        assert head["ContentLength"] == len(data) and head["ETag"].strip('"').endswith("-3")
        assert b.read_range(bid, (5 << 20) - 10, 20) == data[(5 << 20) - 10:(5 << 20) + 10]
    finally:
        b.close()


@pytest.mark.parametrize("override", [{"access_key_secret": "wrong-secret"},
                                      {"access_key_id": "AKIAUNKNOWNKEY000000"}],
                         ids=["wrong-secret", "unknown-key"])
def test_wrong_credentials_are_an_auth_error_with_one_clear_line(stored, override):
    b = s3_backend(stored, **override)
    try:
        for call in (lambda: b.read_range(BIG_ID, 0, 1), lambda: b.blob_size(BIG_ID)):
            with pytest.raises(AuthError) as ei:
                call()
            msg = str(ei.value)
            assert ei.value.permanent and "\n" not in msg and BUCKET in msg and "credentials" in msg
    finally:
        b.close()


def test_missing_bucket_is_a_permanent_error(stored):
    b = S3Backend(S3BackendConfig.from_dict(stored.backend_config("no-such-bucket")))
    with pytest.raises(BackendError) as ei:
        b.blob_size(BIG_ID)
    assert ei.value.permanent and "no-such-bucket" in str(ei.value)
    b.close()


def test_unreachable_endpoint_is_a_transient_error(stored):
    from tests.fixtures.registry import free_port
    b = S3Backend(S3BackendConfig.from_dict({**stored.backend_config(BUCKET),
                                             "endpoint": f"127.0.0.1:{free_port()}", "connect_timeout": 1}))
    with pytest.raises(BackendError) as ei:
        b.read_range(BIG_ID, 0, 1)
    assert not ei.value.permanent and not isinstance(ei.value, (AuthError, BlobNotFoundError))
    b.close()


def test_hinted_sizes_skip_the_head_and_a_probe_keeps_them(stored, monkeypatch):
    """Sizes from a verified manifest (hint_blob_sizes): the first read is a GET alone; a probe
    (warm_backend's HEAD at mount) asks the server but keeps the manifest's size."""
    b = make_backend(BackendConfig.from_dict({"type": "s3", "config": stored.backend_config(BUCKET)}))
    inner = innermost(b)
    assert isinstance(inner, S3Backend)
    heads: list[str] = []
    real = inner._client.head_object
    monkeypatch.setattr(inner._client, "head_object", lambda **kw: (heads.append(kw["Key"]), real(**kw))[1])
    try:
        hint_blob_sizes(b, {BIG_ID: len(BIG), blob_id(SMALL): len(SMALL) + 5})
        assert b.read_range(BIG_ID, 3, 50) == BIG[3:53]
        assert heads == []
        assert inner.probe_blob(BIG_ID) == len(BIG) and len(heads) == 1
        assert inner.probe_blob(blob_id(SMALL)) == len(SMALL) + 5       # the hint stays
        assert b.blob_size(blob_id(EMPTY)) == 0 and len(heads) == 3      # unhinted: asked
    finally:
        close_backend(b)
