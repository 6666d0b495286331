"""--daemon-mode shared: the one `nydusd serve` supervisor of all images."""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from urllib.parse import quote

from nydus_py.snapshotter.process import nydusd_env, pid_alive, terminate
from nydus_py.snapshotter.remote import RemoteConfig, RemoteError

log = logging.getLogger("nydus_py.snapshotter.remote")


class SharedDaemon:
    """Shared mode: the one `nydusd serve` supervisor of all images (ROOT/shared/).

    Started in a session of its own, so it outlives the snapshotter; found again after a
    restart by its pid file, its command line (which names our API socket) and its API. Each
    image is one `POST /api/v1/mount` (the supervisor runs one FUSE child per mount: pyfuse3
    serves one mount per process), and all mounts share ROOT/shared/cache. When the
    supervisor dies its children get SIGTERM and unmount; the snapshotter starts a new
    supervisor and mounts every image in use again (DaemonManager.recover)."""

    def __init__(self, config: RemoteConfig):
        self.config = config
        self.dir = config.root / "shared"
        self.apisock = self.dir / "api.sock"
        self.pid_file = self.dir / "nydusd.pid"
        self.state_dir = self.dir / "state"
        self.cache_dir = self.dir / "cache"
        self.log_file = self.dir / "nydusd.log"
        self._proc: subprocess.Popen | None = None
        self._lock = threading.RLock()

    def pid(self) -> int:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return 0

    def _process_alive(self) -> bool:
        if self._proc is not None:
            self._proc.poll()                      # reap our own child: no zombie passes for alive
        return pid_alive(self.pid(), str(self.apisock))

    def call(self, method: str, target: str, body: object = None, timeout: float = 10.0) -> tuple[int, object]:
        from nydus_py.daemon.api import get_json
        return get_json(str(self.apisock), target, method, body, timeout)

    def alive(self) -> bool:
        if not self._process_alive():
            return False
        try:
            status, info = self.call("GET", "/api/v1/daemon", timeout=5)
        except OSError:
            return False
        return status == 200 and isinstance(info, dict) and info.get("state") == "RUNNING"

    def ensure_running(self) -> bool:
        """Start the supervisor unless it is running; True when it was (re)started."""
        with self._lock:
            if self.alive():
                return False
            self._stop_process()
            for d in (self.dir, self.state_dir, self.cache_dir):
                d.mkdir(parents=True, exist_ok=True)
                os.chmod(d, 0o700)      # whatever the umask: nydusd refuses writable dirs
            self.apisock.unlink(missing_ok=True)
            cmd = [*self.config.nydusd, "serve", "--apisock", str(self.apisock), "--id", "nydus-py-shared",
                   "--state-dir", str(self.state_dir), "--cache-dir", str(self.cache_dir),
                   "--log-file", str(self.log_file), "--log-level", self.config.log_level]
            if self.config.recover_policy == "failover":
                cmd.append("--failover")
            log.info("starting shared nydusd: %s", " ".join(cmd))
            err_path = self.dir / "nydusd.err"
            try:
                with open(err_path, "ab") as err:
                    self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                                  start_new_session=True, env=nydusd_env(self.config))
            except OSError as e:
                raise RemoteError(f"cannot run nydusd {cmd[0]}: {e.strerror}") from None
            self.pid_file.write_text(f"{self._proc.pid}\n")
            deadline = time.monotonic() + self.config.daemon_timeout
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    tail = err_path.read_text(errors="replace").strip().splitlines()[-1:]
                    raise RemoteError(f"shared nydusd exited {self._proc.returncode}: {tail[0] if tail else ''}")
                if self.apisock.exists() and self.alive():
                    log.info("shared nydusd pid %d serving %s", self._proc.pid, self.apisock)
                    return True
                time.sleep(0.05)
            self._stop_process()
            raise RemoteError(f"shared nydusd not ready within {self.config.daemon_timeout}s (log: {self.log_file})")

    def mounts(self) -> dict[str, dict]:
        """mountpoint → the supervisor's view of it ({} when it is not running)."""
        if not self._process_alive():
            return {}
        try:
            status, items = self.call("GET", "/api/v1/mount", timeout=5)
        except OSError:
            return {}
        return {m["mountpoint"]: m for m in items} if status == 200 and isinstance(items, list) else {}

    def mount(self, mountpoint: str, body: dict) -> dict:
        """POST the mount; the body carries the config (maybe with registry auth): it goes over
        the 0600 socket only and is never logged."""
        try:
            status, info = self.call("POST", f"/api/v1/mount?mountpoint={quote(mountpoint)}", body,
                                     timeout=self.config.daemon_timeout + 5)
        except OSError as e:
            raise RemoteError(f"shared nydusd API {self.apisock}: {e}") from None
        if status != 200 or not isinstance(info, dict):
            msg = info.get("message") if isinstance(info, dict) else info
            raise RemoteError(f"shared nydusd could not mount {mountpoint}: {msg}")
        return info

    def umount(self, mountpoint: str) -> None:
        if not self._process_alive():
            return
        try:
            status, info = self.call("DELETE", f"/api/v1/mount?mountpoint={quote(mountpoint)}", timeout=30)
        except OSError as e:
            log.warning("shared nydusd: unmount of %s failed: %s", mountpoint, e)
            return
        if status not in (204, 404):
            log.warning("shared nydusd: unmount of %s answered %s: %s", mountpoint, status, info)

    def stop(self) -> None:
        """Unmount everything and exit (PUT /api/v1/daemon/exit), SIGKILL after a timeout."""
        with self._lock:
            if self._process_alive():
                try:
                    self.call("PUT", "/api/v1/daemon/exit", timeout=5)
                except OSError:
                    pass
            self._stop_process(grace=25.0)
            self.pid_file.unlink(missing_ok=True)
            self.apisock.unlink(missing_ok=True)

    def _stop_process(self, grace: float = 10.0) -> None:
        pid = self.pid()
        if pid_alive(pid, str(self.apisock)):
            terminate(pid, str(self.apisock), grace)
        if self._proc is not None:
            try:
                self._proc.wait(1)
            except subprocess.TimeoutExpired:
                pass
            self._proc = None
