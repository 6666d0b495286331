"""GC of the image state kept in a cache directory (cache/images.py): registry bootstraps for
offline mounts, their ref records and learned prefetch lists. Never removed while a mount holds
them, only when unused for `max_age`, never through a planted symlink, and a mount that asks
for its state while a gc removes it waits and then gets a fresh lock."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest

from nydus_py.cache import gc, images
from nydus_py.io import learned as ll

DAY = 86400


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _hex(digest: str) -> str:
    return digest.split(":")[1]


@pytest.fixture()
def cache(tmp_path):
    d = tmp_path / "cache"
    d.mkdir(mode=0o700)
    held: list[str] = []
    yield d, held
    for digest in held:
        images.release(d, digest)
    for digest in ("A", "B", "C"):
        images.release(d, _digest(digest.encode()))


def _populate(cache_dir, name: bytes, *, age: float = 0.0) -> str:
    """A kept bootstrap, its ref record and a learned list for image `name`, last used `age`
    seconds ago, held by nobody."""
    digest = _digest(name)
    ref = f"reg.example/{name.decode()}:1"
    with images.ImageStore(cache_dir) as store:
        store.save(ref, "sha256:" + "0" * 64, digest, name)
    ll.save_local(str(cache_dir), ll.LearnedList(digest, (0, 1)))
    images.release(cache_dir, digest)      # save held it: this process is "the mount"
    t = time.time() - age
    ours = [p for p in [*(cache_dir / "images").iterdir(), *(cache_dir / "prefetch").iterdir()]
            if _hex(digest) in p.name or p.name == images.ImageStore._ref_name(ref)]
    assert len(ours) == 4                   # bootstrap, ref record, lock, list
    for p in ours:
        os.utime(p, (t, t), follow_symlinks=False)
    return digest


def test_unused_state_goes_by_age_held_state_stays(cache):
    d, held = cache
    a = _populate(d, b"A", age=2 * DAY)
    b = _populate(d, b"B", age=2 * DAY)
    c = _populate(d, b"C")                      # used just now
    assert images.hold(d, a)                    # a running mount of A (its start: last use)
    held.append(a)
    report = gc.collect(d, 0, image_max_age=DAY)
    assert report.removed_images == [b] and report.busy_images == []
    assert not (d / "prefetch" / f"{_hex(b)}.json").exists()
    assert not (d / "images" / f"sha256-{_hex(b)}").exists()
    with images.ImageStore(d) as store:
        assert store.load("reg.example/B:1") is None            # its ref record went too
        assert store.load("reg.example/A:1") == (a, b"A")       # in use: intact
        assert store.load("reg.example/C:1") == (c, b"C")       # too young
    images.release(d, c)                        # (load held C again)
    assert (d / "prefetch" / f"{_hex(a)}.json").exists()
    report = gc.collect(d, 0, image_max_age=0)
    assert report.removed_images == [c] and report.busy_images == [a]
    images.release(d, a)
    held.clear()
    assert gc.collect(d, 0, image_max_age=0).removed_images == [a]
    assert [p for p in d.rglob("*") if not p.is_dir()] == []
    assert images.PREFETCH_SUBDIR == ll.LOCAL_DIR              # one layout, two modules


def test_gc_without_image_max_age_leaves_image_state_alone(cache):
    d, _ = cache
    _populate(d, b"A", age=2 * DAY)
    before = sorted(p.name for p in d.rglob("*"))
    assert gc.collect(d, 0).removed_images == []
    assert sorted(p.name for p in d.rglob("*")) == before


def test_planted_symlinks_are_removed_or_skipped_never_followed(cache, tmp_path):
    d, _ = cache
    a = _populate(d, b"A", age=2 * DAY)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    h = "ab" * 32
    os.symlink(victim, d / "prefetch" / f"{h}.json")                # a list that is a link
    os.symlink(victim, d / "images" / f"{'cd' * 32}.lock")          # a lock that is a link
    os.symlink(victim, d / "images" / f"sha256-{'cd' * 32}")
    report = gc.collect(d, 0, image_max_age=0)
    assert a in report.removed_images and f"sha256:{h}" in report.removed_images
    assert victim.read_bytes() == b"precious"
    assert not os.path.lexists(d / "prefetch" / f"{h}.json")
    # the link where a lock must be: that image's state is skipped (no lock, no removal)
    assert os.path.islink(d / "images" / f"{'cd' * 32}.lock")
    assert os.path.islink(d / "images" / f"sha256-{'cd' * 32}")


def _blocked_flock_waiters() -> int:
    with open("/proc/locks") as f:
        return sum(1 for line in f if "->" in line and "FLOCK" in line)


def test_a_mount_asking_while_gc_removes_waits_then_holds_a_fresh_lock(cache):
    """gc holds the exclusive lock while it unlinks; `hold` blocks on it, then finds the lock
    file unlinked (st_nlink 0) and takes a new one, so it never believes it holds a lock that
    no later gc can see."""
    import fcntl
    d, held = cache
    a = _populate(d, b"A", age=2 * DAY)
    lock_path = d / "images" / f"{_hex(a)}.lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)              # what collect holds while it removes A
    before = _blocked_flock_waiters()
    got: list[bool] = []
    t = threading.Thread(target=lambda: got.append(images.hold(d, a)))
    t.start()
    held.append(a)
    while _blocked_flock_waiters() == before and t.is_alive():
        time.sleep(0.01)                        # until hold() waits in flock (/proc/locks)
    assert t.is_alive(), "hold() did not wait for the gc's lock"
    os.unlink(lock_path)                        # collect's last step, still locked
    os.close(fd)
    t.join(30)
    assert got == [True]
    st = os.stat(lock_path)                     # a fresh lock file, held
    assert st.st_nlink == 1
    report = gc.collect(d, 0, image_max_age=0)
    assert report.busy_images == [a] and report.removed_images == []
