"""Differential test: random multi-layer images, converted and mounted, must equal umoci's unpack.

A seeded generator draws 3–5 layers from the whole tar/overlay vocabulary: regular files
(empty, small, multi-chunk at --chunk-size 0x1000, duplicated content, PAX sparse), dirs with
odd modes (0, setuid, setgid, sticky), symlinks (relative, absolute, dangling, to dirs),
hardlinks (same layer, to lower layers, to symlinks/devices, later rewritten or whited out),
char/block devices, FIFOs, xattrs (binary values, on dirs/symlinks/devices), big uid/gid,
nanosecond and pre-epoch mtimes, whiteouts (files, dirs with content, hardlinked paths, paths
re-added in the same layer before or after the whiteout), opaque dirs (marker before or after
same-layer children), type replacements across layers, implicit parents, root-dir entries,
odd names (spaces, newlines, non-UTF-8, `.wh.` inside a name, components > 100 bytes, paths
> 255 bytes), PAX vs GNU headers, ustar prefix or not, gzip/zstd/uncompressed layers.

Inputs stay inside what both umoci and our documented policy accept (no `..` in names,
hardlinks only to existing non-directories; entries below symlinks are in, resolved inside the
root as umoci and containerd resolve them): the generator tracks the
merged tree with converter.tree.Tree while it generates, and drops an entry the tree refuses.
Only the mtimes umoci set to "now" (implicit parents and their ancestors) are ignored.

NYDUS_FUZZ_SEEDS=N (default 12) seeds 0..N-1; NYDUS_FUZZ_SEED_BASE=B starts at B instead.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from converter.compare import compare_trees
from converter.tar import EntryKind, TarEntry
from converter.tree import Tree
from nydus_py.errors import LayerError
from tests.fixtures.imagegen import (
    CAP_NET_BIND_SERVICE,
    T0_NS,
    Content,
    Image,
    Layer,
    _checksum,
    hostile_layer,
    pax_record,
    raw_header,
)
from tests.fixtures.umoci import umoci_reference

pytestmark = pytest.mark.e2e

VENV_BIN = Path(sys.executable).parent
SEEDS = int(os.environ.get("NYDUS_FUZZ_SEEDS", "12"))
SEED_BASE = int(os.environ.get("NYDUS_FUZZ_SEED_BASE", "0"))
K = EntryKind

NAMES = [b"a", b"b", b"c", b"dir x", b"nl\nname", b"\xff\xfe-raw", "\u00e9t\u00e9-\u540d".encode(),
         b"a.wh.b", b"x.wh..wh..opq", b".hidden", b"L" * 120, b"M" * 200, b"P" * 100, b"Q" * 99,
         b"-dash", b"tab\tname", b"~"]
FILE_MODES = [0o644, 0o644, 0o600, 0o755, 0o000, 0o4755, 0o2755, 0o6711, 0o1644, 0o7777, 0o444]
DIR_MODES = [0o755, 0o755, 0o700, 0o000, 0o4755, 0o2775, 0o1777, 0o7777, 0o711, 0o500]
IDS = [0, 0, 0, 1, 1000, 65534, 70000, 3_000_000, 2**31 - 1, 2**32 - 2]
# (not /etc/passwd: entries written through a link to it would make it a directory, which
# breaks umoci's config.json step after the unpack)
SYMLINK_TARGETS = [b"a", b"../a", b"/etc/shadow", b"nowhere/at/all", b".", b"..", b"/", b"t" * 150,
                   b"dir x/", b"\xff\xfe-raw"]


# --------------------------------------------------------------------------- generator

class Gen:
    """One random image. `tree` follows what the layers produced so far mean, so that the
    generator picks existing paths for hardlinks/whiteouts/rewrites and never writes under a
    non-directory (inputs our policy rejects are not the subject here)."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.tree = Tree()
        self.layers: list[Layer] = []
        self.contents: list[Content] = [Content.of(b""), Content.of(b"same content\n")]
        self.layer_index = -1
        self.layer: Layer | None = None

    # -- helpers ---------------------------------------------------------------------------------
    def mtime(self) -> int:
        r = self.rng.random()
        if r < 0.05:
            return 0
        if r < 0.08:
            return -1_500_000_000 - self.rng.randrange(10**9)      # before the epoch
        return T0_NS + self.rng.randrange(10**12)

    def ids(self) -> dict:
        return dict(uid=self.rng.choice(IDS), gid=self.rng.choice(IDS), mtime_ns=self.mtime())

    def xattrs(self, kind: EntryKind) -> dict:
        if self.rng.random() < 0.75:
            return {}
        out = {}
        for _ in range(self.rng.randint(1, 3)):
            ns = "user" if kind in (K.REG, K.DIR) and self.rng.random() < 0.6 else "trusted"
            name = f"{ns}.{self.rng.choice(['a', 'b', 'long-' + 'n' * 40, 'bin'])}"
            out[name] = self.rng.choice([b"v", bytes(range(256)), b"\0\xff\n=", b"x" * 1200])
        if kind is K.REG and self.rng.random() < 0.2:
            out["security.capability"] = CAP_NET_BIND_SERVICE
        return out

    def paths(self, pred) -> list[tuple[bytes, ...]]:
        return [p for p, n in self.tree.walk() if p and pred(n)]

    def existing_dirs(self) -> list[tuple[bytes, ...]]:
        return [()] + self.paths(lambda n: n.kind is K.DIR)

    def new_path(self) -> tuple[bytes, ...]:
        """A path under an existing dir, sometimes with missing (implicit) parents."""
        base = self.rng.choice(self.existing_dirs())
        extra = 1 if self.rng.random() < 0.8 else self.rng.randint(2, 3)
        path = base + tuple(self.rng.choice(NAMES) for _ in range(extra))
        return path

    def any_path(self) -> tuple[bytes, ...]:
        existing = self.paths(lambda n: True)
        if existing and self.rng.random() < 0.6:
            return self.rng.choice(existing)
        return self.new_path()

    def apply(self, entry_args: dict, kind: EntryKind, path: tuple[bytes, ...], **te) -> bool:
        """Add one entry to the layer if the tree accepts it."""
        name = b"/".join(path)
        if not self.tree_ok(kind, path, **te):
            return False
        add = entry_args.pop("_add")
        if name == b"" and kind is K.DIR:
            name = self.rng.choice([b"./", b"/", b"."])
        elif self.rng.random() < 0.1 and kind not in (K.WHITEOUT, K.OPAQUE):
            name = self.rng.choice([b"./", b"/"]) + name + (b"/" if kind is K.DIR else b"")
        add(name, **entry_args)
        return True

    def tree_ok(self, kind: EntryKind, path, **te) -> bool:
        e = TarEntry(path=path, kind=kind, **te)
        try:
            self.tree.apply(e, self.layer_index)
        except LayerError:
            return False
        return True

    # -- ops -------------------------------------------------------------------------------------
    def op_file(self, path=None):
        path = path or self.any_path()
        r = self.rng.random()
        if r < 0.15:
            content = Content.of(b"")
        elif r < 0.3:
            content = self.rng.choice(self.contents)
        elif r < 0.45:
            content = Content.random(self.rng.randint(4096, 5 * 4096 + 100), seed=self.rng.randrange(10**6))
        elif r < 0.5:
            content = Content.pattern(3 * 4096, b"\xab" * 4096)   # dedupable chunks
        else:
            content = Content.of(self.rng.randbytes(self.rng.randint(1, 300)))
        self.contents.append(content)
        meta = dict(mode=self.rng.choice(FILE_MODES), xattrs=self.xattrs(K.REG), **self.ids())
        if self.layer.fmt == "pax" and self.rng.random() < 0.05:
            size = 3 * 4096
            segs = [(0, 100), (8192, 50)]
            ok = self.tree_ok(K.REG, path, size=size, **_te(meta))
            if ok:
                self.layer.sparse_file(_nm(path), size, segs, seed=self.rng.randrange(1000), **meta)
            return
        self.apply(dict(_add=lambda n, **kw: self.layer.file(n, content, **kw), **meta), K.REG, path,
                   size=content.size, **_te(meta))

    def op_dir(self, path=None):
        path = path if path is not None else (self.any_path() if self.rng.random() < 0.3 else self.new_path())
        meta = dict(mode=self.rng.choice(DIR_MODES), xattrs=self.xattrs(K.DIR), **self.ids())
        self.apply(dict(_add=self.layer.dir, **meta), K.DIR, path, **_te(meta))

    def op_symlink(self, path=None):
        path = path or self.any_path()
        target = self.rng.choice(SYMLINK_TARGETS + [b"/".join(self.any_path())])
        meta = dict(xattrs=self.xattrs(K.SYMLINK), **self.ids())
        self.apply(dict(_add=lambda n, **kw: self.layer.symlink(n, target, **kw), **meta), K.SYMLINK, path,
                   linkname=target, **_te(meta))

    def op_hardlink(self, path=None):
        targets = self.paths(lambda n: n.kind is not K.DIR)
        if not targets:
            return self.op_file()
        target = self.rng.choice(targets)
        path = path or self.any_path()
        if path == target:
            return
        self.apply(dict(_add=lambda n, **kw: self.layer.hardlink(n, b"/".join(target), **kw)),
                   K.HARDLINK, path, link_path=target, linkname=b"/".join(target))

    def op_special(self, path=None):
        path = path or self.any_path()
        kind = self.rng.choice([K.CHR, K.BLK, K.FIFO])
        meta = dict(mode=self.rng.choice([0o666, 0o600, 0o4640]), xattrs=self.xattrs(kind), **self.ids())
        major, minor = self.rng.choice([(1, 3), (8, 0), (300, 70000), (0, 0), (4095, 1048575)])
        if kind is K.FIFO:
            add = self.layer.fifo
        else:
            fn = self.layer.char if kind is K.CHR else self.layer.block
            add = lambda n, **kw: fn(n, major, minor, **kw)  # noqa: E731
        self.apply(dict(_add=add, **meta), kind, path, devmajor=major, devminor=minor, **_te(meta))

    def op_whiteout(self, path=None):
        path = path or self.any_path()
        if not path:
            return
        self.apply(dict(_add=lambda n, **kw: self.layer.whiteout(n, **kw)), K.WHITEOUT, path)

    def op_opaque(self, path=None):
        dirs = self.existing_dirs()
        path = path if path is not None else self.rng.choice(dirs)
        self.apply(dict(_add=lambda n, **kw: self.layer.opaque(n, **kw)), K.OPAQUE, path)

    def op_readd(self):
        """Whiteout + re-add of one path in this layer, in either order."""
        path = self.rng.choice(self.paths(lambda n: True) or [self.new_path()])
        adders = [self.op_file, self.op_dir, self.op_symlink]
        add = self.rng.choice(adders)
        if self.rng.random() < 0.5:
            self.op_whiteout(path)
            add(path)
        else:
            add(path)
            self.op_whiteout(path)

    def op_opaque_with_children(self):
        d = self.rng.choice(self.existing_dirs())
        before = self.rng.random() < 0.5
        if before:
            self.op_opaque(d)
        for _ in range(self.rng.randint(1, 3)):
            self.rng.choice([self.op_file, self.op_dir, self.op_symlink])(d + (self.rng.choice(NAMES),))
        if not before:
            self.op_opaque(d)

    def op_twice(self):
        """The same path twice in one layer (last wins)."""
        path = self.new_path()
        op = self.rng.choice([self.op_file, self.op_dir])
        op(path)
        self.rng.choice([self.op_file, self.op_dir, self.op_symlink, self.op_special])(path)

    def op_deep(self):
        """A path over 255 bytes, by long components."""
        path = self.rng.choice(self.existing_dirs())
        while len(b"/".join(path)) < 300:
            path += (self.rng.choice([b"L" * 120, b"M" * 200, b"d"]),)
        self.rng.choice([self.op_file, self.op_symlink, self.op_dir])(path)

    def op_whiteout_dir_keep_child(self):
        """A dir with lower content whited out while this layer also writes inside it."""
        dirs = self.paths(lambda n: n.kind is K.DIR and n.children)
        if not dirs:
            return self.op_dir()
        d = self.rng.choice(dirs)
        child = d + (self.rng.choice(list(self.tree.lookup(d).children) + NAMES),)
        add = self.rng.choice([self.op_file, self.op_dir, self.op_symlink, self.op_hardlink])
        if self.rng.random() < 0.5:
            self.op_whiteout(d)
            add(child)
        else:
            add(child)
            self.op_whiteout(d)

    def op_link_then_rewrite(self):
        """A hardlink to a (lower) file, then its target rewritten or removed in this layer."""
        files = self.paths(lambda n: n.kind is K.REG)
        if not files:
            return self.op_file()
        target = self.rng.choice(files)
        path = self.new_path()
        if path[:len(target)] == target or target[:len(path)] == path:
            return
        if self.apply(dict(_add=lambda n, **kw: self.layer.hardlink(n, b"/".join(target), **kw)),
                      K.HARDLINK, path, link_path=target, linkname=b"/".join(target)):
            self.rng.choice([self.op_file, self.op_whiteout, self.op_dir])(target)

    def op_root(self):
        self.op_dir(())

    def op_through_symlink(self):
        """An entry, whiteout or opaque marker below a symlink: applied where it leads, inside
        the root (absolute targets from the root, `..` stopping there, chains followed)."""
        links = self.paths(lambda n: n.kind is K.SYMLINK)
        if not links:
            return self.op_symlink()
        link = self.rng.choice(links)
        child = link + (self.rng.choice(NAMES),)
        self.rng.choice([self.op_file, self.op_dir, self.op_symlink, self.op_whiteout, self.op_special,
                         lambda p: self.op_opaque(link)])(child)

    OPS = [("op_file", 30), ("op_dir", 15), ("op_symlink", 8), ("op_hardlink", 10), ("op_special", 5),
           ("op_whiteout", 10), ("op_opaque", 3), ("op_readd", 5), ("op_opaque_with_children", 4),
           ("op_twice", 4), ("op_deep", 2), ("op_root", 1), ("op_whiteout_dir_keep_child", 4),
           ("op_link_then_rewrite", 4), ("op_through_symlink", 5)]

    def image(self) -> Image:
        names, weights = zip(*self.OPS)
        for i in range(self.rng.randint(3, 5)):
            self.layer_index = i
            self.layer = Layer(compression=self.rng.choice(["gzip", "zstd", "none"]),
                               fmt=self.rng.choice(["pax", "gnu"]), use_prefix=self.rng.random() < 0.7)
            for _ in range(self.rng.randint(6, 30)):
                getattr(self, self.rng.choices(names, weights)[0])()
            self.layers.append(self.layer)
        return Image(self.layers)


