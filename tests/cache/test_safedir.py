"""The cache directory on a shared host (issue 9 §4): planted symlinks are never followed,
modes are explicit whatever the umask, and as root a directory a non-root user owns or can
write to is refused with one line naming it."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from nydus_py.cache import entry as entry_mod
from nydus_py.cache import gc, safedir
from nydus_py.cache.chunk_cache import ChunkCache
from nydus_py.errors import ConfigError
from nydus_py.format.bootstrap import BlobInfo
from nydus_py.metrics import Metrics
from tests.fixtures.cache import small_blob

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="ownership checks apply to root")


def _key(info: BlobInfo) -> str:
    return gc.entry_key(info.id.split(":")[1], entry_mod.untabled(info))


@pytest.mark.parametrize("planted", ["data", "meta", "both"])
def test_planted_symlink_is_not_followed_and_the_target_is_untouched(tmp_path, planted):
    work = tmp_path / "cache"
    work.mkdir(mode=0o700)
    target = tmp_path / "precious"
    target.write_bytes(b"do not truncate me\n")
    info, items = small_blob()
    key = _key(info)
    exts = ["data", "meta"] if planted == "both" else [planted]
    for ext in exts:
        (work / f"{key}.{ext}").symlink_to(target)
    m = Metrics()
    c = ChunkCache(work, metrics=m)
    h = c.open_blob(info)
    c.store_many(h, items)
    for ch, data in items:
        got = c.read(h, ch.index, ch.offset, ch.size)
        assert got is None or got == data
    c.close()
    assert target.read_bytes() == b"do not truncate me\n"
    assert target.stat().st_nlink == 1 and not target.is_symlink()
    if planted == "meta":        # data missing: created afresh, the meta link replaced by rename
        assert not (work / f"{key}.meta").is_symlink()
    else:                        # a symlink where a file must be: that blob is read uncached
        assert m.blobcache.value("uncached_blobs") == 1


@root_only
def test_a_symlink_to_a_users_directory_is_refused(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 1000, 1000)
    (tmp_path / "cache").symlink_to(theirs)
    with pytest.raises(ConfigError, match="owned by uid 1000"):
        ChunkCache(tmp_path / "cache")
    assert list(theirs.iterdir()) == []


def _modes_under_umask_000(work) -> None:
    code = f"""
import os, hashlib
os.umask(0)
from nydus_py.cache.chunk_cache import ChunkCache
from tests.fixtures.cache import small_blob
info, items = small_blob()
c = ChunkCache({str(work)!r})
c.store_many(c.open_blob(info), items)
c.close()
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.getcwd())


def test_umask_000_gives_0700_dirs_and_0600_files(tmp_path):
    work = tmp_path / "a" / "b" / "cache"
    _modes_under_umask_000(work)
    for d in (tmp_path / "a", tmp_path / "a" / "b", work):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    files = list(work.iterdir())
    assert sorted(f.suffix for f in files) == [".data", ".meta"]
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


@root_only
@pytest.mark.parametrize("how", ["owner-1000", "mode-0777", "group-writable-1000"])
def test_root_refuses_a_directory_a_user_owns_or_can_write(tmp_path, how):
    work = tmp_path / "cache"
    work.mkdir(mode=0o700)
    if how == "owner-1000":
        os.chown(work, 1000, 1000)
    elif how == "mode-0777":
        os.chmod(work, 0o777)
    else:
        os.chown(work, 0, 1000)
        os.chmod(work, 0o770)
    with pytest.raises(ConfigError) as ei:
        ChunkCache(work)
    msg = str(ei.value)
    assert "\n" not in msg and str(work) in msg and "refusing" in msg
    assert list(work.iterdir()) == []


@root_only
def test_root_refuses_a_component_a_user_created_first(tmp_path):
    parent = tmp_path / "shared"
    parent.mkdir(mode=0o700)
    (parent / "cache").mkdir(mode=0o700)
    os.chown(parent / "cache", 1000, 1000)       # the user won the race to create it
    with pytest.raises(ConfigError, match="owned by uid 1000"):
        safedir.open_dir(parent / "cache" / "deeper")
    assert not (parent / "cache" / "deeper").exists()
