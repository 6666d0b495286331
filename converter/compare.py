"""Compare two directory trees, metadata and content; backs `nydusify check`.

`compare_trees(expected, actual)` walks both trees with lstat (symlinks are never followed)
and returns one human-readable line per difference, each naming the path ("/" is the root
dir itself). An empty list means the trees are the same.

Compared, for every entry including the root directory:
  - presence (names are bytes, so non-UTF-8 names work; shown with backslash escapes)
  - file type (S_IFMT), then full st_mode (permission bits + setuid/setgid/sticky)
  - st_uid, st_gid
  - st_mtime_ns, at nanosecond precision, for every type (symlinks and directories too)
  - st_size for regular files and symlinks (a symlink's size is its target length)
  - xattrs (names + values, follow_symlinks=False), minus IGNORED_XATTRS
  - symlink target (readlink, bytes)
  - st_rdev (major, minor) for char/block devices
  - st_nlink for non-directories, and hardlink groups: the set of paths sharing an inode must
    be the same on both sides (a group split or merged is reported once, with both groups)
  - regular file content: compared in 1 MiB blocks, reporting the first differing offset
    (bounded memory; skipped when sizes differ or check_content=False)

Not compared, and why:
  - st_atime, st_ctime: set by the kernel at access / metadata-change time; no image format
    stores them and no unpacker can reproduce them.
  - st_ino, st_dev, st_blocks, st_blksize: properties of the backing filesystem, not of the
    image (a hole-y sparse file and a dense copy are the same file).
  - directory st_size (4096 multiples on ext4, entry counts elsewhere).
  - directory st_nlink by default (2 + subdirs on ext4, 1 on btrfs/some FUSE fs); the set of
    names already proves the structure. Pass check_dir_nlink=True to compare it anyway.
  - IGNORED_XATTRS: `security.selinux` is a host label the kernel/LSM attaches on creation
    and umoci refuses to write from a layer; `system.nfs4_acl` is likewise host-specific
    (umoci forbids it too). Everything else, including security.capability, trusted.* and
    user.*, is compared. (umoci also drops xattrs whose value is empty: Go's tar reader
    treats an empty PAX record as "unset". A converter must do the same to match.)
  - `ignore_mtime`: paths whose mtime the reference unpacker set to "now" (umoci does this
    for implicitly created parent dirs and their ancestors); the caller names them.
"""

from __future__ import annotations

import os
import stat
from collections import defaultdict
from typing import Container, Iterable

IGNORED_XATTRS = frozenset({"security.selinux", "system.nfs4_acl"})
_BLOCK = 1 << 20
_TYPES = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
          stat.S_IFCHR: "char device", stat.S_IFBLK: "block device", stat.S_IFIFO: "fifo",
          stat.S_IFSOCK: "socket"}


def show(rel: bytes) -> str:
    """Printable form of a tree-relative bytes path ("/" for the root)."""
    return "/" + rel.decode("utf-8", "backslashreplace").replace("\n", "\\n")


def _kind(mode: int) -> str:
    return _TYPES.get(stat.S_IFMT(mode), f"type {stat.S_IFMT(mode):o}")


def _join(base: bytes, rel: bytes) -> bytes:
    return base + b"/" + rel if rel else base


def compare_trees(expected: str | os.PathLike, actual: str | os.PathLike, *,
                  check_content: bool = True, check_dir_nlink: bool = False,
                  ignore_xattrs: Iterable[str] = IGNORED_XATTRS,
                  ignore_mtime: Container[bytes] = (), max_diffs: int | None = None) -> list[str]:
    """Differences between two trees, [] when identical. See the module docstring."""
    c = _Comparer(os.fsencode(expected), os.fsencode(actual), check_content, check_dir_nlink,
                  frozenset(ignore_xattrs), ignore_mtime, max_diffs)
    c.run()
    return c.diffs


class _Stop(Exception):
    pass


