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

The dataclasses live with every other config in nydus_py/config/schema.py and are read by the
one parser (config/parse.py); this module maps them onto the flags, merges the nydusd template
and reads hosts.toml mirrors.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from nydus_py.config.parse import build
from nydus_py.config.schema import DAEMON_MODE_ALIASES, SnapshotterConfig
from nydus_py.errors import ConfigError

def cli_defaults(cfg: SnapshotterConfig) -> dict[str, Any]:
    """argparse dests → values set in the file (flags given on the command line win)."""
    out: dict[str, Any] = {}
    if cfg.root:
        out["root"] = cfg.root
    if cfg.address:
        out["address"] = cfg.address
    if cfg.daemon_mode:
        out["daemon_mode"] = DAEMON_MODE_ALIASES[cfg.daemon_mode]
    if cfg.daemon.nydusd_path:
        out["nydusd"] = cfg.daemon.nydusd_path
    if cfg.daemon.nydusd_config:
        out["nydusd_config"] = cfg.daemon.nydusd_config
    if cfg.daemon.recover_policy:
        out["recover_policy"] = cfg.daemon.recover_policy
    if cfg.log.level:
        out["log_level"] = log_level(cfg.log.level)
    if cfg.log.dir and not cfg.log.log_to_stdout:
        out["log_file"] = str(Path(cfg.log.dir) / "nydus-snapshotter.log")
    if cfg.metrics.address:
        out["metrics_address"] = cfg.metrics.address
    if cfg.remote.skip_ssl_verify:
        out["skip_verify"] = True
    if cfg.remote.auth.enable_cri_keychain:
        out["cri_keychain"] = True
    if cfg.remote.auth.image_service_address:
        out["image_service_address"] = cfg.remote.auth.image_service_address
    if cfg.remote.mirrors_config.dir:
        out["mirrors_config_dir"] = cfg.remote.mirrors_config.dir
    return out


# nydus-snapshotter's (logrus) level names; ours are Python's, and nydusd takes both
LOG_LEVELS = ("trace", "debug", "info", "warn", "warning", "error")


def log_level(name: str) -> str:
    """A level name as `--log-level` or `[log] level` gives it, as Python names it."""
    return {"warn": "warning", "trace": "debug"}.get(name, name)



def load(path: str | Path, warnings: list[str]) -> SnapshotterConfig:
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: malformed TOML ({e})") from None
    try:
        cfg = build(SnapshotterConfig, doc, "", warnings=warnings)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if cfg.version != 1:
        raise ConfigError(f"{path}: version: only version 1 is known, not {cfg.version}")
    return cfg


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
