"""RegistryBackend against a real docker-registry on 127.0.0.1: the shared conformance suite
(anonymous, Basic, token auth, through a mirror, through a Dragonfly-style proxy, wrapped by
make_backend), then mirrors, the proxy, credentials and faults."""

from __future__ import annotations

import base64
import hashlib
import time

import pytest

from nydus_py.errors import AuthError, BackendError, BlobNotFoundError, ConfigError
from nydus_py.metrics import Metrics
from nydus_py.oci.auth import Credentials
from nydus_py.oci.registry import RegistryClient, RegistryConfig
from nydus_py.storage.backend import close_backend, hint_blob_sizes, innermost
from nydus_py.config.schema import BackendConfig
from nydus_py.storage.factory import make_backend
from nydus_py.config.schema import RegistryBackendConfig
from nydus_py.storage.registry import RegistryBackend
from tests.fixtures.backend_contract import BIG, EMPTY, SMALL, blob_id, contract_tests
from tests.fixtures.proxy import ForwardProxy
from tests.fixtures.registry import USERS, Fault, FaultProxy, RegistryServer, free_port

# The conformance tests, collected again in this module against the `backend` fixture below.
globals().update(contract_tests())

BLOBS = {blob_id(x): x for x in (BIG, SMALL, EMPTY)}
BIG_ID = blob_id(BIG)
SMALL_ID = blob_id(SMALL)
REPO = "nydus/blobs"
AUTH = base64.b64encode(f"alice:{USERS['alice']}".encode()).decode()


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("IMAGE_PULL_AUTH", raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))


def push_all(reg: RegistryServer, creds: Credentials | None = None, repo: str = REPO) -> None:
    with RegistryClient(config=RegistryConfig(host=reg.host, scheme="http", credentials=creds)) as c:
        for bid, data in BLOBS.items():
            c.push_blob(repo, data, bid, len(data))


def conf(reg_host: str, **kw) -> dict:
    d = {"host": reg_host, "repo": REPO, "scheme": "http", "timeout": 5, "connect_timeout": 2}
    d.update(kw)
    return d


def backend_for(reg_host: str, **kw) -> RegistryBackend:
    return RegistryBackend(RegistryBackendConfig.from_dict(conf(reg_host, **kw)))


