"""Typed backend configuration, read from nydusd's JSON shape:

    "backend": {
      "type": "localfs",
      "config": {"dir": "/var/lib/nydus/blobs", "alt_dirs": ["/mnt/nas/blobs"], "retry_limit": 2}
    }

`retry_limit` sits in `backend.config` as in nydusd's registry/oss configs; here every backend
type accepts it (the retry wrapper is shared). Unknown fields are a ConfigError naming the field
(`backend.config.dirr: unknown field`), so a typo is not silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nydus_py.errors import ConfigError

if TYPE_CHECKING:   # defined next to their backends; imported lazily below (no import cycle)
    from nydus_py.storage.registry import RegistryBackendConfig
    from nydus_py.storage.s3 import S3BackendConfig

BACKEND_TYPES = ("localfs", "registry", "oss", "s3")
SUPPORTED_TYPES = ("localfs", "registry", "s3")


def check_fields(d: Any, where: str, allowed: tuple[str, ...]) -> dict:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected an object, got {type(d).__name__}")
    for k in d:
        if k not in allowed:
            raise ConfigError(f"{where}.{k}: unknown field (known: {', '.join(allowed)})")
    return d


def get_str(d: dict, key: str, where: str, default: str | None = None) -> str:
    v = d.get(key, default)
    if v is None:
        raise ConfigError(f"{where}.{key}: required")
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{where}.{key}: expected a non-empty string")
    return v


def get_int(d: dict, key: str, where: str, default: int, lo: int = 0) -> int:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ConfigError(f"{where}.{key}: expected an integer >= {lo}")
    return v


def get_float(d: dict, key: str, where: str, default: float, lo: float = 0.0) -> float:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < lo:
        raise ConfigError(f"{where}.{key}: expected a number >= {lo}")
    return float(v)


@dataclass(frozen=True, kw_only=True)
class LocalFsConfig:
    dir: str
    alt_dirs: list[str] = field(default_factory=list)

    FIELDS = ("dir", "alt_dirs")

    @classmethod
    def from_dict(cls, d: dict, where: str = "backend.config") -> "LocalFsConfig":
        check_fields(d, where, cls.FIELDS + RETRY_FIELDS)
        alt = d.get("alt_dirs", [])
        if not isinstance(alt, list) or not all(isinstance(a, str) and a for a in alt):
            raise ConfigError(f"{where}.alt_dirs: expected a list of directory paths")
        return cls(dir=get_str(d, "dir", where), alt_dirs=list(alt))


RETRY_FIELDS = ("retry_limit", "retry_backoff")


@dataclass(frozen=True, kw_only=True)
class BackendConfig:
    type: str
    localfs: LocalFsConfig | None = None
    registry: "RegistryBackendConfig | None" = None
    s3: "S3BackendConfig | None" = None
    retry_limit: int = 2          # extra attempts after a transient error
    retry_backoff: float = 0.1    # seconds before the first retry; doubles each time

    @classmethod
    def from_dict(cls, d: dict, where: str = "backend") -> "BackendConfig":
        check_fields(d, where, ("type", "config"))
        btype = get_str(d, "type", where)
        if btype not in BACKEND_TYPES:
            raise ConfigError(f"{where}.type: unknown backend type {btype!r} "
                              f"(choose from {', '.join(BACKEND_TYPES)})")
        cwhere = f"{where}.config"
        conf = d.get("config")
        if conf is None:
            raise ConfigError(f"{cwhere}: required for backend type {btype!r}")
        if not isinstance(conf, dict):
            raise ConfigError(f"{cwhere}: expected an object, got {type(conf).__name__}")
        retry = dict(retry_limit=get_int(conf, "retry_limit", cwhere, 2),
                     retry_backoff=get_float(conf, "retry_backoff", cwhere, 0.1))
        if btype == "localfs":
            return cls(type=btype, localfs=LocalFsConfig.from_dict(conf, cwhere), **retry)
        if btype == "registry":
            from nydus_py.storage.registry import RegistryBackendConfig
            return cls(type=btype, registry=RegistryBackendConfig.from_dict(conf, cwhere), **retry)
        if btype == "s3":
            from nydus_py.storage.s3 import S3BackendConfig
            return cls(type=btype, s3=S3BackendConfig.from_dict(conf, cwhere), **retry)
        # oss: not implemented yet.
        return cls(type=btype, **retry)
