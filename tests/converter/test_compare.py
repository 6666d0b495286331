"""compare_trees reports every kind of difference, one attribute at a time, and nothing else."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from converter.compare import compare_trees

T = 1_700_000_000_123_456_789
NON_UTF8 = b"caf\xe9"


def make_tree(root) -> None:
    """Deterministic tree with one of everything compare_trees looks at."""
    r = os.fsencode(root)
    j = lambda *p: os.path.join(r, *[os.fsencode(x) for x in p])  # noqa: E731
    os.makedirs(j("d/sub"))
    for name, data in (("d/f", b"hello"), ("d/big", b"x" * 3_000_000), ("d/sub/g", b"g"),
                       ("hl1", b"linked")):
        with open(j(name), "wb") as f:
            f.write(data)
    with open(os.path.join(r, b"d", NON_UTF8), "wb") as f:
        f.write(b"latin1")
    os.link(j("hl1"), j("d/hl2"))
    os.symlink(b"d/f", j("link"))
    os.mkfifo(j("fifo"))
    os.mknod(j("null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.setxattr(j("d/f"), "user.a", b"\x00\xff")
    os.setxattr(j("d"), "trusted.t", b"1")
    os.chmod(j("d/f"), 0o4755)
    os.chown(j("d/sub/g"), 1000, 70000)
    for dirpath, dirnames, filenames in os.walk(r, topdown=False):
        for n in filenames + dirnames:
            os.utime(os.path.join(dirpath, n), ns=(T, T), follow_symlinks=False)
    os.utime(r, ns=(T, T))


@pytest.fixture
def trees(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    make_tree(a)
    make_tree(b)
    return os.fsencode(a), os.fsencode(b)


def one_diff(a, b, expect: str, **kw) -> None:
    diffs = compare_trees(a, b, **kw)
    assert any(expect in d for d in diffs), diffs
    return diffs


def keep_mtime(path: bytes):
    """Context: restore the parent dir's mtime after changing an entry in it."""
    parent = os.path.dirname(path)
    st = os.lstat(parent)

    class _C:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            os.utime(parent, ns=(st.st_atime_ns, st.st_mtime_ns))
    return _C()


def test_identical_trees_have_no_differences(trees):
    assert compare_trees(*trees) == []


def test_missing_and_extra_names_are_reported_with_bytes_names(trees):
    a, b = trees
    p = os.path.join(b, b"d", NON_UTF8)
    with keep_mtime(p):
        os.unlink(p)
    one_diff(a, b, "/d/caf\\xe9: missing (file")
    assert compare_trees(b, a) == ["/d/caf\\xe9: extra (file not in expected)"]


def test_type_change_is_reported_once(trees):
    a, b = trees
    p = os.path.join(b, b"d/f")
    with keep_mtime(p):
        os.unlink(p)
        os.mkdir(p)
    assert compare_trees(a, b) == ["/d/f: type differs: expected file, actual dir"]


@pytest.mark.parametrize("change, expect", [
    (lambda p: os.chmod(p, 0o755), "mode differs: expected 0o104755, actual 0o100755"),
    # chown clears setuid, so restore the mode afterwards (umoci has to do the same)
    (lambda p: (os.chown(p, 1, -1), os.chmod(p, 0o4755)), "uid differs: expected 0, actual 1"),
    (lambda p: (os.chown(p, -1, 3_000_000), os.chmod(p, 0o4755)), "gid differs: expected 0, actual 3000000"),
    (lambda p: os.utime(p, ns=(T, T + 1)), "mtime differs: expected 1700000000.123456789, actual 1700000000.123456790"),
    (lambda p: os.setxattr(p, "user.a", b"\x00\xfe"), "xattr user.a differs"),
    (lambda p: os.removexattr(p, "user.a"), "xattr user.a missing"),
    (lambda p: os.setxattr(p, "user.new", b"v"), "xattr user.new extra"),
])
def test_each_file_attribute_difference_is_reported(trees, change, expect):
    a, b = trees
    p = os.path.join(b, b"d/f")
    change(p)
    os.utime(p, ns=(T, os.lstat(p).st_mtime_ns if "mtime" in expect else T))
    diffs = compare_trees(a, b)
    assert len(diffs) == 1 and diffs[0].startswith(f"/d/f: {expect}"), diffs


def test_size_and_same_size_content_differences(trees):
    a, b = trees
    p = os.path.join(b, b"d/big")
    with open(p, "r+b") as f:
        f.seek(2_500_000)
        f.write(b"y")
    os.utime(p, ns=(T, T))
    assert compare_trees(a, b) == ["/d/big: content differs (first at byte 2500000)"]
    assert compare_trees(a, b, check_content=False) == []
    with open(p, "ab") as f:
        f.write(b"more")
    os.utime(p, ns=(T, T))
    assert compare_trees(a, b) == ["/d/big: size differs: expected 3000000, actual 3000004"]


