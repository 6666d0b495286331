"""`nydus-snapshotter --config config.toml`: Nydus snapshotter's config file, typed.

Keys are nydus-snapshotter's (misc/snapshotter/config.toml) where the meaning carries over:

    version = 1
    root = "/var/lib/nydus-py-snapshotter"
    address = "/run/nydus-py-snapshotter/grpc.sock"
    daemon_mode = "dedicated"            # or "shared"; Nydus's "multiple" = dedicated
    [daemon]
    nydusd_config = "/etc/nydus/nydusd-config.json"   # template for every nydusd (mirrors, proxy, …)
    nydusd_path = "/usr/local/bin/nydusd"
    recover_policy = "restart"
    [log]
    level = "info"
    dir = "/var/log/nydus-py-snapshotter"            # logs to DIR/nydus-snapshotter.log
    log_to_stdout = false
    [metrics]
    address = "127.0.0.1:9110"
    [remote]
    skip_ssl_verify = false
    [remote.mirrors_config]
    dir = "/etc/nydus/certs.d"                       # containerd hosts.toml dirs → nydusd mirrors
    [remote.auth]
    enable_cri_keychain = true                       # CRI ImageService proxy on `address` (cri.py)
    image_service_address = "/run/containerd/containerd.sock"

Every value is optional; a command-line flag overrides the file, the file overrides the
built-in default. An unknown key is a ConfigError with "did you mean"; a Nydus key nydus-py does
not implement is accepted with a warning naming it (never silently: `warnings`).

The dataclasses are plain and self-contained so that they can move into the one config module
(nydus_py/config/schema.py, parsed by config/parse.py) once that lands, without changing callers.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from nydus_py.errors import ConfigError

DAEMON_MODE_ALIASES = {"dedicated": "dedicated", "multiple": "dedicated", "shared": "shared"}
RECOVER_POLICIES = ("restart", "failover", "none")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True, kw_only=True)
class DaemonSection:
    nydusd_config: str = ""            # nydusd JSON template applied to every daemon
    nydusd_path: str = ""
    recover_policy: str = ""
    fs_driver: str = "fusedev"         # the only driver nydus-py has

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"recover_policy": ("",) + RECOVER_POLICIES,
                                                     "fs_driver": ("fusedev",)}
    UNIMPLEMENTED: ClassVar[dict[str, str]] = {
        "nydusimage_path": "nydus-py needs no nydus-image binary",
        "threads_number": "nydusd's concurrency is set by amplify_io / fs_prefetch in the template",
        "log_rotation_size": "no log rotation; use logrotate with copytruncate",
        "failover_policy": "no FUSE request resend/flush policy",
    }


@dataclass(frozen=True, kw_only=True)
class LogSection:
    level: str = ""
    dir: str = ""
    log_to_stdout: bool = False

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"level": ("",) + LOG_LEVELS + ("warn", "trace")}
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
    daemon_mode: str = ""
    daemon: DaemonSection = field(default_factory=DaemonSection)
    log: LogSection = field(default_factory=LogSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    remote: RemoteSection = field(default_factory=RemoteSection)

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"daemon_mode": ("",) + tuple(DAEMON_MODE_ALIASES)}
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

    def cli_defaults(self) -> dict[str, Any]:
        """argparse dests → values set in the file (flags given on the command line win)."""
        out: dict[str, Any] = {}
        if self.root:
            out["root"] = self.root
        if self.address:
            out["address"] = self.address
        if self.daemon_mode:
            out["daemon_mode"] = DAEMON_MODE_ALIASES[self.daemon_mode]
        if self.daemon.nydusd_path:
            out["nydusd"] = self.daemon.nydusd_path
        if self.daemon.nydusd_config:
            out["nydusd_config"] = self.daemon.nydusd_config
        if self.daemon.recover_policy:
            out["recover_policy"] = self.daemon.recover_policy
        if self.log.level:
            out["log_level"] = {"warn": "warning", "trace": "debug"}.get(self.log.level, self.log.level)
        if self.log.dir and not self.log.log_to_stdout:
            out["log_file"] = str(Path(self.log.dir) / "nydus-snapshotter.log")
        if self.metrics.address:
            out["metrics_address"] = self.metrics.address
        if self.remote.skip_ssl_verify:
            out["skip_verify"] = True
        if self.remote.auth.enable_cri_keychain:
            out["cri_keychain"] = True
        if self.remote.auth.image_service_address:
            out["image_service_address"] = self.remote.auth.image_service_address
        if self.remote.mirrors_config.dir:
            out["mirrors_config_dir"] = self.remote.mirrors_config.dir
        return out


def load(path: str | Path, warnings: list[str]) -> SnapshotterConfig:
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: malformed TOML ({e})") from None
    try:
        cfg = build(SnapshotterConfig, doc, "", warnings)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if cfg.version != 1:
        raise ConfigError(f"{path}: version: only version 1 is known, not {cfg.version}")
    return cfg


T = typing.TypeVar("T")


def build(cls: type[T], obj: object, where: str, warnings: list[str]) -> T:
    """A TOML table → dataclass `cls`, every key checked (see the module docstring)."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{where or 'config'}: expected a table, got {type(obj).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}     # type: ignore[arg-type]
    unimplemented: dict[str, str] = getattr(cls, "UNIMPLEMENTED", {})
    choices: dict[str, tuple] = getattr(cls, "CHOICES", {})
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in obj.items():
        path = f"{where}.{key}" if where else key
        if key in unimplemented:
            warnings.append(f"{path}: Nydus key not supported by nydus-py, ignored ({unimplemented[key]})")
            continue
        if key not in fields:
            close = difflib.get_close_matches(key, [*fields, *unimplemented], n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{path}: unknown key{hint} (known: {', '.join(fields)})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build(typing.cast(type, tp), value, path, warnings)
            continue
        if tp is bool and not isinstance(value, bool) or tp is int and (isinstance(value, bool) or
                                                                        not isinstance(value, int)) \
                or tp is str and not isinstance(value, str):
            raise ConfigError(f"{path}: expected {tp.__name__}, got {type(value).__name__}")
        if key in choices and value not in choices[key]:
            raise ConfigError(f"{path}: must be one of {', '.join(c for c in choices[key] if c)}, not {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


# -- the nydusd template -------------------------------------------------------------------------
def load_template(path: str | Path, warnings: list[str] | None = None) -> dict:
    """Read and check a nydusd config (JSON) used as the template of every daemon. It is checked
    with nydusd's own parser (config/nydusd.py), merged with a stand-in image, so a bad key fails
    at start-up; the parser's warnings (Nydus keys nydus-py ignores) go to `warnings`."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read nydusd config ({e.strerror})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    backend = doc.get("device", {}).get("backend", {}) if isinstance(doc.get("device"), dict) else {}
    if isinstance(backend, dict) and backend.get("type", "registry") != "registry":
        raise ConfigError(f"{path}: device.backend.type: the snapshotter reads images from their "
                          f"registry; only \"registry\" can be templated, not {backend.get('type')!r}")
    from nydus_py.config.nydusd import parse
    try:
        cfg = parse(merge_template(doc, {"host": "registry.invalid", "repo": "check/only", "scheme": "https"},
                                   "/nonexistent"))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if warnings is not None:
        warnings.extend(f"{path}: {w}" for w in cfg.warnings)
    return doc


def merge_template(template: dict, backend: dict, work_dir: str) -> dict:
    """The template with the snapshotter's per-image settings filled in: backend type registry,
    `backend` keys (host, repo, scheme, auth, registry_token, skip_verify) replacing the
    template's, and the cache directory the snapshotter manages. Every other key (proxy,
    mirrors, timeouts, cache type and max_size, fs_prefetch, amplify_io …) is the template's."""
    doc = json.loads(json.dumps(template))        # deep copy of plain JSON data
    device = doc.setdefault("device", {})
    b = device.setdefault("backend", {})
    b["type"] = "registry"
    conf = b.setdefault("config", {})
    for k in ("auth", "registry_token"):          # credentials are the image's, never the template's
        conf.pop(k, None)
    conf.update(backend)
    cache = device.setdefault("cache", {"type": "blobcache"})
    if cache.get("type", "blobcache") in ("blobcache", ""):
        cache["type"] = "blobcache"
        cache.setdefault("config", {})["work_dir"] = work_dir
    return doc


# -- [remote.mirrors_config] dir -------------------------------------------------------------------
def host_mirrors(root: str | Path, registry_host: str) -> list[dict]:
    """nydusd `mirrors` entries for `registry_host` from containerd's hosts.toml layout, as Nydus
    reads it: `<root>/<host>/hosts.toml`, else `<root>/_default/hosts.toml`; each `[host."URL"]`
    in file order becomes a mirror with its `header`, `ping_url`, `health_check_interval`,
    `failure_limit`. Read at every daemon start, so an edited file applies to the next image."""
    for name in (registry_host, "_default"):
        f = Path(root) / name / "hosts.toml"
        try:
            with open(f, "rb") as fh:
                doc = tomllib.load(fh)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise ConfigError(f"{f}: cannot read ({e.strerror})") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{f}: malformed TOML ({e})") from None
        hosts = doc.get("host", {})
        if not isinstance(hosts, dict):
            raise ConfigError(f"{f}: host: expected a table of [host.\"URL\"] entries")
        out = []
        for url, h in hosts.items():
            if not isinstance(h, dict):
                raise ConfigError(f"{f}: host.{url!r}: expected a table")
            if "pull" not in h.get("capabilities", ["pull"]):
                continue
            m: dict[str, Any] = {"host": url}
            if isinstance(h.get("header"), dict):
                m["headers"] = {k: v if isinstance(v, str) else ",".join(map(str, v))
                                for k, v in h["header"].items()}
            for k in ("ping_url", "health_check_interval", "failure_limit"):
                if k in h:
                    m[k] = h[k]
            out.append(m)
        return out
    return []
