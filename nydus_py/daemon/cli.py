"""`nydusd`: mount a converted image read-only with FUSE.

    nydusd mount --image oci:DIR[:TAG] MOUNTPOINT
    nydusd mount --bootstrap FILE --blob-dir DIR MOUNTPOINT
    nydusd mount --bootstrap FILE --config nydusd.json MOUNTPOINT
        [--apisock SOCK] [--cache-dir DIR] [--cache-max-size 10G] [--prefetch-files FILE]
    nydusd serve --apisock SOCK [--cache-dir DIR] [--cache-max-size N]   (several mounts)
    nydusd cache gc --cache-dir DIR [--max-size N] [--max-age AGE]

Nydus's own form works too (docs/cli.md, "coming from Nydus"):

    nydusd [fuse] --config C --mountpoint M --bootstrap B [--apisock S] [--id ID]
        [--log-level L] [--log-file F] [--prefetch-files FILE]
    nydusd [fuse] --localfs-dir DIR --mountpoint M --bootstrap B

Its flags that have no meaning here (--writable, --sock, --shared-dir, ...) are refused with
one line saying why, never accepted and ignored.

Foreground by default (Ctrl-C or SIGTERM unmounts and exits 0). With `--daemon` the process
forks before any thread or trio loop exists; the child mounts and reports "ready" or its
error through a pipe, and the parent exits 0 once the mount is live, or prints the error and
exits 1. Bad input is one line on stderr (`nydusd: error: ...`) and a non-zero exit.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys

from nydus_py import config as config_mod
from nydus_py.daemon import startup_files
from nydus_py.daemon.mount import MountRequest, mount
from nydus_py.daemon.procutil import (EXIT_ERROR, _error, _remove_pid, _setup_logging,
                                      _write_pid, await_verdict)
from nydus_py.errors import ConfigError, NydusError

log = logging.getLogger("nydusd")


def _version() -> str:
    from nydus_py import __version__      # not importlib.metadata: ~55 ms of every start-up
    return __version__


@functools.cache
def build_parser() -> argparse.ArgumentParser:
    """Built once per process (parse_args leaves it as it was): ~7 ms, which the fork server
    pays once for all the mounts it forks (prefork_warm)."""
    p = argparse.ArgumentParser(prog="nydusd", description="Serve a nydus-py image with FUSE.")
    p.add_argument("--version", action="version", version=f"nydusd (nydus-py) {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    m = sub.add_parser("mount", help="mount an image read-only at MOUNTPOINT",
                       description="Mount a converted image read-only at MOUNTPOINT.")
    src = m.add_argument_group("image")
    src.add_argument("--image", metavar="IMAGE",
                     help="converted image: oci:DIR[:TAG] or a registry reference HOST/REPO:TAG")
    src.add_argument("--plain-http", action="store_true", help="talk plain HTTP to the registry")
    src.add_argument("--insecure", action="store_true", help="HTTPS without certificate verification")
    src.add_argument("--bootstrap", metavar="FILE", help="bootstrap file (with --blob-dir or --config)")
    src.add_argument("--blob-dir", metavar="DIR", help="directory holding the data blobs")
    m.add_argument("--config", metavar="FILE", help="nydusd-style JSON config")
    m.add_argument("--cache-dir", metavar="DIR",
                   help="chunk cache directory (default: config work_dir, else a private temp dir "
                        "removed at exit)")
    m.add_argument("--daemon", action="store_true", help="detach once the mount is ready")
    m.add_argument("--pid-file", metavar="FILE",
                   help="write the pid here once mounted (removed at exit)")
    m.add_argument("--log-file", metavar="FILE", help="log here instead of stderr")
    m.add_argument("--log-level", default="info",
                   choices=["trace", "debug", "info", "warn", "warning", "error"])
    m.add_argument("--allow-other", action="store_true",
                   help="let other users (e.g. a non-root container) access the mount")
    m.add_argument("--suid", action="store_true",
                   help="honour setuid/setgid bits of image binaries (root only; default nosuid)")
    m.add_argument("--apisock", metavar="SOCK", help="serve the HTTP API on this unix socket")
    m.add_argument("--readahead-kb", type=int, default=1024, metavar="KB",
                   help="kernel readahead for the mount (default 1024; 0 keeps the kernel's)")
    m.add_argument("--id", dest="daemon_id", default="", help="daemon id reported by the API")
    m.add_argument("--cache-max-size", metavar="SIZE",
                   help="cache size limit (bytes or K/M/G/T); LRU eviction above it")
    m.add_argument("--prefetch-files", metavar="FILE",
                   help="image paths to prefetch after mounting, one a line")
    m.add_argument("--no-prefetch", action="store_true",
                   help="do not prefetch the image's own prefetch list")
    m.add_argument("--push-prefetch", action="store_true",
                   help="push this run's learned prefetch list to the image's registry or OCI "
                        "layout (a referrer of the image) when recording ends "
                        "(config learned_prefetch.push)")
    m.add_argument("--no-learned-prefetch", action="store_true",
                   help="do not look up or use a prefetch list learned from earlier runs "
                        "(config learned_prefetch.enable=false)")
    f = m.add_argument_group("failover and hot upgrade (docs/operations.md)")
    f.add_argument("--supervisor", metavar="SOCK",
                   help="keep the /dev/fuse fd and session state in the supervisor on this socket")
    f.add_argument("--upgrade", action="store_true",
                   help="take the live session over from --supervisor instead of mounting")
    f.add_argument("--failover-policy", default="resend", choices=["resend"],
                   help="in-flight requests of a dead daemon are resent by the kernel (Linux >= "
                        "6.9); nydusd's `flush` is not offered")
    f.add_argument("--failover", action="store_true",
                   help="run as the supervisor on --supervisor SOCK: keep the fd, restart the "
                        "daemon with a takeover when it dies, SIGHUP = hot upgrade (nydus-py)")
    m.add_argument("mountpoint", metavar="MOUNTPOINT")

    s = sub.add_parser("serve", help="one daemon for several mounts, driven by the API",
                       description="Serve the API on --apisock; POST /api/v1/mount mounts an "
                       "image in a child process per mount (see docs/operations.md).")
    s.add_argument("--apisock", metavar="SOCK", required=True)
    s.add_argument("--id", dest="daemon_id", default="")
    s.add_argument("--cache-dir", metavar="DIR", help="chunk cache shared by every mount")
    s.add_argument("--cache-max-size", metavar="SIZE")
    s.add_argument("--state-dir", metavar="DIR",
                   help="per-mount sockets, configs and logs (default: a temp dir)")
    s.add_argument("--failover", action="store_true",
                   help="every mount keeps its FUSE session in a supervisor (mount --failover): "
                        "a dead mount daemon is replaced on the same mount; SIGHUP = hot upgrade")
    s.add_argument("--metrics-address", metavar="HOST:PORT",
                   help="also serve GET /metrics (Prometheus, every mount) over TCP here")
    s.add_argument("--log-file", metavar="FILE")
    s.add_argument("--log-level", default="info",
                   choices=["trace", "debug", "info", "warn", "warning", "error"])

    c = sub.add_parser("cache", help="chunk cache maintenance")
    csub = c.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    g = csub.add_parser("gc", help="remove unused blobs (LRU first) down to --max-size",
                        description="Remove cached blobs no mount is using, least recently "
                        "used first, until the cache is at most --max-size (default 0: all "
                        "unused), and the kept bootstraps and learned prefetch lists no mount "
                        "is using that were last used longer ago than --max-age. Prints a JSON "
                        "report.")
    g.add_argument("--cache-dir", metavar="DIR", required=True)
    g.add_argument("--max-size", metavar="SIZE", default="0")
    g.add_argument("--max-age", metavar="AGE", default=None,
                   help="seconds, or with s/m/h/d: 30m, 24h, 7d (default: 0 with --max-size 0, "
                        "else 7d)")
    return p


# Nydus's nydusd flags nydus-py has no equivalent of, and why (one line, non-zero exit)
NYDUS_UNSUPPORTED = {
    "--writable": "the image mount is read-only; a container's writable layer is overlayfs "
                  "above it (the snapshotter does that)",
    "--sock": "virtio-fs (vhost-user) is not implemented; nydus-py serves FUSE",
    "--shared-dir": "passthroughfs is not implemented",
    "--hybrid-mode": "passthroughfs is not implemented",
    "--virtual-mountpoint": "each image is its own FUSE mount (no pseudo mounts below one)",
    "--fuse-threads": "FUSE requests are served by one trio loop; chunk fetches use worker "
                      "threads sized by fs_prefetch.threads_count",
    "--thread-num": "see --fuse-threads",
    "--failover-policy": "nydus-py's takeover speaks its own supervisor protocol, not "
                         "nydus-snapshotter's: use `nydusd mount --failover --supervisor SOCK`",
    "--upgrade": "see --failover-policy",
    "--supervisor": "see --failover-policy",
    "--log-rotation-size": "log rotation is logrotate's job (copytruncate)",
    "--rlimit-nofile": "set it with ulimit/systemd LimitNOFILE",
    "--dedup-db": "chunk deduplication happens at conversion (nydusify --chunk-dict)",
    "--fscache": "EROFS over fscache is not implemented; nydus-py serves FUSE",
    "--fscache-tag": "see --fscache",
    "--fscache-threads": "see --fscache",
}
NYDUS_SUBCOMMANDS_UNSUPPORTED = {
    "virtiofs": "virtio-fs (vhost-user) is not implemented; nydus-py serves FUSE",
    "singleton": "EROFS over fscache is not implemented; use `nydusd serve` for several mounts",
    "nbd": "block-device (NBD) export is not implemented",
    "uffd": "userfaultfd export is not implemented",
}


class _Unsupported(Exception):
    pass


def build_nydus_parser() -> argparse.ArgumentParser:
    """Nydus's `nydusd [fuse] --config --mountpoint --bootstrap ...` (its dedicated FUSE server)."""
    p = argparse.ArgumentParser(prog="nydusd", add_help=True,
                                description="Nydus's nydusd command line (see `nydusd mount -h` "
                                "for nydus-py's own form).")
    p.add_argument("--config", "-C", metavar="FILE", help="nydusd config (v1 JSON or v2 TOML)")
    p.add_argument("--mountpoint", "-M", metavar="DIR", help="where to mount the image")
    p.add_argument("--bootstrap", "-B", metavar="FILE", help="the image's bootstrap")
    p.add_argument("--localfs-dir", "-D", metavar="DIR",
                   help="blob directory; enables the localfs backend (instead of --config)")
    p.add_argument("--apisock", "-A", metavar="SOCK", help="HTTP API on this unix socket")
    p.add_argument("--id", dest="daemon_id", default="", help="daemon id reported by the API")
    p.add_argument("--log-level", "-l", default="info",
                   choices=["trace", "debug", "info", "warn", "error"])
    p.add_argument("--log-file", "-L", metavar="FILE")
    p.add_argument("--prefetch-files", metavar="FILE",
                   help="file listing paths to prefetch, one a line")
    for flag in NYDUS_UNSUPPORTED:
        p.add_argument(flag, nargs="?", const=True, default=None, help=argparse.SUPPRESS)
    return p