def _te(meta: dict) -> dict:
    """imagegen keyword arguments → TarEntry keyword arguments."""
    out = {k: v for k, v in meta.items() if k in ("mode", "uid", "gid", "mtime_ns")}
    out["xattrs"] = {k.encode(): v for k, v in meta.get("xattrs", {}).items()}
    return out


def _nm(path: tuple[bytes, ...]) -> bytes:
    return b"/".join(path)


def random_image(seed: int) -> Image:
    return Gen(seed).image()


# --------------------------------------------------------------------------- convert, mount, compare

def convert_mount_compare(tmp_path: Path, image: Image, tag: str = "fuzz") -> list[str]:
    src, dst, mnt = tmp_path / "src", tmp_path / "dst", tmp_path / "mnt"
    image.write_oci(src, tag)
    r = subprocess.run([str(VENV_BIN / "nydusify"), "convert", "--source", f"oci:{src}:{tag}",
                        "--target", f"oci:{dst}:{tag}", "--chunk-size", "0x1000", "--quiet"],
                       capture_output=True, text=True, timeout=120)
    ref = umoci_reference(src, tag, tmp_path / "umoci")
    assert r.returncode == 0, f"nydusify convert failed but umoci unpacked it: {r.stderr}"
    mnt.mkdir()
    m = subprocess.run([str(VENV_BIN / "nydusd"), "mount", "--image", f"oci:{dst}:{tag}", "--cache-dir",
                        str(tmp_path / "cache"), "--daemon", str(mnt)], capture_output=True, text=True,
                       timeout=60)
    assert m.returncode == 0, m.stderr
    try:
        return compare_trees(ref.rootfs, mnt, ignore_mtime=ref.volatile_mtimes, max_diffs=50)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


