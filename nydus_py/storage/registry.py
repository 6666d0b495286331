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

import logging
import threading
from typing import Any, Mapping

from nydus_py.config.schema import RegistryBackendConfig
from nydus_py.errors import BackendError, BlobNotFoundError, ConfigError
from nydus_py.oci.auth import Credentials, resolve_credentials
from nydus_py.oci.mirrors import RegistryRouter
from nydus_py.oci.registry import RegistryClient, RegistryConfig
from nydus_py.storage.backend import add_size_hints, blob_hex, check_range, range_error
from nydus_py.storage.tls import ca_bundle

log = logging.getLogger(__name__)


def credentials(config: RegistryBackendConfig) -> Credentials | None:
    creds = resolve_credentials(config.host, explicit=config.auth or None)
    if config.registry_token:
        base = creds or Credentials()
        creds = Credentials(username=base.username, password=base.password,
                            identity_token=base.identity_token, registry_token=config.registry_token)
    return creds


def make_client_config(config: RegistryBackendConfig, **overrides) -> RegistryConfig:
    if not config.host or not config.repo:
        missing = "host" if not config.host else "repo"
        raise ConfigError(f"backend.config.{missing}: required (or mount by image reference, "
                          f"which supplies it)")
    kw: dict[str, Any] = {"host": config.host, "scheme": config.scheme, "skip_verify": config.skip_verify,
                          "ca_file": ca_bundle(config.ca_cert_files), "timeout": config.timeout,
                          "connect_timeout": config.connect_timeout, "retry_limit": 0,
                          "credentials": credentials(config)}
    kw.update(overrides)
    return RegistryConfig(**kw)


class RegistryBackend:
    """`BlobBackend` over one registry repository (see storage/backend.py for the contract)."""

    @classmethod
    def from_config(cls, config: RegistryBackendConfig) -> RegistryBackend:
        return cls(config)

    def __init__(self, config: RegistryBackendConfig, *, client_config: RegistryConfig | None = None):
        self.config = config
        self.repo = config.repo
        self.router = RegistryRouter(client_config or make_client_config(config),
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
            self._check_open(blob_id)
            size = self._sizes.get(blob_id)
        return size if size is not None else self.probe_blob(blob_id)

    def _check_open(self, blob_id: str) -> None:
        """Under self._lock: no request after close (a warm-up thread may outlive the mount)."""
        if self._closed:
            raise BackendError(f"blob {blob_id}: backend is closed", permanent=True)

    def hint_sizes(self, sizes: Mapping[str, int]) -> None:
        """Sizes from the image's verified manifest (storage/backend.py: hint_blob_sizes)."""
        with self._lock:
            add_size_hints(self._sizes, sizes)

    def probe_blob(self, blob_id: str) -> int:
        """A HEAD of the blob, whatever is known of it. Run at mount (image_source.warm_backend)
        it leaves a connection in the pool for the first read and finds a missing blob early.
        A size that differs from the manifest's is logged and the manifest's kept: its digest
        chain is verified, the registry's answer is not (chunks are verified either way)."""
        blob_hex(blob_id)
        with self._lock:
            self._check_open(blob_id)
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
            known = self._sizes.setdefault(blob_id, size)
        if known != size:
            log.warning("registry %s: blob %s has %d bytes, its manifest says %d", where, blob_id,
                        size, known)
        return known

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