def _nydus_form(argv: list[str]) -> argparse.Namespace:
    """Nydus's argv → the namespace `nydusd mount` would have parsed."""
    if argv and argv[0] in NYDUS_SUBCOMMANDS_UNSUPPORTED:
        raise _Unsupported(f"nydusd {argv[0]}, because {NYDUS_SUBCOMMANDS_UNSUPPORTED[argv[0]]}")
    if argv and argv[0] == "fuse":
        argv = argv[1:]
    args = build_nydus_parser().parse_args(argv)
    for flag, why in NYDUS_UNSUPPORTED.items():
        if getattr(args, flag[2:].replace("-", "_")) is not None:
            raise _Unsupported(f"{flag}, because {why}")
    if args.localfs_dir and args.config:
        raise ConfigError("--localfs-dir and --config exclude each other (as in nydusd)")
    if not args.mountpoint:
        raise ConfigError("--mountpoint is required")
    return argparse.Namespace(
        command="mount", mountpoint=args.mountpoint, image=None, bootstrap=args.bootstrap,
        blob_dir=args.localfs_dir, config=args.config, plain_http=False, insecure=False,
        cache_dir=None, daemon=False, pid_file=None, log_file=args.log_file,
        log_level=args.log_level, allow_other=False, suid=False, apisock=args.apisock,
        readahead_kb=1024, daemon_id=args.daemon_id, cache_max_size=None,
        prefetch_files=args.prefetch_files, no_prefetch=False, nydus_form=True,
        supervisor=None, upgrade=False, failover=False)


