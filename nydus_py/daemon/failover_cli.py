"""`nydusd mount --failover`: this process becomes the session's supervisor (takeover.py).

The daemon runs as a child with the same command line minus --failover/--daemon/--pid-file,
plus --supervisor/--id (and --upgrade when it takes over). The pid file names the supervisor:
it is the process that lives as long as the mount.
"""

from __future__ import annotations

import logging
import os
import sys

from nydus_py.daemon.mount import MountRequest
from nydus_py.daemon.procutil import _remove_pid, _setup_logging, _write_pid, await_verdict

log = logging.getLogger("nydusd")

_DROP = {"failover": False, "daemon": False, "pid_file": True}   # dest -> takes a value


def child_argv(parser, argv: list[str], upgrade: bool) -> list[str]:
    """The daemon's argv: `argv` without the supervisor-only options (matched as argparse
    matches them, abbreviations and --opt=value included)."""
    mount = parser._subparsers._group_actions[0].choices["mount"]
    out: list[str] = []
    skip = False
    for tok in argv:
        if skip:
            skip = False
            continue
        if tok.startswith("--") and tok != "--":
            name, eq, _ = tok.partition("=")
            acts = mount._option_string_actions
            hits = {acts[o].dest for o in acts if o == name} or \
                {acts[o].dest for o in acts if o.startswith(name)}
            if len(hits) == 1 and (dest := hits.pop()) in _DROP:
                skip = _DROP[dest] and not eq
                continue
        out.append(tok)
    return [sys.executable, "-m", "nydus_py.daemon.cli", *out] + (["--upgrade"] if upgrade else [])


def run_failover(req: MountRequest, args, argv: list[str], parser) -> int:
    """`parser` is nydusd's (the CLI hands it in: this module imports no CLI)."""
    from nydus_py.daemon.fdsupervisor import FdSupervisor
    pid_file = os.path.abspath(args.pid_file) if args.pid_file else None
    log_file = os.path.abspath(args.log_file) if args.log_file else None
    mountpoint = os.path.realpath(req.mountpoint)
    supervisor = req.supervisor or ""      # cli.main checked it is given

    def make(on_ready, on_error) -> FdSupervisor:
        return FdSupervisor(supervisor, mountpoint,
                            lambda upgrade: child_argv(parser, argv, upgrade),
                            on_ready=on_ready, on_error=on_error)

    if not args.daemon:
        _setup_logging(args.log_level, log_file)
        try:
            return make((lambda: _write_pid(pid_file)) if pid_file else None, None).run()
        finally:
            _remove_pid(pid_file)

    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(w)
        return await_verdict(pid, r, "supervisor")
    os.close(r)
    code = 1
    reported = False
    try:
        os.setsid()
        # Let go of the caller's terminal/pipes now: the daemons inherit our stderr (through
        # the forwarder), and the first daemon's error reaches the caller as the verdict.
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        _setup_logging(args.log_level, log_file)

        def ready() -> None:
            nonlocal reported
            if pid_file:
                _write_pid(pid_file)
            os.write(w, b"ready\n")
            os.close(w)
            reported = True

        def error(msg: str) -> None:
            nonlocal reported
            os.write(w, f"error: {msg}".encode())
            os.close(w)
            reported = True

        code = make(ready, error).run()
    except BaseException as e:
        log.exception("supervisor failed")
        if not reported:
            os.write(w, f"error: internal error: {e!r}".encode())
    finally:
        if reported:
            _remove_pid(pid_file)
        else:
            os.close(w)
    os._exit(code)
