"""RegistryClient against a real docker-registry process on 127.0.0.1 (plus proxies)."""

import dataclasses
import os
import threading

import pytest

from nydus_py.errors import AuthError, BackendError, BlobNotFoundError, DigestMismatchError
from nydus_py.oci import digest as dg
from nydus_py.oci import mediatypes as mt
from nydus_py.oci.auth import Credentials
from nydus_py.oci.layout import canonical_json
from nydus_py.oci.registry import RegistryClient, RegistryConfig
from nydus_py.retry import RetryPolicy
from tests.fixtures.registry import USERS, Fault, FaultProxy

ALICE = Credentials("alice", USERS["alice"])
BLOB = os.urandom(300_000) + b"tail-marker"
BLOB_D = dg.of_bytes(BLOB)


def client(host: str, **kw) -> RegistryClient:
    """A client whose retries do not sleep (the schedule itself is tested in tests/test_retry.py)."""
    kw.setdefault("timeout", 5.0)
    cfg = RegistryConfig(host=host, scheme="http", **kw)
    return RegistryClient(config=cfg, retry=dataclasses.replace(cfg.retry_policy(), sleep=lambda s: None))


def push(c: RegistryClient, repo: str, data: bytes = BLOB) -> str:
    d = dg.of_bytes(data)
    c.push_blob(repo, data, d, len(data))
    return d


