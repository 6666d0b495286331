"""Snapshot metadata in one small sqlite database (`ROOT/metadata.db`), so state survives a
restart of the snapshotter. It plays the part of containerd's `snapshots/storage` metastore:

  * a snapshot has a numeric `id` (its directory `ROOT/snapshots/<id>`), a unique `key`, a
    parent key ('' for none), a kind (VIEW / ACTIVE / COMMITTED, the proto's numbers), labels,
    created/updated times and, once committed, its disk usage;
  * Commit keeps the id and renames the key, so the unpacked files never move;
  * `remote` says where a committed snapshot's files are: '' (its own `fs` dir), "blob" (a
    nydus-py data-blob layer: no files of its own; the bootstrap layer above serves them) or
    "bootstrap" (the nydusd mount of image `image`);
  * `images` remembers the nydusd serving each image (pid, mountpoint, how to restart it).

One connection behind a lock: the gRPC servicer calls in from a thread pool, and each method is
one short transaction.
"""

from __future__ import annotations

import errno
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from nydus_py.errors import NydusError

KIND_UNKNOWN, KIND_VIEW, KIND_ACTIVE, KIND_COMMITTED = 0, 1, 2, 3
KIND_NAMES = {KIND_VIEW: "view", KIND_ACTIVE: "active", KIND_COMMITTED: "committed"}
REMOTE_NONE, REMOTE_BLOB, REMOTE_BOOTSTRAP = "", "blob", "bootstrap"


class SnapshotNotFound(NydusError):
    """The key does not exist (gRPC NOT_FOUND)."""
    errno = errno.ENOENT


class SnapshotExists(NydusError):
    """The key (or target) already exists (gRPC ALREADY_EXISTS)."""
    errno = errno.EEXIST


class SnapshotPrecondition(NydusError):
    """Wrong kind for the operation, or the snapshot still has children (FAILED_PRECONDITION)."""
    errno = errno.EBUSY


@dataclass(frozen=True)
class Snapshot:
    id: int
    key: str
    parent: str
    kind: int
    created_ns: int
    updated_ns: int
    labels: dict[str, str]
    size: int = 0
    inodes: int = 0
    remote: str = REMOTE_NONE
    image: str = ""


@dataclass(frozen=True)
class ImageRecord:
    id: str                 # hex of the manifest digest
    ref: str                # registry reference the bootstrap came from
    manifest_digest: str
    bootstrap_digest: str
    mountpoint: str
    pid: int                # 0 = no daemon recorded
    state: dict             # what remote.py needs to restart the daemon (paths, registry)


def _image(row: tuple) -> ImageRecord:
    id_, ref, manifest_digest, bootstrap_digest, mountpoint, pid, state = row
    return ImageRecord(id_, ref, manifest_digest, bootstrap_digest, mountpoint, pid, json.loads(state))


_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    parent TEXT NOT NULL DEFAULT '',
    kind INTEGER NOT NULL,
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0,
    remote TEXT NOT NULL DEFAULT '',
    image TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent);
