"""Configuration: every dataclass in config/schema.py, one parser in config/parse.py, nydusd's
documents (v1 JSON, v2 TOML, blob cache entries) in config/nydusd.py."""

from nydus_py.config.nydusd import load, parse, parse_text
from nydus_py.config.parse import build, parse_size
from nydus_py.config.schema import (
    BACKEND_TYPES,
    CACHE_TYPES,
    DEFAULT_AMPLIFY_IO,
    BackendConfig,
    CacheConfig,
    DaemonConfig,
    LocalFsConfig,
    MirrorConfig,
    PrefetchConfig,
    ProxyConfig,
    RegistryBackendConfig,
    S3BackendConfig,
)

__all__ = [
    "BACKEND_TYPES",
    "CACHE_TYPES",
    "DEFAULT_AMPLIFY_IO",
    "BackendConfig",
    "CacheConfig",
    "DaemonConfig",
    "LocalFsConfig",
    "MirrorConfig",
    "PrefetchConfig",
    "ProxyConfig",
    "RegistryBackendConfig",
    "S3BackendConfig",
    "build",
    "load",
    "parse",
    "parse_size",
    "parse_text",
]
