"""The snapshotter's behaviour, in plain Python (service.py is only the gRPC adapter).

Layout under ROOT (like containerd's overlayfs snapshotter, plus what nydus needs):

    ROOT/metadata.db               sqlite: snapshots, labels, images (store.py)
    ROOT/snapshots/<id>/fs         an active snapshot's upperdir / a committed layer's files
    ROOT/snapshots/<id>/work       overlay workdir
    ROOT/images/<image-id>/        bootstrap, nydusd.json, nydusd.pid, nydusd.log, cache/
    ROOT/mnt/<image-id>            the nydusd mount of that image

Remote snapshots. When Prepare carries the target label (`containerd.io/snapshot.ref`, the
layer's chain id) and the Resolver says the layer is a nydus-py one, we commit a snapshot
named after the target at once and raise SnapshotExists: containerd then skips downloading and
unpacking the layer. Data-blob layers become empty "blob" snapshots; the bootstrap layer gets
its image mounted by nydusd and becomes a "bootstrap" snapshot whose files are that mount.
"""

from __future__ import annotations

import builtins
import logging
import os
import shutil
import threading
from pathlib import Path

from nydus_py.cache import safedir
from nydus_py.snapshotter import overlay
from nydus_py.snapshotter.remote import (LABEL_IMAGE, LABEL_REMOTE, LABEL_TARGET, RemoteFileSystem,
                                         RemoteLayer)
from nydus_py.snapshotter.store import (KIND_ACTIVE, KIND_COMMITTED, KIND_VIEW, REMOTE_BOOTSTRAP,
                                        Snapshot, SnapshotExists, SnapshotPrecondition, Store)

log = logging.getLogger("nydus_py.snapshotter")


def prepare_root(root: str | Path) -> Path:
    """ROOT with its subdirectories, private to root; the absolute path.

    Modes are explicit whatever the umask (and an older root made under umask 000 is
    repaired): nydusd refuses, as root, a cache dir below a directory another user can write
    (nydus_py/cache/safedir.py). Missing ancestors are made 0755, and refused if another
    user could replace them."""
    root = Path(root).absolute()
    safedir.ensure_dir(root.parent, what="directory of the snapshotter root", mode=0o755)
    for d in (root, *(root / sub for sub in ("snapshots", "images", "mnt"))):
        d.mkdir(mode=0o700, exist_ok=True)
        os.chmod(d, 0o700)
    return root


