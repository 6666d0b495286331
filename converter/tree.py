"""The merged file tree of an image: layers applied in order with OCI whiteout semantics.

One `Inode` per file (slots; hardlinked paths share one object), directories hold a
`children` dict keyed by name bytes. `Tree.apply(entry, layer)` merges one TarEntry:

| entry                               | effect                                                         |
|-------------------------------------|----------------------------------------------------------------|
| `.wh.X` (WHITEOUT of X)             | removes X as it exists in LOWER layers: an X this layer added  |
|                                     | (before or after) stays; for a dir, its lower children go       |
| `D/.wh..wh..opq` (OPAQUE)           | removes every lower-layer child of D, keeps this layer's        |
| `L/.wh..wh..opq`, L a symlink       | LayerError (umoci empties the symlink's target directory)       |
| whiteout of a missing path / under  | nothing (as umoci; a path may already be gone through another   |
| a non-directory                     | whiteout)                                                       |
| any type over a different type      | replaces it (a dir's subtree goes with it)                      |
| DIR over an existing DIR            | new metadata (mode/owner/mtime/xattrs), children kept           |
| HARDLINK                            | the name shares the target's Inode (this or a lower layer);    |
|                                     | missing target or a directory → LayerError; a symlink is fine   |
|                                     | (linked itself, not followed); a target that is the entry's own |
|                                     | path or below it → LayerError (replacing the path removes it)   |
| missing parent directories          | created: 0755, root:root, mtime 0 (see below); under a setgid   |
|                                     | dir: 02755 and the parent's group (mkdir(2) semantics)          |
| a parent component is a symlink     | LayerError (umoci follows it, scoped to the root; we refuse)    |
| a parent component is another       | LayerError (umoci: MkdirAll fails with ENOTDIR, same outcome)   |
| non-directory                       |                                                                 |
| the root (`./`)                     | updates the root's metadata; any other type → LayerError       |
| uid/gid > 2^32-2, device major >    | LayerError (no Linux filesystem holds them: chown/mknod fail or |
| 4095 or minor > 2^20-1              | truncate; FUSE's rdev is 32-bit)                               |

"This layer added" follows umoci's `upperPaths`: every path an entry of the current layer
created, and all its ancestors. Implicit parents: umoci creates them with MkdirAll(0777)
(so 0755 under the usual umask), owned by the extracting user (root) and stamped with the
current time; we keep 0755 and root:root but use mtime 0 (the epoch, which is also what
umoci gives the root directory) so that a conversion is reproducible.
The root starts as 0755 root:root mtime 0, like umoci's rootfs.
"""

from __future__ import annotations

from typing import Iterator

from converter.tar import EntryKind, TarEntry, show
from nydus_py.errors import LayerError

_NO_DEV = (0, 0)
MAX_ID = (1 << 32) - 2          # uid/gid are 32-bit, and 2^32-1 is chown's "leave unchanged"
MAX_MAJOR, MAX_MINOR = (1 << 12) - 1, (1 << 20) - 1   # what mknod(2)'s 32-bit dev_t holds


class Inode:
    __slots__ = ("kind", "mode", "uid", "gid", "mtime_ns", "size", "rdev", "target", "xattrs",
                 "chunks", "layer", "children")

    def __init__(self, kind: EntryKind, mode: int = 0o755, uid: int = 0, gid: int = 0,
                 mtime_ns: int = 0, *, size: int = 0, rdev: tuple[int, int] = _NO_DEV,
                 target: bytes = b"", xattrs: dict[bytes, bytes] | None = None, layer: int = -1):
        self.kind = kind
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.mtime_ns = mtime_ns
        self.size = size
        self.rdev = rdev
        self.target = target
        self.xattrs = {} if xattrs is None else xattrs
        self.chunks: list[int] = []
        self.layer = layer
        self.children: dict[bytes, Inode] | None = {} if kind is EntryKind.DIR else None

    @classmethod
    def from_entry(cls, e: TarEntry, layer: int) -> "Inode":
        return cls(e.kind, e.mode, e.uid, e.gid, e.mtime_ns,
                   size=e.size if e.kind is EntryKind.REG else 0,
                   rdev=(e.devmajor, e.devminor) if e.kind in (EntryKind.CHR, EntryKind.BLK) else _NO_DEV,
                   target=e.linkname if e.kind is EntryKind.SYMLINK else b"",
                   xattrs=e.xattrs, layer=layer)

    def __repr__(self) -> str:
        return f"<Inode {self.kind.value} {self.mode:o} {self.uid}:{self.gid} layer={self.layer}>"