@pytest.mark.parametrize("seed", range(SEED_BASE, SEED_BASE + SEEDS))
def test_random_image_matches_umoci(tmp_path, umoci, seed):
    diffs = convert_mount_compare(tmp_path, random_image(seed))
    assert not diffs, f"seed {seed}: {len(diffs)} difference(s):\n" + "\n".join(diffs)


# --------------------------------------------------------------------------- hand-picked edge cases
# Each builds a small image, checked against umoci the same way. `both_reject` is for inputs
# umoci refuses to unpack: we must refuse them too, with one line naming the entry.

def _check(tmp_path: Path, *layers: Layer) -> None:
    diffs = convert_mount_compare(tmp_path, Image(list(layers)))
    assert not diffs, "\n".join(diffs)


def _both_reject(tmp_path: Path, *layers: Layer, match: str) -> str:
    src = tmp_path / "src"
    Image(list(layers)).write_oci(src, "t")
    r = subprocess.run([str(VENV_BIN / "nydusify"), "convert", "--source", f"oci:{src}:t",
                        "--target", f"oci:{tmp_path / 'dst'}:t", "--quiet"], capture_output=True, text=True)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nydusify: error:") and match in lines[0], r.stderr
    assert not (tmp_path / "dst").exists()
    with pytest.raises(Exception, match="failed"):
        umoci_reference(src, "t", tmp_path / "umoci")
    return lines[0]


