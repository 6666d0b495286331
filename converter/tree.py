"""The merged file tree of an image: layers applied in order with OCI whiteout semantics.

One `Inode` per file (slots; hardlinked paths share one object), directories hold a
`children` dict keyed by name bytes. `Tree.apply(entry, layer)` merges one TarEntry:

| entry                               | effect                                                         |
|-------------------------------------|----------------------------------------------------------------|
| `.wh.X` (WHITEOUT of X)             | removes X as it exists in LOWER layers: an X this layer added  |
|                                     | (before or after) stays; for a dir, its lower children go       |
| `D/.wh..wh..opq` (OPAQUE)           | removes every lower-layer child of D, keeps this layer's        |
| `L/.wh..wh..opq`, L a symlink       | empties the directory L leads to (umoci, containerd)            |
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
| a parent component is a symlink     | followed INSIDE the root, for entries, whiteouts and hardlink   |
| (`lib/x`, lib -> usr/lib)           | targets (umoci SecureJoin, containerd fs.RootPath): absolute    |
|                                     | targets start at the root, `..` stops there, chains are         |
|                                     | followed, > 255 links → LayerError (ELOOP, as SecureJoin); the  |
|                                     | last component of a path is never followed                     |
| a parent component is another       | LayerError (umoci: MkdirAll fails with ENOTDIR, same outcome)   |
| non-directory                       |                                                                 |
| a symlink                           | mode 0777 whatever the header says (lstat on Linux)             |
| system.posix_acl_access xattr       | sets the permission bits (group = the mask) and is dropped when |
|                                     | the mode says it all, as setxattr does (converter/acl.py)       |
| the root (`./`)                     | updates the root's metadata; any other type → LayerError       |
| uid/gid > 2^32-2, device major >    | LayerError (no Linux filesystem holds them: chown/mknod fail or |
| 4095 or minor > 2^20-1              | truncate; FUSE's rdev is 32-bit)                               |

"This layer added" follows umoci's `upperPaths`: every path an entry of the current layer
created (where it landed, symlinks resolved), and all its ancestors. Implicit parents: umoci creates them with MkdirAll(0777)
(so 0755 under the usual umask), owned by the extracting user (root) and stamped with the
current time; we keep 0755 and root:root but use mtime 0 (the epoch, which is also what
umoci gives the root directory) so that a conversion is reproducible.
The root starts as 0755 root:root mtime 0, like umoci's rootfs.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

from converter import acl
from converter.tar import EntryKind, TarEntry, show
from nydus_py.errors import LayerError

_NO_DEV = (0, 0)
MAX_ID = (1 << 32) - 2          # uid/gid are 32-bit, and 2^32-1 is chown's "leave unchanged"
MAX_MAJOR, MAX_MINOR = (1 << 12) - 1, (1 << 20) - 1   # what mknod(2)'s 32-bit dev_t holds
MAX_SYMLINKS = 255              # links followed in one path lookup: SecureJoin's maxSymlinkLimit (umoci), ELOOP beyond


class Inode:
    __slots__ = (
        "children",
        "chunks",
        "gid",
        "kind",
        "layer",
        "mode",
        "mtime_ns",
        "rdev",
        "size",
        "target",
        "uid",
        "xattrs",
    )

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
        self.chunks: list[int] | array[int] = []   # builder fills a u32 array
        self.layer = layer
        self.children: dict[bytes, Inode] | None = {} if kind is EntryKind.DIR else None

    def entries(self) -> dict[bytes, Inode]:
        """A directory's children (for callers that know it is one)."""
        return _children(self)

    @classmethod
    def from_entry(cls, e: TarEntry, layer: int) -> Inode:
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


