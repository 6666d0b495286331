"""converter.tree: the overlay merge of layers (OCI whiteouts, replacements, hardlinks)."""

from __future__ import annotations

import io
import tracemalloc

import pytest

from converter.tar import EntryKind, TarEntry, iter_entries
from converter.tree import Inode, Tree
from nydus_py.errors import LayerError
from tests.fixtures.tarbuild import END, member, pax

K = EntryKind


def P(s: str) -> tuple[bytes, ...]:
    return tuple(c.encode() for c in s.split("/") if c)


def E(path: str, kind: EntryKind = K.REG, layer_name: str = "", **kw) -> TarEntry:
    return TarEntry(path=P(path), kind=kind, name=path.encode(), origin=layer_name, **kw)


def build(*layers: list[TarEntry]) -> Tree:
    t = Tree()
    for i, entries in enumerate(layers):
        for e in entries:
            t.apply(e, i)
    return t


def names(t: Tree) -> list[str]:
    return ["/".join(c.decode("utf-8", "backslashreplace") for c in p) for p, _ in t.walk()][1:]


# -- basics --------------------------------------------------------------------------------------

def test_apply_returns_inode_only_for_regular_files():
    t = Tree()
    f = t.apply(E("etc/passwd", size=12, mode=0o600, uid=3, mtime_ns=7, xattrs={b"user.a": b"\0"}), 0)
    assert isinstance(f, Inode) and f.kind is K.REG and f.size == 12 and f.chunks == [] and f.layer == 0
    assert (f.mode, f.uid, f.mtime_ns, f.xattrs) == (0o600, 3, 7, {b"user.a": b"\0"})
    assert t.apply(E("etc", K.DIR), 0) is None
    assert t.apply(E("lnk", K.SYMLINK, linkname=b"/etc/passwd"), 0) is None
    assert t.apply(E("dev/null", K.CHR, devmajor=1, devminor=3), 0) is None
    assert t.lookup(P("lnk")).target == b"/etc/passwd"
    assert t.lookup(P("dev/null")).rdev == (1, 3)
    assert t.lookup(P("etc/passwd")) is f


def test_implicit_parents_are_0755_root_epoch():
    t = build([], [E("a/b/c", mtime_ns=99)])
    for p in ("a", "a/b"):
        d = t.lookup(P(p))
        assert (d.kind, d.mode, d.uid, d.gid, d.mtime_ns, d.layer) == (K.DIR, 0o755, 0, 0, 0, 1)


def test_root_starts_0755_and_root_entry_updates_it():
    t = Tree()
    assert (t.root.mode, t.root.uid, t.root.mtime_ns) == (0o755, 0, 0)
    t.apply(E("", K.DIR, mode=0o700, uid=5, mtime_ns=123), 0)
    assert (t.root.mode, t.root.uid, t.root.mtime_ns) == (0o700, 5, 123)


def test_root_cannot_change_type():
    with pytest.raises(LayerError, match="refusing to change the type of the root directory"):
        build([E("", K.SYMLINK, linkname=b"/x")])


def test_walk_is_sorted_by_name_bytes_and_deterministic():
    entries = [E(n) for n in ("b", "a/z", "a/\xe9".encode("latin1").decode("latin1"), "A", "a/B")]
    entries.append(TarEntry(path=(b"a", b"\xe9"), kind=K.REG))
    t = build(entries)
    assert [p for p, _ in t.walk()] == [(), (b"A",), (b"a",), (b"a", b"B"), (b"a", b"z"),
                                        (b"a", b"\xc3\xa9"), (b"a", b"\xe9"), (b"b",)]


# -- replacement ---------------------------------------------------------------------------------

def test_dir_replaced_by_file_drops_subtree():
    t = build([E("d/x"), E("d/sub/y")], [E("d")])
    assert t.lookup(P("d")).kind is K.REG and names(t) == ["d"]