def test_opaque_marker_after_same_layer_children(tmp_path, umoci):
    a, b = Layer(), Layer()
    a.dir("d", mode=0o750, mtime_ns=T0_NS + 5)
    a.file("d/x", b"x")
    a.dir("d/sub")
    a.file("d/sub/y", b"y")
    b.file("d/new", b"added before the marker")
    b.dir("d/sub2")
    b.file("d/sub2/z", b"z")
    b.opaque("d")
    b.file("d/after", b"added after the marker")
    _check(tmp_path, a, b)


def test_whiteouts_of_the_roots_children_and_a_whiteout_only_layer(tmp_path, umoci):
    a, b, c = Layer(), Layer(fmt="gnu"), Layer()
    a.dir("./", mode=0o711, mtime_ns=T0_NS + 1)
    a.dir("etc")
    a.file("etc/passwd", b"root")
    a.dir("bin")
    a.symlink("sh", "bin/busybox")
    a.file("top", b"top")
    b.whiteout("etc")
    b.whiteout("sh")
    b.whiteout("top")
    b.whiteout("never-there")
    c.opaque("")
    c.file("only", b"the root is opaque")
    _check(tmp_path, a, b, c)


def test_hardlink_then_whiteout_of_its_target_in_the_same_layer(tmp_path, umoci):
    a, b = Layer(), Layer()
    a.file("f", b"content", mode=0o4755, uid=7)     # setuid file, hardlinked
    a.hardlink("f2", "f")
    b.hardlink("g", "f")          # g joins f's inode before f goes
    b.whiteout("f")
    _check(tmp_path, a, b)


