"""`nydusctl`: talk to a running nydusd through its API socket, as Nydus's nydusctl does.

    nydusctl --sock S info
    nydusctl --sock S metrics fsstats|fs|backend|cache|blobcache [--interval N]
    nydusctl --sock S set log-level trace|debug|info|warn|error
    nydusctl --sock S mount --source BOOTSTRAP|oci:DIR --mountpoint M [--config C] [--type rafs]
    nydusctl --sock S umount --mountpoint M

Human-readable by default, the API's JSON with --raw. Exit 0 on success, 1 with one line
(`nydusctl: error: ...`, the daemon's message when it gave one) otherwise. `mount`/`umount`
need a daemon started with `nydusd serve` (one that holds several mounts).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.parse

CATEGORIES = {"fsstats": "/api/v1/metrics", "fs": "/api/v1/metrics",
              "backend": "/api/v1/metrics/backend",
              "cache": "/api/v1/metrics/blobcache", "blobcache": "/api/v1/metrics/blobcache"}


class CtlError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nydusctl", description="Query and configure a running nydusd.")
    p.add_argument("--sock", "-S", required=True, metavar="SOCK", help="the daemon's --apisock")
    p.add_argument("--raw", "-r", action="store_true", help="print the API's JSON as is")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="the daemon's id, version, state, mounts")
    s = sub.add_parser("set", help="change a daemon setting")
    s.add_argument("kind", choices=["log-level"])
    s.add_argument("value")
    m = sub.add_parser("metrics", help="fs (fsstats), backend or cache (blobcache) metrics")
    m.add_argument("category", choices=sorted(CATEGORIES))
    m.add_argument("--interval", "-I", type=float, metavar="SECONDS",
                   help="print again every SECONDS until interrupted")
    mo = sub.add_parser("mount", help="mount an image (a `nydusd serve` daemon)")
    mo.add_argument("--source", "-s", required=True, help="bootstrap file or oci:DIR[:TAG]")
    mo.add_argument("--mountpoint", "-m", required=True)
    mo.add_argument("--config", "-c", help="nydusd config file (JSON) for the mount")
    mo.add_argument("--type", "-t", default="rafs", choices=["rafs", "passthrough_fs"])
    u = sub.add_parser("umount", help="unmount (a `nydusd serve` daemon)")
    u.add_argument("--mountpoint", "-m", required=True)
    return p


def _call(sock: str, method: str, target: str, body: object = None) -> object:
    from nydus_py.daemon.api import call_sync
    data = json.dumps(body).encode() if body is not None else None
    try:
        status, raw = call_sync(sock, method, target, data)
    except FileNotFoundError:
        raise CtlError(f"{sock}: no such socket (is nydusd running with --apisock {sock}?)") from None
    except ConnectionRefusedError:
        raise CtlError(f"{sock}: nobody is listening (stale socket of a stopped nydusd?)") from None
    except OSError as e:
        raise CtlError(f"{sock}: {e.strerror or e}") from None
    try:
        doc = json.loads(raw) if raw.strip() else None
    except ValueError:
        doc = raw.decode("utf-8", "replace")
    if status >= 400:
        msg = doc.get("message") if isinstance(doc, dict) else doc
        raise CtlError(f"{method} {target}: {status} {msg}")
    return doc


def _show(doc: object, raw: bool, indent: str = "") -> None:
    if raw:
        print(json.dumps(doc, indent=2))
        return
    if isinstance(doc, dict):
        for k, v in doc.items():
            if isinstance(v, list) and not any(isinstance(x, (dict, list)) for x in v):
                print(f"{indent}{k}: {' '.join(map(str, v))}")      # e.g. a latency histogram
            elif isinstance(v, (dict, list)) and v:
                print(f"{indent}{k}:")
                _show(v, False, indent + "  ")
            else:
                print(f"{indent}{k}: {v}")
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            if isinstance(v, (dict, list)):
                print(f"{indent}- [{i}]")
                _show(v, False, indent + "  ")
            else:
                print(f"{indent}- {v}")
    else:
        print(f"{indent}{doc}")


def run(args) -> int:
    sock = args.sock
    if args.cmd == "info":
        _show(_call(sock, "GET", "/api/v1/daemon"), args.raw)
    elif args.cmd == "set":
        _call(sock, "PUT", "/api/v1/daemon", {"log_level": args.value})
        if not args.raw:
            print(f"log level set to {args.value}")
    elif args.cmd == "metrics":
        while True:
            _show(_call(sock, "GET", CATEGORIES[args.category]), args.raw)
            if not args.interval:
                break
            sys.stdout.flush()
            time.sleep(args.interval)
    elif args.cmd == "mount":
        body: dict = {"source": args.source if args.source.startswith("oci:") else os.path.abspath(args.source),
                      "fs_type": args.type}
        if args.config:
            try:
                with open(args.config, encoding="utf-8") as f:
                    body["config"] = f.read()
            except OSError as e:
                raise CtlError(f"--config {args.config}: {e.strerror}") from None
        mp = urllib.parse.quote(os.path.abspath(args.mountpoint))
        _call(sock, "POST", f"/api/v1/mount?mountpoint={mp}", body)
        if not args.raw:
            print(f"mounted {args.source} at {args.mountpoint}")
    elif args.cmd == "umount":
        mp = urllib.parse.quote(os.path.abspath(args.mountpoint))
        _call(sock, "DELETE", f"/api/v1/mount?mountpoint={mp}")
        if not args.raw:
            print(f"unmounted {args.mountpoint}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except CtlError as e:
        print(f"nydusctl: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