def _size(text: str | None, what: str) -> int | None:
    from nydus_py.config import parse_size
    if text is None:
        return None
    try:
        return parse_size(text)
    except ValueError as e:
        raise ConfigError(f"{what}: {e}") from None


def _request(args) -> MountRequest:
    if args.image and (args.bootstrap or args.blob_dir):
        raise ConfigError("--image cannot be combined with --bootstrap/--blob-dir")
    if args.blob_dir and not args.bootstrap:
        raise ConfigError("--blob-dir needs --bootstrap")
    # before mounting: never take over a live daemon's API socket (a takeover daemon binds
    # it only once its predecessor has stopped and removed it: serve_unix checks again then)
    if args.apisock and not args.upgrade:
        from nydus_py.daemon.api import claim_socket_path
        claim_socket_path(os.path.abspath(args.apisock))
    cfg = config_mod.load(args.config) if args.config else config_mod.DaemonConfig()
    for w in cfg.warnings:
        print(f"nydusd: warning: {args.config}: {w}", file=sys.stderr, flush=True)
    if not args.image and not args.bootstrap and cfg.metadata_path:
        args.bootstrap = cfg.metadata_path      # a blob cache entry names its bootstrap
    if getattr(args, "nydus_form", False) and not args.bootstrap:
        raise _Unsupported("--mountpoint without --bootstrap (pseudo mounts added later through "
                           "the API), because each image is its own FUSE mount here: run "
                           "`nydusd serve --apisock S` and POST /api/v1/mount?mountpoint=DIR")
    # the Nydus-form command line has no learned-prefetch flags (its config has the keys)
    push, no_learned = getattr(args, "push_prefetch", False), getattr(args, "no_learned_prefetch", False)
    if push or no_learned:
        import dataclasses
        lp = cfg.learned_prefetch
        lp = dataclasses.replace(lp, push=lp.push or push, enable=lp.enable and not no_learned)
        cfg = dataclasses.replace(cfg, learned_prefetch=lp)
    prefetch_files: tuple[str, ...] = ()
    if args.prefetch_files:
        from nydus_py.io.prefetch import read_paths_file
        try:
            prefetch_files = tuple(read_paths_file(args.prefetch_files))
        except OSError as e:
            raise ConfigError(f"--prefetch-files {args.prefetch_files}: {e.strerror}") from None
    return MountRequest(mountpoint=args.mountpoint, image=args.image, bootstrap=args.bootstrap,
                        plain_http=args.plain_http, skip_verify=args.insecure,
                        readahead_kb=args.readahead_kb,
                        blob_dir=args.blob_dir, cache_dir=args.cache_dir, config=cfg,
                        allow_other=args.allow_other, suid=args.suid,
                        apisock=os.path.abspath(args.apisock) if args.apisock else None,
                        daemon_id=args.daemon_id, prefetch_files=prefetch_files,
                        no_prefetch=args.no_prefetch,
                        cache_max_size=_size(args.cache_max_size, "--cache-max-size"),
                        supervisor=os.path.abspath(args.supervisor) if args.supervisor else None,
                        upgrade=args.upgrade)