def test_hardlink_to_a_path_whited_out_earlier_in_the_layer(tmp_path, umoci):
    a, b = Layer(), Layer()
    a.file("f", b"content")
    b.whiteout("f")
    b.hardlink("g", "f")
    _both_reject(tmp_path, a, b, match="hardlink target 'f' does not exist")


def test_hardlinked_path_whited_out_in_an_upper_layer_keeps_the_other_link(tmp_path, umoci):
    a, b, c = Layer(), Layer(), Layer()
    a.file("f", b"shared", mode=0o4711, xattrs={"user.k": b"v"})
    a.hardlink("g", "f")
    a.hardlink("h", "f")
    b.whiteout("f")
    c.file("h", b"h rewritten: leaves the group")
    _check(tmp_path, a, b, c)


def test_hardlink_to_a_symlink_links_the_symlink(tmp_path, umoci):
    a, b = Layer(), Layer()
    a.dir("d")
    a.file("d/real", b"real")
    a.symlink("s", "d/real", xattrs={"trusted.t": b"1"})
    a.hardlink("hs", "s")
    b.hardlink("hs2", "s")
    a.symlink("dangling", "nowhere")
    b.hardlink("hd", "dangling")
    _check(tmp_path, a, b)


def test_opaque_on_a_dir_that_was_a_file(tmp_path, umoci):
    a, b = Layer(), Layer()
    a.file("d", b"a file first")
    b.dir("d", mode=0o700)
    b.opaque("d")
    b.file("d/x", b"x")
    _check(tmp_path, a, b)


def test_opaque_under_a_path_that_is_still_a_file(tmp_path, umoci):
    a, b = Layer(), Layer()
    a.file("d", b"a file")
    b.opaque("d")                 # no-op on a file (both)
    b.file("d/x", b"x")           # but nothing can go under a file
    _both_reject(tmp_path, a, b, match="parent 'd' is a reg")


def test_names_containing_wh_are_not_whiteouts(tmp_path, umoci):
    a, b = Layer(), Layer()
    a.file("a.wh.b", b"1")
    a.file("x.wh..wh..opq", b"2")
    a.dir("d.wh.")
    a.file("d.wh./f", b"3")
    b.whiteout("a.wh.b")
    b.file("keep.wh.", b"4")
    _check(tmp_path, a, b)