class _Comparer:
    def __init__(self, exp: bytes, act: bytes, check_content: bool, check_dir_nlink: bool,
                 ignore_xattrs: frozenset[str], ignore_mtime: Container[bytes], max_diffs: int | None):
        self.exp, self.act = exp.rstrip(b"/") or b"/", act.rstrip(b"/") or b"/"
        self.check_content, self.check_dir_nlink = check_content, check_dir_nlink
        self.ignore_xattrs, self.ignore_mtime, self.max_diffs = ignore_xattrs, ignore_mtime, max_diffs
        self.diffs: list[str] = []
        # inode -> paths, for non-dirs with nlink > 1 (per side)
        self.links: tuple[dict, dict] = (defaultdict(list), defaultdict(list))
        self.inode_of: tuple[dict, dict] = ({}, {})

    def add(self, rel: bytes, msg: str) -> None:
        self.diffs.append(f"{show(rel)}: {msg}")
        if self.max_diffs is not None and len(self.diffs) >= self.max_diffs:
            raise _Stop

    def run(self) -> None:
        try:
            for side, root in enumerate((self.exp, self.act)):
                if not os.path.isdir(root) or os.path.islink(root):
                    self.diffs.append(f"{os.fsdecode(root)}: not a directory")
            if self.diffs:
                return
            self.walk()
            self.compare_link_groups()
        except _Stop:
            pass

    def walk(self) -> None:
        stack = [b""]
        while stack:
            rel = stack.pop()
            se = os.lstat(_join(self.exp, rel))
            sa = os.lstat(_join(self.act, rel))
            if not self.compare_entry(rel, se, sa) or not stat.S_ISDIR(se.st_mode):
                continue
            names_e = set(os.listdir(_join(self.exp, rel)))
            names_a = set(os.listdir(_join(self.act, rel)))
            for name in sorted(names_e - names_a):
                child = rel + b"/" + name if rel else name
                self.add(child, f"missing ({_kind(os.lstat(_join(self.exp, child)).st_mode)} "
                                f"not in actual)")
            for name in sorted(names_a - names_e):
                child = rel + b"/" + name if rel else name
                self.add(child, f"extra ({_kind(os.lstat(_join(self.act, child)).st_mode)} "
                                f"not in expected)")
            stack.extend(sorted((rel + b"/" + n if rel else n for n in names_e & names_a), reverse=True))

    def compare_entry(self, rel: bytes, se: os.stat_result, sa: os.stat_result) -> bool:
        """Compare one entry; False when the types differ (nothing more to compare)."""
        if stat.S_IFMT(se.st_mode) != stat.S_IFMT(sa.st_mode):
            self.add(rel, f"type differs: expected {_kind(se.st_mode)}, actual {_kind(sa.st_mode)}")
            return False
        mode = se.st_mode
        if se.st_mode != sa.st_mode:
            self.add(rel, f"mode differs: expected {se.st_mode:#o}, actual {sa.st_mode:#o}")
        for field in ("st_uid", "st_gid"):
            if getattr(se, field) != getattr(sa, field):
                self.add(rel, f"{field[3:]} differs: expected {getattr(se, field)}, actual {getattr(sa, field)}")
        if se.st_mtime_ns != sa.st_mtime_ns and rel not in self.ignore_mtime:
            self.add(rel, f"mtime differs: expected {_ns(se.st_mtime_ns)}, actual {_ns(sa.st_mtime_ns)}")
        is_dir = stat.S_ISDIR(mode)
        if (not is_dir or self.check_dir_nlink) and se.st_nlink != sa.st_nlink:
            self.add(rel, f"nlink differs: expected {se.st_nlink}, actual {sa.st_nlink}")
        if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
            if se.st_size != sa.st_size:
                self.add(rel, f"size differs: expected {se.st_size}, actual {sa.st_size}")
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            if se.st_rdev != sa.st_rdev:
                self.add(rel, f"device differs: expected {_dev(se.st_rdev)}, actual {_dev(sa.st_rdev)}")
        pe, pa = _join(self.exp, rel), _join(self.act, rel)
        if stat.S_ISLNK(mode):
            te, ta = os.readlink(pe), os.readlink(pa)
            if te != ta:
                self.add(rel, f"symlink target differs: expected {te!r}, actual {ta!r}")
        self.compare_xattrs(rel, pe, pa)
        if not is_dir and (se.st_nlink > 1 or sa.st_nlink > 1):
            for side, st in enumerate((se, sa)):
                key = (st.st_dev, st.st_ino)
                self.links[side][key].append(rel)
                self.inode_of[side][rel] = key
        if stat.S_ISREG(mode) and self.check_content and se.st_size == sa.st_size:
            off = _first_difference(pe, pa)
            if off is not None:
                self.add(rel, f"content differs (first at byte {off})")
        return True

    def compare_xattrs(self, rel: bytes, pe: bytes, pa: bytes) -> None:
        xe, xa = _xattrs(pe, self.ignore_xattrs), _xattrs(pa, self.ignore_xattrs)
        if xe == xa:
            return
        for name in sorted(xe.keys() - xa.keys()):
            self.add(rel, f"xattr {name} missing (expected {_short(xe[name])})")
        for name in sorted(xa.keys() - xe.keys()):
            self.add(rel, f"xattr {name} extra (actual {_short(xa[name])})")
        for name in sorted(xe.keys() & xa.keys()):
            if xe[name] != xa[name]:
                self.add(rel, f"xattr {name} differs: expected {_short(xe[name])}, actual {_short(xa[name])}")

    def compare_link_groups(self) -> None:
        """The paths sharing an inode must be the same on both sides. Only paths present on
        both sides are recorded, so a missing path (reported already) does not count here."""
        groups: tuple[dict, dict] = ({}, {})
        seen: set[tuple[tuple, tuple]] = set()
        for rel in sorted(self.inode_of[0]):
            keys = (self.inode_of[0][rel], self.inode_of[1][rel])
            if keys in seen:
                continue
            seen.add(keys)
            ge, ga = (groups[side].get(keys[side]) or groups[side].setdefault(
                keys[side], frozenset(self.links[side][keys[side]])) for side in (0, 1))
            if ge == ga:
                continue
            self.add(rel, "hardlink group differs: expected {" + ", ".join(map(show, sorted(ge)))
                     + "}, actual {" + ", ".join(map(show, sorted(ga))) + "}")


def _xattrs(path: bytes, ignore: frozenset[str]) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:       # ENOTSUP on some filesystems, EPERM on symlinks in some setups
        return {}
    out = {}
    for n in names:
        if n in ignore:
            continue
        try:
            out[n] = os.getxattr(path, n, follow_symlinks=False)
        except OSError:
            continue
    return out


def _first_difference(a: bytes, b: bytes) -> int | None:
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        off = 0
        while True:
            ba, bb = fa.read(_BLOCK), fb.read(_BLOCK)
            if ba != bb:
                n = min(len(ba), len(bb))
                i = next((i for i in range(n) if ba[i] != bb[i]), n)
                return off + i
            if not ba:
                return None
            off += len(ba)


def _ns(ns: int) -> str:
    s, f = divmod(ns, 1_000_000_000)
    return f"{s}.{f:09d}"


def _dev(rdev: int) -> str:
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def _short(v: bytes, limit: int = 40) -> str:
    return repr(v if len(v) <= limit else v[:limit] + b"...")