def test_file_replaced_by_dir_and_symlink_by_dir():
    t = build([E("f"), E("s", K.SYMLINK, linkname=b"x")], [E("f", K.DIR), E("s", K.DIR), E("s/in")])
    assert t.lookup(P("f")).kind is K.DIR and t.lookup(P("s/in")).kind is K.REG


def test_dir_over_dir_updates_metadata_keeps_children():
    t = build([E("d", K.DIR, mode=0o755, uid=1, mtime_ns=1, xattrs={b"user.old": b"1"}), E("d/keep")],
              [E("d", K.DIR, mode=0o700, uid=2, mtime_ns=2, xattrs={b"user.new": b"2"})])
    d = t.lookup(P("d"))
    assert (d.mode, d.uid, d.mtime_ns, d.xattrs, d.layer) == (0o700, 2, 2, {b"user.new": b"2"}, 0)
    assert names(t) == ["d", "d/keep"]


def test_file_replaced_by_file_in_upper_layer():
    t = build([E("f", size=1)], [E("f", size=2)])
    assert t.lookup(P("f")).size == 2 and t.lookup(P("f")).layer == 1


# -- whiteouts -----------------------------------------------------------------------------------

def test_whiteout_removes_lower_file_and_dir_subtree():
    t = build([E("f"), E("d/a/b"), E("other")], [E("f", K.WHITEOUT), E("d", K.WHITEOUT)])
    assert names(t) == ["other"]


def test_whiteout_keeps_same_layer_entry_before_or_after():
    t = build([E("x"), E("y")],
              [E("x", K.WHITEOUT), E("x", size=5),          # whiteout first, then re-added
               E("y", size=6), E("y", K.WHITEOUT)])         # added first, then whiteout
    assert t.lookup(P("x")).size == 5 and t.lookup(P("y")).size == 6


def test_whiteout_of_dir_keeps_same_layer_children_only():
    t = build([E("d/lower1"), E("d/sub/lower2")], [E("d/new"), E("d", K.WHITEOUT)])
    assert names(t) == ["d", "d/new"]


def test_whiteout_in_later_layer_removes_what_an_earlier_layer_added():
    t = build([E("a")], [E("b")], [E("b", K.WHITEOUT), E("a", K.WHITEOUT)])
    assert names(t) == []


def test_whiteout_of_missing_path_or_under_a_file_is_a_no_op():
    t = build([E("f")], [E("nothing", K.WHITEOUT), E("f/child", K.WHITEOUT), E("no/such/dir", K.WHITEOUT)])
    assert names(t) == ["f"]


def test_whiteout_through_a_symlink_removes_where_it_leads():
    """`lib/.wh.libx.so` with lib -> usr/lib (merged /usr) removes usr/lib/libx.so (umoci,
    containerd); before, the whole image was refused."""
    t = build([E("usr/lib/libx.so"), E("usr/lib/liby.so"), E("lib", K.SYMLINK, linkname=b"usr/lib")],
              [E("lib/libx.so", K.WHITEOUT)])
    assert names(t) == ["lib", "usr", "usr/lib", "usr/lib/liby.so"]


def test_opaque_marker_through_a_symlink_empties_its_target():
    t = build([E("real/x"), E("link", K.SYMLINK, linkname=b"/real")], [E("real/new"), E("link", K.OPAQUE)])
    assert names(t) == ["link", "real", "real/new"]


def test_opaque_removes_lower_children_keeps_same_layer_ones():
    t = build([E("d/lower"), E("d/sub/deep"), E("d/sub/deeper/x"), E("keep/me")],
              [E("d/before"), E("d/sub/new"), E("d", K.OPAQUE), E("d/after")])
    assert names(t) == ["d", "d/after", "d/before", "d/sub", "d/sub/new", "keep", "keep/me"]


def test_opaque_at_root_and_on_a_file():
    t = build([E("a"), E("b/c")], [E("f")], [E("new"), E("", K.OPAQUE), E("f", K.OPAQUE)])
    assert names(t) == ["new"]