def test_same_path_twice_in_one_layer_last_wins(tmp_path, umoci):
    a, b = Layer(), Layer()
    a.dir("d", mode=0o700, uid=1, mtime_ns=T0_NS + 1, xattrs={"user.first": b"1"})
    a.file("d/f", b"first", mode=0o600, uid=5)
    a.file("d/f", b"second, longer", mode=0o644, uid=6, xattrs={"user.x": b"y"})
    a.dir("d", mode=0o751, uid=2, mtime_ns=T0_NS + 2, xattrs={"user.second": b"2"})
    b.file("e", b"file")
    b.dir("e", mode=0o2770, gid=9)         # file then dir in one layer
    b.file("e/x", b"x")
    b.symlink("f", "e")
    b.file("f", b"symlink then file")
    _check(tmp_path, a, b)


def test_file_dir_symlink_replacements_across_layers(tmp_path, umoci):
    a, b, c, d = Layer(), Layer(fmt="gnu"), Layer(compression="zstd"), Layer(compression="none")
    a.file("p", b"file")
    a.dir("q")
    a.file("q/child", b"child")
    b.dir("p")
    b.file("p/inner", b"inner")
    b.file("q", b"dir replaced by file")
    c.symlink("p", "q")
    c.dir("q", mode=0o1777)                 # recreated: empty
    d.whiteout("q")
    d.dir("q", mode=0o755, mtime_ns=T0_NS + 9)
    _check(tmp_path, a, b, c, d)


# regressions: bugs the random differential found ------------------------------------------------

def test_regression_implicit_parents_inherit_setgid(tmp_path, umoci):
    """mkdir(2) in a setgid dir gives the new dir the parent's group and the setgid bit; umoci
    creates implicit parents that way, we made them 0755 root:root."""
    a, b = Layer(), Layer()
    a.dir("sg", mode=0o2775, gid=42)
    a.file("sg/implicit/deeper/f", b"f")
    b.dir("./", mode=0o2755, gid=7)
    b.file("top-implicit/f", b"under a setgid root")
    _check(tmp_path, a, b)


def test_regression_hardlink_replacing_its_targets_parent(tmp_path, umoci):
    """`d` (a hardlink to `d/f`) first clobbers `d`, so its target is gone: umoci fails with
    ENOENT; we turned `d` into the file."""
    a = Layer()
    a.dir("d")
    a.file("d/f", b"f")
    a.hardlink("d", "d/f")
    _both_reject(tmp_path, a, match="hardlink target 'd/f' is the entry itself or inside it")


def test_regression_hardlink_to_itself(tmp_path, umoci):
    a, b = Layer(), Layer()
    a.file("f", b"f")
    b.hardlink("f", "f")
    _both_reject(tmp_path, a, b, match="hardlink target 'f' is the entry itself")


def test_regression_negative_base256_mtime_in_gnu_headers(tmp_path, umoci):
    """imagegen wrote negative base-256 numbers as 0x80 + two's complement of the rest, which
    reads back as a huge positive number (Go: "invalid tar header"), and negative PAX times
    as floor seconds + positive fraction ("-2.75" for -1.25 s)."""
    a = Layer(fmt="gnu")
    a.file("old", b"before the epoch", mtime_ns=-86_400 * 10**9)
    a.dir("d", mtime_ns=-(2**31 - 10) * 10**9 + 5)    # (ext4 clamps below -2^31 s)
    a.file("frac", b"-1.25 s", mtime_ns=-1_250_000_000)
    _check(tmp_path, a)


def test_regression_opaque_marker_through_a_symlink_empties_its_target(tmp_path, umoci):
    """`link/.wh..wh..opq` with link -> real: umoci empties real/ (keeping what this layer
    wrote there); we first did nothing, then refused the image."""
    a, b = Layer(), Layer()
    a.dir("real")
    a.file("real/x", b"x")
    a.symlink("link", "real")
    b.file("real/new", b"this layer's")
    b.opaque("link")
    _check(tmp_path, a, b)


# issue 13: fidelity found against other unpackers ------------------------------------------------

