"""nydus-py images behind containerd: which layers are ours, and the nydusd serving each image.

Which layer is which. containerd passes a layer's descriptor annotations to Prepare as labels
only when they start with `containerd.io/snapshot/` (plus `containerd.io/snapshot.ref`, the
layer's chain id). So the `io.nydus-py.*` annotations never arrive as such; what does arrive,
when the client uses containerd's AppendInfoHandlerWrapper (CRI, nerdctl) or stargz's
(`ctr-remote image rpull`), is the image reference, the layer digest and (CRI) the manifest
digest. We fetch the manifest once (cached), find the layer, and decide from its media type
and annotations (docs/format.md). A converter may also put the hint labels `HINT_BLOB` /
`HINT_BOOTSTRAP` straight on the layer descriptors; they pass containerd's filter.

The daemon. One nydusd per image (first version), started with `nydusd mount --daemon` in a
session of its own, so it outlives the snapshotter; its pid, mountpoint and the command that
started it live in the store. On start the snapshotter re-attaches to a daemon whose pid is
alive and whose mountpoint is still a live mount, and restarts (after a lazy unmount) one that
is not.
"""

from __future__ import annotations

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
from dataclasses import dataclass, field
from pathlib import Path

from nydus_py.errors import ConfigError, ImageFormatError, NydusError
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


class DaemonManager:
    """Starts, re-attaches to and stops the nydusd of each image."""

    def __init__(self, config: RemoteConfig, store: Store, resolver: Resolver):
        self.config = config
        self.store = store
        self.resolver = resolver
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _lock(self, image_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(image_id, threading.Lock())

    def image_dir(self, image_id: str) -> Path:
        return self.config.root / "images" / image_id

    def mountpoint(self, image_id: str) -> Path:
        return self.config.root / "mnt" / image_id

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
        client = self.resolver.client(ref)
        backend = {"host": ref.api_host, "repo": ref.repository, "scheme": client.config.scheme}
        if self.config.skip_verify:
            backend["skip_verify"] = True
        creds = client.config.credentials
        if creds is not None and creds.has_basic():
            import base64
            backend["auth"] = base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
        cfg = {"device": {"backend": {"type": "registry", "config": backend},
                          "cache": {"type": "blobcache", "config": {"work_dir": str(d / "cache")}}},
               "mode": "direct", "digest_validate": True}
        cfg_path = d / "nydusd.json"
        tmp = cfg_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)   # may hold credentials
        with os.fdopen(fd, "w") as f:
            json.dump(cfg, f, indent=2)
        os.replace(tmp, cfg_path)
        rec = ImageRecord(id=image_id, ref=str(ref), manifest_digest=layer.manifest_digest,
                          bootstrap_digest=layer.digest, mountpoint=str(self.mountpoint(image_id)), pid=0,
                          state={"bootstrap": str(boot), "config": str(cfg_path)})
        self.store.put_image(rec)
        return rec

    def _fetch_bootstrap(self, layer: RemoteLayer, dest: Path) -> None:
        client = self.resolver.client(layer.ref)
        tmp = dest.with_suffix(".part")
        t0 = time.monotonic()
        try:
            with client.get_blob(layer.ref.repository, layer.digest, layer.size or None) as r, open(tmp, "wb") as f:
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
        return [*cmd, rec.mountpoint]

    def _start(self, rec: ImageRecord) -> ImageRecord:
        mnt = Path(rec.mountpoint)
        self._stop_process(rec)
        unmount(mnt)
        mnt.mkdir(parents=True, exist_ok=True)
        pid_file = self.image_dir(rec.id) / "nydusd.pid"
        pid_file.unlink(missing_ok=True)
        cmd = self._command(rec)
        log.info("starting nydusd for %s: %s", rec.ref, " ".join(cmd))
        try:
            p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                               timeout=self.config.daemon_timeout, start_new_session=True)
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
        rec = ImageRecord(rec.id, rec.ref, rec.manifest_digest, rec.bootstrap_digest, rec.mountpoint, pid, rec.state)
        self.store.put_image(rec)
        log.info("nydusd pid %d serves %s at %s", pid, rec.ref, mnt)
        return rec

    def _healthy(self, rec: ImageRecord) -> bool:
        return pid_alive(rec.pid, rec.mountpoint) and is_live_mount(rec.mountpoint)

    # -- restart ----------------------------------------------------------------------------
    def reattach_all(self) -> None:
        """After a snapshotter (re)start: keep healthy daemons, restart broken ones, stop
        those no snapshot uses."""
        for rec in self.store.images():
            try:
                if self.store.image_users(rec.id) == 0:
                    self.release(rec.id)
                elif self._healthy(rec):
                    log.info("re-attached to nydusd pid %d for %s at %s", rec.pid, rec.ref, rec.mountpoint)
                else:
                    log.warning("nydusd for %s (pid %d) is gone or its mount is dead; restarting", rec.ref, rec.pid)
                    with self._lock(rec.id):
                        self._start(rec)
            except NydusError as e:
                log.error("image %s: %s", rec.ref, e)

    # -- tear down --------------------------------------------------------------------------
    def release(self, image_id: str) -> None:
        """Stop the image's nydusd, unmount, forget it and delete its files."""
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

    def _stop_process(self, rec: ImageRecord, timeout: float = 10.0) -> None:
        if not pid_alive(rec.pid, rec.mountpoint):
            return
        try:
            os.kill(rec.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and pid_alive(rec.pid, rec.mountpoint):
            time.sleep(0.05)
        if pid_alive(rec.pid, rec.mountpoint):
            log.warning("nydusd pid %d ignored SIGTERM for %.0fs; killing it", rec.pid, timeout)
            try:
                os.kill(rec.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _read_pid(path: Path) -> int:
    for _ in range(50):
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            time.sleep(0.02)
    raise RemoteError(f"nydusd wrote no pid to {path}")


__all__ = ["RemoteConfig", "RemoteLayer", "Resolver", "DaemonManager", "RemoteError", "layer_kind",
           "is_mounted", "is_live_mount", "unmount", "pid_alive"]