def _age(text: str) -> float:
    """`90`, `90s`, `30m`, `24h`, `7d` → seconds (ValueError otherwise)."""
    unit = {"s": 1, "m": 60, "h": 3600, "d": 86400}.get(text[-1:], 0)
    value = float(text[:-1] if unit else text)
    if not 0 <= value < float("inf"):
        raise ValueError(text)
    return value * (unit or 1)


def _cache_gc(args) -> int:
    import json

    from nydus_py.cache.gc import collect
    try:
        max_size = _size(args.max_size, "--max-size")
    except NydusError as e:
        return _error(str(e))
    try:
        max_age = _age(args.max_age) if args.max_age is not None else 0.0 if not max_size else 7 * 86400.0
    except ValueError:
        return _error(f"--max-age {args.max_age!r}: expected seconds or a number with s, m, h or d")
    if not os.path.isdir(args.cache_dir):
        return _error(f"{args.cache_dir}: no such cache directory")
    report = collect(args.cache_dir, max_size or 0, image_max_age=max_age)
    print(json.dumps(report.to_dict(), indent=2))
    return 0


def _serve(args) -> int:
    from nydus_py.daemon.supervisor import Supervisor
    _setup_logging(args.log_level, args.log_file)
    try:
        sup = Supervisor(apisock=os.path.abspath(args.apisock), daemon_id=args.daemon_id,
                         cache_dir=args.cache_dir,
                         cache_max_size=_size(args.cache_max_size, "--cache-max-size"),
                         state_dir=args.state_dir, log_level=args.log_level,
                         failover=args.failover, metrics_address=args.metrics_address,
                         mount_entry=main)
        sup.run()
    except NydusError as e:
        return _error(str(e))
    return 0


