"""The registry side of the benchmarks.

    Registry(root, addr)     docker-registry serving root/data on addr (optionally inside a netns)
    ShapedNet(rate, ...)     netns `nydperf` + veth pair 10.213.7.1 <-> 10.213.7.2, tc tbf each way
    DelayProxy(upstream, rtt)  TCP forwarder on 127.0.0.1 adding rtt/2 per direction (the kernel
                             has no netem), counting bytes; clients talk to proxy.host

Every object is a context manager and removes what it created (processes, netns, qdiscs).
"""

from __future__ import annotations

import asyncio
import http.client
import os
import secrets
import socket
import subprocess
import threading
import time
from pathlib import Path

from .util import run

NETNS = "nydperf"
HOST_IF, NS_IF = "nydp0", "nydp1"
HOST_IP, NS_IP = "10.213.7.1", "10.213.7.2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    def __init__(self, root: Path, *, addr: str = "127.0.0.1", port: int | None = None,
                 netns: str | None = None, name: str = "registry"):
        self.root, self.addr, self.netns, self.name = Path(root), addr, netns, name
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.access_log_path = self.root / f"{name}.access.log"

    @property
    def host(self) -> str:
        return f"{self.addr}:{self.port}"

    def __enter__(self) -> "Registry":
        self.root.mkdir(parents=True, exist_ok=True)
        cfg = self.root / f"{self.name}.yml"
        cfg.write_text("\n".join([
            "version: 0.1", "log:", "  level: warn", "  accesslog:", "    disabled: false",
            "storage:", "  filesystem:", f"    rootdirectory: {self.root / 'data'}",
            "  delete:", "    enabled: true", "  maintenance:", "    uploadpurging:", "      enabled: false",
            "http:", f"  addr: {self.host}", f"  secret: {secrets.token_hex(16)}", ""]))
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        argv = ["docker-registry", "serve", str(cfg)]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        with open(self.access_log_path, "ab") as out, open(self.root / f"{self.name}.err.log", "ab") as err:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited {self.proc.returncode}")
            try:
                c = http.client.HTTPConnection(self.addr, self.port, timeout=1)
                c.request("GET", "/v2/")
                c.getresponse().read()
                c.close()
                return self
            except OSError:
                time.sleep(0.05)
        self.__exit__()
        raise RuntimeError(f"registry on {self.host} did not come up")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log_lines(self) -> int:
        try:
            with open(self.access_log_path, "rb") as f:
                return sum(1 for line in f if b'"GET ' in line or b'"HEAD ' in line)
        except FileNotFoundError:
            return 0


class ShapedNet:
    """A network namespace reached over a veth pair capped with tbf in both directions."""

    def __init__(self, rate_mbit: int):
        self.rate = rate_mbit
        self.up = False

    def __enter__(self) -> "ShapedNet":
        subprocess.run(["ip", "netns", "del", NETNS], stderr=subprocess.DEVNULL)   # stale
        try:
            run(["ip", "netns", "add", NETNS])
            self.up = True
            run(["ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF])
            run(["ip", "link", "set", NS_IF, "netns", NETNS])
            run(["ip", "addr", "add", f"{HOST_IP}/30", "dev", HOST_IF])
            run(["ip", "link", "set", HOST_IF, "up"])
            run(["ip", "-n", NETNS, "addr", "add", f"{NS_IP}/30", "dev", NS_IF])
            run(["ip", "-n", NETNS, "link", "set", NS_IF, "up"])
            run(["ip", "-n", NETNS, "link", "set", "lo", "up"])
            # burst must hold a GSO super-packet (64 KiB) and rate/HZ; latency bounds the queue
            burst = max(128 * 1024, self.rate * 1_000_000 // 8 // 100)
            for ns in (None, NETNS):
                dev = NS_IF if ns else HOST_IF
                pre = ["ip", "netns", "exec", ns] if ns else []
                run([*pre, "tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{self.rate}mbit",
                     "burst", str(burst), "latency", "100ms"])
        except Exception:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.up:
            subprocess.run(["ip", "link", "del", HOST_IF], stderr=subprocess.DEVNULL)
            subprocess.run(["ip", "netns", "del", NETNS], stderr=subprocess.DEVNULL)
            self.up = False


class DelayProxy:
    """127.0.0.1:PORT → upstream, each byte delayed by rtt/2 in each direction (order and
    throughput kept: data is queued with a release time, not slept on), plus one rtt before
    the upstream connection (the TCP handshake). Counts bytes each way."""

    def __init__(self, upstream: str, rtt_ms: float):
        self.up_host, up_port = upstream.rsplit(":", 1)
        self.up_port = int(up_port)
        self.half = rtt_ms / 2000.0
        self.rtt = rtt_ms / 1000.0
        self.bytes_down = 0
        self.bytes_up = 0
        self.connections = 0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def reset(self) -> None:
        self.bytes_down = self.bytes_up = self.connections = 0

    def __enter__(self) -> "DelayProxy":
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("delay proxy did not start")
        return self

    def __exit__(self, *exc) -> None:
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread:
            self._thread.join(5)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0, limit=1 << 20)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()
            server.close()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            if self.rtt:
                await asyncio.sleep(self.rtt)
            ur, uw = await asyncio.open_connection(self.up_host, self.up_port, limit=1 << 20)
        except OSError:
            cw.close()
            return
        for w in (cw, uw):
            s = w.get_extra_info("socket")
            if s is not None:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(self._pipe(cr, uw, up=True), self._pipe(ur, cw, up=False),
                             return_exceptions=True)

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter, *, up: bool) -> None:
        q: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def reader() -> None:
            try:
                while True:
                    data = await r.read(1 << 18)
                    if up:
                        self.bytes_up += len(data)
                    else:
                        self.bytes_down += len(data)
                    q.put_nowait((loop.time() + self.half, data))
                    if not data:
                        return
            except (ConnectionError, OSError):
                q.put_nowait((0.0, b""))

        async def writer() -> None:
            try:
                while True:
                    due, data = await q.get()
                    wait = due - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    if not data:
                        if w.can_write_eof():
                            w.write_eof()
                        return
                    w.write(data)
                    await w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                rt.cancel()

        rt = asyncio.ensure_future(reader())
        try:
            await writer()
        finally:
            try:
                w.close()
            except Exception:
                pass
