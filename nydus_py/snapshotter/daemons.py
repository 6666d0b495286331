"""The nydusd serving each image: start, re-attach after a snapshotter restart, recover
dead ones (monitor thread), release and clean up (remote.py's docstring has the modes)."""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

from nydus_py.errors import NydusError
from nydus_py.oci.auth import Credentials
from nydus_py.format.limits import MAX_BOOTSTRAP_SIZE as MAX_BOOTSTRAP
from nydus_py.oci.reference import parse as parse_reference
from nydus_py.snapshotter import cri
from nydus_py.snapshotter.process import (is_live_mount, is_mounted, nydusd_env, pid_alive, read_pid,
                                          terminate, unmount)
from nydus_py.snapshotter.config import host_mirrors, merge_template
from nydus_py.snapshotter.remote import DEDICATED, SHARED, RemoteConfig, RemoteError, RemoteLayer
from nydus_py.snapshotter.resolver import Resolver
from nydus_py.snapshotter.shared import SharedDaemon
from nydus_py.snapshotter.store import ImageRecord, Store

log = logging.getLogger("nydus_py.snapshotter.remote")


class DaemonManager:
    """Starts, re-attaches to, recovers and stops the nydusd serving each image.

    `config.daemon_mode` picks how a *new* image is served: "dedicated" (one `nydusd mount
    --daemon` per image) or "shared" (one mount in the shared supervisor). An image keeps
    the mode it was started in (ImageRecord.state["mode"]), so changing the option never
    disturbs the daemons of running containers."""

    def __init__(self, config: RemoteConfig, store: Store, resolver: Resolver):
        self.config = config
        self.store = store
        self.resolver = resolver
        self.shared = SharedDaemon(config)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._monitor: threading.Thread | None = None
        self._starter: threading.Thread | None = None
        self._stopping = threading.Event()

    def _lock(self, image_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(image_id, threading.Lock())

    def image_dir(self, image_id: str) -> Path:
        return self.config.root / "images" / image_id

    def api_sock(self, image_id: str) -> Path:
        """A dedicated nydusd's API socket: ROOT/api/<id[:32]>.sock, not in the image dir, since
        ROOT/images/<64 hex>/api.sock under the default root is longer than a unix socket path
        may be (108 bytes)."""
        return self.config.root / "api" / f"{image_id[:32]}.sock"

    def mountpoint(self, image_id: str) -> Path:
        return self.config.root / "mnt" / image_id

    @staticmethod
    def mode_of(rec: ImageRecord) -> str:
        return rec.state.get("mode", DEDICATED)

    # -- bring up ---------------------------------------------------------------------------
    def ensure(self, layer: RemoteLayer) -> Path:
        """The image's bootstrap fetched and nydusd serving it; returns the mountpoint."""
        image_id = layer.image_id
        refused = False
        try:
            with self._lock(image_id):
                rec = self.store.get_image(image_id)
                if rec is not None and self._healthy(rec):
                    return Path(rec.mountpoint)
                if rec is not None:
                    return Path(self._start(rec).mountpoint)
                try:
                    rec = self._prepare_image(layer)
                    return Path(self._start(rec).mountpoint)
                except BaseException:
                    # refused (bootstrap digest, nydusd rejecting the bootstrap, a daemon that
                    # does not start): no image dir, mountpoint, socket or record stays behind
                    refused = True
                    self._forget(image_id, self.store.get_image(image_id))
                    raise
        finally:
            if refused and self.config.daemon_mode == SHARED:
                self._stop_idle_shared()        # what it cached goes; the supervisor stays

    def _prepare_image(self, layer: RemoteLayer) -> ImageRecord:
        image_id = layer.image_id
        d = self.image_dir(image_id)
        d.mkdir(mode=0o700, exist_ok=True)      # holds nydusd.json (credentials), and its cache/
        boot = d / "bootstrap"
        if not boot.exists():
            self._fetch_bootstrap(layer, boot)
        ref = layer.ref
        rec = ImageRecord(id=image_id, ref=str(ref), manifest_digest=layer.manifest_digest,
                          bootstrap_digest=layer.digest, mountpoint=str(self.mountpoint(image_id)), pid=0,
                          state={"bootstrap": str(boot), "config": str(d / "nydusd.json"),
                                 "mode": self.config.daemon_mode,
                                 "registry": {"host": ref.host, "api_host": ref.api_host,
                                              "repo": ref.repository,
                                              "scheme": self.resolver.scheme(ref.api_host)}})
        self.store.put_image(rec)
        return rec

    def _config_doc(self, rec: ImageRecord) -> dict:
        """nydusd's config for the image, with credentials resolved now (a rotated password
        in the docker config is picked up by the next daemon start)."""
        reg = rec.state["registry"]
        backend: dict = {"host": reg["api_host"], "repo": reg["repo"], "scheme": reg["scheme"]}
        if self.config.skip_verify:
            backend["skip_verify"] = True
        creds = self._credentials(rec)
        if creds is not None and creds.has_basic:
            backend["auth"] = base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
        if creds is not None and creds.registry_token:
            backend["registry_token"] = creds.registry_token
        mirrors = host_mirrors(self.config.mirrors_config_dir, reg["host"]) if self.config.mirrors_config_dir else None
        if mirrors:
            backend["mirrors"] = mirrors
        work = self.shared.cache_dir if self.mode_of(rec) == SHARED else self.image_dir(rec.id) / "cache"
        # digest_validate false: the cache is keyed by chunk table, so images cannot poison each
        # other (docs/operations.md "Trust model"); true would sha256 every cache hit
        template = self.config.nydusd_template or {"mode": "direct", "digest_validate": False}
        doc = merge_template(template, backend, str(work))
        # nydusd gets the bootstrap file, not the image: name its manifest, whose referrers
        # are the image's learned prefetch lists (as `nydusd mount --image` finds them)
        doc.setdefault("learned_prefetch", {})["image_manifest"] = rec.manifest_digest
        return doc

    def _credentials(self, rec: ImageRecord) -> Credentials | None:
        """A CRI pull secret (kept with the image, so it survives a snapshotter restart:
        cri.py), else IMAGE_PULL_AUTH / the docker config."""
        ref = parse_reference(rec.ref)
        creds = self.resolver.keychain.get(ref)
        if creds is not None:
            cri.keep(self.image_dir(rec.id), creds)
            return creds
        return cri.kept(self.image_dir(rec.id)) or self.resolver.credentials(ref)

    def _write_config(self, rec: ImageRecord) -> None:
        if "registry" not in rec.state:        # a record from before configs were rewritten
            return
        cfg_path = Path(rec.state["config"])
        tmp = cfg_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)   # may hold credentials
        with os.fdopen(fd, "w") as f:
            json.dump(self._config_doc(rec), f, indent=2)
        os.replace(tmp, cfg_path)

    def _fetch_bootstrap(self, layer: RemoteLayer, dest: Path) -> None:
        client = self.resolver.client(layer.ref)
        tmp = dest.with_suffix(".part")
        t0 = time.monotonic()
        if not 0 < layer.size <= MAX_BOOTSTRAP:     # the stream is held to this size, then verified
            raise RemoteError(f"{layer.ref}: bootstrap {layer.digest}: descriptor size {layer.size} "
                              f"is not in 1..{MAX_BOOTSTRAP}")
        try:
            with client.get_blob(layer.ref.repository, layer.digest, layer.size) as r, open(tmp, "wb") as f:
                while True:
                    buf = r.read(1 << 20)
                    if not buf:
                        break
                    f.write(buf)
            os.replace(tmp, dest)
        except (NydusError, OSError) as e:
            tmp.unlink(missing_ok=True)
            raise RemoteError(f"{layer.ref}: cannot fetch bootstrap {layer.digest}: {e}") from None
        log.info("fetched bootstrap %s of %s (%d bytes, %.2fs)", layer.digest, layer.ref,
                 dest.stat().st_size, time.monotonic() - t0)

    def _command(self, rec: ImageRecord) -> list[str]:
        d = self.image_dir(rec.id)
        cmd = [*self.config.nydusd, "mount", "--bootstrap", rec.state["bootstrap"], "--config", rec.state["config"],
               "--daemon", "--pid-file", str(d / "nydusd.pid"), "--log-file", str(d / "nydusd.log"),
               "--apisock", str(self.api_sock(rec.id)),    # metrics for the snapshotter's scrapes
               "--log-level", self.config.log_level]
        if self.config.allow_other:
            cmd.append("--allow-other")
        if self.config.suid:
            cmd.append("--suid")
        if self.config.recover_policy == "failover":
            # pid file = the supervisor, which keeps the FUSE fd and replaces a dead daemon
            # (its socket may be long: takeover.sun_path reaches it through /proc/self/fd)
            cmd += ["--failover", "--supervisor", str(d / "supervisor.sock"), "--id", rec.id]
        return [*cmd, rec.mountpoint]

    def _start(self, rec: ImageRecord) -> ImageRecord:
        mnt = Path(rec.mountpoint)
        if not (self.config.recover_policy == "failover" and self.mode_of(rec) == SHARED
                and is_live_mount(mnt)):
            self._stop_process(rec)
            unmount(mnt)
        # else: the shared nydusd died but the image's failover mount lives on; the new one
        # adopts it (nydusd serve --failover), so running containers keep their rootfs
        mnt.mkdir(mode=0o755, exist_ok=True)    # explicit: the umask may be 000
        self.api_sock(rec.id).parent.mkdir(mode=0o700, exist_ok=True)
        if self.mode_of(rec) == SHARED:
            return self._start_shared(rec)
        self._write_config(rec)
        pid_file = self.image_dir(rec.id) / "nydusd.pid"
        pid_file.unlink(missing_ok=True)
        cmd = self._command(rec)
        log.info("starting nydusd for %s: %s", rec.ref, " ".join(cmd))
        try:
            p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=self.config.daemon_timeout, start_new_session=True,
                               env=nydusd_env(self.config))
        except subprocess.TimeoutExpired:
            raise RemoteError(f"{rec.ref}: nydusd did not report ready within {self.config.daemon_timeout}s "
                              f"(log: {self.image_dir(rec.id) / 'nydusd.log'})") from None
        except OSError as e:
            raise RemoteError(f"{rec.ref}: cannot run nydusd {cmd[0]}: {e.strerror}") from None
        if p.returncode != 0:
            msg = (p.stderr or p.stdout).strip().splitlines()
            raise RemoteError(f"{rec.ref}: nydusd failed (exit {p.returncode}): {msg[-1] if msg else ''}")
        pid = read_pid(pid_file)
        # mounted is enough: `--daemon` exits 0 only once the FUSE loop runs. A statfs here (a
        # round trip to the daemon) waited ~20 ms behind its start-up work, in the Prepare.
        if not is_mounted(mnt):
            raise RemoteError(f"{rec.ref}: nydusd exited 0 but {mnt} is not mounted")
        rec = replace(rec, pid=pid)
        self.store.put_image(rec)
        log.info("nydusd pid %d serves %s at %s", pid, rec.ref, mnt)
        return rec

    def _start_shared(self, rec: ImageRecord) -> ImageRecord:
        self.shared.ensure_running()
        body = {"bootstrap": rec.state["bootstrap"], "config": self._config_doc(rec)}
        log.info("mounting %s at %s in the shared nydusd", rec.ref, rec.mountpoint)
        info = self.shared.mount(rec.mountpoint, body)
        # the supervisor answers once the mount's API (served by its FUSE loop) says RUNNING
        if not is_mounted(rec.mountpoint):
            raise RemoteError(f"{rec.ref}: the shared nydusd reported the mount but {rec.mountpoint} is not mounted")
        rec = replace(rec, pid=int(info.get("pid") or 0))
        self.store.put_image(rec)
        log.info("shared nydusd (pid %d, mount child %d) serves %s at %s", self.shared.pid(), rec.pid,
                 rec.ref, rec.mountpoint)
        return rec

    def _healthy(self, rec: ImageRecord) -> bool:
        if self.config.recover_policy == "none":
            return True         # never restart: the operator decides
        if self.mode_of(rec) == SHARED:
            m = self.shared.mounts().get(os.path.realpath(rec.mountpoint))
            return m is not None and m.get("state") == "RUNNING" and is_live_mount(rec.mountpoint)
        if is_live_mount(rec.mountpoint) and not pid_alive(rec.pid, rec.mountpoint) and \
                self.config.recover_policy == "failover":
            # the supervisor is gone but its daemon still serves the same connection: restarting
            # would unmount it under running containers
            log.warning("supervisor pid %d of %s is gone; its daemon still serves %s (no failover "
                        "until the image is started again)", rec.pid, rec.ref, rec.mountpoint)
            return True
        return pid_alive(rec.pid, rec.mountpoint) and is_live_mount(rec.mountpoint)

    # -- restart and recovery -----------------------------------------------------------------
    def reattach_all(self) -> None:
        """After a snapshotter (re)start: keep healthy daemons, restart broken ones, stop
        those no snapshot uses."""
        for rec in self.store.images():
            try:
                if self.store.image_users(rec.id) == 0:
                    self.release(rec.id)
                elif self._healthy(rec):
                    who = f"shared nydusd pid {self.shared.pid()}" if self.mode_of(rec) == SHARED else f"nydusd pid {rec.pid}"
                    log.info("re-attached to %s for %s at %s", who, rec.ref, rec.mountpoint)
                else:
                    log.warning("nydusd for %s (%s, pid %d) is gone or its mount is dead; restarting",
                                rec.ref, self.mode_of(rec), rec.pid)
                    with self._lock(rec.id):
                        self._start(rec)
            except NydusError as e:
                log.error("image %s: %s", rec.ref, e)
        self._stop_idle_shared()

    def recover(self) -> int:
        """One round of the liveness monitor: restart the daemon (in shared mode: the
        supervisor, then every mount) of each image in use whose mount is not healthy.
        Mounts the supervisor is restarting itself are left to it. Returns how many were
        restarted."""
        restarted = 0
        shared_mounts = self.shared.mounts()
        for rec in self.store.images():
            if self._stopping.is_set():
                break
            if self.mode_of(rec) == SHARED:
                m = shared_mounts.get(os.path.realpath(rec.mountpoint))
                if m is not None and m.get("state") in ("STARTING", "RESTARTING"):
                    continue
            with self._lock(rec.id):
                cur = self.store.get_image(rec.id)
                if cur is None or self.store.image_users(cur.id) == 0 or self._healthy(cur):
                    continue
                log.warning("nydusd for %s (%s) is gone or its mount is dead; restarting", cur.ref,
                            self.mode_of(cur))
                try:
                    self._start(cur)
                    restarted += 1
                except NydusError as e:
                    log.error("image %s: restart failed: %s", cur.ref, e)
        # shared mode keeps its supervisor up while idle too (start_shared): one that died with
        # no image in it is started again here, not in the next image's Prepare
        if self._starter is not None and not self._starter.is_alive() and \
                not self._stopping.is_set() and not self.shared.alive():
            log.warning("the shared nydusd is gone; starting it again")
            try:
                self.shared.ensure_running()
                restarted += 1
            except NydusError as e:
                log.error("%s", e)
        return restarted

    def start_shared(self) -> None:
        """Shared mode: start the supervisor now, in the background, as nydus-snapshotter
        starts its shared nydusd with the snapshotter. Started on the first image instead, that
        image's Prepare waited ~0.36 s for a new interpreter and its imports before its own
        mount (which, in a running supervisor, is a fork: ~0.1 s). A Prepare that arrives
        while this runs waits for it (SharedDaemon's lock) instead of starting another."""
        if self.config.daemon_mode != SHARED or self._starter is not None:
            return

        def run() -> None:
            try:
                self.shared.ensure_running()
            except NydusError as e:     # the next image tries again, and reports it
                log.error("%s (tried again at the next image)", e)
        self._starter = threading.Thread(target=run, name="shared-nydusd-start", daemon=True)
        self._starter.start()

    def start_monitor(self, interval: float) -> None:
        if interval <= 0 or self._monitor is not None:
            return

        def loop() -> None:
            while not self._stopping.wait(interval):
                try:
                    self.recover()
                except Exception:
                    log.exception("daemon monitor")
        self._monitor = threading.Thread(target=loop, name="nydusd-monitor", daemon=True)
        self._monitor.start()

    def close(self) -> None:
        """Stop the monitor; the daemons keep running (they serve running containers), but a
        shared supervisor that serves no image stops with the snapshotter."""
        self._stopping.set()
        if self._monitor is not None:
            self._monitor.join(30)
        if self._starter is not None:
            self._starter.join(self.config.daemon_timeout + 5)
        self._stop_idle_shared()

    # -- tear down --------------------------------------------------------------------------
    def release(self, image_id: str) -> None:
        """Stop the image's nydusd (or its mount in the shared one), unmount, forget it and
        delete its files (and, shared, the cached blobs no other mount uses)."""
        with self._lock(image_id):
            rec = self.store.get_image(image_id)
            if rec is None:
                return
            self._forget(image_id, rec)
            log.info("released image %s (%s)", rec.ref, image_id)
        if self.mode_of(rec) == SHARED:
            self._stop_idle_shared()

    def _forget(self, image_id: str, rec: ImageRecord | None) -> None:
        """Under the image's lock: stop its daemon, unmount, delete its files and record."""
        mountpoint = Path(rec.mountpoint) if rec is not None else self.mountpoint(image_id)
        if rec is not None:
            self._stop_process(rec)
        self._kill_stray(self.image_dir(image_id))     # one that outlived a failed start
        unmount(mountpoint)
        try:
            os.rmdir(mountpoint)
        except OSError:
            pass
        shutil.rmtree(self.image_dir(image_id), ignore_errors=True)
        self.api_sock(image_id).unlink(missing_ok=True)
        if rec is not None:
            self.store.delete_image(image_id)

    def _stop_idle_shared(self) -> None:
        """Drop cached blobs no mount uses. The supervisor stays up while the snapshotter runs
        in shared mode (as nydus-snapshotter's shared nydusd does), so the next image costs a
        fork instead of a new interpreter; it stops when no image needs it and the snapshotter
        is stopping or runs in another mode."""
        with self.shared._lock:
            if any(self.mode_of(r) == SHARED for r in self.store.images()) or \
                    (self.config.daemon_mode == SHARED and not self._stopping.is_set()):
                self.gc_shared_cache()
                return
            if self.shared.pid() or self.shared._proc is not None:
                log.info("no image uses the shared nydusd any more; stopping it")
                self.shared.stop()
            shutil.rmtree(self.shared.state_dir, ignore_errors=True)
            shutil.rmtree(self.shared.cache_dir, ignore_errors=True)

    def gc_shared_cache(self) -> None:
        if not self.shared.cache_dir.is_dir():
            return
        from nydus_py.cache.gc import collect
        # as nydus-snapshotter removes a layer's blob cache with its snapshot: everything no
        # running image uses goes, learned prefetch lists and kept bootstraps too
        report = collect(self.shared.cache_dir, 0, image_max_age=0)
        if report.removed_blobs or report.removed_images:
            log.info("shared cache: removed %d unused blobs and the state of %d unused images "
                     "(%d bytes)", len(report.removed_blobs), len(report.removed_images),
                     report.removed_bytes)

    def cleanup(self) -> None:
        """Containerd's Cleanup: free every daemon, mount and directory no snapshot needs:
        images without users; image/mountpoint directories and stray mounts with no record
        (a crash between steps); shared-daemon mounts of unknown images; unused cache."""
        for rec in self.store.images():
            if self.store.image_users(rec.id) == 0:
                self.release(rec.id)
        known = {r.id for r in self.store.images()}
        known_mps = {os.path.realpath(r.mountpoint) for r in self.store.images()}
        for mp in self.shared.mounts():
            if mp not in known_mps:
                log.info("cleanup: unmounting %s from the shared nydusd (no image record)", mp)
                self.shared.umount(mp)
        for sub in ("images", "mnt"):        # stray daemons first, then their mountpoints
            base = self.config.root / sub
            if not base.is_dir():
                continue
            for d in base.iterdir():
                if d.name in known:
                    continue
                log.info("cleanup: removing %s (no image record)", d)
                with self._lock(d.name):
                    if self.store.get_image(d.name) is not None:     # appeared meanwhile (a pull)
                        continue
                    self._remove_stray(sub, d)
        api = self.config.root / "api"
        if api.is_dir():
            for sock in api.iterdir():        # a stale socket costs only a scrape's miss
                if sock.name not in {self.api_sock(r.id).name for r in self.store.images()}:
                    sock.unlink(missing_ok=True)
        self._stop_idle_shared()

    def _remove_stray(self, sub: str, d: Path) -> None:
        if sub == "mnt":
            try:
                unmount(d)
                os.rmdir(d)
            except (OSError, NydusError) as e:
                log.warning("cleanup: %s: %s", d, e)
        else:
            self._kill_stray(d)
            shutil.rmtree(d, ignore_errors=True)

    def _kill_stray(self, image_dir: Path) -> None:
        """A dedicated nydusd whose record is gone still has its pid file in the image dir."""
        mp = str(self.mountpoint(image_dir.name))
        try:
            pid = int((image_dir / "nydusd.pid").read_text().strip())
        except (OSError, ValueError):
            return
        if pid_alive(pid, mp):
            terminate(pid, mp, 10.0)
        unmount(mp)

    def _stop_process(self, rec: ImageRecord, timeout: float = 10.0) -> None:
        if self.mode_of(rec) == SHARED:
            self.shared.umount(os.path.realpath(rec.mountpoint))
            return
        if pid_alive(rec.pid, rec.mountpoint):
            terminate(rec.pid, rec.mountpoint, timeout)
