"""Every configuration dataclass of nydus-py, in one place (as Nydus keeps api/src/config.rs).

Field names are nydusd's v1 JSON names, so `X.from_dict(json_value, "dotted.path")` reads a
nydusd config section as-is; all parsing goes through config/parse.py. The documents around
them (nydusd's v1 JSON, v2 TOML, blob cache entries) are read by config/nydusd.py.

This module imports nothing heavy: building a config never loads requests or botocore.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from nydus_py.config.parse import (
    FromDict,
    build,
    check_keys,
    expect_object,
    join,
    split_host,
)
from nydus_py.errors import ConfigError
from nydus_py.retry import DEFAULT_BACKOFF, DEFAULT_LIMIT

SCHEMES = ("http", "https")
_POSITIVE = {"gt": 0}


def _scheme() -> str:
    return field(default="https", metadata={"choices": SCHEMES})


def _opt_str(secret: bool = False) -> str:
    return field(default="", repr=not secret, metadata={"empty_is_none": True})


# -- backends -----------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class LocalFsConfig(FromDict):
    """`backend.config` of type localfs: blobs as `<dir>/<hex>` or `<dir>/blobs/sha256/<hex>`."""

    dir: str = field(metadata={"nonempty": True})
    alt_dirs: list[str] = field(default_factory=list, metadata={"nonempty_items": True})

    UNIMPLEMENTED: ClassVar[dict[str, str]] = {
        "blob_file": "blobs are looked up by digest under `dir`",
    }


@dataclass(frozen=True, kw_only=True)
class ProxyConfig(FromDict):
    """A Dragonfly-style HTTP proxy for blob reads (nydusd's `registry.proxy`)."""

    url: str = field(metadata={"nonempty": True})   # "http://127.0.0.1:65001" ("host:port" = http)
    ping_url: str = _opt_str()                  # e.g. "http://127.0.0.1:40901/server/ping"; "" = no checks
    fallback: bool = True                       # go to the registry when the proxy fails
    check_interval: float = field(default=5.0, metadata=_POSITIVE)     # seconds between pings
    use_http: bool = False                      # ask the proxy for http:// registry URLs (no CONNECT tunnel)

    UNIMPLEMENTED: ClassVar[dict[str, str]] = {
        "check_pause_elapsed": "health checks run every check_interval",
        "dragonfly_scheduler_endpoint": "the proxy is reached at `url` only",
    }

    def __post_init__(self) -> None:
        # Nydus's sample configs write "localhost:6789": a plain-HTTP proxy, as nydusd reads it
        for name in ("url", "ping_url"):
            v = getattr(self, name)
            if v and "://" not in v:
                object.__setattr__(self, name, "http://" + v)
        scheme, _ = split_host(self.url.rstrip("/"), "http", "url")
        if scheme not in SCHEMES:
            raise ConfigError("url: expected http://host:port")


@dataclass(frozen=True, kw_only=True)
class MirrorConfig(FromDict):
    """One registry mirror (nydusd's `registry.mirrors[]`)."""

    host: str = field(metadata={"nonempty": True})  # "http://mirror:5000" (or "mirror:5000": origin's scheme)
    ping_url: str = _opt_str()                  # default "<host>/v2"
    headers: dict[str, str] = field(default_factory=dict)
    health_check_interval: float = field(default=5.0, metadata=_POSITIVE)  # seconds between pings while unhealthy
    failure_limit: int = field(default=5, metadata={"min": 1})  # transient failures before it is skipped

    UNIMPLEMENTED: ClassVar[dict[str, str]] = {"auth_through": "the origin's credentials are always used"}

    def __post_init__(self) -> None:
        split_host(self.host, "https", "host")


@dataclass(frozen=True, kw_only=True)
class RegistryBackendConfig(FromDict):
    """`backend.config` of a registry backend; field names are nydusd's. `host`/`repo` may be
    left out when the image reference supplies them (`nydusd mount --image REF --config C`,
    and the snapshotter), as in Nydus's sample config."""

    host: str = ""                              # host[:port] of the registry API
    repo: str = ""                              # repository holding the blobs, e.g. "library/app"
    scheme: str = _scheme()
    auth: str = _opt_str(secret=True)           # base64 "user:pass"; "" = IMAGE_PULL_AUTH / docker config
    registry_token: str = _opt_str(secret=True)
    skip_verify: bool = False
    ca_cert_files: list[str] = field(default_factory=list, metadata={"nonempty_items": True})
    timeout: float = field(default=5.0, metadata=_POSITIVE)  # seconds without a byte before a read fails
    connect_timeout: float = field(default=5.0, metadata=_POSITIVE)
    proxy: ProxyConfig | None = field(default=None, metadata={"none_if_empty": "url"})
    mirrors: list[MirrorConfig] = field(default_factory=list)

    UNIMPLEMENTED: ClassVar[dict[str, str]] = {
        "blob_url_scheme": "blobs are read with `scheme`; use a mirror for another scheme",
        "blob_redirected_host": "use `mirrors` to read blobs from another host",
    }

    def __post_init__(self) -> None:
        if "/" in self.host:
            raise ConfigError("host: expected host[:port] without scheme or path")
        if self.repo:
            from nydus_py.oci.reference import check_repository
            try:
                check_repository(self.repo)
            except ConfigError as e:
                raise ConfigError(f"repo: {e}") from None
        if self.auth:       # fail now, not at the first read
            from nydus_py.oci.auth import Credentials
            try:
                Credentials.from_auth_string(self.auth, "auth")
            except ConfigError as e:
                raise ConfigError(str(e) if str(e).startswith("auth") else f"auth: {e}") from None


@dataclass(frozen=True, kw_only=True)
class S3BackendConfig(FromDict):
    """`backend.config` of an S3 backend; field names are nydusd's (plus `session_token`,
    `force_path_style`)."""

    bucket_name: str = field(metadata={"nonempty": True})
    region: str = _opt_str()                    # "" = from AWS_REGION / the AWS config file
    endpoint: str = _opt_str()                  # host[:port]; "" = AWS's endpoint for the region
    scheme: str = _scheme()
    object_prefix: str = _opt_str()
    access_key_id: str = _opt_str()
    access_key_secret: str = _opt_str(secret=True)
    session_token: str = _opt_str(secret=True)
    force_path_style: bool = True               # nydusd always uses path-style URLs
    skip_verify: bool = False
    ca_cert_files: list[str] = field(default_factory=list, metadata={"nonempty_items": True})
    timeout: float = field(default=5.0, metadata=_POSITIVE)  # seconds without a byte before a read fails
    connect_timeout: float = field(default=5.0, metadata=_POSITIVE)

    UNIMPLEMENTED: ClassVar[dict[str, str]] = {"proxy": "S3 requests go to `endpoint` directly"}

    def __post_init__(self) -> None:
        endpoint = self.endpoint
        if "://" in endpoint:        # accept "http://host:port" too; its scheme wins
            scheme, _, endpoint = endpoint.partition("://")
            if scheme not in SCHEMES:
                raise ConfigError(f"endpoint: unsupported scheme {scheme!r}")
            object.__setattr__(self, "scheme", scheme)
        if "/" in endpoint.rstrip("/"):
            raise ConfigError("endpoint: expected host[:port] without a path")
        object.__setattr__(self, "endpoint", endpoint.rstrip("/"))
        if bool(self.access_key_id) != bool(self.access_key_secret):
            raise ConfigError("access_key_secret: access_key_id and access_key_secret go together")


BACKEND_TYPES: dict[str, type[FromDict]] = {"localfs": LocalFsConfig, "registry": RegistryBackendConfig,
                                  "s3": S3BackendConfig}
# Nydus backend types nydus-py has no implementation of, and why (a one-line error, never a stub)
UNSUPPORTED_BACKENDS = {
    "oss": "Aliyun OSS also speaks the S3 API: use type \"s3\" with the OSS endpoint",
    "localdisk": "blobs on a raw disk/GPT partition are not implemented; use localfs",
    "http-proxy": "the HTTP proxy backend is not implemented; use registry with a proxy",
}
RETRY_FIELDS = ("retry_limit", "retry_backoff")


@dataclass(frozen=True, kw_only=True)
class BackendConfig:
    """nydusd's `{"type": T, "config": {...}}`; exactly the field named by `type` is set."""

    type: str
    localfs: LocalFsConfig | None = None
    registry: RegistryBackendConfig | None = None
    s3: S3BackendConfig | None = None
    retry_limit: int = DEFAULT_LIMIT        # extra attempts after a transient error (in `config`, as nydusd)
    retry_backoff: float = DEFAULT_BACKOFF  # seconds before the first retry; doubles each time (retry.py)

    @property
    def settings(self) -> LocalFsConfig | RegistryBackendConfig | S3BackendConfig | None:
        return getattr(self, self.type, None)

    @classmethod
    def from_dict(cls, d: object, where: str = "backend", *,
                  warnings: list[str] | None = None) -> BackendConfig:
        obj = expect_object(d, where)
        check_keys(obj, ("type", "config"), where)
        btype = obj.get("type")
        if btype is None:
            raise ConfigError(f"{join(where, 'type')}: required field missing")
        return cls.of_type(btype, obj.get("config"), where, join(where, "config"), warnings=warnings)

    @classmethod
    def of_type(cls, btype: object, conf: object, where: str, cwhere: str, *,
                warnings: list[str] | None = None) -> BackendConfig:
        """The backend `btype` configured by the object `conf` (found at `cwhere`)."""
        if not isinstance(btype, str) or not btype:
            raise ConfigError(f"{join(where, 'type')}: expected a backend type "
                              f"({', '.join(BACKEND_TYPES)})")
        if btype in UNSUPPORTED_BACKENDS:
            raise ConfigError(f"{join(where, 'type')}: {btype!r} is not supported by nydus-py "
                              f"({UNSUPPORTED_BACKENDS[btype]})")
        if btype not in BACKEND_TYPES:
            from nydus_py.config.parse import did_you_mean
            raise ConfigError(f"{join(where, 'type')}: unknown backend type {btype!r}"
                              f"{did_you_mean(btype, BACKEND_TYPES)} (choose from {', '.join(BACKEND_TYPES)})")
        if conf is None:
            raise ConfigError(f"{cwhere}: required for backend type {btype!r}")
        conf = dict(expect_object(conf, cwhere))
        retry = build(_Retry, {k: conf.pop(k) for k in RETRY_FIELDS if k in conf}, cwhere)
        settings: Any = build(BACKEND_TYPES[btype], conf, cwhere, warnings=warnings)
        return cls(type=btype, retry_limit=retry.retry_limit, retry_backoff=retry.retry_backoff,
                   **{btype: settings})


@dataclass(frozen=True, kw_only=True)
class _Retry:
    retry_limit: int = field(default=DEFAULT_LIMIT, metadata={"min": 0})
    retry_backoff: float = field(default=DEFAULT_BACKOFF, metadata={"min": 0})


# -- cache, prefetch, daemon --------------------------------------------------------------------
CACHE_TYPES = ("blobcache", "dummy")


@dataclass(frozen=True, kw_only=True)
class CacheConfig(FromDict):
    """`device.cache.config` (plus the cache `type`)."""

    type: str = field(default="blobcache", metadata={"choices": CACHE_TYPES})
    work_dir: str = ""             # "" = a private temporary directory, removed at exit
    max_size: int = field(default=0, metadata={"size": True, "min": 0})  # 0 = unlimited (LRU above it)

    UNIMPLEMENTED: ClassVar[dict[str, str]] = {
        "disable_indexed_map": "the cache keeps its own chunk map",
        "enable_encryption": "cached chunks are stored as fetched and verified; encrypt the "
                             "cache directory's filesystem instead",
        "enable_convergent_encryption": "see enable_encryption",
        "encryption_key": "see enable_encryption",
    }


@dataclass(frozen=True, kw_only=True)
class PrefetchConfig(FromDict):
    """`fs_prefetch`: the background prefetcher (io/prefetch.py)."""

    enable: bool = False
    threads_count: int = field(default=4, metadata={"min": 0})
    merging_size: int = field(default=1 << 20, metadata={"size": True, "min": 0})
    bandwidth_rate: int = field(default=0, metadata={"size": True, "min": 0})  # bytes/s, 0 = unlimited
    prefetch_all: bool = False

    UNIMPLEMENTED: ClassVar[dict[str, str]] = {
        "stream_prefetch": "prefetch reads whole merged ranges",
    }


@dataclass(frozen=True, kw_only=True)
class LearnedPrefetchConfig(FromDict):
    """`learned_prefetch` (nydus-py's own): prefetch lists learned from earlier runs
    (daemon/learned.py)."""

    enable: bool = True            # look up a learned list at mount and prefetch it first
    record: bool = True            # record this run's reads; keep the list in the cache dir
    push: bool = False             # also push it to the registry / OCI layout (a referrer)
    window_secs: int = field(default=60, metadata={"min": 1})  # record reads this long after the first
    # sha256 digest of the converted image's manifest, for an image mounted from a bootstrap file
    # with a registry backend (nydus-snapshotter sets it): its lists are that manifest's referrers
    image_manifest: str = field(default="", metadata={"empty_is_none": True})

    def __post_init__(self) -> None:
        m = self.image_manifest
        if m and not (m.startswith("sha256:") and len(m) == 71 and
                      all(c in "0123456789abcdef" for c in m[7:])):
            raise ConfigError(f"image_manifest: {m!r} is not a sha256 digest (sha256:<64 hex>)")


DEFAULT_AMPLIFY_IO = 1 << 20


@dataclass(frozen=True, kw_only=True)
class DaemonConfig(FromDict):
    """A whole nydusd configuration (v1 top level; config/nydusd.py maps v2 onto it)."""

    backend: BackendConfig | None = field(default=None, metadata={"internal": True})
    cache: CacheConfig = field(default_factory=CacheConfig, metadata={"internal": True})
    id: str = field(default="", metadata={"internal": True})
    metadata_path: str = field(default="", metadata={"internal": True})  # bootstrap (blob cache entries)
    mode: str = field(default="direct", metadata={"choices": ("direct", "cached")})
    digest_validate: bool = False   # true: sha256 of every cache hit too (cache/chunk_cache.py)
    enable_xattr: bool = True
    iostats_files: bool = False
    latest_read_files: bool = False
    access_pattern: bool = False
    amplify_io: int = field(default=DEFAULT_AMPLIFY_IO, metadata={"size": True, "min": 0})
    # nydus-py's own: on an executable's first read, fetch its interpreter and libraries (io/predict.py)
    exec_prefetch: bool = True
    fs_prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)
    learned_prefetch: LearnedPrefetchConfig = field(default_factory=LearnedPrefetchConfig)
    # warnings met while parsing (Nydus keys nydus-py does not implement); not a config key
    warnings: tuple[str, ...] = field(default=(), compare=False, metadata={"internal": True})


