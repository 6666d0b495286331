"""nydus-py images behind containerd: which layers are ours, and the nydusd serving each image.

Which layer is which. containerd passes a layer's descriptor annotations to Prepare as labels
only when they start with `containerd.io/snapshot/` (plus `containerd.io/snapshot.ref`, the
layer's chain id). So the `io.nydus-py.*` annotations never arrive as such; what does arrive,
when the client uses containerd's AppendInfoHandlerWrapper (CRI, nerdctl) or stargz's
(`ctr-remote image rpull`), is the image reference, the layer digest and (CRI) the manifest
digest. We fetch the manifest once (cached), find the layer, and decide from its media type
and annotations (docs/format.md). A converter may also put the hint labels `HINT_BLOB` /
`HINT_BOOTSTRAP` straight on the layer descriptors; they pass containerd's filter.

The daemons (`--daemon-mode`, nydus-snapshotter's names). "dedicated": one `nydusd mount
--daemon` per image. "shared": one `nydusd serve` supervisor for all images, each image one
mount in it (SharedDaemon). Either way the daemon runs in a session of its own, so it outlives
the snapshotter; what is needed to find or restart it lives in the store. On start the
snapshotter re-attaches to a daemon that is alive and whose mount is live, and restarts (after
a lazy unmount) one that is not; a monitor thread does the same every `recover_interval`
seconds while it runs.

`recover_policy` (nydus-snapshotter's names): "restart" restarts a dead daemon on a fresh mount
(running containers keep the dead one); "failover" starts every daemon under a supervisor that
keeps the FUSE connection (`nydusd mount --failover`, `nydusd serve --failover`;
daemon/takeover.py), so a dead daemon is replaced on the *same* mount by its supervisor and
running containers only pause; the snapshotter restarts only what lost its mount; "none" never
restarts anything.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import quote

from nydus_py.errors import ConfigError, NydusError
from nydus_py.format.limits import MAX_BOOTSTRAP_SIZE as MAX_BOOTSTRAP
from nydus_py.oci import mediatypes as mt
from nydus_py.oci.auth import resolve_credentials
from nydus_py.oci.layout import json_object
from nydus_py.oci.reference import Reference, parse as parse_reference
from nydus_py.oci.registry import RegistryClient, RegistryConfig
from nydus_py.snapshotter.store import REMOTE_BLOB, REMOTE_BOOTSTRAP, ImageRecord, Store

log = logging.getLogger("nydus_py.snapshotter.remote")

LABEL_TARGET = "containerd.io/snapshot.ref"
CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
CRI_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
STARGZ_REF = "containerd.io/snapshot/remote/stargz.reference"
STARGZ_DIGEST = "containerd.io/snapshot/remote/stargz.digest"
HINT_BLOB = "containerd.io/snapshot/nydus-py.blob"
HINT_BOOTSTRAP = "containerd.io/snapshot/nydus-py.bootstrap"
LABEL_REMOTE = "containerd.io/snapshot/remote"          # set on our remote snapshots
LABEL_IMAGE = "containerd.io/snapshot/nydus-py.image"   # image id, on bootstrap snapshots

BLOB_TYPES = {mt.NYDUS_PY_BLOB, "application/vnd.oci.image.layer.nydus-py.blob.v1"}
BOOTSTRAP_TYPES = {mt.NYDUS_PY_BOOTSTRAP, "application/vnd.oci.image.layer.nydus-py.bootstrap.v1"}
MANIFEST_CACHE = 64
DEDICATED, SHARED = "dedicated", "shared"        # nydus-snapshotter's --daemon-mode names
RECOVER_POLICIES = ("restart", "failover", "none")  # nydus-snapshotter's recover_policy
DAEMON_MODES = (DEDICATED, SHARED)


def default_nydusd() -> list[str]:
    """The `nydusd` next to our interpreter (the venv's console script), else on PATH."""
    here = Path(sys.executable).parent / "nydusd"
    if here.exists():
        return [str(here)]
    found = shutil.which("nydusd")
    return [found] if found else [sys.executable, "-c", "from nydus_py.daemon.cli import main; main()"]


@dataclass(frozen=True, kw_only=True)
class RemoteConfig:
    root: Path
    nydusd: tuple[str, ...] = field(default_factory=lambda: tuple(default_nydusd()))
    plain_http: tuple[str, ...] = ()       # registry hosts spoken to over http
    plain_http_loopback: bool = True       # localhost / 127.x / [::1] registries use http
    skip_verify: bool = False
    docker_config: str | None = None       # docker config.json with credentials
    daemon_timeout: float = 30.0           # seconds for nydusd to report its mount ready
    daemon_mode: str = "dedicated"         # DEDICATED: a nydusd per image; SHARED: one supervisor
    recover_interval: float = 5.0          # seconds between liveness checks of the daemons (0: off)
    recover_policy: str = "restart"        # RECOVER_POLICIES; "failover" keeps the FUSE session
    log_level: str = "info"
    allow_other: bool = True               # non-root container users can read the image
    suid: bool = True                      # honour setuid bits in the image, as overlayfs would


@dataclass(frozen=True)
class RemoteLayer:
    kind: str                   # REMOTE_BLOB or REMOTE_BOOTSTRAP
    ref: Reference
    manifest_digest: str
    digest: str
    size: int

    @property
    def image_id(self) -> str:
        return self.manifest_digest.split(":", 1)[-1]


class RemoteError(NydusError):
    """A nydus-py layer could not be made available (bootstrap fetch or nydusd start failed)."""


# ---------------------------------------------------------------------------- classification

class Resolver:
    """Labels of a Prepare → RemoteLayer for nydus-py layers, None for anything else."""

    def __init__(self, config: RemoteConfig):
        self.config = config
        self._clients: dict[str, RegistryClient] = {}
        self._manifests: OrderedDict[tuple[str, str], dict] = OrderedDict()
        self._lock = threading.Lock()

    def close(self) -> None:
        for c in self._clients.values():
            c.close()

    def scheme(self, host: str) -> str:
        if host in self.config.plain_http:
            return "http"
        bare = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
        if self.config.plain_http_loopback and (bare == "localhost" or bare.startswith("127.") or bare == "[::1]"):
            return "http"
        return "https"

    def client(self, ref: Reference) -> RegistryClient:
        with self._lock:
            c = self._clients.get(ref.api_host)
            if c is None:
                creds = resolve_credentials(ref.host, docker_config=self.config.docker_config)
                c = RegistryClient(config=RegistryConfig(
                    host=ref.api_host, scheme=self.scheme(ref.api_host), skip_verify=self.config.skip_verify,
                    credentials=creds))
                self._clients[ref.api_host] = c
            return c

    def classify(self, labels: dict[str, str]) -> RemoteLayer | None:
        if not labels.get(LABEL_TARGET):
            return None
        ref_text = labels.get(CRI_IMAGE_REF) or labels.get(STARGZ_REF)
        layer_digest = labels.get(CRI_LAYER_DIGEST) or labels.get(STARGZ_DIGEST)
        if not ref_text or not layer_digest:
            return None          # a plain `ctr pull`: nothing to find the image with
        try:
            ref = parse_reference(ref_text)
        except ConfigError as e:
            log.warning("ignoring unparsable image reference label %r: %s", ref_text, e)
            return None
        try:
            manifest, manifest_digest = self._manifest_with(ref, labels.get(CRI_MANIFEST_DIGEST), layer_digest)
        except NydusError as e:
            if labels.get(HINT_BLOB) or labels.get(HINT_BOOTSTRAP):
                raise RemoteError(f"{ref_text}: layer {layer_digest} is nydus-py but the manifest "
                                  f"cannot be read: {e}") from None
            log.warning("%s: cannot read manifest to classify layer %s (%s); treating it as an "
                        "ordinary layer", ref_text, layer_digest, e)
            return None
        if manifest is None:
            return None
        desc = next((d for d in manifest.get("layers") or [] if isinstance(d, dict)
                     and d.get("digest") == layer_digest), None)
        if desc is None:
            return None
        kind = layer_kind(desc, labels)
        if kind is None:
            return None
        return RemoteLayer(kind, ref, manifest_digest, layer_digest, int(desc.get("size") or 0))

    def _manifest_with(self, ref: Reference, manifest_digest: str | None, layer_digest: str
                       ) -> tuple[dict | None, str]:
        """The manifest holding `layer_digest`: by digest when CRI told us, else resolve the
        reference (walking an index's manifests)."""
        if manifest_digest:
            return self._get_manifest(ref, manifest_digest), manifest_digest
        doc, digest = self._get_manifest_by_ref(ref)
        if doc.get("mediaType") in mt.INDEX_TYPES or "manifests" in doc:
            for m in doc.get("manifests") or []:
                child = self._get_manifest(ref, m["digest"])
                if any(d.get("digest") == layer_digest for d in child.get("layers") or []):
                    return child, m["digest"]
            return None, ""
        return doc, digest

    def _get_manifest_by_ref(self, ref: Reference) -> tuple[dict, str]:
        data, _mtype, digest = self.client(ref).get_manifest(ref.repository, ref.ref)
        doc = json_object(data, f"manifest {ref}")
        self._remember((ref.name, digest), doc)
        return doc, digest

    def _get_manifest(self, ref: Reference, digest: str) -> dict:
        key = (ref.name, digest)
        with self._lock:
            if key in self._manifests:
                self._manifests.move_to_end(key)
                return self._manifests[key]
        data, _mtype, _ = self.client(ref).get_manifest(ref.repository, digest)
        doc = json_object(data, f"manifest {ref.name}@{digest}")
        self._remember(key, doc)
        return doc

    def _remember(self, key: tuple[str, str], doc: dict) -> None:
        with self._lock:
            self._manifests[key] = doc
            while len(self._manifests) > MANIFEST_CACHE:
                self._manifests.popitem(last=False)


def layer_kind(desc: dict, labels: dict[str, str] | None = None) -> str | None:
    """REMOTE_BLOB / REMOTE_BOOTSTRAP for a nydus-py layer descriptor, else None."""
    labels = labels or {}
    ann = desc.get("annotations") or {}
    mtype = desc.get("mediaType", "")
    if mtype in BOOTSTRAP_TYPES or ann.get(mt.ANNO_BOOTSTRAP) == "true" or labels.get(HINT_BOOTSTRAP) == "true":
        return REMOTE_BOOTSTRAP
    if mtype in BLOB_TYPES or ann.get(mt.ANNO_BLOB) == "true" or labels.get(HINT_BLOB) == "true":
        return REMOTE_BLOB
    return None


# ---------------------------------------------------------------------------- daemons

def is_mounted(path: str | Path) -> bool:
    """`path` is a mountpoint in our mount namespace (by /proc/self/mountinfo, no stat: a
    dead FUSE mount answers stat with ENOTCONN)."""
    target = os.path.realpath(path) if os.path.exists(os.path.dirname(str(path))) else str(path)
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                mp = line.split(b" ")[4].decode("utf-8", "surrogateescape")
                mp = mp.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
                if mp == target:
                    return True
    except OSError:
        return False
    return False


def is_live_mount(path: str | Path) -> bool:
    if not is_mounted(path):
        return False
    try:
        os.stat(path)
        return True
    except OSError:
        return False           # ENOTCONN: the daemon behind it is gone


def pid_alive(pid: int, mountpoint: str | None = None) -> bool:
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                return False
        if mountpoint is not None:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return mountpoint.encode() in f.read().split(b"\0")
        return True
    except (OSError, IndexError):
        return False


def unmount(path: str | Path) -> None:
    """Lazy unmount, whoever's mount it is; no error when nothing is mounted there."""
    if not is_mounted(path):
        return
    for cmd in (["fusermount3", "-u", "-z", str(path)], ["umount", "-l", str(path)]):
        try:
            if subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0 and not is_mounted(path):
                return
        except (OSError, subprocess.TimeoutExpired):
            continue
    if is_mounted(path):
        raise RemoteError(f"cannot unmount {path}")


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
            _terminate(pid, str(self.apisock), grace)
        if self._proc is not None:
            try:
                self._proc.wait(1)
            except subprocess.TimeoutExpired:
                pass
            self._proc = None


def nydusd_env(config: RemoteConfig) -> dict[str, str]:
    """nydusd's environment: ours (IMAGE_PULL_AUTH, DOCKER_CONFIG, HOME pass through), and
    with --docker-config DIR/config.json, DOCKER_CONFIG=DIR so a daemon that resolves
    credentials itself (identity tokens) reads the same file."""
    env = dict(os.environ)
    if config.docker_config and Path(config.docker_config).name == "config.json":
        env["DOCKER_CONFIG"] = str(Path(config.docker_config).absolute().parent)
    return env


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
        self._stopping = threading.Event()

    def _lock(self, image_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(image_id, threading.Lock())

    def image_dir(self, image_id: str) -> Path:
        return self.config.root / "images" / image_id

    def mountpoint(self, image_id: str) -> Path:
        return self.config.root / "mnt" / image_id

    @staticmethod
    def mode_of(rec: ImageRecord) -> str:
        return rec.state.get("mode", DEDICATED)

    # -- bring up ---------------------------------------------------------------------------
    def ensure(self, layer: RemoteLayer) -> Path:
        """The image's bootstrap fetched and nydusd serving it; returns the mountpoint."""
        image_id = layer.image_id
        with self._lock(image_id):
            rec = self.store.get_image(image_id)
            if rec is not None and self._healthy(rec):
                return Path(rec.mountpoint)
            if rec is None:
                rec = self._prepare_image(layer)
            return Path(self._start(rec).mountpoint)

    def _prepare_image(self, layer: RemoteLayer) -> ImageRecord:
        image_id = layer.image_id
        d = self.image_dir(image_id)
        d.mkdir(parents=True, exist_ok=True)
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
        creds = resolve_credentials(reg["host"], docker_config=self.config.docker_config)
        if creds is not None and creds.has_basic:
            backend["auth"] = base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
        if creds is not None and creds.registry_token:
            backend["registry_token"] = creds.registry_token
        work = self.shared.cache_dir if self.mode_of(rec) == SHARED else self.image_dir(rec.id) / "cache"
        return {"device": {"backend": {"type": "registry", "config": backend},
                           "cache": {"type": "blobcache", "config": {"work_dir": str(work)}}},
                # false: the cache is keyed by chunk table, so images cannot poison each other
                # (docs/operations.md "Trust model"); true would sha256 every cache hit
                "mode": "direct", "digest_validate": False}

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
               "--log-level", self.config.log_level]
        if self.config.allow_other:
            cmd.append("--allow-other")
        if self.config.suid:
            cmd.append("--suid")
        if self.config.recover_policy == "failover":
            # pid file = the supervisor, which keeps the FUSE fd and replaces a dead daemon
            # (the API socket goes to ROOT/sock/: a unix socket path has at most 107 bytes)
            sock_dir = self.config.root / "sock"
            sock_dir.mkdir(mode=0o700, exist_ok=True)
            cmd += ["--failover", "--supervisor", str(d / "supervisor.sock"), "--id", rec.id,
                    "--apisock", str(sock_dir / f"{rec.id[:16]}.sock")]
        return [*cmd, rec.mountpoint]

    def _start(self, rec: ImageRecord) -> ImageRecord:
        mnt = Path(rec.mountpoint)
        if not (self.config.recover_policy == "failover" and self.mode_of(rec) == SHARED
                and is_live_mount(mnt)):
            self._stop_process(rec)
            unmount(mnt)
        # else: the shared nydusd died but the image's failover mount lives on; the new one
        # adopts it (nydusd serve --failover), so running containers keep their rootfs
        mnt.mkdir(parents=True, exist_ok=True)
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
        pid = _read_pid(pid_file)
        if not is_live_mount(mnt):
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
        if not is_live_mount(rec.mountpoint):
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
        return restarted

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
        """Stop the monitor; the daemons keep running (they serve running containers)."""
        self._stopping.set()
        if self._monitor is not None:
            self._monitor.join(30)

    # -- tear down --------------------------------------------------------------------------
    def release(self, image_id: str) -> None:
        """Stop the image's nydusd (or its mount in the shared one), unmount, forget it and
        delete its files (and, shared, the cached blobs no other mount uses)."""
        with self._lock(image_id):
            rec = self.store.get_image(image_id)
            if rec is None:
                return
            self._stop_process(rec)
            unmount(rec.mountpoint)
            try:
                os.rmdir(rec.mountpoint)
            except OSError:
                pass
            shutil.rmtree(self.image_dir(image_id), ignore_errors=True)
            self.store.delete_image(image_id)
            log.info("released image %s (%s)", rec.ref, image_id)
        if self.mode_of(rec) == SHARED:
            self._stop_idle_shared()

    def _stop_idle_shared(self) -> None:
        """Drop cached blobs no mount uses; stop the supervisor when no image needs it."""
        with self.shared._lock:
            if any(self.mode_of(r) == SHARED for r in self.store.images()):
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
        report = collect(self.shared.cache_dir, 0)
        if report.removed_blobs:
            log.info("shared cache: removed %d unused blobs (%d bytes)", report.removed_blobs, report.removed_bytes)

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
            _terminate(pid, mp, 10.0)
        unmount(mp)

    def _stop_process(self, rec: ImageRecord, timeout: float = 10.0) -> None:
        if self.mode_of(rec) == SHARED:
            self.shared.umount(os.path.realpath(rec.mountpoint))
            return
        if pid_alive(rec.pid, rec.mountpoint):
            _terminate(rec.pid, rec.mountpoint, timeout)


def _terminate(pid: int, marker: str, timeout: float) -> None:
    """SIGTERM, then SIGKILL after `timeout`; only while `pid` still runs with `marker` on its
    command line (never a recycled pid)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(pid, marker):
        time.sleep(0.05)
    if pid_alive(pid, marker):
        log.warning("nydusd pid %d ignored SIGTERM for %.0fs; killing it", pid, timeout)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _read_pid(path: Path) -> int:
    for _ in range(50):
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            time.sleep(0.02)
    raise RemoteError(f"nydusd wrote no pid to {path}")


__all__ = ["RemoteConfig", "RemoteLayer", "Resolver", "DaemonManager", "SharedDaemon", "RemoteError",
           "layer_kind", "DEDICATED", "SHARED", "DAEMON_MODES",
           "is_mounted", "is_live_mount", "unmount", "pid_alive"]