OUR_COMMANDS = ("mount", "serve", "cache")


def prefork_warm() -> None:
    """Called by daemon/forkserver.py before it forks mounts: what each would build alike
    (the parser, and argparse's first-parse set-up: a parse of a typical mount line)."""
    build_parser().parse_args(["mount", "--image", "oci:/", "--log-level", "warn", "/"])


def main(argv: list[str] | None = None) -> int:
    startup_files.finish()      # before any fork: its read-ahead threads are done in a few ms
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in OUR_COMMANDS and argv[0] not in ("-h", "--help", "--version"):
        try:
            args = _nydus_form(argv)
        except _Unsupported as e:
            print(f"nydusd: not supported by nydus-py: {e}", file=sys.stderr, flush=True)
            return 2
        except NydusError as e:
            return _error(str(e))
        return _run_mount(args, argv)
    args = build_parser().parse_args(argv)
    if args.command == "cache":
        return _cache_gc(args)
    if args.command == "serve":
        return _serve(args)
    return _run_mount(args, argv)


def _run_mount(args: argparse.Namespace, argv: list[str]) -> int:
    try:
        if (args.upgrade or args.failover) and not args.supervisor:
            raise ConfigError("--upgrade and --failover need --supervisor SOCK")
        if args.upgrade and args.failover:
            raise ConfigError("--upgrade is for the daemon a --failover supervisor starts")
        req = _request(args)
    except _Unsupported as e:
        print(f"nydusd: not supported by nydus-py: {e}", file=sys.stderr, flush=True)
        return 2
    except NydusError as e:
        return _error(str(e))
    if args.failover:
        from nydus_py.daemon.failover_cli import run_failover
        return run_failover(req, args, argv, build_parser())
    if args.daemon:
        return _daemonize(req, args)
    _setup_logging(args.log_level, args.log_file)
    pid_file = os.path.abspath(args.pid_file) if args.pid_file else None
    try:
        mount(req, on_ready=(lambda: _write_pid(pid_file)) if pid_file else None)
    except NydusError as e:
        return _error(str(e))
    except KeyboardInterrupt:  # before the mount existed (afterwards SIGINT unmounts cleanly)
        return 130
    finally:
        _remove_pid(pid_file)
    return 0


def _daemonize(req: MountRequest, args) -> int:
    """Fork now (no threads exist yet); the parent waits for the child's verdict."""
    pid_file = os.path.abspath(args.pid_file) if args.pid_file else None
    log_file = os.path.abspath(args.log_file) if args.log_file else None
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(w)
        code = await_verdict(pid, r, "daemon")
        # Nothing is left to do here: skip the interpreter's teardown of trio, pyfuse3 and the
        # rest (40-140 ms, all of it in the caller's mount-ready time).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    os.close(r)
    code = _daemon_child(req, args, w, pid_file, log_file)
    os._exit(code)


def _daemon_child(req: MountRequest, args, w: int, pid_file: str | None, log_file: str | None) -> int:
    reported = False
    try:
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        _setup_logging(args.log_level, log_file)

        def ready() -> None:
            nonlocal reported
            if pid_file:
                _write_pid(pid_file)
            # Our stdout/stderr may be a pipe someone waits on: let go of them.
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            os.write(w, b"ready\n")
            os.close(w)
            reported = True

        mount(req, on_ready=ready)
        return 0
    except NydusError as e:
        if reported:
            log.error("%s", e)
        else:                   # the parent prints it: one line on the user's terminal
            os.write(w, f"error: {e}".encode())
        return EXIT_ERROR
    except BaseException as e:  # a bug: still tell the parent, never leave it waiting
        log.exception("internal error")
        if not reported:
            os.write(w, f"error: internal error: {e!r}".encode())
        return EXIT_ERROR
    finally:
        if reported:
            _remove_pid(pid_file)
        if not reported:
            os.close(w)


if __name__ == "__main__":
    sys.exit(main())
