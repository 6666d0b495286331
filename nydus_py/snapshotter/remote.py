"""nydus-py images behind containerd: the definitions every part of the remote side shares.

    remote.py     labels, RemoteConfig, RemoteLayer, RemoteError, the RemoteFileSystem protocol
    resolver.py   which layers are ours: Prepare labels → manifest → RemoteLayer
    daemons.py    DaemonManager: the nydusd serving each image (start, re-attach, recover, stop)
    shared.py     SharedDaemon: the one `nydusd serve` supervisor of --daemon-mode shared
    process.py    nydusd processes and mounts: liveness, terminate, lazy unmount
    fs.py         NydusFileSystem: resolver + daemons behind RemoteFileSystem, what core.Snapshotter uses

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

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from nydus_py.errors import NydusError
from nydus_py.oci import mediatypes as mt
from nydus_py.oci.reference import Reference

LABEL_TARGET = "containerd.io/snapshot.ref"
CRI_IMAGE_REF = "containerd.io/snapshot/cri.image-ref"
CRI_LAYER_DIGEST = "containerd.io/snapshot/cri.layer-digest"
CRI_MANIFEST_DIGEST = "containerd.io/snapshot/cri.manifest-digest"
STARGZ_REF = "containerd.io/snapshot/remote/stargz.reference"
STARGZ_DIGEST = "containerd.io/snapshot/remote/stargz.digest"
# the layer chain from this layer up, comma-separated (CRI; ctr-remote rpull): resolver.py
CRI_IMAGE_LAYERS = "containerd.io/snapshot/cri.image-layers"
STARGZ_LAYERS = "containerd.io/snapshot/remote/stargz.layers"
HINT_BLOB = "containerd.io/snapshot/nydus-py.blob"
HINT_BOOTSTRAP = "containerd.io/snapshot/nydus-py.bootstrap"
LABEL_REMOTE = "containerd.io/snapshot/remote"          # set on our remote snapshots
LABEL_IMAGE = "containerd.io/snapshot/nydus-py.image"   # image id, on bootstrap snapshots

BLOB_TYPES = {mt.NYDUS_PY_BLOB, "application/vnd.oci.image.layer.nydus-py.blob.v1"}
BOOTSTRAP_TYPES = {mt.NYDUS_PY_BOOTSTRAP, "application/vnd.oci.image.layer.nydus-py.bootstrap.v1"}
MANIFEST_CACHE = 64
# how long a tag resolved for one layer's Prepare answers the next layers' Prepares of the same
# pull (only when the manifest ends with their layer chain): a pull is a few seconds at most
REF_TTL = 60.0
DEDICATED, SHARED = "dedicated", "shared"        # nydus-snapshotter's --daemon-mode names
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
    recover_policy: str = "restart"        # config.schema.RECOVER_POLICIES; "failover" keeps the FUSE session
    # nydusd JSON template ([daemon] nydusd_config): proxy, mirrors, prefetch, cache limits
    # reach every daemon; the snapshotter fills in the registry, credentials and cache dir
    nydusd_template: dict | None = field(default=None, compare=False)
    mirrors_config_dir: str | None = None  # containerd-style <dir>/<host>/hosts.toml → nydusd mirrors
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



@runtime_checkable
class RemoteFileSystem(Protocol):
    """The remote-filesystem side of the snapshotter (as stargz-snapshotter's FileSystem):
    decide which layers are remote, mount an image, and let it go. core.Snapshotter gets one
    at construction; fs.NydusFileSystem is the real one, tests pass their own."""

    def classify(self, labels: dict[str, str]) -> RemoteLayer | None:
        """The remote layer a Prepare's labels name, or None for an ordinary layer."""
        ...

    def mount(self, layer: RemoteLayer) -> Path:
        """Serve the image of bootstrap layer `layer` (fetch, start its daemon); its mountpoint."""
        ...

    def mountpoint(self, image_id: str) -> Path:
        """Where image `image_id` is (or will be) mounted."""
        ...

    def unmount(self, image_id: str) -> None:
        """The image is no longer used: stop its daemon, unmount, forget it."""
        ...

    def start(self) -> None:
        """Re-attach to (or restart) the daemons of images in use; start monitoring them."""
        ...

    def cleanup(self) -> None:
        """Free every daemon, mount and directory no snapshot needs."""
        ...

    def close(self) -> None:
        """Stop our threads and connections; daemons keep running."""
        ...