def test_opaque_keeps_the_dir_metadata():
    t = build([E("d", K.DIR, mode=0o711), E("d/x")], [E("d", K.OPAQUE)])
    assert t.lookup(P("d")).mode == 0o711 and names(t) == ["d"]


# -- hardlinks -----------------------------------------------------------------------------------

def test_hardlinks_share_one_inode_same_and_lower_layer():
    t = Tree()
    f = t.apply(E("bin/a", size=3), 0)
    t.apply(E("bin/b", K.HARDLINK, link_path=P("bin/a")), 0)
    t.apply(E("usr/c", K.HARDLINK, link_path=P("bin/a")), 1)
    assert t.lookup(P("bin/b")) is f and t.lookup(P("usr/c")) is f
    walked = [n for _, n in t.walk() if n is f]
    assert len(walked) == 3


def test_hardlink_to_a_symlink_is_allowed():
    t = build([E("s", K.SYMLINK, linkname=b"t"), E("s2", K.HARDLINK, link_path=P("s"))])
    assert t.lookup(P("s2")) is t.lookup(P("s"))


def test_replacing_one_hardlinked_name_leaves_the_other():
    t = build([E("a", size=1), E("b", K.HARDLINK, link_path=P("a"))], [E("a", size=2)])
    assert t.lookup(P("b")).size == 1 and t.lookup(P("a")).size == 2


def test_hardlink_errors_name_layer_and_entry():
    with pytest.raises(LayerError) as ei:
        build([E("x", K.HARDLINK, "layer 4 (sha256:1234)", link_path=P("missing"))])
    assert str(ei.value) == "layer 4 (sha256:1234): entry 'x': hardlink target 'missing' does not exist"
    with pytest.raises(LayerError, match="entry 'x': hardlink target 'd' is a directory"):
        build([E("d", K.DIR), E("x", K.HARDLINK, link_path=P("d"))])
    with pytest.raises(LayerError, match="does not exist"):
        build([E("gone")], [E("gone", K.WHITEOUT), E("x", K.HARDLINK, link_path=P("gone"))])


# -- hostile paths -------------------------------------------------------------------------------

def test_entry_below_a_symlinked_dir_lands_where_it_leads():
    """Merged-/usr bases: lib -> usr/lib, then a layer writes lib/libx.so."""
    t = build([E("usr/lib", K.DIR), E("lib", K.SYMLINK, linkname=b"usr/lib")],
              [E("lib/libx.so", size=3), E("lib/sub/deeper", size=1)])
    assert names(t) == ["lib", "usr", "usr/lib", "usr/lib/libx.so", "usr/lib/sub", "usr/lib/sub/deeper"]
    assert t.lookup(P("lib")).kind is K.SYMLINK


@pytest.mark.parametrize("target, lands", [
    (b"/tmp", "tmp/passwd"),                       # absolute: from the image root
    (b"../../../../tmp", "tmp/passwd"),             # `..` never climbs above the root
    (b"/../../x/../tmp/./", "tmp/passwd"),
    (b"a/../b", "b/passwd"),
    (b".", "passwd"),
    (b"/", "passwd"),
    (b"nowhere/at/all", "nowhere/at/all/passwd"),  # dangling: the dirs are created (MkdirAll)
])
def test_symlink_targets_are_clamped_to_the_root(target, lands):
    t = build([E("etc", K.SYMLINK, linkname=target)], [E("etc/passwd")])
    assert t.lookup(P(lands)) is not None and t.lookup(P("etc")).kind is K.SYMLINK
    for p, n in t.walk():
        assert n.kind is not K.SYMLINK or p == P("etc")