def test_merged_usr_entries_and_whiteouts_through_symlinked_dirs(tmp_path, umoci):
    """A merged-/usr base (lib -> usr/lib, bin -> usr/bin) and a layer that writes and whites
    out through those links: applied where they lead, as umoci and containerd do."""
    base, upper, top = Layer(), Layer(fmt="gnu"), Layer()
    base.dir("usr")
    base.dir("usr/lib", mode=0o755, mtime_ns=T0_NS + 1)
    base.dir("usr/bin")
    base.file("usr/lib/libold.so", b"old")
    base.file("usr/lib/libkeep.so", b"keep")
    base.dir("usr/lib/plugins")
    base.file("usr/lib/plugins/p1", b"p1")
    base.symlink("lib", "usr/lib")
    base.symlink("bin", "/usr/bin")                 # absolute: from the image root
    base.symlink("lib64", "/lib")                   # a chain: lib64 -> /lib -> usr/lib
    base.symlink("up", "../../../..")               # climbs to the root and no further
    base.symlink("dangling", "not/yet")
    upper.file("lib/libx.so", b"new library", mode=0o755)
    upper.file("lib64/ld.so", b"loader")
    upper.file("bin/tool", b"#!/bin/sh\n", mode=0o755)
    upper.whiteout("lib/libold.so")
    upper.file("up/etc/through-up", b"at the root")
    upper.file("dangling/f", b"creates not/yet")
    upper.dir("lib/newdir", mode=0o700)
    upper.file("lib/newdir/f", b"f")
    upper.hardlink("bin/keep-link", "lib/libkeep.so")
    top.opaque("lib64/plugins")
    top.file("lib/plugins/p2", b"p2")
    _check(tmp_path, base, upper, top)


@pytest.mark.parametrize("kind", ["symlink_write", "symlink_dir_escape"])
def test_hostile_symlink_layers_stay_inside_the_root_where_umoci_puts_them(tmp_path, umoci, kind):
    """`evil -> /tmp` then `evil/pwned`, and `up -> ../../..` then `up/tmp/pwned`: resolved
    inside the image root (ROOT/tmp/...), exactly as umoci confines them; nothing outside."""
    base = Layer()
    base.file("etc/hostname", b"box\n")
    _check(tmp_path, base, hostile_layer(kind))
    assert not os.path.lexists("/tmp/pwned-through-symlink")
    assert not os.path.lexists("/tmp/pwned-through-relative-symlink")


def test_symlink_mode_is_0777_whatever_the_header_says(tmp_path, umoci):
    a = Layer()
    a.file("target", b"t")
    a.symlink("s644", "target", mode=0o644)
    a.symlink("s000", "target", mode=0o000)
    a.symlink("s4755", "/nowhere", mode=0o4755)
    _check(tmp_path, a)


def _acl(*entries: tuple[int, int, int], version: int = 2) -> bytes:
    import struct
    return struct.pack("<I", version) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_posix_access_acl_sets_the_group_bits_to_the_mask(tmp_path, umoci):
    """setxattr(system.posix_acl_access) makes the permission bits the ACL's (group = mask)
    and keeps the ACL only when the mode cannot say it; umoci (as root) shows the kernel's
    result. The FUSE mount must report the same mode and the same ACL bytes."""
    u = 0xFFFFFFFF
    named = _acl((0x01, 7, u), (0x02, 5, 1000), (0x04, 5, u), (0x08, 6, 42), (0x10, 1, u), (0x20, 4, u))
    plain = _acl((0x01, 6, 0), (0x04, 4, 0), (0x20, 0, 0))
    a = Layer()
    a.file("f-named", b"x", mode=0o4777, xattrs={"system.posix_acl_access": named})
    a.file("f-plain", b"y", mode=0o777, xattrs={"system.posix_acl_access": plain})
    a.dir("d", mode=0o2700, xattrs={"system.posix_acl_access": named})
    a.fifo("p", mode=0o600, xattrs={"system.posix_acl_access": named})
    a.symlink("s", "f-named", xattrs={"system.posix_acl_access": named})
    _check(tmp_path, a)


def test_overlayfs_xattrs_are_dropped_as_umoci_drops_them(tmp_path, umoci):
    """trusted.overlay.* must not come from an image (it would steer the overlay mounted above
    it); umoci does not write them either."""
    a = Layer()
    a.dir("d", xattrs={"trusted.overlay.opaque": b"y", "trusted.other": b"1"})
    a.file("d/f", b"x", xattrs={"trusted.overlay.redirect": b"/elsewhere", "user.k": b"v"})
    _check(tmp_path, a)