class Snapshotter:
    """`fs` is the remote-filesystem side (remote.RemoteFileSystem; fs.open_snapshotter wires
    the nydusd one); without it this is a plain overlayfs snapshotter. `store` defaults to
    ROOT/metadata.db; pass it when `fs` shares it."""

    def __init__(self, root: str | Path, *, fs: RemoteFileSystem | None = None, store: Store | None = None):
        self.root = prepare_root(root)
        self.store = store if store is not None else Store(self.root / "metadata.db")
        self.fs = fs
        self._remote_lock = threading.Lock()

    def start(self) -> None:
        """Re-attach to (or restart) the nydusd of every image still in use."""
        if self.fs is not None:
            self.fs.start()

    def close(self) -> None:
        """Stop our threads; daemons keep running (running containers use them)."""
        if self.fs is not None:
            self.fs.close()
        self.store.close()

    # -- containerd's Snapshotter interface --------------------------------------------------
    def prepare(self, key: str, parent: str, labels: dict[str, str]) -> list[overlay.Mount]:
        return self._create(key, parent, labels, KIND_ACTIVE)

    def view(self, key: str, parent: str, labels: dict[str, str]) -> list[overlay.Mount]:
        return self._create(key, parent, labels, KIND_VIEW)

    def mounts(self, key: str) -> list[overlay.Mount]:
        s = self.store.get(key)
        if s.kind == KIND_COMMITTED:
            raise SnapshotPrecondition(f"snapshot {key!r} is committed; it has no mounts")
        return overlay.mounts(self.root, s, self._lowers(s))

    def commit(self, name: str, key: str, labels: dict[str, str]) -> Snapshot:
        s = self.store.get(key)
        size, inodes = disk_usage(overlay.fs_dir(self.root, s.id)) if s.kind == KIND_ACTIVE else (0, 0)
        return self.store.commit(key, name, labels, size=size, inodes=inodes)

    def remove(self, key: str) -> None:
        s = self.store.remove(key)
        self._remove_dir(s.id)
        if s.remote == REMOTE_BOOTSTRAP and self.fs is not None and self.store.image_users(s.image) == 0:
            self.fs.unmount(s.image)

    def stat(self, key: str) -> Snapshot:
        return self.store.get(key)

    def update(self, key: str, labels: dict[str, str], paths: list[str]) -> Snapshot:
        return self.store.update_labels(key, labels, paths)

    def list(self) -> list[Snapshot]:
        return self.store.all()

    def usage(self, key: str) -> tuple[int, int]:
        s = self.store.get(key)
        if s.kind == KIND_ACTIVE:
            return disk_usage(overlay.fs_dir(self.root, s.id))
        return s.size, s.inodes

    def cleanup(self) -> None:
        """Delete snapshot directories no record owns (a crash mid-Remove or mid-Prepare), and
        free the daemons, mounts, directories and cached blobs no snapshot uses."""
        with self.store.locked():
            ids = self.store.ids()
            orphans = [d for d in (self.root / "snapshots").iterdir()
                       if not (d.name.isdigit() and int(d.name) in ids)]
            for d in orphans:              # renamed away under the lock: a Prepare cannot race us
                try:
                    os.rename(d, d.with_name(f"cleanup-{d.name}"))
                except OSError:
                    pass
        for d in (self.root / "snapshots").glob("cleanup-*"):
            log.info("cleanup: removing orphan %s", d.name.removeprefix("cleanup-"))
            shutil.rmtree(d, ignore_errors=True)
        if self.fs is not None:
            self.fs.cleanup()

    # -- internals --------------------------------------------------------------------------
    def _create(self, key: str, parent: str, labels: dict[str, str], kind: int) -> builtins.list[overlay.Mount]:
        if labels.get(LABEL_TARGET) and self.fs is not None:
            self._maybe_remote(self.fs, parent, labels)
        s = self.store.create(key, parent, kind, labels)
        try:
            d = overlay.snapshot_dir(self.root, s.id)
            if d.exists():                     # an orphan from before a crash
                shutil.rmtree(d)
            overlay.fs_dir(self.root, s.id).mkdir(parents=True, mode=0o755)
            if kind == KIND_ACTIVE:
                overlay.work_dir(self.root, s.id).mkdir(mode=0o711)
        except BaseException:
            self.store.remove(key)
            raise
        return overlay.mounts(self.root, s, self._lowers(s))

    def _maybe_remote(self, fs: RemoteFileSystem, parent: str, labels: dict[str, str]) -> None:
        """Raise SnapshotExists when the target layer is (or now becomes) a remote snapshot."""
        target = labels[LABEL_TARGET]
        existing = self.store.find(target)
        if existing is not None and existing.kind == KIND_COMMITTED and existing.parent == parent:
            raise SnapshotExists(f"target snapshot {target!r} already exists")
        layer = fs.classify(labels)
        if layer is None:
            return
        log.info("layer %s of %s is a nydus-py %s; committing remote snapshot %s",
                 layer.digest, layer.ref, layer.kind, target)
        with self._remote_lock:
            if self.store.find(target) is None:
                self._commit_remote(fs, target, parent, labels, layer)
        raise SnapshotExists(f"target snapshot {target!r} already exists (remote)")

    def _commit_remote(self, fs: RemoteFileSystem, target: str, parent: str, labels: dict[str, str],
                       layer: RemoteLayer) -> None:
        labels = dict(labels)
        labels[LABEL_REMOTE] = "nydus-py"
        image = ""
        if layer.kind == REMOTE_BOOTSTRAP:
            fs.mount(layer)
            image = layer.image_id
            labels[LABEL_IMAGE] = image
        self.store.create(target, parent, KIND_COMMITTED, labels, remote=layer.kind, image=image)

    def _lowers(self, s: Snapshot) -> builtins.list[str]:      # `list` is a method here
        return overlay.lower_dirs(self.root, self.store.parents(s.key), self._mountpoint)

    def _mountpoint(self, image_id: str) -> Path:
        if self.fs is None:
            raise SnapshotPrecondition(f"image {image_id} needs nydusd but remote snapshots are disabled")
        rec = self.store.get_image(image_id)
        return Path(rec.mountpoint) if rec else self.fs.mountpoint(image_id)

    def _remove_dir(self, sid: int) -> None:
        d = overlay.snapshot_dir(self.root, sid)
        if not d.exists():
            return
        trash = d.with_name(f"rm-{sid}")     # rename first: a crash mid-delete leaves an orphan Cleanup finds
        try:
            os.rename(d, trash)
        except OSError:
            trash = d
        shutil.rmtree(trash, ignore_errors=True)


def disk_usage(path: Path) -> tuple[int, int]:
    """(bytes allocated, inodes) under `path`, each inode counted once, like containerd's
    fs.DiskUsage."""
    seen: set[tuple[int, int]] = set()
    size = 0
    stack = [str(path)]
    while stack:
        top = stack.pop()
        try:
            st = os.lstat(top)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        size += st.st_blocks * 512
        if os.path.isdir(top) and not os.path.islink(top):
            try:
                with os.scandir(top) as it:
                    stack.extend(e.path for e in it)
            except OSError:
                continue
    return size, len(seen)
