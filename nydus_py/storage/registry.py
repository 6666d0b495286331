"""Blobs in one repository of an OCI registry (nydusd's `backend.type = "registry"`).

    "backend": {"type": "registry", "config": {
        "host": "registry.example.com", "repo": "library/app", "scheme": "https",
        "auth": "<base64 user:pass>", "timeout": 5, "connect_timeout": 5, "retry_limit": 2,
        "proxy": {"url": "http://127.0.0.1:65001", "ping_url": "http://127.0.0.1:40901/server/ping",
                  "fallback": true, "check_interval": 5, "use_http": false},
        "mirrors": [{"host": "http://mirror:5000", "headers": {"X-Dragonfly-Registry": "..."},
                     "ping_url": "", "health_check_interval": 5, "failure_limit": 5}]}}

`blob_size` is a HEAD (cached per blob: blobs are immutable), `read_range` a ranged GET checked
against that size first, so a range past the end is a permanent error without a request. Both
go through `RegistryRouter` (proxy → mirrors → origin, see oci/mirrors.py). The clients make
one attempt per route; retries are the RetryingBackend's (`retry_limit`), as for every backend.

Credentials, first hit wins: `auth` (base64 "user:pass") > `IMAGE_PULL_AUTH` > docker's
config.json for `host` (credential helpers included); `registry_token`, when set, is sent as a
Bearer token as-is (nydusd's behaviour) together with whichever of those was found.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from nydus_py.errors import BackendError, BlobNotFoundError, ConfigError
from nydus_py.oci.auth import Credentials, resolve_credentials
from nydus_py.oci.mirrors import MirrorConfig, ProxyConfig, RegistryRouter, split_host
from nydus_py.oci.reference import check_repository
from nydus_py.oci.registry import RegistryClient, RegistryConfig
from nydus_py.storage.backend import blob_hex, check_range, range_error
from nydus_py.storage.config import RETRY_FIELDS, check_fields, get_float, get_int, get_str


def get_bool(d: dict, key: str, where: str, default: bool) -> bool:
    v = d.get(key, default)
    if not isinstance(v, bool):
        raise ConfigError(f"{where}.{key}: expected true or false")
    return v


def get_opt_str(d: dict, key: str, where: str) -> str:
    v = d.get(key, "")
    if v is None:
        return ""
    if not isinstance(v, str):
        raise ConfigError(f"{where}.{key}: expected a string")
    return v


def _sub(ctor, where: str, **kw):
    """Build a dataclass whose __post_init__ may raise a ConfigError, prefixing `where`."""
    try:
        return ctor(**kw)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


PROXY_FIELDS = ("url", "ping_url", "fallback", "check_interval", "use_http")


def proxy_from_dict(d: Any, where: str) -> ProxyConfig:
    check_fields(d, where, PROXY_FIELDS)
    url = get_str(d, "url", where)
    if "://" not in url:
        raise ConfigError(f"{where}.url: expected http://host:port")
    return _sub(ProxyConfig, where, url=get_str(d, "url", where), ping_url=get_opt_str(d, "ping_url", where),
                fallback=get_bool(d, "fallback", where, True),
                check_interval=get_float(d, "check_interval", where, 5.0, lo=0.001),
                use_http=get_bool(d, "use_http", where, False))


def mirror_from_dict(d: Any, where: str) -> MirrorConfig:
    check_fields(d, where, ("host", "ping_url", "headers", "health_check_interval", "failure_limit"))
    headers = d.get("headers", {})
    if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in headers.items()):
        raise ConfigError(f"{where}.headers: expected an object of string values")
    host = get_str(d, "host", where)
    split_host(host, "https", f"{where}.host")
    return _sub(MirrorConfig, where, host=host, ping_url=get_opt_str(d, "ping_url", where),
                headers=dict(headers),
                health_check_interval=get_float(d, "health_check_interval", where, 5.0, lo=0.001),
                failure_limit=get_int(d, "failure_limit", where, 5, lo=1))


@dataclass(frozen=True, kw_only=True)
class RegistryBackendConfig:
    """`backend.config` of a registry backend; field names are nydusd's."""

    host: str                                   # host[:port] of the registry API
    repo: str                                   # repository holding the blobs, e.g. "library/app"
    scheme: str = "https"
    auth: str = field(default="", repr=False)   # base64 "user:pass"; "" = IMAGE_PULL_AUTH / docker config
    registry_token: str = field(default="", repr=False)
    skip_verify: bool = False
    timeout: float = 5.0                        # seconds without a byte before a read fails
    connect_timeout: float = 5.0
    proxy: ProxyConfig | None = None
    mirrors: list[MirrorConfig] = field(default_factory=list)

    FIELDS = ("host", "repo", "scheme", "auth", "registry_token", "skip_verify", "timeout",
              "connect_timeout", "proxy", "mirrors")

    @classmethod
    def from_dict(cls, d: Any, where: str = "backend.config") -> "RegistryBackendConfig":
        check_fields(d, where, cls.FIELDS + RETRY_FIELDS)
        scheme = get_str(d, "scheme", where, "https")
        if scheme not in ("http", "https"):
            raise ConfigError(f"{where}.scheme: expected 'http' or 'https', not {scheme!r}")
        host = get_str(d, "host", where)
        if "/" in host:
            raise ConfigError(f"{where}.host: expected host[:port] without scheme or path")
        repo = get_str(d, "repo", where)
        try:
            check_repository(repo)
        except Exception as e:
            raise ConfigError(f"{where}.repo: {e}") from None
        auth = get_opt_str(d, "auth", where)
        if auth:
            Credentials.from_auth_string(auth, f"{where}.auth")     # fail now, not at first read
        proxy = None
        if d.get("proxy") is not None:      # nydusd: an empty `proxy.url` means no proxy
            pd = check_fields(d["proxy"], f"{where}.proxy", PROXY_FIELDS)
            if pd.get("url") != "":
                proxy = proxy_from_dict(pd, f"{where}.proxy")
        mirrors = d.get("mirrors", [])
        if not isinstance(mirrors, list):
            raise ConfigError(f"{where}.mirrors: expected a list")
        return cls(host=host, repo=repo, scheme=scheme, auth=auth,
                   registry_token=get_opt_str(d, "registry_token", where),
                   skip_verify=get_bool(d, "skip_verify", where, False),
                   timeout=get_float(d, "timeout", where, 5.0, lo=0.001),
                   connect_timeout=get_float(d, "connect_timeout", where, 5.0, lo=0.001),
                   proxy=proxy,
                   mirrors=[mirror_from_dict(m, f"{where}.mirrors[{i}]") for i, m in enumerate(mirrors)])

    def credentials(self) -> Credentials | None:
        creds = resolve_credentials(self.host, explicit=self.auth or None)
        if self.registry_token:
            base = creds or Credentials()
            creds = Credentials(username=base.username, password=base.password,
                                identity_token=base.identity_token, registry_token=self.registry_token)
        return creds

    def client_config(self, **overrides) -> RegistryConfig:
        kw: dict[str, Any] = dict(host=self.host, scheme=self.scheme, skip_verify=self.skip_verify,
                                  timeout=self.timeout, connect_timeout=self.connect_timeout,
                                  retry_limit=0, credentials=self.credentials())
        kw.update(overrides)
        return RegistryConfig(**kw)