def test_symlink_target_and_symlink_mtime(trees):
    a, b = trees
    p = os.path.join(b, b"link")
    os.unlink(p)
    os.symlink(b"d/g", p)
    os.utime(p, ns=(T, T + 5), follow_symlinks=False)
    os.utime(b, ns=(T, T))
    diffs = compare_trees(a, b)
    assert any("/link: symlink target differs: expected b'd/f', actual b'd/g'" == d for d in diffs), diffs
    assert any(d.startswith("/link: mtime differs") for d in diffs), diffs
    assert len(diffs) == 2


def test_device_numbers(trees):
    a, b = trees
    p = os.path.join(b, b"null")
    os.unlink(p)
    os.mknod(p, stat.S_IFCHR | 0o666, os.makedev(1, 5))
    os.utime(p, ns=(T, T))
    os.utime(b, ns=(T, T))
    assert compare_trees(a, b) == ["/null: device differs: expected 1:3, actual 1:5"]


def test_directory_mtime_mode_xattr_and_root(trees):
    a, b = trees
    os.utime(os.path.join(b, b"d/sub"), ns=(T, T + 1))
    os.chmod(b, 0o700)
    os.removexattr(os.path.join(b, b"d"), "trusted.t")
    diffs = compare_trees(a, b)
    assert "/d/sub: mtime differs: expected 1700000000.123456789, actual 1700000000.123456790" in diffs
    assert "/: mode differs: expected 0o40755, actual 0o40700" in diffs
    assert "/d: xattr trusted.t missing (expected b'1')" in diffs
    assert len(diffs) == 3
    assert compare_trees(a, b, ignore_mtime={b"d/sub"}) == diffs[:0] + [d for d in diffs if "mtime" not in d]


def test_hardlink_split_is_reported_as_group_and_nlink(trees):
    a, b = trees
    p = os.path.join(b, b"d/hl2")
    with keep_mtime(p):
        os.unlink(p)
        with open(p, "wb") as f:
            f.write(b"linked")
    os.utime(p, ns=(T, T))
    diffs = compare_trees(a, b)
    assert "/d/hl2: nlink differs: expected 2, actual 1" in diffs
    assert "/hl1: nlink differs: expected 2, actual 1" in diffs
    assert any(d.startswith("/d/hl2: hardlink group differs: expected {/d/hl2, /hl1}, actual {/d/hl2}")
               for d in diffs), diffs


def test_hardlinks_to_a_different_partner_are_reported(trees):
    """Same nlink on both sides, but the inode is shared with a different path."""
    a, b = trees
    for root in (a, b):
        os.link(os.path.join(root, b"d/sub/g"), os.path.join(root, b"g2"))
    # in b, swap which names are linked: hl1<->g2 instead of hl1<->d/hl2 and d/sub/g<->g2
    for n in (b"d/hl2", b"g2"):
        os.unlink(os.path.join(b, n))
    os.link(os.path.join(b, b"d/sub/g"), os.path.join(b, b"d/hl2"))
    os.link(os.path.join(b, b"hl1"), os.path.join(b, b"g2"))
    diffs = compare_trees(a, b, check_content=False, ignore_mtime={b"", b"d"})
    assert any("hardlink group differs" in d for d in diffs), diffs


def test_security_selinux_is_ignored_by_default(trees):
    a, b = trees
    try:
        os.setxattr(os.path.join(b, b"d/f"), "security.selinux", b"system_u:object_r:bin_t:s0\0")
    except OSError as e:
        pytest.skip(f"cannot set security.selinux here: {e}")
    assert compare_trees(a, b) == []
    assert compare_trees(a, b, ignore_xattrs=()) != []


def test_max_diffs_stops_early_and_non_directories_are_refused(trees, tmp_path):
    a, b = trees
    os.chmod(b, 0o700)
    os.chmod(os.path.join(b, b"d"), 0o700)
    assert len(compare_trees(a, b, max_diffs=1)) == 1
    f = tmp_path / "file"
    f.write_bytes(b"")
    assert compare_trees(a, f)[0].endswith("not a directory")


@pytest.fixture
def fast_tmp(tmp_path):
    """A scratch dir on tmpfs when there is one: the test measures compare_trees, not the disk."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        d = tempfile.mkdtemp(dir="/dev/shm", prefix="nydus-compare-")
        yield Path(d)
        shutil.rmtree(d)
    else:
        yield tmp_path


def test_ten_thousand_files_compare(fast_tmp):
    """Comparing a tree with itself does all the work (lstat, xattrs, reads) of a real check;
    creating a second copy would only measure the disk. No time limit here (unit tests have none:
    they flake under load); pytest's timeout catches a blow-up, perf/ measures speed."""
    for i in range(100):
        d = fast_tmp / f"d{i:03d}"
        d.mkdir()
        for k in range(100):
            (d / f"f{k:03d}").write_bytes(b"%d" % k)
    assert compare_trees(fast_tmp, fast_tmp) == []


def test_a_huge_hardlink_group_is_not_quadratic(fast_tmp):
    (fast_tmp / "f").write_bytes(b"x")
    for i in range(5000):
        os.link(fast_tmp / "f", fast_tmp / f"l{i}")
    assert compare_trees(fast_tmp, fast_tmp) == []