def test_symlink_chains_are_followed_and_loops_refused():
    t = build([E("real", K.DIR), E("a", K.SYMLINK, linkname=b"b"), E("b", K.SYMLINK, linkname=b"/c/../real"),
               E("c", K.SYMLINK, linkname=b"real")], [E("a/f")])
    assert t.lookup(P("real/f")) is not None
    with pytest.raises(LayerError, match="entry 'loop/f': more than 255 symlinks on the way to 'loop'"):
        build([E("loop", K.SYMLINK, linkname=b"loop")], [E("loop/f")])
    # SecureJoin's limit (umoci), not the kernel's 40: tests/e2e/test_differential.py checks both
    chain = [E(f"s{i}", K.SYMLINK, linkname=f"s{i + 1}".encode()) for i in range(255)] + [E("s255", K.DIR)]
    assert build(chain, [E("s0/f")]).lookup(P("s255/f")) is not None          # 255 links: allowed
    with pytest.raises(LayerError, match="more than 255 symlinks"):
        build([E("s", K.SYMLINK, linkname=b"s0")] + chain, [E("s/f")])


def test_a_symlink_leading_to_a_file_is_not_a_directory():
    with pytest.raises(LayerError, match=r"entry 'l/x': parent 'f' \(where 'l' leads\) is a reg"):
        build([E("f"), E("l", K.SYMLINK, linkname=b"f")], [E("l/x")])


def test_hardlink_target_through_a_symlinked_dir():
    t = build([E("usr/lib/libx.so", size=1), E("lib", K.SYMLINK, linkname=b"usr/lib")],
              [E("libx-link", K.HARDLINK, link_path=P("lib/libx.so"))])
    assert t.lookup(P("libx-link")) is t.lookup(P("usr/lib/libx.so"))


def test_same_layer_paths_are_tracked_where_they_land():
    """umoci's upperPaths are symlink-expanded: a whiteout of a path this layer wrote through a
    symlink keeps it."""
    t = build([E("usr/lib/old"), E("lib", K.SYMLINK, linkname=b"usr/lib")],
              [E("lib/new"), E("usr/lib/new", K.WHITEOUT), E("usr/lib", K.OPAQUE)])
    assert names(t) == ["lib", "usr", "usr/lib", "usr/lib/new"]


# -- metadata as Linux keeps it ------------------------------------------------------------------

def test_symlinks_report_mode_0777_whatever_the_header_says():
    t = build([E("s", K.SYMLINK, linkname=b"x", mode=0o644)])
    assert t.lookup(P("s")).mode == 0o777


ACL = b"system.posix_acl_access"


def acl_value(*entries: tuple[int, int, int], version: int = 2) -> bytes:
    import struct
    return struct.pack("<I", version) + b"".join(struct.pack("<HHI", *e) for e in entries)


UNDEF = 0xFFFFFFFF


def test_access_acl_sets_the_group_bits_to_its_mask():
    value = acl_value((0x01, 7, UNDEF), (0x02, 5, 1000), (0x04, 5, UNDEF), (0x10, 1, UNDEF), (0x20, 4, UNDEF))
    t = build([E("f", mode=0o4777, xattrs={ACL: value, b"user.x": b"1"}),
               E("d", K.DIR, mode=0o2700, xattrs={ACL: value})])
    f = t.lookup(P("f"))
    assert f.mode == 0o4714 and f.xattrs == {ACL: value, b"user.x": b"1"}
    assert t.lookup(P("d")).mode == 0o2714


def test_access_acl_equivalent_to_the_mode_is_not_stored_and_ids_are_canonical():
    plain = acl_value((0x01, 6, 0), (0x04, 4, 0), (0x20, 0, 0))
    t = build([E("f", mode=0o777, xattrs={ACL: plain})])
    assert t.lookup(P("f")).mode == 0o640 and t.lookup(P("f")).xattrs == {}
    named = acl_value((0x01, 6, 0), (0x04, 4, 0), (0x08, 4, 42), (0x10, 6, 0), (0x20, 0, 0))
    t = build([E("f", xattrs={ACL: named})])
    assert t.lookup(P("f")).xattrs[ACL] == acl_value((0x01, 6, UNDEF), (0x04, 4, UNDEF), (0x08, 4, 42),
                                                      (0x10, 6, UNDEF), (0x20, 0, UNDEF))


