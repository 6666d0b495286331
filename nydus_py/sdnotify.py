"""systemd's sd_notify, without libsystemd: one datagram to $NOTIFY_SOCKET.

    notify("READY=1")          # Type=notify units: the service is up
    notify("STOPPING=1")

A path starting with "@" is an abstract socket (NUL first byte). Without NOTIFY_SOCKET (not
under systemd) nothing is sent. An error is logged, never raised: a service must not die
because its supervisor's socket is gone.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str, environ: dict[str, str] | None = None) -> bool:
    """True when the message was sent."""
    path = (environ if environ is not None else os.environ).get("NOTIFY_SOCKET", "")
    if not path:
        return False
    if path[0] not in ("/", "@"):
        log.warning("NOTIFY_SOCKET %r: not a unix socket path, not notifying", path)
        return False
    addr = "\0" + path[1:] if path[0] == "@" else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as e:
        log.warning("sd_notify %s to %s failed: %s", state, path, e)
        return False
    return True