# -- nydus-snapshotter's config.toml (snapshotter/config.py maps it onto the flags) ---------------
# Key names are Nydus snapshotter's (misc/snapshotter/config.toml); "" means "not set" (the
# flag's default applies). Sections and keys Nydus has but nydus-py does not: UNIMPLEMENTED.
DAEMON_MODE_ALIASES = {"dedicated": "dedicated", "multiple": "dedicated", "shared": "shared"}
RECOVER_POLICIES = ("restart", "failover", "none")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True, kw_only=True)
class DaemonSection:
    nydusd_config: str = ""            # nydusd JSON template applied to every daemon
    nydusd_path: str = ""
    recover_policy: str = field(default="", metadata={"choices": RECOVER_POLICIES, "empty_is_none": True})
    fs_driver: str = field(default="fusedev", metadata={"choices": ("fusedev",)})   # the only one nydus-py has

    UNIMPLEMENTED: ClassVar[dict[str, str]] = {
        "nydusimage_path": "nydus-py needs no nydus-image binary",
        "threads_number": "nydusd's concurrency is set by amplify_io / fs_prefetch in the template",
        "log_rotation_size": "no log rotation; use logrotate with copytruncate",
        "failover_policy": "no FUSE request resend/flush policy",
    }


@dataclass(frozen=True, kw_only=True)
class LogSection:
    level: str = field(default="", metadata={"choices": LOG_LEVELS + ("warn", "trace"), "empty_is_none": True})
    dir: str = ""
    log_to_stdout: bool = False
    UNIMPLEMENTED: ClassVar[dict[str, str]] = {
        k: "no log rotation; use logrotate with copytruncate"
        for k in ("log_rotation_compress", "log_rotation_local_time", "log_rotation_max_age",
                  "log_rotation_max_backups", "log_rotation_max_size")}