def _implicit_dir(parent: Inode, layer_index: int) -> Inode:
    """A missing parent directory: 0755 root:root mtime 0, except that under a setgid
    directory it inherits the group and the setgid bit, as mkdir(2) gives it to umoci (and to
    any unpacker that creates parents with mkdir)."""
    if parent.mode & 0o2000:
        return Inode(EntryKind.DIR, 0o2755, 0, parent.gid, layer=layer_index)
    return Inode(EntryKind.DIR, 0o755, layer=layer_index)


def _join(path: tuple[bytes, ...]) -> str:
    return "/".join(show(c) for c in path)


class Tree:
    def __init__(self) -> None:
        self.root = Inode(EntryKind.DIR, 0o755)
        self._layer: int | None = None
        self._upper: set[tuple[bytes, ...]] = set()   # paths touched by the current layer

    # -- merge ----------------------------------------------------------------------------------
    def apply(self, entry: TarEntry, layer_index: int) -> Inode | None:
        """Merge one entry of layer `layer_index` (layers must come in order, each one whole).
        Returns the new Inode of a REG entry, whose data the caller must now read from `entry`
        (and fill in `chunks`); None for everything else."""
        if layer_index != self._layer:
            self._layer, self._upper = layer_index, set()
        kind, path = entry.kind, entry.path
        if kind is EntryKind.WHITEOUT or kind is EntryKind.OPAQUE:
            self._whiteout(entry)
            return None
        if not path:
            self._check_values(entry, layer_index)
            if kind is not EntryKind.DIR:
                raise LayerError(f"{self._who(entry, layer_index)}: refusing to change the type of "
                                 f"the root directory to {kind.value}")
            self._set_meta(self.root, entry)
            return None
        if kind is not EntryKind.HARDLINK:
            self._check_values(entry, layer_index)
        parent = self._parent(entry, layer_index)
        name = path[-1]
        if kind is EntryKind.HARDLINK:
            node = self._link_target(entry, layer_index)
        else:
            old = parent.children.get(name)
            if kind is EntryKind.DIR and old is not None and old.kind is EntryKind.DIR:
                self._set_meta(old, entry)
                self._mark(path)
                return None
            node = Inode.from_entry(entry, layer_index)
        parent.children[name] = node
        self._mark(path)
        return node if kind is EntryKind.REG else None

    @staticmethod
    def _who(entry: TarEntry, layer_index: int) -> str:
        if entry.origin:
            return entry.describe()
        return f"layer {layer_index}: entry '{_join(entry.path) or '.'}'"

    def _check_values(self, e: TarEntry, layer_index: int) -> None:
        """Owner and device numbers a Linux filesystem can hold (umoci's chown/mknod fail or
        silently truncate beyond them; the FUSE attr has a 32-bit rdev)."""
        if not (0 <= e.uid <= MAX_ID and 0 <= e.gid <= MAX_ID):
            raise LayerError(f"{self._who(e, layer_index)}: uid/gid {e.uid}/{e.gid} out of range "
                             f"(0..{MAX_ID})")
        if e.kind in (EntryKind.CHR, EntryKind.BLK) and not (
                0 <= e.devmajor <= MAX_MAJOR and 0 <= e.devminor <= MAX_MINOR):
            raise LayerError(f"{self._who(e, layer_index)}: device number {e.devmajor}:{e.devminor} "
                             f"out of range (major 0..{MAX_MAJOR}, minor 0..{MAX_MINOR})")

    @staticmethod
    def _set_meta(node: Inode, e: TarEntry) -> None:
        node.mode, node.uid, node.gid, node.mtime_ns, node.xattrs = e.mode, e.uid, e.gid, e.mtime_ns, e.xattrs

    def _mark(self, path: tuple[bytes, ...]) -> None:
        upper = self._upper
        for i in range(len(path), 0, -1):
            p = path[:i]
            if p in upper:
                break
            upper.add(p)

    def _parent(self, entry: TarEntry, layer_index: int) -> Inode:
        """The directory that will hold entry.path, creating missing ones."""
        node, path = self.root, entry.path
        for i in range(len(path) - 1):
            child = node.children.get(path[i])
            if child is None:
                child = node.children[path[i]] = _implicit_dir(node, layer_index)
            elif child.kind is not EntryKind.DIR:
                raise LayerError(f"{self._who(entry, layer_index)}: parent '{_join(path[:i + 1])}' is "
                                 + ("a symlink (writing through a symlink is refused)"
                                    if child.kind is EntryKind.SYMLINK else f"a {child.kind.value}, "
                                    "not a directory"))
            node = child
        return node

    def _find(self, path: tuple[bytes, ...], entry: TarEntry, layer_index: int, role: str):
        """(parent, node) at path without creating anything; parent None if a component is
        missing or not a directory. A symlink parent component is an error."""
        node = self.root
        for i in range(len(path) - 1):
            child = node.children.get(path[i])
            if child is None or child.kind is not EntryKind.DIR:
                if child is not None and child.kind is EntryKind.SYMLINK:
                    raise LayerError(f"{self._who(entry, layer_index)}: {role} '{_join(path)}' goes "
                                     f"through symlink '{_join(path[:i + 1])}' (refused)")
                return None, None
            node = child
        return node, (node.children.get(path[-1]) if path else node)

    def _link_target(self, entry: TarEntry, layer_index: int) -> Inode:
        link_path = entry.link_path or ()
        _, target = self._find(link_path, entry, layer_index, "hardlink target")
        where = f"{self._who(entry, layer_index)}: hardlink target '{_join(link_path)}'"
        if link_path[:len(entry.path)] == entry.path:
            # the entry first clobbers its own path (and what is under it), so the target is gone
            # by the time it would be linked: umoci fails with ENOENT, we say why
            raise LayerError(f"{where} is the entry itself or inside it")
        if target is None:
            raise LayerError(f"{where} does not exist")
        if target.kind is EntryKind.DIR:
            raise LayerError(f"{where} is a directory")
        return target

    def _whiteout(self, entry: TarEntry) -> None:
        path = entry.path
        role = "opaque directory" if entry.kind is EntryKind.OPAQUE else "whiteout of"
        parent, node = self._find(path, entry, self._layer, role)
        if node is None:
            return
        if entry.kind is EntryKind.OPAQUE and node.kind is EntryKind.SYMLINK:
            # umoci resolves the marker's directory (SecureJoin) and empties the symlink's target
            raise LayerError(f"{self._who(entry, self._layer)}: opaque directory '{_join(path)}' is a "
                             f"symlink (writing through a symlink is refused)")
        if entry.kind is EntryKind.OPAQUE or path in self._upper:
            if node.kind is EntryKind.DIR:
                self._purge(node, path)
        else:
            del parent.children[path[-1]]

    def _purge(self, top: Inode, top_path: tuple[bytes, ...]) -> None:
        """Remove everything under `top` that the current layer did not create."""
        upper = self._upper
        stack = [(top, top_path)]
        while stack:
            d, dp = stack.pop()
            for name in list(d.children):
                cp = dp + (name,)
                if cp not in upper:
                    del d.children[name]
                elif d.children[name].kind is EntryKind.DIR:
                    stack.append((d.children[name], cp))

    # -- reading ----------------------------------------------------------------------------------
    def lookup(self, path: tuple[bytes, ...]) -> Inode | None:
        node = self.root
        for c in path:
            if node.children is None:
                return None
            node = node.children.get(c)
            if node is None:
                return None
        return node

    def walk(self) -> Iterator[tuple[tuple[bytes, ...], Inode]]:
        """(path, inode) for every name, depth first, siblings sorted by name bytes; the root
        first as `()`. Hardlinked names yield the same Inode object."""
        stack = [((), self.root)]
        while stack:
            path, node = stack.pop()
            yield path, node
            if node.children:
                for name in sorted(node.children, reverse=True):
                    stack.append((path + (name,), node.children[name]))