def test_pax_mtimes_before_1678_and_after_2262_are_kept(tmp_path, umoci):
    """Beyond int64 nanoseconds: umoci's Lutimes goes through UnixNano (undefined there) and
    containerd clamps to the epoch; the tar says the time, and the mount reports it exactly."""
    late, early = (16_725_225_600 * 10**9 + 123_456_789), (-11_676_096_000 * 10**9 + 5)   # 2500, 1600
    a = Layer()
    a.file("late", b"x", mtime_ns=late)
    a.file("early", b"y", mtime_ns=early)
    a.dir("d", mtime_ns=late)
    src = tmp_path / "src"
    Image([a]).write_oci(src, "t")
    ref = umoci_reference(src, "t", tmp_path / "umoci")
    with _converted_and_mounted(tmp_path, src, "t") as mnt:
        assert [os.lstat(mnt / n).st_mtime_ns for n in ("late", "early", "d")] == [late, early, late]
        diffs = compare_trees(ref.rootfs, mnt, ignore_mtime=ref.volatile_mtimes | {b"late", b"early", b"d"})
        assert not diffs, diffs


def test_pre_go18_gnu_prefix_names_the_entry_as_go_does(tmp_path, umoci):
    """Go before 1.8 wrote a ustar prefix into GNU headers (over atime/ctime); Go's reader, so
    umoci and containerd, puts such an entry at prefix/name."""
    prefix = b"usr/share/doc/" + b"p" * 100
    data = b"long path written by an old Go"
    hdr = raw_header(name=b"file-after-the-prefix", typeflag=b"0", size=len(data), gnu=True, fix_checksum=False)
    hdr[345:345 + len(prefix)] = prefix
    _checksum(hdr)
    a = Layer(fmt="gnu")
    a.dir("usr")
    a.raw(bytes(hdr) + data + bytes(-len(data) % 512))
    _check(tmp_path, a)


def test_solaris_x_extended_header_is_refused_like_umoci(tmp_path, umoci):
    records = pax_record(b"SCHILY.xattr.user.k", b"v")
    a = Layer()
    a.file("before", b"ok")
    a.raw(bytes(raw_header(name=b"./PaxHeaders.9/f", typeflag=b"X", size=len(records)))
          + records + bytes(-len(records) % 512))
    a.file("f", b"data")
    _both_reject(tmp_path, a, match="typeflag 'X' is a vendor extension")


@contextlib.contextmanager
def _converted_and_mounted(tmp_path: Path, src: Path, tag: str):
    dst, mnt = tmp_path / "dst", tmp_path / "mnt"
    r = subprocess.run([str(VENV_BIN / "nydusify"), "convert", "--source", f"oci:{src}:{tag}",
                        "--target", f"oci:{dst}:{tag}", "--quiet"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    mnt.mkdir()
    m = subprocess.run([str(VENV_BIN / "nydusd"), "mount", "--image", f"oci:{dst}:{tag}", "--cache-dir",
                        str(tmp_path / "cache"), "--daemon", str(mnt)], capture_output=True, text=True,
                       timeout=60)
    assert m.returncode == 0, m.stderr
    try:
        yield mnt
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


def _link_chain(n: int) -> tuple[Layer, Layer]:
    """`l0 -> l1 -> … -> l<n-1> -> d`: n links on the way to d, then a layer that writes a file
    and whites one out through l0."""
    base, upper = Layer(), Layer()
    base.dir("d")
    base.file("d/old", b"old")
    for i in range(n):
        base.symlink(f"l{i}", f"l{i + 1}" if i + 1 < n else "d")
    upper.file("l0/new", b"written through the chain")
    upper.whiteout("l0/old")
    return base, upper


@pytest.mark.parametrize("n", [41, 255])
def test_symlink_chains_up_to_securejoin_s_limit_resolve_as_umoci(tmp_path, umoci, n):
    """umoci resolves a path's symlinks with SecureJoin, whose limit is 255 links (the kernel's
    40 does not apply: the links are resolved in user space); we refused chains over 40."""
    _check(tmp_path, *_link_chain(n))


def test_symlink_chain_over_securejoin_s_limit_is_refused_as_umoci_does(tmp_path, umoci):
    """256 links: SecureJoin fails with ELOOP and umoci's unpack with it; so does the convert,
    with one line naming the entry."""
    line = _both_reject(tmp_path, *_link_chain(256), match="more than 255 symlinks")
    assert "l0/new" in line
