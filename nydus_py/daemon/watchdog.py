"""Once a daemon is stopping, it ends within a bounded time whatever is in flight.

Cancelling trio tasks does not interrupt a worker thread: a read or a prefetch stuck in a
backend that never answers (a hung NFS blob dir, a registry that stops sending) would keep
trio.run, and so `nydusd mount` and its mount, alive forever after SIGTERM; and a
`nydusd serve` waits for mount children that may not end at all. `arm()` (on a stop signal or
an external unmount) starts a timer thread that, after `grace` seconds, calls `before_exit`
(the supervisor kills its children there), detaches the mountpoints (`fusermount3 -u -z`: the
kernel fails the stuck requests) and exits with status 1; `cancel()` (a normal end) stops it.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable, Iterable

from nydus_py import mountinfo

log = logging.getLogger(__name__)

MOUNT_GRACE = 5.0       # seconds from a stop signal (or external unmount) to `nydusd mount`'s forced exit


class StopWatchdog:
    def __init__(self, mountpoints: Callable[[], Iterable[str]], grace: float, *,
                 before_exit: Callable[[], None] | None = None):
        self.mountpoints = mountpoints
        self.grace = grace
        self.before_exit = before_exit
        self._timer: threading.Timer | None = None

    def arm(self) -> None:
        if self._timer is None:
            self._timer = threading.Timer(self.grace, self._fire)
            self._timer.daemon = True
            self._timer.start()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _fire(self) -> None:
        mountpoints = list(self.mountpoints())
        log.error("shutdown did not finish within %.0f s (requests stuck in the backend?): "
                  "detaching %s and exiting", self.grace, ", ".join(mountpoints) or "nothing")
        try:
            if self.before_exit is not None:
                self.before_exit()
            for mp in mountpoints:
                mountinfo.lazy_unmount(mp)
        finally:
            logging.shutdown()
            os._exit(1)