def test_access_acl_on_a_symlink_or_of_another_version_is_dropped():
    value = acl_value((0x01, 7, UNDEF), (0x04, 5, UNDEF), (0x10, 1, UNDEF), (0x20, 4, UNDEF))
    t = build([E("s", K.SYMLINK, linkname=b"x", xattrs={ACL: value}),
               E("f", mode=0o600, xattrs={ACL: acl_value((0x01, 7, UNDEF), version=1)})])
    assert t.lookup(P("s")).xattrs == {} and t.lookup(P("s")).mode == 0o777
    assert t.lookup(P("f")).xattrs == {} and t.lookup(P("f")).mode == 0o600


@pytest.mark.parametrize("value", [
    b"\2\0\0",                                                            # short
    acl_value((0x01, 7, UNDEF), (0x04, 5, UNDEF)) + b"x",                   # ragged
    acl_value((0x04, 5, UNDEF), (0x01, 7, UNDEF), (0x20, 0, UNDEF)),        # out of order
    acl_value((0x01, 7, UNDEF), (0x02, 7, 5), (0x04, 5, UNDEF), (0x20, 0, UNDEF)),   # named, no mask
    acl_value((0x01, 0o17, UNDEF), (0x04, 5, UNDEF), (0x20, 0, UNDEF)),     # perm beyond rwx
    acl_value((0x01, 7, UNDEF), (0x04, 5, UNDEF)),                          # no other
])
def test_invalid_access_acl_is_refused_naming_the_entry(value):
    with pytest.raises(LayerError, match="entry 'f': invalid POSIX ACL in xattr system.posix_acl_access"):
        build([E("f", xattrs={ACL: value})])


def test_non_directory_parent_is_refused():
    with pytest.raises(LayerError, match="entry 'f/x': parent 'f' is a reg, not a directory"):
        build([E("f")], [E("f/x")])


def test_message_without_origin_uses_layer_index():
    with pytest.raises(LayerError, match=r"^layer 0: entry 'f/x'"):
        t = Tree()
        t.apply(TarEntry(path=P("f"), kind=K.REG), 0)
        t.apply(TarEntry(path=P("f/x"), kind=K.REG), 0)


# -- end to end with the tar reader ---------------------------------------------------------------

def test_layers_from_tar_bytes():
    lower = member(b"./", type=b"5", mode=0o755) + member(b"etc/", type=b"5") + member(b"etc/a", b"A") \
        + member(b"etc/b", b"B") + member(b"opt/x", b"X") + END
    upper = member(b"etc/.wh.a") + member(b"opt/.wh..wh..opq") + member(b"opt/y", b"Y") \
        + pax([(b"mtime", b"5.000000001")]) + member(b"etc/b", b"BB") + END
    t = Tree()
    for i, tar in enumerate((lower, upper)):
        for e in iter_entries(io.BytesIO(tar), f"layer {i}"):
            node = t.apply(e, i)
            if node is not None:
                assert e.read(100) and e.read(100) == b""
    assert names(t) == ["etc", "etc/b", "opt", "opt/y"]
    assert t.lookup(P("etc/b")).mtime_ns == 5_000_000_001 and t.lookup(P("etc/b")).size == 2


def _many(n: int):
    return (TarEntry(path=(b"usr", b"d%03d" % (i % 500), b"file-%06d.so" % i), kind=K.REG,
                     size=i, mode=0o644, mtime_ns=i) for i in range(n))


def test_100k_entries_merge():
    t = Tree()
    for e in _many(100_000):
        t.apply(e, 0)
    assert sum(1 for _ in t.walk()) == 100_000 + 500 + 2


def test_memory_per_entry_keeps_100k_well_below_200mb():
    n = 20_000
    tracemalloc.start()
    try:
        t = Tree()
        for e in _many(n):
            t.apply(e, 0)
        t._upper = set()   # the per-layer bookkeeping is dropped when the next layer starts
        per_entry = tracemalloc.get_traced_memory()[0] / n
    finally:
        tracemalloc.stop()
    assert per_entry * 100_000 < 100 << 20, f"{per_entry:.0f} bytes per entry"
