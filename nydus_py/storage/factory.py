"""One place that turns a BackendConfig into a ready BlobBackend (nydus's factory.rs).

    RetryingBackend(MeteredBackend(<concrete>))   retries outside, metrics per attempt inside

`BACKENDS` maps a backend type to the module and class implementing it, imported when a
backend of that type is built (a localfs daemon never loads requests routing or botocore).
A new backend type is one row here plus its config dataclass in nydus_py/config/schema.py.
"""

from __future__ import annotations

import importlib

from nydus_py.config.schema import BackendConfig
from nydus_py.errors import ConfigError
from nydus_py.metrics import Metrics
from nydus_py.retry import RetryPolicy
from nydus_py.storage.backend import BlobBackend
from nydus_py.storage.wrappers import MeteredBackend, RetryingBackend

#  type        module                         class
BACKENDS: dict[str, tuple[str, str]] = {
    "localfs": ("nydus_py.storage.localfs", "LocalFsBackend"),
    "registry": ("nydus_py.storage.registry", "RegistryBackend"),
    "s3": ("nydus_py.storage.s3", "S3Backend"),
}


def _concrete(config: BackendConfig) -> BlobBackend:
    row, settings = BACKENDS.get(config.type), config.settings
    if row is None or settings is None:
        raise ConfigError(f"backend.type: {config.type!r} is not supported by nydus-py")
    module, cls = row
    return getattr(importlib.import_module(module), cls).from_config(settings)


def make_backend(config: BackendConfig, *, metrics: Metrics | None = None) -> BlobBackend:
    """The configured backend, metered into `metrics.backend` and retried as configured."""
    backend = _concrete(config)
    backend = MeteredBackend(backend, (metrics or Metrics()).backend)
    return RetryingBackend(backend, RetryPolicy(limit=config.retry_limit, backoff=config.retry_backoff),
                           metrics=metrics.backend if metrics is not None else None)