CREATE INDEX IF NOT EXISTS snapshots_image ON snapshots(image);
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,
    ref TEXT NOT NULL,
    manifest_digest TEXT NOT NULL,
    bootstrap_digest TEXT NOT NULL,
    mountpoint TEXT NOT NULL,
    pid INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT '{}'
);
"""
_COLS = "id, key, parent, kind, created_ns, updated_ns, labels, size, inodes, remote, image"


def _row(r: tuple) -> Snapshot:
    return Snapshot(id=r[0], key=r[1], parent=r[2], kind=r[3], created_ns=r[4], updated_ns=r[5],
                    labels=json.loads(r[6]), size=r[7], inodes=r[8], remote=r[9], image=r[10])


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- helpers ----------------------------------------------------------------------------
    def locked(self):
        """Hold the store's lock (no transaction) across several reads and a file operation."""
        return self._lock

    def _tx(self):
        return _Tx(self)

    def _get(self, key: str) -> Snapshot | None:
        r = self._db.execute(f"SELECT {_COLS} FROM snapshots WHERE key = ?", (key,)).fetchone()
        return _row(r) if r else None

    def _must(self, key: str) -> Snapshot:
        s = self._get(key)
        if s is None:
            raise SnapshotNotFound(f"snapshot {key!r} not found")
        return s

    # -- snapshots ----------------------------------------------------------------------------
    def get(self, key: str) -> Snapshot:
        with self._lock:
            return self._must(key)

    def find(self, key: str) -> Snapshot | None:
        with self._lock:
            return self._get(key)

    def create(self, key: str, parent: str, kind: int, labels: dict[str, str], *,
               remote: str = REMOTE_NONE, image: str = "") -> Snapshot:
        """A new snapshot; the parent must exist and be committed."""
        if not key:
            raise SnapshotPrecondition("snapshot key must not be empty", errno=errno.EINVAL)
        now = time.time_ns()
        with self._tx():
            if self._get(key) is not None:
                raise SnapshotExists(f"snapshot {key!r} already exists")
            if parent:
                p = self._must(parent)
                if p.kind != KIND_COMMITTED:
                    raise SnapshotPrecondition(f"parent {parent!r} is not committed")
            self._db.execute(
                "INSERT INTO snapshots (key, parent, kind, created_ns, updated_ns, labels, remote, image)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key, parent, kind, now, now, json.dumps(labels, sort_keys=True), remote, image))
            return self._must(key)

    def commit(self, key: str, name: str, labels: dict[str, str], *, size: int = 0, inodes: int = 0) -> Snapshot:
        """Turn active snapshot `key` into committed `name` (same id, same directory), with
        exactly `labels` and Created == Updated == now."""
        now = time.time_ns()
        with self._tx():
            s = self._must(key)
            if s.kind != KIND_ACTIVE:
                raise SnapshotPrecondition(f"snapshot {key!r} is {KIND_NAMES.get(s.kind)}, not active")
            if self._get(name) is not None:
                raise SnapshotExists(f"snapshot {name!r} already exists")
            # As containerd's snapshotters (storage.CommitActive): the commit's labels replace
            # the active snapshot's, and a committed snapshot is created at commit time.
            self._db.execute(
                "UPDATE snapshots SET key = ?, kind = ?, labels = ?, size = ?, inodes = ?,"
                " created_ns = ?, updated_ns = ? WHERE id = ?",
                (name, KIND_COMMITTED, json.dumps(dict(labels), sort_keys=True), size, inodes,
                 now, now, s.id))
            return self._must(name)

    def remove(self, key: str) -> Snapshot:
        """Delete the record; refuses while children exist. Returns what was removed."""
        with self._tx():
            s = self._must(key)
            if self._db.execute("SELECT 1 FROM snapshots WHERE parent = ? LIMIT 1", (key,)).fetchone():
                raise SnapshotPrecondition(f"snapshot {key!r} has children; remove them first")
            self._db.execute("DELETE FROM snapshots WHERE id = ?", (s.id,))
            return s

    def update_labels(self, key: str, labels: dict[str, str], paths: list[str]) -> Snapshot:
        """containerd's Update: `paths` empty replaces all labels; "labels" likewise;
        "labels.K" sets or (if absent from `labels`) deletes one key."""
        with self._tx():
            s = self._must(key)
            new = dict(s.labels)
            if not paths or "labels" in paths:
                new = dict(labels)
            for p in paths:
                if p.startswith("labels."):
                    k = p[len("labels."):]
                    if k in labels:
                        new[k] = labels[k]
                    else:
                        new.pop(k, None)
                elif p != "labels":
                    raise SnapshotPrecondition(f"cannot update field {p!r} of snapshot {key!r}",
                                               errno=errno.EINVAL)
            self._db.execute("UPDATE snapshots SET labels = ?, updated_ns = ? WHERE id = ?",
                             (json.dumps(new, sort_keys=True), time.time_ns(), s.id))
            return self._must(key)

    def parents(self, key: str) -> list[Snapshot]:
        """The chain below `key`, nearest parent first."""
        with self._lock:
            out: list[Snapshot] = []
            cur = self._must(key).parent
            while cur:
                s = self._must(cur)
                out.append(s)
                cur = s.parent
            return out

    def all(self) -> list[Snapshot]:
        with self._lock:
            return [_row(r) for r in self._db.execute(f"SELECT {_COLS} FROM snapshots ORDER BY id")]

    def ids(self) -> set[int]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT id FROM snapshots")}

    def image_users(self, image: str) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM snapshots WHERE image = ?", (image,)).fetchone()[0]

    # -- images -----------------------------------------------------------------------------
    def put_image(self, rec: ImageRecord) -> None:
        with self._tx():
            self._db.execute(
                "INSERT OR REPLACE INTO images (id, ref, manifest_digest, bootstrap_digest, mountpoint, pid, state)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (rec.id, rec.ref, rec.manifest_digest, rec.bootstrap_digest, rec.mountpoint, rec.pid,
                 json.dumps(rec.state, sort_keys=True)))

    def get_image(self, image_id: str) -> ImageRecord | None:
        with self._lock:
            r = self._db.execute("SELECT id, ref, manifest_digest, bootstrap_digest, mountpoint, pid, state"
                                 " FROM images WHERE id = ?", (image_id,)).fetchone()
        return _image(r) if r else None

    def images(self) -> list[ImageRecord]:
        with self._lock:
            rows = self._db.execute("SELECT id, ref, manifest_digest, bootstrap_digest, mountpoint, pid, state"
                                    " FROM images ORDER BY id").fetchall()
        return [_image(r) for r in rows]

    def delete_image(self, image_id: str) -> None:
        with self._tx():
            self._db.execute("DELETE FROM images WHERE id = ?", (image_id,))


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT under the store's lock; ROLLBACK on any exception."""

    def __init__(self, store: Store):
        self.store = store

    def __enter__(self) -> None:
        self.store._lock.acquire()
        try:
            self.store._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.store._lock.release()
            raise

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.store._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.store._lock.release()
