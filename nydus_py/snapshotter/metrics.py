"""The snapshotter's Prometheus metrics (`[metrics] address`): its own, and every daemon's.

On each scrape: `nydus_snapshotter_images{mode}`, `nydus_snapshotter_daemon_up{image_ref,
image_id,mode}`, then each dedicated nydusd's `/metrics` (over its API socket) labelled with its
image, and the shared supervisor's (already labelled `mountpoint`, plus `daemon="shared"`).
A daemon that does not answer is only `daemon_up 0`: one slow daemon does not fail the scrape.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from nydus_py import prometheus
from nydus_py.snapshotter.process import is_live_mount, pid_alive
from nydus_py.snapshotter.remote import SHARED

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from nydus_py.snapshotter.daemons import DaemonManager

log = logging.getLogger("nydus_py.snapshotter.metrics")


def collect(daemons: "DaemonManager") -> list["Metric"]:
    from prometheus_client.core import GaugeMetricFamily

    from nydus_py.daemon.api import call_sync
    records = daemons.store.images()
    images = GaugeMetricFamily("nydus_snapshotter_images", "nydus-py images served, by daemon mode",
                               labels=["mode"])
    up = GaugeMetricFamily("nydus_snapshotter_daemon_up",
                           "1 when the image's nydusd is running and its mount answers",
                           labels=["image_ref", "image_id", "mode"])
    counts: dict[str, int] = {}
    groups: list[list[Metric]] = []
    for rec in records:
        mode = daemons.mode_of(rec)
        counts[mode] = counts.get(mode, 0) + 1
        alive = is_live_mount(rec.mountpoint) and (mode == SHARED or pid_alive(rec.pid, rec.mountpoint))
        up.add_metric([rec.ref, rec.id, mode], 1 if alive else 0)
        sock = daemons.api_sock(rec.id)
        if mode == SHARED or not alive or not sock.exists():
            continue
        try:
            status, body = call_sync(str(sock), "GET", "/metrics", timeout=5)
            if status == 200:
                groups.append(prometheus.parse(body.decode(), {"image_ref": rec.ref, "image_id": rec.id}))
        except (OSError, ValueError) as e:
            log.debug("metrics of nydusd for %s: %s", rec.ref, e)
    for mode in sorted(counts):
        images.add_metric([mode], counts[mode])
    if counts.get(SHARED) and os.path.exists(daemons.shared.apisock):
        try:
            status, body = call_sync(str(daemons.shared.apisock), "GET", "/metrics", timeout=10)
            if status == 200:
                groups.append(prometheus.parse(body.decode(), {"daemon": "shared"}))
        except (OSError, ValueError) as e:
            log.debug("metrics of the shared nydusd: %s", e)
    return prometheus.merge([[images, up], *groups])