def _children(d: Inode) -> dict[bytes, Inode]:
    assert d.children is not None, "a directory"
    return d.children


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
            self._set_meta(self.root, entry, self._meta(entry, layer_index))
            return None
        if kind is not EntryKind.HARDLINK:
            self._check_values(entry, layer_index)
        parent, here = self._parent(entry, layer_index)
        kids = _children(parent)
        name = path[-1]
        if kind is EntryKind.HARDLINK:
            node = self._link_target(entry, layer_index, here)
        else:
            meta = self._meta(entry, layer_index)
            old = kids.get(name)
            if kind is EntryKind.DIR and old is not None and old.kind is EntryKind.DIR:
                self._set_meta(old, entry, meta)
                self._mark(here)
                return None
            node = Inode.from_entry(entry, layer_index)
            node.mode, node.xattrs = meta
        kids[name] = node
        self._mark(here)
        return node if kind is EntryKind.REG else None

    @staticmethod
    def _who(entry: TarEntry, layer_index: int | None) -> str:
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

    def _meta(self, e: TarEntry, layer_index: int) -> tuple[int, dict[bytes, bytes]]:
        """(mode, xattrs) as a Linux filesystem ends up with them after an unpacker applied the
        entry: a symlink's mode is always 0777 (lstat; chmod cannot change it); an access ACL
        sets the permission bits and is kept only when the mode cannot say it (converter/acl.py);
        ACLs cannot be set on symlinks (EOPNOTSUPP, which unpackers skip)."""
        mode, xattrs = e.mode, e.xattrs
        if e.kind is EntryKind.SYMLINK:
            mode = 0o777
        value = xattrs.get(acl.ACCESS)
        if value is not None:
            xattrs = dict(xattrs)
            del xattrs[acl.ACCESS]
            if e.kind is not EntryKind.SYMLINK:
                try:
                    mode, kept = acl.access_acl(mode, value)
                except ValueError as err:
                    raise LayerError(f"{self._who(e, layer_index)}: invalid POSIX ACL in xattr "
                                     f"{acl.ACCESS.decode()} ({err})") from None
                if kept is not None:
                    xattrs[acl.ACCESS] = kept
        return mode, xattrs

    @staticmethod
    def _set_meta(node: Inode, e: TarEntry, meta: tuple[int, dict[bytes, bytes]]) -> None:
        node.mode, node.xattrs = meta
        node.uid, node.gid, node.mtime_ns = e.uid, e.gid, e.mtime_ns

    def _mark(self, path: tuple[bytes, ...]) -> None:
        upper = self._upper
        for i in range(len(path), 0, -1):
            p = path[:i]
            if p in upper:
                break
            upper.add(p)

    # -- paths inside the root --------------------------------------------------------------------
    def _resolve(self, path: tuple[bytes, ...], who: str, gone: tuple[bytes, ...] | None = None
                 ) -> tuple[tuple[bytes, ...], Inode | None]:
        """Where `path` leads inside the image, following every symlink on it as containerd's
        fs.RootPath and umoci's SecureJoin do: an absolute target restarts at the root, `..`
        never climbs above it, a missing component is taken as it is (so is the rest, which
        can only be missing too until a `..` climbs back). Returns (resolved path, its node or
        None when missing or under a non-directory). At most MAX_SYMLINKS links are followed
        (ELOOP, as SecureJoin: umoci's unpack fails there too). `gone`: a path to treat as
        missing (just clobbered)."""
        node: Inode | None = self.root
        for c in path:                       # the common case: every component a directory
            if node is None or node.children is None:
                break
            node = node.children.get(c)
            if node is not None and node.kind is EntryKind.SYMLINK:
                break
        else:
            if gone is None or path[:len(gone)] != gone:
                return path, node
        todo = list(reversed(path))
        where: list[bytes] = []
        nodes: list[Inode | None] = [self.root]
        links = 0
        while todo:
            c = todo.pop()
            if c == b"" or c == b".":
                continue
            if c == b"..":
                if where:
                    where.pop()
                    nodes.pop()
                continue
            parent = nodes[-1]
            child = parent.children.get(c) if parent is not None and parent.children is not None else None
            if child is not None and gone is not None and tuple(where) + (c,) == gone:
                child = None
            if child is not None and child.kind is EntryKind.SYMLINK:
                links += 1
                if links > MAX_SYMLINKS:
                    raise LayerError(f"{who}: more than {MAX_SYMLINKS} symlinks on the way to "
                                     f"'{_join(path)}' (a loop?)")
                if child.target.startswith(b"/"):
                    where.clear()
                    del nodes[1:]
                todo.extend(reversed(child.target.split(b"/")))
                continue
            where.append(c)
            nodes.append(child)
        return tuple(where), nodes[-1]

    def _parent(self, entry: TarEntry, layer_index: int) -> tuple[Inode, tuple[bytes, ...]]:
        """The directory that will hold entry.path, creating missing ones, and the path where
        the entry lands (entry.path itself unless a symlink on the way leads elsewhere)."""
        node, path = self.root, entry.path
        for i in range(len(path) - 1):       # the common case: no symlink on the way
            kids = _children(node)
            child = kids.get(path[i])
            if child is None:
                child = kids[path[i]] = _implicit_dir(node, layer_index)
            elif child.kind is not EntryKind.DIR:
                if child.kind is EntryKind.SYMLINK:
                    # everything before it exists, so nothing was created yet
                    return self._parent_via_links(entry, layer_index)
                raise LayerError(f"{self._who(entry, layer_index)}: parent '{_join(path[:i + 1])}' is "
                                 f"a {child.kind.value}, not a directory")
            node = child
        return node, path

    def _parent_via_links(self, entry: TarEntry, layer_index: int) -> tuple[Inode, tuple[bytes, ...]]:
        who = self._who(entry, layer_index)
        where, node = self._resolve(entry.path[:-1], who)
        if node is None or node.kind is not EntryKind.DIR:
            node = self.root
            for i, c in enumerate(where):      # no symlink left on the resolved path
                kids = _children(node)
                child = kids.get(c)
                if child is None:
                    child = kids[c] = _implicit_dir(node, layer_index)
                elif child.kind is not EntryKind.DIR:
                    raise LayerError(f"{who}: parent '{_join(where[:i + 1])}' (where "
                                     f"'{_join(entry.path[:-1])}' leads) is a {child.kind.value}, "
                                     f"not a directory")
                node = child
        return node, where + entry.path[-1:]

    def _link_target(self, entry: TarEntry, layer_index: int, here: tuple[bytes, ...]) -> Inode:
        """The inode a hardlink joins: its target's directory resolved inside the root (the
        last component is not followed: a link to a symlink links the symlink, as umoci)."""
        link_path = entry.link_path or ()
        who = self._who(entry, layer_index)
        where = f"{who}: hardlink target '{_join(link_path)}'"
        # the entry first clobbers its own path (and what is under it), so a target there is
        # gone by the time it would be linked: umoci fails with ENOENT, we say why
        if link_path[:len(entry.path)] == entry.path:
            raise LayerError(f"{where} is the entry itself or inside it")
        d, dnode = self._resolve(link_path[:-1], who, gone=here)
        if d + link_path[-1:] == here or (d + link_path[-1:])[:len(here)] == here:
            raise LayerError(f"{where} is the entry itself or inside it")
        target = dnode.children.get(link_path[-1]) if dnode is not None and dnode.children is not None else None
        if target is None:
            raise LayerError(f"{where} does not exist")
        if target.kind is EntryKind.DIR:
            raise LayerError(f"{where} is a directory")
        return target

    def _whiteout(self, entry: TarEntry) -> None:
        """A whiteout's directory is resolved inside the root (umoci, containerd), so is an
        opaque marker's directory itself: `lib/.wh.x` with lib -> usr/lib removes usr/lib/x."""
        path, opaque = entry.path, entry.kind is EntryKind.OPAQUE
        who = self._who(entry, self._layer)
        parent: Inode | None
        if opaque:
            where, node = self._resolve(path, who)
            parent = None
        else:
            pwhere, parent = self._resolve(path[:-1], who)
            where = pwhere + path[-1:]
            node = parent.children.get(path[-1]) if parent is not None and parent.children is not None else None
        if node is None:
            return
        if opaque or where in self._upper:
            if node.kind is EntryKind.DIR:
                self._purge(node, where)
        elif parent is not None and parent.children is not None:
            del parent.children[path[-1]]

    def _purge(self, top: Inode, top_path: tuple[bytes, ...]) -> None:
        """Remove everything under `top` that the current layer did not create."""
        upper = self._upper
        stack = [(top, top_path)]
        while stack:
            d, dp = stack.pop()
            kids = _children(d)
            for name in list(kids):
                cp = dp + (name,)
                if cp not in upper:
                    del kids[name]
                elif kids[name].kind is EntryKind.DIR:
                    stack.append((kids[name], cp))

    # -- reading ----------------------------------------------------------------------------------
    def lookup(self, path: tuple[bytes, ...]) -> Inode | None:
        node: Inode | None = self.root
        for c in path:
            if node is None or node.children is None:
                return None
            node = node.children.get(c)
        return node

    def walk(self) -> Iterator[tuple[tuple[bytes, ...], Inode]]:
        """(path, inode) for every name, depth first, siblings sorted by name bytes; the root
        first as `()`. Hardlinked names yield the same Inode object."""
        stack: list[tuple[tuple[bytes, ...], Inode]] = [((), self.root)]
        while stack:
            path, node = stack.pop()
            yield path, node
            if node.children:
                for name in sorted(node.children, reverse=True):
                    stack.append((path + (name,), node.children[name]))