def manifest_for(config_digest: str, config_size: int, layers=()) -> bytes:
    return canonical_json({
        "schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
        "config": {"mediaType": mt.OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": mt.NYDUS_PY_BLOB, "digest": d, "size": s} for d, s in layers]})


# ---------------------------------------------------------------------------- push / pull

def test_push_small_blob_then_head_and_repush_is_skipped(registry):
    c = client(registry.host)
    data = b"small blob " * 10
    d = dg.of_bytes(data)
    assert c.head_blob("t/small", d) is None
    assert c.push_blob("t/small", data, d, len(data)) == "uploaded"
    assert c.head_blob("t/small", d) == len(data)
    assert c.push_blob("t/small", data, d, len(data)) == "exists"


def test_push_large_blob_from_file_in_patch_chunks_with_progress(registry, tmp_path):
    px = FaultProxy(registry.host)
    try:
        c = client(px.host, upload_chunk_size=64 << 10)
        path = tmp_path / "blob"
        path.write_bytes(BLOB)
        seen: list[int] = []
        assert c.push_blob("t/large", path, BLOB_D, len(BLOB), on_progress=seen.append) == "uploaded"
        assert px.count("PATCH", "/blobs/uploads/") == -(-len(BLOB) // (64 << 10))
        assert px.count("PUT", "/blobs/uploads/") == 1
        assert seen == sorted(seen) and seen[-1] == len(BLOB)
        assert c.read_range("t/large", BLOB_D, 0, len(BLOB)) == BLOB
    finally:
        px.close()


def test_cross_repo_mount_uploads_nothing(registry):
    px = FaultProxy(registry.host)
    try:
        c = client(px.host)
        d = push(c, "t/mount-src")
        px.clear()
        assert c.push_blob("t/mount-dst", BLOB, d, len(BLOB), mount_from=["t/mount-src"]) == "mounted"
        assert px.count("POST", r"mount=") == 1 and px.count("PUT") == 0 and px.count("PATCH") == 0
        assert c.head_blob("t/mount-dst", d) == len(BLOB)
    finally:
        px.close()


def test_mount_from_repo_without_the_blob_falls_back_to_upload(registry):
    c = client(registry.host)
    data = b"not in the source repo"
    d = dg.of_bytes(data)
    assert c.push_blob("t/mount-dst2", data, d, len(data), mount_from=["t/empty-src"]) == "uploaded"
    assert c.read_range("t/mount-dst2", d, 0, len(data)) == data


def test_manifest_round_trip_by_tag_and_by_digest(registry):
    c = client(registry.host)
    cfg = b'{"architecture":"amd64","os":"linux"}'
    cd = push(c, "t/img", cfg)
    ld = push(c, "t/img")
    m = manifest_for(cd, len(cfg), [(ld, len(BLOB))])
    md = c.put_manifest("t/img", "v1", m, mt.OCI_MANIFEST)
    assert md == dg.of_bytes(m)
    assert c.get_manifest("t/img", "v1") == (m, mt.OCI_MANIFEST, md)
    assert c.get_manifest("t/img", md) == (m, mt.OCI_MANIFEST, md)
    assert c.list_tags("t/img") == ["v1"]


def test_missing_manifest_and_blob_are_not_found_errors_naming_them(registry):
    c = client(registry.host)
    with pytest.raises(BlobNotFoundError, match=r"t/nothing:nope.*HTTP 404"):
        c.get_manifest("t/nothing", "nope")
    missing = dg.of_bytes(b"never pushed")
    with pytest.raises(BlobNotFoundError, match=rf"t/img@{missing}.*HTTP 404"):
        c.read_range("t/img", missing, 0, 1)


# ---------------------------------------------------------------------------- ranges

@pytest.mark.parametrize("offset, length", [
    (0, 1), (0, 4096), (123_457, 10_000), (len(BLOB) - 11, 11), (len(BLOB) - 1, 1), (0, len(BLOB))])
def test_read_range_returns_exact_bytes(registry, offset, length):
    c = client(registry.host)
    push(c, "t/range")
    assert c.read_range("t/range", BLOB_D, offset, length) == BLOB[offset:offset + length]


def test_read_range_zero_length_and_past_the_end(registry):
    c = client(registry.host)
    push(c, "t/range")
    assert c.read_range("t/range", BLOB_D, 10, 0) == b""
    with pytest.raises(BackendError) as e:
        c.read_range("t/range", BLOB_D, len(BLOB) - 5, 10)
    assert e.value.permanent and "past the end" in str(e.value)


def test_read_range_from_many_threads_shares_one_client(registry):
    c = client(registry.host, pool_size=8)
    push(c, "t/range")
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            for j in range(10):
                off = (i * 7919 + j * 104_729) % (len(BLOB) - 5000)
                assert c.read_range("t/range", BLOB_D, off, 5000) == BLOB[off:off + 5000]
        except BaseException as e:   # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_connections_are_reused(registry):
    px = FaultProxy(registry.host)
    try:
        c = client(px.host)
        push(c, "t/range")
        px.clear()
        for i in range(20):
            c.read_range("t/range", BLOB_D, i * 100, 100)
        assert len({r.client for r in px.requests}) == 1
    finally:
        px.close()


def test_get_blob_streams_and_verifies(registry):
    c = client(registry.host)
    push(c, "t/range")
    with c.get_blob("t/range", BLOB_D, len(BLOB)) as r:
        assert r.read() == BLOB


# ---------------------------------------------------------------------------- auth

def test_basic_auth_with_good_credentials(basic_registry):
    c = client(basic_registry.host, credentials=ALICE)
    d = push(c, "t/basic")
    assert c.read_range("t/basic", d, 5, 5) == BLOB[5:10]


@pytest.mark.parametrize("creds, message", [
    (None, "requires credentials"),
    (Credentials("alice", "wrong"), "HTTP 401"),
])
def test_basic_auth_failures_are_auth_errors(basic_registry, creds, message):
    c = client(basic_registry.host, credentials=creds)
    with pytest.raises(AuthError, match=message) as e:
        c.head_blob("t/basic", BLOB_D)
    assert "\n" not in str(e.value) and "wrong" not in str(e.value)


def test_token_auth_fetches_once_and_caches_per_scope(token_registry):
    c = client(token_registry.host, credentials=ALICE)
    iss = token_registry.issuer
    d = push(c, "t/token")
    iss.requests.clear()
    reader = client(token_registry.host, credentials=ALICE)
    for i in range(5):
        assert reader.read_range("t/token", d, i, 3) == BLOB[i:i + 3]
    assert [r["scopes"] for r in iss.requests] == [["repository:t/token:pull"]]
    assert iss.requests[0]["user"] == "alice" and iss.requests[0]["service"] == iss.service


def test_expired_token_is_fetched_again(token_registry):
    iss = token_registry.issuer
    c = client(token_registry.host, credentials=ALICE)
    now = [1000.0]
    c.transport.auth._clock = lambda: now[0]
    assert c.head_blob("t/expiry", BLOB_D) is None
    iss.requests.clear()
    now[0] += iss.expires_in - 60          # still valid: cached
    assert c.head_blob("t/expiry", BLOB_D) is None
    assert len(iss.requests) == 0
    now[0] += 60                           # past expires_in (minus the safety margin)
    assert c.head_blob("t/expiry", BLOB_D) is None
    assert len(iss.requests) == 1


def test_cold_client_from_many_threads_authenticates_once_per_scope(token_registry):
    d = push(client(token_registry.host, credentials=ALICE), "t/token-mt")
    iss = token_registry.issuer
    iss.requests.clear()
    c = client(token_registry.host, credentials=ALICE)
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda i=i: results.append(c.read_range("t/token-mt", d, i, 8)))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == sorted(BLOB[i:i + 8] for i in range(8))
    assert len(iss.requests) == 1


def test_token_auth_accepts_access_token_field(token_registry):
    iss = token_registry.issuer
    iss.field_name = "access_token"
    try:
        c = client(token_registry.host, credentials=ALICE)
        assert c.head_blob("t/token-at", BLOB_D) is None
    finally:
        iss.field_name = "token"


def test_rejected_token_is_refreshed_once(token_registry):
    iss = token_registry.issuer
    c = client(token_registry.host, credentials=ALICE)
    d = push(c, "t/token")
    c2 = client(token_registry.host, credentials=ALICE)
    iss.requests.clear()
    iss.bad_tokens = 1
    assert c2.read_range("t/token", d, 0, 4) == BLOB[:4]
    assert len(iss.requests) == 2


def test_token_that_stays_rejected_is_an_auth_error(token_registry):
    iss = token_registry.issuer
    iss.bad_tokens = 2
    try:
        c = client(token_registry.host, credentials=ALICE)
        with pytest.raises(AuthError, match=r"t/token@.*HTTP 401"):
            c.read_range("t/token", BLOB_D, 0, 4)
    finally:
        iss.bad_tokens = 0


@pytest.mark.parametrize("creds, message", [
    (Credentials("alice", "wrong"), "user 'alice' rejected"),
    (None, "anonymous access rejected"),
])
def test_token_auth_failures_are_auth_errors(token_registry, creds, message):
    c = client(token_registry.host, credentials=creds)
    with pytest.raises(AuthError, match=message) as e:
        c.get_manifest("t/token", "latest")
    assert "\n" not in str(e.value) and "token from http://" in str(e.value)


def test_forbidden_is_an_auth_error_without_retries(registry):
    px = FaultProxy(registry.host)
    try:
        px.add(Fault.http(403), method="GET", path="/manifests/", times=None)
        c = client(px.host)
        with pytest.raises(AuthError, match="HTTP 403"):
            c.get_manifest("t/img", "v1")
        assert px.count("GET", "/manifests/") == 1
    finally:
        px.close()


def test_requests_go_through_the_configured_http_proxy(registry, fault_proxy):
    c = client(registry.host, proxy=fault_proxy.url)
    d = push(c, "t/proxied", b"via proxy")
    assert c.read_range("t/proxied", d, 4, 5) == b"proxy"
    assert fault_proxy.count("GET", rf"http://{registry.host}/v2/t/proxied/blobs/") == 1


# ---------------------------------------------------------------------------- TLS

def test_tls_registry_with_ca_file(tls_registry):
    c = RegistryClient(config=RegistryConfig(host=tls_registry.host, ca_file=str(tls_registry.ca_path)))
    d = push(c, "t/tls", b"over tls")
    assert c.read_range("t/tls", d, 5, 3) == b"tls"


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_tls_registry_with_skip_verify(tls_registry):
    c = RegistryClient(config=RegistryConfig(host=tls_registry.host, skip_verify=True))
    assert c.head_blob("t/tls", BLOB_D) is None


def test_untrusted_certificate_is_a_permanent_error_with_a_hint(tls_registry):
    c = RegistryClient(config=RegistryConfig(host=tls_registry.host, retry_limit=3))
    with pytest.raises(BackendError, match="TLS error.*ca_file") as e:
        c.head_blob("t/tls", BLOB_D)
    assert e.value.permanent and c.retries == 0


# ---------------------------------------------------------------------------- redirects

def test_blob_redirect_to_another_host_does_not_leak_authorization(token_registry):
    px = FaultProxy(token_registry.host)
    try:
        c = client(px.host, credentials=ALICE)
        d = push(c, "t/redirect")
        px.clear()
        px.add(Fault.redirect(), method="GET", path=r"/blobs/sha256:", times=None)
        assert c.read_range("t/redirect", d, 1000, 50) == BLOB[1000:1050]
        with c.get_blob("t/redirect", d, len(BLOB)) as r:
            assert r.read() == BLOB
        assert px.count("GET", "/blobs/sha256:", fault="redirect") == 2
        assert all(r.headers.get("Authorization", "").startswith("Bearer ")
                   for r in px.requests if r.fault == "redirect")
        assert len(px.storage.requests) == 2
        for _, _, headers in px.storage.requests:
            assert "Authorization" not in headers and "authorization" not in {k.lower() for k in headers}
        assert px.storage.requests[0][2].get("Range") == "bytes=1000-1049"
    finally:
        px.close()


# ---------------------------------------------------------------------------- faults and retries

@pytest.fixture()
def pushed(registry):
    push(client(registry.host), "t/faults")
    return "t/faults"


def test_retries_5xx_then_succeeds(fault_proxy, pushed):
    fault_proxy.add(Fault.http(500), method="GET", path="/blobs/", times=2)
    c = client(fault_proxy.host)
    assert c.read_range(pushed, BLOB_D, 10, 20) == BLOB[10:30]
    assert fault_proxy.count("GET", "/blobs/") == 3 and c.retries == 2


def test_retry_limit_exhausted_is_a_transient_backend_error(fault_proxy, pushed):
    fault_proxy.add(Fault.http(503), method="GET", path="/blobs/", times=None)
    c = client(fault_proxy.host, retry_limit=2)
    with pytest.raises(BackendError, match="HTTP 503") as e:
        c.read_range(pushed, BLOB_D, 0, 10)
    assert not e.value.permanent and fault_proxy.count("GET", "/blobs/") == 3


def test_429_honours_retry_after(fault_proxy, pushed):
    fault_proxy.add(Fault.http(429, retry_after="1"), method="GET", path="/blobs/", times=1)
    sleeps: list[float] = []
    c = RegistryClient(config=RegistryConfig(host=fault_proxy.host, scheme="http"),
                       retry=RetryPolicy(sleep=sleeps.append))
    assert c.read_range(pushed, BLOB_D, 0, 10) == BLOB[:10]
    assert sleeps == [1.0]


@pytest.mark.parametrize("fault", [Fault.truncate(keep=7), Fault.reset()], ids=["truncated", "reset"])
def test_broken_responses_are_retried(fault_proxy, pushed, fault):
    fault_proxy.add(fault, method="GET", path="/blobs/", times=1)
    c = client(fault_proxy.host)
    assert c.read_range(pushed, BLOB_D, 100, 1000) == BLOB[100:1100]
    assert c.retries == 1


def test_truncated_body_is_an_error_never_short_data(fault_proxy, pushed):
    fault_proxy.add(Fault.truncate(keep=7), method="GET", path="/blobs/", times=None)
    c = client(fault_proxy.host, retry_limit=1)
    with pytest.raises(BackendError) as e:
        c.read_range(pushed, BLOB_D, 100, 1000)
    assert not e.value.permanent and f"{pushed}@{BLOB_D}" in str(e.value)


def test_slow_response_times_out_and_is_retried(fault_proxy, pushed):
    fault_proxy.add(Fault.delay(1.5), method="GET", path="/blobs/", times=1)
    c = client(fault_proxy.host, timeout=0.5)
    assert c.read_range(pushed, BLOB_D, 0, 10) == BLOB[:10]
    assert c.retries == 1


def test_server_ignoring_range_is_skipped_to_the_offset(fault_proxy, pushed):
    fault_proxy.add(Fault.ignore_range(), method="GET", path="/blobs/", times=None)
    c = client(fault_proxy.host)
    assert c.read_range(pushed, BLOB_D, 5000, 300) == BLOB[5000:5300]
    c2 = client(fault_proxy.host, max_range_skip=1000)
    with pytest.raises(BackendError, match="ignored Range") as e:
        c2.read_range(pushed, BLOB_D, 5000, 300)
    assert e.value.permanent


def test_corrupted_blob_is_a_digest_mismatch(fault_proxy, pushed):
    fault_proxy.add(Fault.corrupt(), method="GET", path="/blobs/", times=None)
    c = client(fault_proxy.host)
    with c.get_blob(pushed, BLOB_D, len(BLOB)) as r:
        with pytest.raises(DigestMismatchError, match=BLOB_D):
            r.read()


def test_corrupted_manifest_by_digest_is_a_digest_mismatch(fault_proxy, registry):
    c = client(registry.host)
    m = manifest_for(push(c, "t/mf", b"{}"), 2)
    md = c.put_manifest("t/mf", "v1", m, mt.OCI_MANIFEST)
    fault_proxy.add(Fault.corrupt(), method="GET", path="/manifests/", times=None)
    with pytest.raises(DigestMismatchError, match=md):
        client(fault_proxy.host).get_manifest("t/mf", md)


def test_uploads_survive_a_transient_failure(fault_proxy):
    fault_proxy.add(Fault.http(500), method="PUT", path="/blobs/uploads/", times=1)
    c = client(fault_proxy.host)
    data = b"retry me" * 1000
    d = dg.of_bytes(data)
    assert c.push_blob("t/upload-retry", data, d, len(data)) == "uploaded"
    assert c.head_blob("t/upload-retry", d) == len(data)


def test_chunked_upload_restarts_after_a_failed_patch(fault_proxy):
    fault_proxy.add(Fault.http(502), method="PATCH", path="/blobs/uploads/", times=1)
    c = client(fault_proxy.host, upload_chunk_size=100_000)
    assert c.push_blob("t/upload-retry2", BLOB, BLOB_D, len(BLOB)) == "uploaded"
    assert c.read_range("t/upload-retry2", BLOB_D, len(BLOB) - 11, 11) == b"tail-marker"
    assert fault_proxy.count("POST", "/blobs/uploads/") == 2


def test_put_manifest_by_digest_verifies_content_first(registry):
    c = client(registry.host)
    m = manifest_for(push(c, "t/mfd", b"{}"), 2)
    d = dg.of_bytes(m)
    assert c.put_manifest("t/mfd", d, m, mt.OCI_MANIFEST) == d
    assert c.get_manifest("t/mfd", d)[0] == m
    with pytest.raises(DigestMismatchError):
        c.put_manifest("t/mfd", dg.of_bytes(b"other"), m, mt.OCI_MANIFEST)