@dataclass(frozen=True, kw_only=True)
class MetricsSection:
    address: str = ""                  # host:port for Prometheus; "" = no TCP listener

    UNIMPLEMENTED: ClassVar[dict[str, str]] = {
        "hung_io_interval": "no hung-I/O detector",
        "collect_interval": "metrics are read from the daemons on each scrape",
    }


@dataclass(frozen=True, kw_only=True)
class MirrorsConfigSection:
    dir: str = ""                      # containerd-style <dir>/<host>/hosts.toml


@dataclass(frozen=True, kw_only=True)
class AuthSection:
    enable_cri_keychain: bool = False  # serve CRI's ImageService on `address`, keep PullImage's auth
    image_service_address: str = ""    # containerd's CRI socket the proxy forwards to

    UNIMPLEMENTED: ClassVar[dict[str, str]] = {
        k: "only the CRI keychain (and IMAGE_PULL_AUTH / the docker config) provide credentials"
        for k in ("enable_kubeconfig_keychain", "kubeconfig_path", "enable_kubelet_credential_providers",
                  "credential_provider_config", "credential_provider_bin_dir", "credential_renewal_interval")}


@dataclass(frozen=True, kw_only=True)
class RemoteSection:
    skip_ssl_verify: bool = False
    mirrors_config: MirrorsConfigSection = field(default_factory=MirrorsConfigSection)
    auth: AuthSection = field(default_factory=AuthSection)

    UNIMPLEMENTED: ClassVar[dict[str, str]] = {
        "convert_vpc_registry": "no VPC registry rewriting",
    }


@dataclass(frozen=True, kw_only=True)
class SnapshotterConfig:
    version: int = 1
    root: str = ""
    address: str = ""
    daemon_mode: str = field(default="", metadata={"choices": tuple(DAEMON_MODE_ALIASES), "empty_is_none": True})
    daemon: DaemonSection = field(default_factory=DaemonSection)
    log: LogSection = field(default_factory=LogSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    remote: RemoteSection = field(default_factory=RemoteSection)

    UNIMPLEMENTED: ClassVar[dict[str, str]] = {
        "cleanup_on_close": "daemons always outlive the snapshotter; Cleanup frees unused ones",
        "uid": "the socket is root-only (0600)", "gid": "the socket is root-only (0600)",
        "system": "no system controller socket; nydusd's API sockets serve the same data",
        "snapshot": "plain overlayfs mounts only (no nydus-overlayfs, kata volumes)",
        "cache_manager": "caches live under root and are freed with their images",
        "image": "no image signature validation",
        "cgroup": "use the systemd unit's resource limits",
        "experimental": "no stargz/tarfs/referrer detection",
    }