def wait_until(pred, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


# ---------------------------------------------------------------------------- conformance

@pytest.fixture(scope="module")
def pushed(registry, basic_registry, token_registry):
    alice = Credentials("alice", USERS["alice"])
    push_all(registry)
    push_all(basic_registry, alice)
    push_all(token_registry, alice)
    return {"anonymous": registry, "basic": basic_registry, "token": token_registry}


def _anonymous(p):
    return backend_for(p["anonymous"].host), []


def _basic(p):
    return backend_for(p["basic"].host, auth=AUTH), []


def _token(p):
    return backend_for(p["token"].host, auth=AUTH), []


def _via_mirror(p):
    px = FaultProxy(p["anonymous"].host)
    return backend_for(p["anonymous"].host, mirrors=[{"host": px.url}]), [px]


def _via_proxy(p):
    px = ForwardProxy()
    return backend_for(p["anonymous"].host, proxy={"url": px.url, "ping_url": f"{px.url}/server/ping"}), [px]


def _made_by_factory(p):
    c = BackendConfig.from_dict({"type": "registry", "config": conf(p["token"].host, auth=AUTH)})
    return make_backend(c, metrics=Metrics()), []


REGISTRY_BACKENDS = {"anonymous": _anonymous, "basic-auth": _basic, "token-auth": _token,
                     "via-mirror": _via_mirror, "via-proxy": _via_proxy, "factory": _made_by_factory}


@pytest.fixture(params=sorted(REGISTRY_BACKENDS))
def backend(request, pushed):
    b, extra = REGISTRY_BACKENDS[request.param](pushed)
    yield b
    close_backend(b)
    for x in extra:
        (x.stop if isinstance(x, ForwardProxy) else x.close)()


# ---------------------------------------------------------------------------- config

def test_config_from_nydusd_json_shape():
    c = BackendConfig.from_dict({"type": "registry", "config": {
        "host": "r.example.com", "repo": "lib/app", "auth": AUTH, "retry_limit": 5,
        "proxy": {"url": "http://127.0.0.1:65001", "ping_url": "http://127.0.0.1:40901/server/ping",
                  "fallback": False, "check_interval": 2, "use_http": True},
        "mirrors": [{"host": "http://m1:5000", "headers": {"X-Dragonfly-Registry": "https://r.example.com"},
                     "failure_limit": 3}]}})
    r = c.registry
    assert c.retry_limit == 5 and r.scheme == "https" and r.repo == "lib/app"
    assert r.proxy.fallback is False and r.proxy.use_http and r.proxy.check_interval == 2.0
    assert r.mirrors[0].failure_limit == 3 and r.mirrors[0].health_check_interval == 5.0
    assert AUTH not in repr(c)                            # secrets stay out of logs


@pytest.mark.parametrize("d,field", [
    ({"host": "h/x", "repo": "a/b"}, "backend.config.host"),
    ({"host": "h", "repo": "a/b", "hots": 1}, "backend.config.hots"),
    ({"host": "h", "repo": "a/b", "scheme": "ftp"}, "backend.config.scheme"),
    ({"host": "h", "repo": "a/b", "auth": "not base64!"}, "backend.config.auth"),
    ({"host": "h", "repo": "a/b", "skip_verify": "yes"}, "backend.config.skip_verify"),
    ({"host": "h", "repo": "a/b", "proxy": {"url": "http://p", "pingurl": "x"}}, "backend.config.proxy.pingurl"),
    ({"host": "h", "repo": "a/b", "proxy": {"url": "ftp://p:1"}}, "backend.config.proxy.url"),
    ({"host": "h", "repo": "a/b", "mirrors": [{"host": "http://m", "failure_limit": 0}]},
     "backend.config.mirrors[0].failure_limit"),
    ({"host": "h", "repo": "a/b", "mirrors": [{"host": "http://m/path"}]}, "backend.config.mirrors[0].host"),
    ({"host": "h", "repo": "a/b", "mirrors": [{"host": "http://m", "headers": {"a": 1}}]},
     "backend.config.mirrors[0].headers"),
    ({"host": "h", "repo": "a/b", "mirrors": {}}, "backend.config.mirrors"),
])
def test_bad_registry_config_names_the_field(d, field):
    with pytest.raises(ConfigError) as ei:
        BackendConfig.from_dict({"type": "registry", "config": d})
    assert str(ei.value).startswith(field + ":"), str(ei.value)


def test_host_and_repo_may_come_from_the_image_but_are_needed_to_read():
    # Nydus's sample nydusd-config.json has neither: the image reference supplies them
    c = BackendConfig.from_dict({"type": "registry", "config": {"timeout": 5, "retry_limit": 2}})
    assert c.registry.host == "" and c.retry_limit == 2
    with pytest.raises(ConfigError, match=r"^backend\.config\.host: required"):
        make_backend(c)


def test_schemeless_proxy_url_is_plain_http_as_in_nydus_samples():
    c = RegistryBackendConfig.from_dict({"host": "h", "repo": "a/b",
                                         "proxy": {"url": "localhost:6789", "ping_url": "localhost:6789/ping"}})
    assert c.proxy.url == "http://localhost:6789" and c.proxy.ping_url == "http://localhost:6789/ping"


def test_empty_proxy_url_means_no_proxy():
    c = RegistryBackendConfig.from_dict({"host": "h", "repo": "a/b", "proxy": {"url": ""}})
    assert c.proxy is None


# ---------------------------------------------------------------------------- credentials

def test_credentials_come_from_image_pull_auth_when_auth_is_absent(pushed, monkeypatch):
    monkeypatch.setenv("IMAGE_PULL_AUTH", AUTH)
    b = backend_for(pushed["basic"].host)
    assert b.read_range(BIG_ID, 5, 10) == BIG[5:15]
    b.close()


def test_credentials_come_from_docker_config(pushed, monkeypatch, tmp_path):
    d = tmp_path / "dc"
    d.mkdir()
    (d / "config.json").write_text('{"auths": {"%s": {"auth": "%s"}}}' % (pushed["token"].host, AUTH))
    monkeypatch.setenv("DOCKER_CONFIG", str(d))
    b = backend_for(pushed["token"].host)
    assert b.read_range(BIG_ID, 0, 3) == BIG[:3]
    b.close()


@pytest.mark.parametrize("flavour", ["basic", "token"])
def test_wrong_credentials_are_an_auth_error(pushed, flavour):
    bad = base64.b64encode(b"alice:wrong").decode()
    b = backend_for(pushed[flavour].host, auth=bad)
    with pytest.raises(AuthError) as ei:
        b.read_range(BIG_ID, 0, 1)
    assert ei.value.permanent and pushed[flavour].host in str(ei.value)
    b.close()


def test_no_credentials_for_a_protected_registry_is_an_auth_error(pushed):
    b = backend_for(pushed["basic"].host)
    with pytest.raises(AuthError):
        b.blob_size(BIG_ID)
    b.close()


# ---------------------------------------------------------------------------- behaviour

def test_blob_size_is_one_head_then_cached(pushed):
    px = FaultProxy(pushed["anonymous"].host)
    b = backend_for(px.host)
    try:
        for _ in range(3):
            assert b.blob_size(BIG_ID) == len(BIG)
            b.read_range(BIG_ID, 0, 10)
        assert px.count("HEAD", "/blobs/") == 1 and px.count("GET", "/blobs/") == 3
        assert "Range" in px.requests[-1].headers
    finally:
        b.close()
        px.close()


def test_sizes_hinted_by_the_manifest_need_no_head_before_the_first_read(pushed, caplog):
    px = FaultProxy(pushed["anonymous"].host)
    b = make_backend(BackendConfig(type="registry", registry=RegistryBackendConfig.from_dict(conf(px.host))))
    try:
        hint_blob_sizes(b, {BIG_ID: len(BIG), SMALL_ID: len(SMALL) + 1, "sha256:x": -1})
        assert b.read_range(BIG_ID, 5, 100) == BIG[5:105]
        assert px.count("HEAD", "/blobs/") == 0 and px.count("GET", "/blobs/") == 1
        # a probe asks anyway (the connection it leaves is the point); a registry answer that
        # differs from the manifest is logged and the manifest's size stays
        inner = innermost(b)
        assert isinstance(inner, RegistryBackend)
        assert inner.probe_blob(BIG_ID) == len(BIG)
        assert inner.probe_blob(SMALL_ID) == len(SMALL) + 1
        assert px.count("HEAD", "/blobs/") == 2
        assert "manifest says" in caplog.text and SMALL_ID in caplog.text
        with pytest.raises(BlobNotFoundError, match="not found in registry"):
            inner.probe_blob(blob_id(b"nowhere"))
        heads = px.count("HEAD", "/blobs/")
        inner.close()                       # a warm-up thread outliving the mount asks nothing
        with pytest.raises(BackendError, match="closed"):
            inner.probe_blob(BIG_ID)
        assert px.count("HEAD", "/blobs/") == heads
    finally:
        b.close()
        px.close()


# ---------------------------------------------------------------------------- mirrors

def test_reads_go_to_the_mirror_with_its_headers(pushed):
    px = FaultProxy(pushed["anonymous"].host)
    b = backend_for(pushed["anonymous"].host, mirrors=[{"host": px.url, "headers": {"X-Mirror": "yes"}}])
    try:
        assert b.read_range(BIG_ID, 100, 1000) == BIG[100:1100]
        assert px.count("GET", "/blobs/") == 1
        assert all(r.headers.get("X-Mirror") == "yes" for r in px.requests)
    finally:
        b.close()
        px.close()


def test_failing_mirror_falls_back_to_origin_and_is_skipped_until_its_ping_answers(pushed):
    px = FaultProxy(pushed["anonymous"].host)
    px.add(Fault.http(500), path=r"/blobs/", times=None)
    px.add(Fault.http(503), path=r"^/v2/?$", times=None)          # the health check fails too
    b = backend_for(pushed["anonymous"].host, mirrors=[
        {"host": px.url, "failure_limit": 2, "health_check_interval": 0.1}])
    try:
        for i in range(6):
            assert b.read_range(BIG_ID, i, 10) == BIG[i:i + 10]   # origin serves every read
        mirror = b.router.mirrors[0]
        assert not mirror.healthy
        assert px.count(None, "/blobs/") == 2                     # HEAD + first GET, then skipped
        assert wait_until(lambda: px.count("GET", r"^/v2/?$") >= 2)  # pinged while unhealthy
        with px.lock:
            px.rules.clear()                                      # mirror recovers
        assert wait_until(lambda: mirror.healthy)
        before = px.count("GET", "/blobs/")
        assert b.read_range(BIG_ID, 0, 10) == BIG[:10]
        assert px.count("GET", "/blobs/") == before + 1           # used again
    finally:
        b.close()
        px.close()


def test_unreachable_mirror_falls_back_to_origin(pushed):
    dead = f"http://127.0.0.1:{free_port()}"
    b = backend_for(pushed["anonymous"].host, mirrors=[{"host": dead}, {"host": dead, "failure_limit": 1}])
    try:
        assert b.read_range(BIG_ID, 1, 2) == BIG[1:3]
        assert b.router.mirrors[1].healthy is False
    finally:
        b.close()


def test_mirror_without_the_blob_falls_back_without_counting_a_failure(pushed, tmp_path):
    with RegistryServer(tmp_path / "empty-mirror") as empty:
        b = backend_for(pushed["anonymous"].host, mirrors=[{"host": empty.url, "failure_limit": 1}])
        try:
            assert b.read_range(BIG_ID, 0, 4) == BIG[:4]
            assert b.router.mirrors[0].healthy and b.router.mirrors[0].failures == 0
        finally:
            b.close()


# ---------------------------------------------------------------------------- proxy

def test_proxy_serves_reads_falls_back_when_killed_and_is_used_again_when_back(pushed):
    px = ForwardProxy()
    b = backend_for(pushed["anonymous"].host, proxy={
        "url": px.url, "ping_url": f"{px.url}/server/ping", "check_interval": 0.1})
    host = pushed["anonymous"].host
    try:
        assert b.read_range(BIG_ID, 0, 100) == BIG[:100]
        assert px.count("GET", f"http://{host}/v2/{REPO}/blobs/{BIG_ID}") == 1   # the original URL
        px.stop()
        assert b.read_range(BIG_ID, 100, 100) == BIG[100:200]        # per-request fallback at once
        assert wait_until(lambda: not b.router.proxy.healthy)        # then the ping notices
        for i in range(5):
            assert b.read_range(BIG_ID, i * 1000, 1000) == BIG[i * 1000:(i + 1) * 1000]
        seen = px.count("GET", "/blobs/")
        px.start()
        assert wait_until(lambda: b.router.proxy.healthy)
        assert b.read_range(BIG_ID, 7, 7) == BIG[7:14]
        assert px.count("GET", "/blobs/") == seen + 1
    finally:
        b.close()
        px.stop()


def test_unhealthy_proxy_without_fallback_is_a_transient_error(pushed):
    px = ForwardProxy()
    b = backend_for(pushed["anonymous"].host, proxy={
        "url": px.url, "ping_url": f"{px.url}/server/ping", "check_interval": 0.05, "fallback": False})
    try:
        assert b.read_range(BIG_ID, 0, 10) == BIG[:10]
        px.stop()
        assert wait_until(lambda: not b.router.proxy.healthy)
        with pytest.raises(BackendError) as ei:
            b.read_range(BIG_ID, 0, 10)
        assert not ei.value.permanent and "fallback is disabled" in str(ei.value)
    finally:
        b.close()
        px.stop()


def test_proxy_404_is_the_registry_answer_not_a_fallback(pushed):
    px = ForwardProxy()
    b = backend_for(pushed["anonymous"].host, proxy={"url": px.url})
    try:
        missing = "sha256:" + hashlib.sha256(b"nope").hexdigest()
        with pytest.raises(BlobNotFoundError):
            b.blob_size(missing)
        assert px.count("HEAD", missing) == 1
    finally:
        b.close()
        px.stop()


def test_use_http_asks_the_proxy_for_http_urls():
    c = RegistryBackendConfig.from_dict({"host": "r.example.com", "repo": "a/b",
                                         "proxy": {"url": "http://127.0.0.1:1", "use_http": True}})
    b = RegistryBackend(c)
    try:
        assert b.router.proxy.client.config.scheme == "http"
        assert b.router.proxy.client.config.proxy == "http://127.0.0.1:1"
        assert b.router.origin.client.config.scheme == "https" and b.router.origin.client.config.proxy is None
    finally:
        b.close()


# ---------------------------------------------------------------------------- faults

def _factory_backend(host: str, retry_limit: int = 2):
    c = BackendConfig.from_dict({"type": "registry", "config": conf(host, retry_limit=retry_limit,
                                                                    retry_backoff=0.01)})
    return make_backend(c, metrics=Metrics())


def test_transient_500s_are_retried_by_the_backend_wrapper(pushed):
    px = FaultProxy(pushed["anonymous"].host)
    b = _factory_backend(px.host)
    try:
        px.add(Fault.http(500), method="GET", path=r"/blobs/", times=2)
        assert b.read_range(BIG_ID, 10, 20) == BIG[10:30]
        assert px.count("GET", "/blobs/") == 3
    finally:
        b.close()
        px.close()


@pytest.mark.parametrize("fault", [Fault.http(500), Fault.truncate(100), Fault.reset()],
                         ids=["500", "truncated", "reset"])
def test_persistent_faults_end_in_a_transient_backend_error_never_short_data(pushed, fault):
    px = FaultProxy(pushed["anonymous"].host)
    b = _factory_backend(px.host, retry_limit=2)
    try:
        b.blob_size(BIG_ID)
        px.add(fault, method="GET", path=r"/blobs/", times=None)
        with pytest.raises(BackendError) as ei:
            b.read_range(BIG_ID, 0, 50_000)
        assert not ei.value.permanent and BIG_ID in str(ei.value)
        assert px.count("GET", "/blobs/") == 3                     # 1 + retry_limit
    finally:
        b.close()
        px.close()


def test_registry_stopped_midway_is_a_backend_error_after_retries(tmp_path):
    with RegistryServer(tmp_path / "reg") as reg:
        push_all(reg)
        b = _factory_backend(reg.host, retry_limit=1)
        assert b.read_range(BIG_ID, 0, 10) == BIG[:10]
        reg.stop()
        with pytest.raises(BackendError) as ei:
            b.read_range(BIG_ID, 10, 10)
        assert not ei.value.permanent
        b.close()
