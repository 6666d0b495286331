"""nydusd's JSON configuration, parsed into typed, frozen dataclasses.

The field names are nydusd's (v1 "fuse" config), so an existing nydusd config works:

    {
      "device": {
        "backend": {"type": "localfs", "config": {"dir": "/var/lib/blobs"}},
        "cache": {"type": "blobcache", "config": {"work_dir": "/var/cache/nydus"}}
      },
      "mode": "direct",
      "digest_validate": true,
      "enable_xattr": true,
      "amplify_io": 1048576,
      "fs_prefetch": {"enable": false, "threads_count": 4, "merging_size": 1048576,
                      "bandwidth_rate": 0, "prefetch_all": false}
    }

`device.backend` is parsed by storage/config.py (BackendConfig: localfs now, registry/oss/s3
as their backends land) and turned into a backend by storage/factory.py. Cache types:
"blobcache" (`work_dir`) and "dummy" (a private temporary directory, removed at exit).
`device.cache.config.max_size` (bytes, nydus-py's addition) bounds the cache (LRU eviction).
`fs_prefetch` drives the background prefetcher (io/prefetch.py); `access_pattern` and
`iostats_files` turn on the per-file recording behind /api/v1/metrics/{pattern,files};
`mode` and `latest_read_files` are accepted for compatibility. `learned_prefetch` (nydus-py's
own) drives prefetch lists learned from earlier runs (daemon/learned.py).

Every field is checked: an unknown key or a value of the wrong type is a ConfigError naming
its dotted path (`device.backend.config.dri: unknown field`), so typos fail loudly.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from nydus_py.errors import ConfigError
from nydus_py.storage.config import BackendConfig

CACHE_TYPES = ("blobcache", "dummy")
DEFAULT_AMPLIFY_IO = 1 << 20


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    type: str = "blobcache"
    work_dir: str = ""             # "" = a private temporary directory, removed at exit
    max_size: int = 0              # bytes; 0 = unlimited (LRU eviction above it)


@dataclass(frozen=True, kw_only=True)
class PrefetchConfig:
    enable: bool = False
    threads_count: int = 4
    merging_size: int = 1 << 20
    bandwidth_rate: int = 0        # bytes/s, 0 = unlimited
    prefetch_all: bool = False


@dataclass(frozen=True, kw_only=True)
class LearnedPrefetchConfig:
    """nydus-py's own: prefetch lists learned from earlier runs (daemon/learned.py)."""
    enable: bool = True            # look up a learned list at mount and prefetch it first
    record: bool = True            # record this run's reads; keep the list in the cache dir
    push: bool = False             # also push it to the registry / OCI layout (a referrer)
    window_secs: int = 60          # record reads this long after the first one


@dataclass(frozen=True, kw_only=True)
class DaemonConfig:
    backend: BackendConfig | None = None      # None: the CLI supplies it (--image/--blob-dir)
    cache: CacheConfig = field(default_factory=CacheConfig)
    mode: str = "direct"
    digest_validate: bool = False   # true: sha256 of every cache hit (ChunkCache validate)
    enable_xattr: bool = True
    iostats_files: bool = False
    latest_read_files: bool = False
    access_pattern: bool = False
    amplify_io: int = DEFAULT_AMPLIFY_IO
    fs_prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)
    learned_prefetch: LearnedPrefetchConfig = field(default_factory=LearnedPrefetchConfig)


# -- parsing ------------------------------------------------------------------------------------
def load(path: str | Path) -> DaemonConfig:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: config is not UTF-8 text") from None
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{path}: malformed JSON ({e})") from None
    try:
        return parse(doc)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def parse(doc: object) -> DaemonConfig:
    """A nydusd-style config document (already JSON-decoded) → DaemonConfig."""
    doc = _object(doc, "config")
    top = dict(doc)
    device = _object(top.pop("device", {}), "device")
    _no_unknown(device, ("backend", "cache"), "device")
    backend = None
    if "backend" in device:
        backend = BackendConfig.from_dict(device["backend"], "device.backend")
    cache = CacheConfig()
    if "cache" in device:
        cache = _cache(_object(device["cache"], "device.cache"))
    cfg = _build(DaemonConfig, top, "", skip=("backend", "cache"))
    cfg = dataclasses.replace(cfg, backend=backend, cache=cache)
    if cfg.mode not in ("direct", "cached"):
        raise ConfigError(f"mode: must be \"direct\" or \"cached\", not {cfg.mode!r}")
    if cfg.amplify_io < 0:
        raise ConfigError("amplify_io: must not be negative")
    if cfg.cache.max_size < 0:
        raise ConfigError("device.cache.config.max_size: must not be negative")
    pf = cfg.fs_prefetch
    for name in ("threads_count", "merging_size", "bandwidth_rate"):
        if getattr(pf, name) < 0:
            raise ConfigError(f"fs_prefetch.{name}: must not be negative")
    if cfg.learned_prefetch.window_secs <= 0:
        raise ConfigError("learned_prefetch.window_secs: must be positive")
    return cfg


def _cache(obj: dict) -> CacheConfig:
    _no_unknown(obj, ("type", "config", "compressed", "validate"), "device.cache")
    kind = obj.get("type", "blobcache")
    if kind in ("", "none"):
        kind = "dummy"
    if kind not in CACHE_TYPES:
        raise ConfigError(f"device.cache.type: must be one of {', '.join(CACHE_TYPES)}, not {kind!r}")
    inner = _object(obj.get("config", {}), "device.cache.config")
    settings = _build(CacheConfig, inner, "device.cache.config", skip=("type",))
    return dataclasses.replace(settings, type=kind)


def _object(v: object, where: str) -> dict:
    if not isinstance(v, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {_json_type(v)}")
    return v


def _no_unknown(obj: dict, known, where: str) -> None:
    for k in obj:
        if k not in known:
            raise ConfigError(f"{_join(where, k)}: unknown field (known: {', '.join(known)})")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else str(key)


def _build(cls, obj: dict, where: str, *, skip: tuple[str, ...] = ()):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
    _no_unknown(obj, tuple(fields), where)
    kwargs = {name: _value(obj[name], hints[name], _join(where, name)) for name in fields if name in obj}
    missing = [n for n, f in fields.items() if n not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{_join(where, missing[0])}: required field missing")
    return cls(**kwargs)


def _value(v: object, tp, where: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if v is None else _value(v, args[0], where)
    if dataclasses.is_dataclass(tp):
        return _build(tp, _object(v, where), where)
    if origin is tuple:
        if not isinstance(v, list):
            raise ConfigError(f"{where}: expected a JSON array, got {_json_type(v)}")
        item = typing.get_args(tp)[0]
        return tuple(_value(x, item, f"{where}[{i}]") for i, x in enumerate(v))
    if tp is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{where}: expected true or false, got {_json_type(v)}")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{where}: expected an integer, got {_json_type(v)}")
        return v
    if tp is str:
        if not isinstance(v, str):
            raise ConfigError(f"{where}: expected a string, got {_json_type(v)}")
        return v
    raise TypeError(f"config field {where}: unsupported type {tp!r}")  # a bug in this module


def _json_type(v: object) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "an array", dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)
