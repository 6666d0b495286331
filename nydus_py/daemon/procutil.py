"""Process plumbing shared by nydusd's CLI (daemon/cli.py) and `mount --failover`
(daemon/failover_cli.py): logging set-up, one error line, pid files, reading a verdict pipe.
Its own module so that neither CLI module imports the other."""

from __future__ import annotations

import logging
import os
import sys

EXIT_ERROR = 1


def _setup_logging(level: str, log_file: str | None) -> None:
    level = {"trace": "DEBUG", "warn": "WARNING"}.get(level, level.upper())
    if log_file:  # 0600 whatever the umask (logs name files and images)
        try:
            os.close(os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600))
        except OSError:
            pass        # FileHandler reports it
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    setattr(handler, "_nydusd", True)  # noqa: B010  (replace only our own handler if called again)
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_nydusd", False)]:
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("pyfuse3").setLevel(max(logging.getLevelName(level), logging.INFO))


def _error(msg: str) -> int:
    print(f"nydusd: error: {msg}", file=sys.stderr, flush=True)
    return EXIT_ERROR


def _write_pid(pid_file: str) -> None:
    with open(pid_file, "w") as f:
        f.write(f"{os.getpid()}\n")


def _remove_pid(pid_file: str | None) -> None:
    if pid_file:
        try:
            os.unlink(pid_file)
        except OSError:
            pass


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks)


def await_verdict(pid: int, r: int, what: str) -> int:
    """The parent's side of a daemonizing fork: read the child's verdict ("ready", or
    "error: MSG") from `r` and turn it into this process's exit code."""
    verdict = _read_all(r)
    os.close(r)
    if verdict.startswith(b"ready"):
        return 0
    os.waitpid(pid, 0)
    msg = verdict.decode("utf-8", "replace").strip() or f"{what} exited before the mount was ready"
    return _error(msg.removeprefix("error: "))
