"""One place that turns a BackendConfig into a ready BlobBackend (nydus's factory.rs).

    RetryingBackend(MeteredBackend(<concrete>))   retries outside, metrics per attempt inside

New backend types add a branch in `_concrete` and nothing else (registry and s3 import their
modules lazily, so a localfs daemon never loads requests routing or botocore).
"""

from __future__ import annotations

import os

from nydus_py.errors import ConfigError
from nydus_py.metrics import Metrics
from nydus_py.storage.backend import BlobBackend
from nydus_py.storage.config import BackendConfig
from nydus_py.storage.localfs import LocalFsBackend
from nydus_py.storage.wrappers import MeteredBackend, RetryingBackend


def _concrete(config: BackendConfig) -> BlobBackend:
    if config.type == "localfs":
        if config.localfs is None:
            raise ConfigError("backend.config: required for backend type 'localfs'")
        # The primary dir must exist at startup; alt_dirs may be NAS mounts that come later.
        if not os.path.isdir(config.localfs.dir):
            raise ConfigError(f"backend.config.dir: {config.localfs.dir} is not a directory")
        return LocalFsBackend(config.localfs.dir, config.localfs.alt_dirs)
    if config.type == "registry" and config.registry is not None:
        from nydus_py.storage.registry import RegistryBackend
        return RegistryBackend(config.registry)
    if config.type == "s3" and config.s3 is not None:
        from nydus_py.storage.s3 import S3Backend
        return S3Backend(config.s3)
    raise ConfigError(f"backend.type: {config.type!r} is not supported yet")


def make_backend(config: BackendConfig, *, metrics: Metrics | None = None) -> BlobBackend:
    """The configured backend, metered into `metrics.backend` and retried as configured."""
    backend = _concrete(config)
    backend = MeteredBackend(backend, (metrics or Metrics()).backend)
    return RetryingBackend(backend, config.retry_limit, config.retry_backoff,
                           metrics=metrics.backend if metrics is not None else None)