class RegistryBackend:
    """`BlobBackend` over one registry repository (see storage/backend.py for the contract)."""

    def __init__(self, config: RegistryBackendConfig, *, client_config: RegistryConfig | None = None):
        self.config = config
        self.repo = config.repo
        self.router = RegistryRouter(client_config or config.client_config(),
                                     mirrors=config.mirrors, proxy=config.proxy)
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"RegistryBackend({self.config.scheme}://{self.config.host}/{self.repo}, {self.router!r})"

    @property
    def origin(self) -> RegistryClient:
        return self.router.origin.client

    # -- BlobBackend --------------------------------------------------------------------------
    def blob_size(self, blob_id: str) -> int:
        blob_hex(blob_id)
        with self._lock:
            if self._closed:
                raise BackendError(f"blob {blob_id}: backend is closed", permanent=True)
            size = self._sizes.get(blob_id)
        if size is not None:
            return size
        where = f"{self.config.host}/{self.repo}"

        def head(client: RegistryClient) -> int:
            n = client.head_blob(self.repo, blob_id)
            if n is None:
                raise BlobNotFoundError(f"blob {blob_id} not found in {client.config.host}/{self.repo}")
            return n

        try:
            size = self.router.call(f"size of blob {blob_id}", head)
        except BlobNotFoundError:
            raise BlobNotFoundError(f"blob {blob_id} not found in registry {where}") from None
        with self._lock:
            self._sizes[blob_id] = size
        return size

    def read_range(self, blob_id: str, offset: int, length: int) -> bytes:
        check_range(offset, length)
        size = self.blob_size(blob_id)
        if offset + length > size:
            raise range_error(blob_id, offset, length, size, f"{self.config.host}/{self.repo}")
        if length == 0:
            return b""
        data = self.router.call(f"read of blob {blob_id}",
                                lambda c: c.read_range(self.repo, blob_id, offset, length))
        if len(data) != length:          # RegistryClient promises this; a short read must never leak
            raise BackendError(f"blob {blob_id}: short read of [{offset}, {offset + length}) "
                               f"({len(data)} bytes)", permanent=False)
        return data

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.router.close()
