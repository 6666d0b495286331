"""Which way a registry request goes: Dragonfly proxy, mirrors, origin (nydusd's `registry.proxy`
and `registry.mirrors`).

A `RegistryRouter` holds one `RegistryClient` per route, each with its own connection pool and
auth state (a mirror's 401 challenge must not overwrite the origin's), all built from the
origin's `RegistryConfig`:

    proxy    same host and scheme as the origin (http when `use_http`), sent through `proxy.url`
             as an HTTP forward proxy, which is how nydusd talks to Dragonfly's dfdaemon: the
             proxy sees the original registry URL and the registry's Authorization header, so
             it can fetch from the origin itself and cache per blob
    mirrors  the origin's request with the host (and scheme) replaced by the mirror's, plus the
             mirror's extra `headers`; the origin's credentials are used for the mirror's own
             auth challenge, as nydusd does
    origin   the configured registry

`call(what, fn)` runs `fn(client)` on each candidate route in turn and returns the first result:

  * proxy healthy: the proxy first. A transient failure (connection error, timeout, 5xx, short
    body) falls back to the next route when `fallback` is true, and is raised otherwise; a
    permanent answer (404, 401/403, bad range) is the origin's answer relayed, and is raised.
  * proxy unhealthy (its `ping_url` failed): skipped when `fallback`, else the call fails with
    a transient BackendError.
  * mirrors, in order, skipping unhealthy ones. Any error moves on to the next route; transient
    ones count towards `failure_limit`, and a mirror that reaches it is unhealthy until its
    `ping_url` (default `<host>/v2`) answers with a status below 500. A success resets the count.
  * origin last; its error is the call's error.

Routes carry `retry_limit=0`: a route is tried once per call and retries belong to the caller
(the backend's RetryingBackend), so a retry re-runs the whole route choice.

Health checks run in one daemon thread per router, started only when some route has a ping URL
and stopped by `close()`: the proxy is pinged every `check_interval` seconds (2xx/3xx is healthy,
as nydusd), an unhealthy mirror every `health_check_interval` seconds.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import requests

from nydus_py.config.parse import split_host
from nydus_py.config.schema import MirrorConfig, ProxyConfig
from nydus_py.errors import BackendError
from nydus_py.oci.registry import RegistryClient, RegistryConfig

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Route:
    kind: str                      # "proxy" | "mirror" | "origin"
    name: str                      # for logs and messages
    client: RegistryClient
    ping_url: str = ""
    interval: float = 5.0
    failure_limit: int = 0         # 0: never taken out by request failures
    healthy: bool = True
    failures: int = 0
    next_check: float = 0.0


class RegistryRouter:
    """Routes for one registry; thread-safe. See the module docstring."""

    def __init__(self, origin: RegistryConfig, *, mirrors: list[MirrorConfig] | tuple = (),
                 proxy: ProxyConfig | None = None, clock: Callable[[], float] = time.monotonic):
        self.origin_config = origin
        self.proxy_config = proxy
        self._clock = clock
        self._lock = threading.Lock()
        base = dataclasses.replace(origin, retry_limit=0)
        self.proxy: Route | None = None
        if proxy is not None:
            cfg = dataclasses.replace(base, proxy=proxy.url,
                                      scheme="http" if proxy.use_http else origin.scheme)
            self.proxy = Route("proxy", f"proxy {proxy.url}", RegistryClient(config=cfg),
                               ping_url=proxy.ping_url, interval=proxy.check_interval)
        self.mirrors: list[Route] = []
        for m in mirrors:
            scheme, host = split_host(m.host, origin.scheme, f"mirror {m.host!r}")
            cfg = dataclasses.replace(base, host=host, scheme=scheme,
                                      headers=tuple(sorted(m.headers.items())))
            self.mirrors.append(Route("mirror", f"mirror {scheme}://{host}", RegistryClient(config=cfg),
                                      ping_url=m.ping_url or f"{scheme}://{host}/v2",
                                      interval=m.health_check_interval, failure_limit=m.failure_limit))
        self.origin = Route("origin", f"registry {origin.scheme}://{origin.host}",
                            RegistryClient(config=base))
        self._ping_session = requests.Session()
        self._ping_session.trust_env = False
        self._ping_timeout = (origin.connect_timeout, origin.connect_timeout)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if (self.proxy is not None and self.proxy.ping_url) or self.mirrors:
            self._thread = threading.Thread(target=self._health_loop, name="nydus-registry-health",
                                            daemon=True)
            self._thread.start()

    def __repr__(self) -> str:
        return f"RegistryRouter({', '.join(r.name for r in self.routes())})"

    def routes(self) -> list[Route]:
        return ([self.proxy] if self.proxy else []) + self.mirrors + [self.origin]

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        for r in self.routes():
            r.client.close()
        self._ping_session.close()

    # ---------------------------------------------------------------------------- routing

    def call(self, what: str, fn: Callable[[RegistryClient], T]) -> T:
        proxy = self.proxy
        fallback = self.proxy_config.fallback if self.proxy_config else True
        if proxy is not None:
            with self._lock:
                healthy = proxy.healthy
            if healthy:
                try:
                    return fn(proxy.client)
                except BackendError as e:
                    if e.permanent or not fallback:
                        raise
                    log.warning("%s: %s failed (%s); falling back", what, proxy.name, e)
            elif not fallback:
                raise BackendError(f"{what}: {proxy.name} is unhealthy (ping {proxy.ping_url} failed) "
                                   "and fallback is disabled", permanent=False)
        for m in self.mirrors:
            with self._lock:
                if not m.healthy:
                    continue
            try:
                result = fn(m.client)
            except BackendError as e:
                self._mirror_failed(m, e, what)
                continue
            with self._lock:
                m.failures = 0
            return result
        return fn(self.origin.client)

    def _mirror_failed(self, m: Route, e: BackendError, what: str) -> None:
        log.warning("%s: %s failed (%s); trying the next route", what, m.name, e)
        if e.permanent:
            return
        with self._lock:
            m.failures += 1
            if m.healthy and m.failures >= m.failure_limit:
                m.healthy = False
                m.next_check = self._clock() + m.interval
                log.warning("%s is unhealthy after %d failures; skipped until %s answers",
                            m.name, m.failures, m.ping_url)

    # ---------------------------------------------------------------------------- health

    def _health_loop(self) -> None:
        intervals = [r.interval for r in self.routes() if r.ping_url]
        tick = max(0.02, min(intervals) / 4)
        while not self._stop.wait(tick):
            now = self._clock()
            for r in self.routes():
                if not r.ping_url or r.next_check > now:
                    continue
                if r.kind == "mirror":
                    with self._lock:
                        if r.healthy:
                            continue
                ok = self.ping(r)
                with self._lock:
                    r.next_check = self._clock() + r.interval
                    if ok != r.healthy:
                        log.warning("%s is %s", r.name, "healthy again" if ok else "unhealthy")
                    r.healthy = ok
                    if ok:
                        r.failures = 0

    def ping(self, r: Route) -> bool:
        """One health probe of route `r`: proxy 2xx/3xx, mirror < 500 (a 401 from /v2 is alive)."""
        cfg = r.client.config
        verify: bool | str = cfg.ca_file or not cfg.skip_verify
        try:
            resp = self._ping_session.get(r.ping_url, timeout=self._ping_timeout, verify=verify,
                                          allow_redirects=False)
            resp.close()
        except requests.RequestException:
            return False
        if r.kind == "proxy":
            return 200 <= resp.status_code < 400
        return resp.status_code < 500
