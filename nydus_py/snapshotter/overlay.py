"""Mount specs for a snapshot, the way containerd's overlayfs snapshotter builds them. Pure:
no I/O, so every case is unit-tested without containerd.

    no parents, active       → bind  ROOT/snapshots/<id>/fs  rw
    no parents, view         → bind  ROOT/snapshots/<id>/fs  ro
    one lower, view          → bind  <that lower>            ro
    lowers, view             → overlay lowerdir=L1:L2:...    (read-only: no upperdir)
    lowers, active           → overlay lowerdir=L1:...,upperdir=<id>/fs,workdir=<id>/work

"Lowers" are the parents' directories, nearest first. A nydus-py image contributes one lower:
the nydusd mountpoint of its bootstrap snapshot, which already holds the merged tree of every
layer below it; its data-blob snapshots contribute nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from nydus_py.snapshotter.store import (KIND_ACTIVE, KIND_VIEW, REMOTE_BLOB, REMOTE_BOOTSTRAP,
                                        Snapshot)


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: list[str] = field(default_factory=list)


def snapshot_dir(root: Path, sid: int) -> Path:
    return root / "snapshots" / str(sid)


def fs_dir(root: Path, sid: int) -> Path:
    return snapshot_dir(root, sid) / "fs"


def work_dir(root: Path, sid: int) -> Path:
    return snapshot_dir(root, sid) / "work"


def lower_dirs(root: Path, parents: Iterable[Snapshot], mountpoint_of) -> list[str]:
    """Directories of the parent chain (nearest first). `mountpoint_of(image_id)` gives the
    nydusd mountpoint for a bootstrap snapshot; the walk stops there, since that mount is
    the whole image below it."""
    out: list[str] = []
    for p in parents:
        if p.remote == REMOTE_BOOTSTRAP:
            out.append(str(mountpoint_of(p.image)))
            break
        if p.remote == REMOTE_BLOB:
            continue
        out.append(str(fs_dir(root, p.id)))
    return out


def mounts(root: Path, snap: Snapshot, lowers: list[str]) -> list[Mount]:
    """The mounts containerd should perform for `snap` (see the module docstring)."""
    own = str(fs_dir(root, snap.id))
    if snap.kind not in (KIND_ACTIVE, KIND_VIEW):
        raise ValueError(f"snapshot {snap.key!r} is not active or view; it has no mounts")
    readonly = snap.kind == KIND_VIEW
    if not lowers:
        return [Mount("bind", own, ["ro" if readonly else "rw", "rbind"])]
    if readonly:
        if len(lowers) == 1:
            return [Mount("bind", lowers[0], ["ro", "rbind"])]
        return [Mount("overlay", "overlay", [f"lowerdir={':'.join(lowers)}"])]
    return [Mount("overlay", "overlay", [
        "index=off",
        f"workdir={work_dir(root, snap.id)}",
        f"upperdir={own}",
        f"lowerdir={':'.join(lowers)}",
    ])]
