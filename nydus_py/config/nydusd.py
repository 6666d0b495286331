"""nydusd's configuration documents → DaemonConfig, as Nydus documents them (docs/config.md).

    v1 JSON      {"device": {"backend": {"type", "config"}, "cache": {"type", "config"}},
                  "mode", "digest_validate", "enable_xattr", "amplify_io", "fs_prefetch", ...}
    v2 TOML/JSON version = 2, id, [backend] type + [backend.<type>], [cache] type +
                 [cache.filecache], [rafs] (+ [rafs.prefetch])
    blob cache   {"type": "bootstrap", "id", "domain_id", "config" (v1 entry) | "config_v2" (v2)}
    entry

v2 and blob cache entries are mapped onto v1's shape and built by the one parser
(config/parse.py), so every value is checked the same way. A key Nydus knows that nydus-py
does not implement is a warning naming it (DaemonConfig.warnings; the CLI prints them); a key
nobody knows is a ConfigError with its dotted path and a "did you mean".
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from nydus_py.config.parse import build, check_keys, expect_object, join
from nydus_py.config.schema import BackendConfig, CacheConfig, DaemonConfig
from nydus_py.errors import ConfigError

# Nydus cache type names → ours ("filecache" is v2's name of blobcache)
CACHE_TYPE_NAMES = {"blobcache": "blobcache", "filecache": "blobcache", "dummy": "dummy",
                    "dummycache": "dummy", "": "dummy", "none": "dummy"}
V1_TOP_UNIMPLEMENTED: dict[str, str] = {}
DEVICE_UNIMPLEMENTED = {"external_backends": "external backends are not implemented",
                        "id": "the factory id has no use here"}
CACHE_UNIMPLEMENTED = {
    "compressed": "the cache holds chunks as the blob stores them; this flag is fixed",
    "validate": "every chunk is verified against its digest when fetched",
    "prefetch_config": "blob-level prefetch is not implemented; use fs_prefetch",
    "prefetch": "blob-level prefetch is not implemented; use rafs.prefetch",
}
# Misspellings in Nydus's own sample configs, which nydusd ignores (serde drops unknown keys):
# accepted with a warning so those samples load; any other unknown key is an error.
NYDUS_SAMPLE_TYPOS = {"registy": "registry", "metadata_file": "metadata_path"}


def load(path: str | Path) -> DaemonConfig:
    """A config file: JSON (v1, v2, blob cache entry) or TOML (v2, blob cache entry)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: config is not UTF-8 text") from None
    try:
        return parse_text(text, str(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def parse_text(text: str, name: str = "") -> DaemonConfig:
    if str(name).endswith(".toml") or not text.lstrip().startswith("{"):
        import tomllib      # here: ~4 ms of every daemon start-up, and configs are mostly JSON
        try:
            doc: Any = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            if str(name).endswith(".toml"):
                raise ConfigError(f"malformed TOML ({e})") from None
            raise ConfigError(f"neither JSON nor TOML ({e})") from None
    else:
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"malformed JSON ({e})") from None
    return parse(doc)


def parse(doc: object) -> DaemonConfig:
    """A decoded config document (any of the three forms) → DaemonConfig."""
    obj = expect_object(doc, "config")
    warnings: list[str] = []
    if "config_v2" in obj or ("config" in obj and "type" in obj and "device" not in obj):
        cfg = _blob_entry(obj, warnings)
    elif "version" in obj:
        cfg = _v2(obj, "", warnings)
    else:
        cfg = _v1(obj, warnings)
    return dataclasses.replace(cfg, warnings=tuple(warnings) + _semantic_warnings(cfg))


def _semantic_warnings(cfg: DaemonConfig) -> tuple[str, ...]:
    out = []
    if cfg.mode == "cached":
        out.append("mode: \"cached\" is not supported by nydus-py; the bootstrap is always "
                   "held in memory (\"direct\" behaviour)")
    if cfg.latest_read_files:
        out.append("latest_read_files: not supported by nydus-py, ignored (use access_pattern "
                   "and /api/v1/metrics/pattern)")
    return tuple(out)


# -- v1 -----------------------------------------------------------------------------------------
def _v1(obj: dict, warnings: list[str], where: str = "") -> DaemonConfig:
    top = dict(obj)
    device = expect_object(top.pop("device", {}), join(where, "device"))
    dwhere = join(where, "device")
    check_keys(device, ("backend", "cache"), dwhere, DEVICE_UNIMPLEMENTED, warnings)
    backend = None
    if "backend" in device:
        backend = BackendConfig.from_dict(device["backend"], join(dwhere, "backend"), warnings=warnings)
    cache = CacheConfig()
    if "cache" in device:
        c = expect_object(device["cache"], join(dwhere, "cache"))
        cwhere = join(dwhere, "cache")
        check_keys(c, ("type", "config"), cwhere, CACHE_UNIMPLEMENTED, warnings)
        cache = _cache(c.get("type", "blobcache"), c.get("config", {}), cwhere,
                       join(cwhere, "config"), warnings)
    cfg = build(DaemonConfig, top, where, warnings=warnings)
    return dataclasses.replace(cfg, backend=backend, cache=cache)


def _cache(kind: object, conf: object, where: str, cwhere: str, warnings: list[str]) -> CacheConfig:
    twhere = join(where, "type")
    if kind == "fscache":
        warnings.append(f"{twhere}: \"fscache\" is not supported by nydus-py (it needs the "
                        f"kernel's EROFS over fscache; nydus-py serves FUSE): using blobcache "
                        f"with the same work_dir")
        kind = "blobcache"
    if not isinstance(kind, str) or kind not in CACHE_TYPE_NAMES:
        raise ConfigError(f"{twhere}: must be one of blobcache, filecache, dummycache, "
                          f"not {kind!r}")
    conf = dict(expect_object(conf if conf is not None else {}, cwhere))
    if "type" in conf:
        raise ConfigError(f"{join(cwhere, 'type')}: unknown field; the cache type is {twhere}")
    return build(CacheConfig, {**conf, "type": CACHE_TYPE_NAMES[kind]}, cwhere, warnings=warnings)


# -- v2 -----------------------------------------------------------------------------------------
V2_TOP = ("version", "id", "backend", "cache", "rafs", "metadata_path")
V2_TOP_UNIMPLEMENTED = {"external_backends": "external backends are not implemented",
                        "overlay": "a writable overlay is the snapshotter's job (overlayfs)"}
V2_BACKEND_SECTIONS = ("localfs", "registry", "s3", "oss", "localdisk", "http-proxy")
V2_CACHE = ("type", "filecache", "fscache", "compressed", "validate", "prefetch")
V2_RAFS = ("mode", "batch_size", "validate", "enable_xattr", "iostats_files", "access_pattern",
           "latest_read_files", "prefetch")
V2_RAFS_NAMES = (("amplify_io", "batch_size"), ("digest_validate", "validate"),
                 ("fs_prefetch.threads_count", "prefetch.threads"),
                 ("fs_prefetch.merging_size", "prefetch.batch_size"),
                 ("fs_prefetch.bandwidth_rate", "prefetch.bandwidth_limit"), ("fs_prefetch", "prefetch"))
V2_RAFS_PREFETCH = {"enable": "enable", "threads": "threads_count", "batch_size": "merging_size",
                    "bandwidth_limit": "bandwidth_rate", "prefetch_all": "prefetch_all",
                    "stream_prefetch": "stream_prefetch"}


def _v2(obj: dict, where: str, warnings: list[str]) -> DaemonConfig:
    check_keys(obj, V2_TOP, where, V2_TOP_UNIMPLEMENTED, warnings)
    if obj.get("version") != 2:
        raise ConfigError(f"{join(where, 'version')}: must be 2 (or leave it out for a v1 config)")
    ident = obj.get("id", "")
    if not isinstance(ident, str):
        raise ConfigError(f"{join(where, 'id')}: expected a string")
    backend = None
    if "backend" in obj:
        backend = _v2_backend(expect_object(obj["backend"], join(where, "backend")),
                              join(where, "backend"), warnings)
    cache = CacheConfig()
    if "cache" in obj:
        cwhere = join(where, "cache")
        c = expect_object(obj["cache"], cwhere)
        misplaced = {k: "nydusd ignores it here too: it belongs in [cache.filecache]"
                     for k in ("enable_encryption", "enable_convergent_encryption", "encryption_key")}
        check_keys(c, V2_CACHE, cwhere, misplaced, warnings)   # Nydus's v2 sample puts them here
        for k in ("compressed", "validate", "prefetch"):
            if k in c:
                warnings.append(f"{join(cwhere, k)}: not supported by nydus-py, ignored "
                                f"({CACHE_UNIMPLEMENTED[k]})")
        kind = c.get("type", "")
        section = "fscache" if kind == "fscache" else "filecache"
        cache = _cache(kind, c.get(section, {}), cwhere, join(cwhere, section), warnings)
    v1: dict[str, Any] = {}
    if "rafs" in obj:
        rwhere = join(where, "rafs")
        r = expect_object(obj["rafs"], rwhere)
        check_keys(r, V2_RAFS, rwhere, None, warnings)
        names = {"batch_size": "amplify_io", "validate": "digest_validate"}
        v1 = {names.get(k, k): v for k, v in r.items() if k != "prefetch"}
        if "prefetch" in r:
            pwhere = join(rwhere, "prefetch")
            p = expect_object(r["prefetch"], pwhere)
            check_keys(p, V2_RAFS_PREFETCH, pwhere, None, warnings)
            v1["fs_prefetch"] = {V2_RAFS_PREFETCH[k]: v for k, v in p.items()}
    try:
        cfg = build(DaemonConfig, v1, "", warnings=warnings)
    except ConfigError as e:       # name the v2 key, not the v1 one it maps to
        msg = str(e)
        for v1name, v2name in V2_RAFS_NAMES:
            if msg.startswith(v1name):
                msg = v2name + msg[len(v1name):]
                break
        raise ConfigError(join(join(where, "rafs"), msg)) from None
    meta = obj.get("metadata_path", "")
    if not isinstance(meta, str):
        raise ConfigError(f"{join(where, 'metadata_path')}: expected a string")
    return dataclasses.replace(cfg, backend=backend, cache=cache, id=ident, metadata_path=meta)


def _v2_backend(b: dict, where: str, warnings: list[str]) -> BackendConfig:
    for k in b:
        if k == "type" or k in V2_BACKEND_SECTIONS:
            continue
        if k in NYDUS_SAMPLE_TYPOS:
            warnings.append(f"{join(where, k)}: ignored, as nydusd does (a misspelling of "
                            f"{NYDUS_SAMPLE_TYPOS[k]!r} in Nydus's sample configs)")
            continue
        check_keys({k: None}, ("type",) + V2_BACKEND_SECTIONS, where)
    btype = b.get("type")
    # Sections of other types are inert (only `type` picks one), as in nydusd.
    return BackendConfig.of_type(btype, b.get(btype) if isinstance(btype, str) else None,
                                 where, join(where, str(btype)), warnings=warnings)


# -- blob cache entries (nydusd's /api/v2/blobs body and misc/configs/*blob-cache-entry*) ---------
ENTRY_TOP = ("type", "id", "domain_id", "config", "config_v2")
ENTRY_V1 = ("id", "backend_type", "backend_config", "cache_type", "cache_config",
            "prefetch_config", "metadata_path", "external_backends")


def _blob_entry(obj: dict, warnings: list[str]) -> DaemonConfig:
    check_keys(obj, ENTRY_TOP, "", None, warnings)
    if obj.get("type") not in ("bootstrap", "datablob"):
        raise ConfigError(f"type: a blob cache entry is \"bootstrap\" or \"datablob\", "
                          f"not {obj.get('type')!r}")
    if "config_v2" in obj:
        return _v2(expect_object(obj["config_v2"], "config_v2"), "config_v2", warnings)
    c = expect_object(obj.get("config"), "config")
    for k in c:
        if k in NYDUS_SAMPLE_TYPOS and k not in ENTRY_V1:
            warnings.append(f"config.{k}: ignored, as nydusd does (a misspelling of "
                            f"{NYDUS_SAMPLE_TYPOS[k]!r} in Nydus's sample configs)")
    check_keys({k: v for k, v in c.items() if k not in NYDUS_SAMPLE_TYPOS}, ENTRY_V1, "config",
               None, warnings)
    for k in ("prefetch_config", "external_backends"):
        if k in c:
            warnings.append(f"config.{k}: not supported by nydus-py, ignored")
    backend = BackendConfig.of_type(c.get("backend_type"), c.get("backend_config"), "config.backend",
                                    "config.backend_config", warnings=warnings)
    cache = _cache(c.get("cache_type", "blobcache"), c.get("cache_config", {}), "config.cache",
                   "config.cache_config", warnings)
    meta = c.get("metadata_path") or ""
    if not isinstance(meta, str):
        raise ConfigError("config.metadata_path: expected a string")
    return DaemonConfig(backend=backend, cache=cache, id=str(c.get("id", "")), metadata_path=meta)
