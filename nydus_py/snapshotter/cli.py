"""`nydus-snapshotter`: containerd remote snapshotter (proxy plugin) for nydus-py images.

    nydus-snapshotter --root /var/lib/nydus-py-snapshotter \
                      --address /run/nydus-py-snapshotter/grpc.sock

and in containerd's config.toml:

    [proxy_plugins."nydus-py"]
      type = "snapshot"
      address = "/run/nydus-py-snapshotter/grpc.sock"

SIGTERM/SIGINT stop serving and exit 0; nydusd daemons keep running (they serve running
containers) and are re-attached on the next start. Bad options: one line on stderr, exit 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import threading
from pathlib import Path

from nydus_py import __version__, sdnotify
from nydus_py.cache import safedir
from nydus_py.config.schema import RECOVER_POLICIES
from nydus_py.errors import ConfigError, NydusError
from nydus_py.snapshotter import config as snapconfig
from nydus_py.snapshotter.remote import DAEMON_MODES, DEDICATED, RemoteConfig, default_nydusd

log = logging.getLogger("nydus-snapshotter")
DEFAULT_ROOT = "/var/lib/nydus-py-snapshotter"
DEFAULT_ADDRESS = "/run/nydus-py-snapshotter/grpc.sock"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nydus-snapshotter",
                                description="containerd snapshotter (gRPC proxy plugin) for nydus-py images")
    p.add_argument("--version", action="version", version=f"nydus-snapshotter (nydus-py) {__version__}")
    p.add_argument("--config", metavar="FILE",
                   help="config.toml with nydus-snapshotter's keys (root, address, daemon_mode, [daemon] "
                        "nydusd_config, [log], [metrics], [remote]); flags given here override it")
    p.add_argument("--nydusd-config", metavar="FILE",
                   help="nydusd JSON config used as the template of every daemon (mirrors, proxy, "
                        "prefetch, cache limits); the snapshotter fills in registry, credentials, cache dir")
    p.add_argument("--metrics-address", metavar="HOST:PORT",
                   help="serve Prometheus metrics over TCP here (default: none)")
    p.add_argument("--enable-cri-keychain", dest="cri_keychain", action="store_true",
                   help="also serve CRI's ImageService on --address, forwarding to "
                        "--image-service-address, and use PullImage's credentials (Kubernetes pull secrets)")
    p.add_argument("--image-service-address", metavar="SOCK", default="/run/containerd/containerd.sock",
                   help="containerd's CRI socket for --enable-cri-keychain (default %(default)s)")
    p.add_argument("--mirrors-config-dir", metavar="DIR",
                   help="containerd-style DIR/<host>/hosts.toml: registry mirrors for nydusd")
    p.add_argument("--root", default=DEFAULT_ROOT, help=f"state directory (default {DEFAULT_ROOT})")
    p.add_argument("--address", default=DEFAULT_ADDRESS, help=f"unix socket to serve on (default {DEFAULT_ADDRESS})")
    p.add_argument("--nydusd", default=None, metavar="CMD",
                   help="command that runs nydusd (default: the nydusd next to this Python, else on PATH)")
    p.add_argument("--plain-http", action="append", default=[], metavar="HOST[:PORT]",
                   help="talk http, not https, to this registry (repeatable); loopback hosts always do")
    p.add_argument("--no-plain-http-loopback", action="store_true",
                   help="use https for localhost/127.x registries too")
    p.add_argument("--skip-verify", action="store_true", help="do not verify registry TLS certificates")
    p.add_argument("--docker-config", metavar="FILE",
                   help="docker config.json with registry credentials (default: IMAGE_PULL_AUTH, "
                        "else $DOCKER_CONFIG/config.json or ~/.docker/config.json; credHelpers and "
                        "credsStore are run)")
    p.add_argument("--daemon-mode", choices=DAEMON_MODES, default=DEDICATED,
                   help="dedicated: one nydusd per image (default); shared: one nydusd supervisor "
                        "for all images, each image a mount in it. Images keep the mode they were "
                        "started in")
    p.add_argument("--daemon-timeout", type=float, default=30.0, help="seconds to wait for nydusd's mount")
    p.add_argument("--recover-interval", type=float, default=5.0, metavar="SECONDS",
                   help="check the daemons this often and restart dead ones (0: only at start)")
    p.add_argument("--recover-policy", choices=RECOVER_POLICIES, default="restart",
                   help="what happens when a nydusd dies: restart (a new mount; running "
                        "containers keep the dead one), failover (a new daemon takes over the same "
                        "FUSE session: running containers only pause), none")
    p.add_argument("--no-remote", action="store_true",
                   help="behave as a plain overlayfs snapshotter (never start nydusd)")
    p.add_argument("--log-level", default="info", choices=snapconfig.LOG_LEVELS, type=snapconfig.log_level)
    p.add_argument("--log-file", metavar="FILE", help="log here instead of stderr")
    return p


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """Flags, with --config's values as defaults (a flag on the command line wins). Returns
    the warnings about Nydus keys the file sets that nydus-py does not implement."""
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    warnings: list[str] = []
    if known.config:
        cfg = snapconfig.load(known.config, warnings)
        defaults = snapconfig.cli_defaults(cfg)
        # daemon.recover_policy (checked against RECOVER_POLICIES by the parser) becomes
        # --recover-policy's default, as every other key its flag's
        parser.set_defaults(**defaults)
    return parser.parse_args(argv), warnings


def main(argv: list[str] | None = None) -> int:
    try:
        args, warnings = parse_args(argv)
        template = snapconfig.load_template(args.nydusd_config, warnings) if args.nydusd_config else None
        if args.metrics_address:
            from nydus_py.prometheus import split_address
            try:
                split_address(args.metrics_address)
            except ValueError as e:
                raise ConfigError(str(e)) from None
    except ConfigError as e:
        print(f"nydus-snapshotter: error: {e}", file=sys.stderr)
        return 1
    if args.log_file:       # explicit modes whatever the umask (nydus_py/cache/safedir.py)
        try:
            safedir.ensure_dir(Path(args.log_file).absolute().parent, what="log directory", mode=0o755)
        except ConfigError as e:
            print(f"nydus-snapshotter: error: {e}", file=sys.stderr)
            return 1
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), filename=args.log_file,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if os.geteuid() != 0:
        print("nydus-snapshotter: error: must run as root (it mounts overlay and FUSE filesystems)",
              file=sys.stderr)
        return 1
    from nydus_py.snapshotter.fs import open_snapshotter       # grpc is imported only when serving
    from nydus_py.snapshotter.service import make_server

    for w in warnings:
        log.warning("%s", w)
    root = Path(args.root).absolute()
    remote = RemoteConfig(root=root, nydusd=tuple(shlex.split(args.nydusd)) if args.nydusd else tuple(default_nydusd()),
                          plain_http=tuple(args.plain_http), plain_http_loopback=not args.no_plain_http_loopback,
                          skip_verify=args.skip_verify, docker_config=args.docker_config,
                          daemon_timeout=args.daemon_timeout, log_level=args.log_level,
                          daemon_mode=args.daemon_mode, recover_interval=args.recover_interval,
                          recover_policy=args.recover_policy,
                          nydusd_template=template, mirrors_config_dir=args.mirrors_config_dir)
    address = Path(args.address)
    try:
        sn = open_snapshotter(root, remote, enable_remote=not args.no_remote)
        sn.start()
        safedir.ensure_dir(address.absolute().parent, what="socket directory", mode=0o755)
        address.unlink(missing_ok=True)
        server = make_server(sn, str(address))
        close_cri = None
        if args.cri_keychain:
            from nydus_py.snapshotter import cri
            from nydus_py.snapshotter.fs import NydusFileSystem
            if not isinstance(sn.fs, NydusFileSystem):
                raise ConfigError("--enable-cri-keychain needs the remote snapshotter (not --no-remote)")
            close_cri = cri.add_to_server(server, args.image_service_address, sn.fs.resolver.keychain)
            log.info("CRI ImageService proxy on %s -> %s", address, args.image_service_address)
        server.start()
    except NydusError as e:
        print(f"nydus-snapshotter: error: {e}", file=sys.stderr)
        return 1
    os.chmod(address, 0o600)
    log.info("serving containerd snapshots API on %s, root %s", address, root)
    metrics_server = None
    if args.metrics_address:
        from nydus_py import prometheus
        from nydus_py.snapshotter.metrics import collect
        from nydus_py.snapshotter.fs import NydusFileSystem
        daemons = sn.fs.daemons if isinstance(sn.fs, NydusFileSystem) else None
        try:
            metrics_server = prometheus.serve_tcp(args.metrics_address,
                                                  lambda: collect(daemons) if daemons is not None else [])
        except (ValueError, OSError) as e:
            print(f"nydus-snapshotter: error: --metrics-address {args.metrics_address}: {e}", file=sys.stderr)
            server.stop(grace=0)
            sn.close()
            address.unlink(missing_ok=True)
            return 1
        log.info("Prometheus metrics on http://%s/metrics", args.metrics_address)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    sdnotify.notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving {address}")
    stop.wait()
    log.info("stopping (nydusd daemons keep running)")
    sdnotify.notify("STOPPING=1")
    if metrics_server is not None:
        metrics_server.shutdown()
        metrics_server.server_close()
    server.stop(grace=5).wait()
    if close_cri is not None:
        close_cri()
    sn.close()
    address.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
