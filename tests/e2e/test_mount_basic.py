"""Real FUSE mounts of `nydusd mount` (root + /dev/fuse): contents, metadata, read-only-ness,
data-path errors, signals, --daemon and stale-mount recovery.

Every mount is torn down in a finally (SIGTERM, then `fusermount3 -u -z`), so a failing test
never leaves a mount behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from nydus_py import mountinfo, pidwait
from tests.fixtures.rich_image import BIG_DIR_ENTRIES, CAP_NET_RAW_EP, MTIME, build_rich
from tests.fixtures.registry import stop_process

pytestmark = pytest.mark.e2e

NYDUSD = Path(sys.executable).parent / "nydusd"
MOUNT_TIMEOUT = 15.0


def nydusd_cmd() -> list[str]:
    if NYDUSD.exists():
        return [str(NYDUSD)]
    return [sys.executable, "-m", "nydus_py.daemon.cli"]


def mount_entry(path: Path) -> mountinfo.MountEntry | None:
    """The mountinfo entry for `path` (works for stale mounts too, unlike ismount)."""
    return mountinfo.find(os.path.realpath(path))


def mount_options(path: Path) -> tuple[str, set[str]]:
    e = mount_entry(path)
    assert e is not None, f"{path} is not mounted"
    return e.fstype, set(e.options) | set(e.super_options)


def force_unmount(path: Path) -> None:
    for _ in range(3):
        if mount_entry(path) is None:
            return
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)


def serving(path: Path) -> bool:
    """Mounted and answering (a stale FUSE mount fails statfs with ENOTCONN; a listing may
    come from the kernel's cache)."""
    if mount_entry(path) is None:
        return False
    try:
        os.statvfs(path)
    except OSError:
        return False
    return True


def wait_mounted(path: Path, proc: subprocess.Popen | None, log: Path) -> None:
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while time.monotonic() < deadline:
        if serving(path):
            return
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"nydusd exited with {proc.returncode}: {log.read_text()}")
        time.sleep(0.05)
    pytest.fail(f"{path} not mounted after {MOUNT_TIMEOUT}s: {log.read_text()}")


@contextlib.contextmanager
def nydusd(mountpoint: Path, *args: str, log: Path):
    """Runs `nydusd mount ARGS MOUNTPOINT` in the foreground; yields once it is mounted."""
    mountpoint.mkdir(exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen([*nydusd_cmd(), "mount", *args, str(mountpoint)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_mounted(mountpoint, proc, log)
        yield proc
    finally:
        stop_process(proc, grace=10)
        force_unmount(mountpoint)


def run_nydusd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([*nydusd_cmd(), *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def rich():
    return build_rich()


@pytest.fixture(scope="module")
def oci_image(rich, tmp_path_factory):
    return rich.write_oci(tmp_path_factory.mktemp("oci") / "layout", tag="v1")


@pytest.fixture(scope="module")
def mounted_oci(oci_image, tmp_path_factory):
    """One shared mount of the OCI-layout image for the read-only checks."""
    base = tmp_path_factory.mktemp("mnt")
    with nydusd(base / "mnt", "--image", f"oci:{oci_image}:v1", log=base / "log") as proc:
        yield base / "mnt", proc


# -- contents and metadata ------------------------------------------------------------------------
def test_every_file_reads_back_byte_exact(mounted_oci, rich):
    mnt, _ = mounted_oci
    for path, data in rich.files.items():
        assert (mnt / path.encode("latin-1").decode("utf-8")).read_bytes() == data, path


def test_random_offset_reads_and_mmap(mounted_oci, rich):
    mnt, _ = mounted_oci
    data = rich.files["big"]
    fd = os.open(mnt / "big", os.O_RDONLY)
    try:
        for off, size in ((0, 1), (4095, 2), (4096, 4096), (8000, 10_000), (len(data) - 1, 100),
                          (len(data), 10), (len(data) + 5000, 10)):
            assert os.pread(fd, size, off) == data[off:off + size]
        with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as m:
            assert m[:] == data
    finally:
        os.close(fd)


def test_directory_listings_resume_and_include_every_entry(mounted_oci):
    mnt, _ = mounted_oci
    names = os.listdir(mnt / "many")
    assert len(names) == BIG_DIR_ENTRIES and sorted(names) == [f"f{i:04d}" for i in range(BIG_DIR_ENTRIES)]
    assert sorted(os.listdir(mnt)) == sorted(
        ["abslink", "big", "bin", "café", "dangling", "dev", "empty", "etc", "hard1", "link", "many",
         "secret", "sub", "text"])
    with os.scandir(mnt / "sub") as it:
        for e in it:
            assert e.inode() == os.lstat(e.path).st_ino


def test_metadata_modes_owners_times_and_link_counts(mounted_oci, rich):
    mnt, _ = mounted_oci
    st = os.lstat(mnt)
    assert stat.S_ISDIR(st.st_mode) and st.st_nlink == 2 + 5
    assert os.lstat(mnt / "sub").st_nlink == 2
    secret = os.lstat(mnt / "secret")
    assert (stat.S_IMODE(secret.st_mode), secret.st_uid, secret.st_gid) == (0o600, 1000, 1000)
    big = os.lstat(mnt / "big")
    assert big.st_size == len(rich.files["big"]) and big.st_mtime_ns == MTIME
    assert big.st_blocks == -(-big.st_size // 512)
    assert stat.S_IMODE(os.lstat(mnt / "bin" / "hello").st_mode) == 0o755
    hard = [os.lstat(mnt / p) for p in ("hard1", "sub/hard2", "sub/hard3")]
    assert len({h.st_ino for h in hard}) == 1 and all(h.st_nlink == 3 for h in hard)


def test_symlinks_devices_and_fifo(mounted_oci):
    mnt, _ = mounted_oci
    assert os.readlink(mnt / "link") == "etc/hostname"
    assert os.readlink(mnt / "abslink") == "/etc/hostname"
    assert os.readlink(os.fsencode(mnt / "dangling")) == b"nowhere\xff"
    assert (mnt / "link").read_bytes() == b"nydus\n"
    null, sda = os.lstat(mnt / "dev/null"), os.lstat(mnt / "dev/sda")
    assert stat.S_ISCHR(null.st_mode) and (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    assert stat.S_ISBLK(sda.st_mode) and (os.major(sda.st_rdev), os.minor(sda.st_rdev)) == (8, 0)
    assert stat.S_ISFIFO(os.lstat(mnt / "dev/fifo").st_mode)
    with pytest.raises(PermissionError):      # nodev: image device nodes cannot be opened
        open(mnt / "dev/null", "rb")


def test_xattrs(mounted_oci):
    mnt, _ = mounted_oci
    host = mnt / "etc/hostname"
    assert sorted(os.listxattr(host)) == ["security.capability", "user.origin"]
    assert os.getxattr(host, "user.origin") == b"nydus-py"
    assert os.getxattr(host, "security.capability") == CAP_NET_RAW_EP
    with pytest.raises(OSError) as ei:
        os.getxattr(host, "user.missing")
    assert ei.value.errno == errno.ENODATA
    assert os.listxattr(mnt / "big") == []


def test_every_write_fails_with_erofs(mounted_oci):
    mnt, _ = mounted_oci
    attempts = [
        lambda: os.open(mnt / "big", os.O_WRONLY),
        lambda: os.open(mnt / "big", os.O_RDWR),
        lambda: os.open(mnt / "new", os.O_WRONLY | os.O_CREAT, 0o644),
        lambda: os.truncate(mnt / "big", 0),
        lambda: os.mkdir(mnt / "d"),
        lambda: os.unlink(mnt / "big"),
        lambda: os.rmdir(mnt / "many"),
        lambda: os.rename(mnt / "big", mnt / "big2"),
        lambda: os.symlink("x", mnt / "s"),
        lambda: os.link(mnt / "big", mnt / "l"),
        lambda: os.chmod(mnt / "big", 0o777),
        lambda: os.chown(mnt / "big", 1, 1),
        lambda: os.utime(mnt / "big", (0, 0)),
        lambda: os.setxattr(mnt / "big", "user.x", b"y"),
        lambda: os.removexattr(mnt / "etc/hostname", "user.origin"),
        lambda: os.mknod(mnt / "n", stat.S_IFIFO | 0o644),
    ]
    for i, attempt in enumerate(attempts):
        with pytest.raises(OSError) as ei:
            attempt()
        assert ei.value.errno == errno.EROFS, (i, ei.value)


def test_binaries_execute_and_statfs_and_mount_options(mounted_oci):
    mnt, _ = mounted_oci
    out = subprocess.run([str(mnt / "bin/hello")], capture_output=True, check=True, timeout=10)
    assert out.stdout == b"hello from nydus\n"
    sv = os.statvfs(mnt)
    assert sv.f_flag & os.ST_RDONLY and sv.f_flag & os.ST_NOSUID
    assert sv.f_files > BIG_DIR_ENTRIES and sv.f_bfree == 0
    fstype, opts = mount_options(mnt)
    assert fstype == "fuse.nydus-py"
    assert {"ro", "nosuid", "nodev", "default_permissions"} <= opts and "allow_other" not in opts


# -- bootstrap + blob dir, errors on the data path, permissions, SIGTERM ---------------------------
def test_corrupt_blob_gives_eio_for_that_file_and_the_daemon_keeps_serving(rich, tmp_path):
    boot, blobs = rich.write_flat(tmp_path / "img")
    blob = blobs / rich.blob_id.split(":", 1)[1]
    raw = bytearray(blob.read_bytes())
    off, _ = rich.chunk_offsets["big"][0]
    raw[off] ^= 0xFF
    blob.write_bytes(raw)
    # pytest's tmp dirs are 0700: other users need a mountpoint they can reach.
    mnt, log = Path(tempfile.mkdtemp(prefix="nydus-e2e-")), tmp_path / "log"
    os.chmod(mnt, 0o755)
    with contextlib.ExitStack() as stack:
        stack.callback(os.rmdir, mnt)
        proc = stack.enter_context(nydusd(mnt, "--bootstrap", str(boot), "--blob-dir", str(blobs),
                                          "--allow-other", log=log))
        with pytest.raises(OSError) as ei:
            (mnt / "big").read_bytes()
        assert ei.value.errno == errno.EIO
        assert (mnt / "etc/hostname").read_bytes() == b"nydus\n"
        assert (mnt / "text").read_bytes() == rich.files["text"]
        assert proc.poll() is None
        # default_permissions + allow_other: the kernel enforces modes for other users.
        nobody = dict(user=65534, group=65534, capture_output=True, timeout=10)
        assert subprocess.run(["cat", str(mnt / "etc/hostname")], **nobody).stdout == b"nydus\n"
        denied = subprocess.run(["cat", str(mnt / "secret")], **nobody)
        assert denied.returncode != 0 and b"Permission denied" in denied.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert mount_entry(mnt) is None
    text = log.read_text()
    assert any("nydus_py.fs.vfs: read /big" in line and "mismatch" in line
               for line in text.splitlines()), text


def test_sigint_unmounts_and_exits_zero(oci_image, tmp_path):
    mnt = tmp_path / "mnt"
    with nydusd(mnt, "--image", f"oci:{oci_image}:v1", log=tmp_path / "log") as proc:
        assert (mnt / "etc/hostname").read_bytes() == b"nydus\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        assert mount_entry(mnt) is None


def test_external_unmount_ends_the_daemon_cleanly(oci_image, tmp_path):
    mnt = tmp_path / "mnt"
    with nydusd(mnt, "--image", f"oci:{oci_image}:v1", log=tmp_path / "log") as proc:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        assert proc.wait(10) == 0


def test_config_file_backend_and_persistent_cache_dir(rich, tmp_path):
    boot, blobs = rich.write_flat(tmp_path / "img")
    cache = tmp_path / "cache"
    cfg = tmp_path / "nydusd.json"
    cfg.write_text(json.dumps({
        "device": {"backend": {"type": "localfs", "config": {"dir": str(blobs)}},
                   "cache": {"type": "blobcache", "config": {"work_dir": str(cache)}}},
        "digest_validate": True, "amplify_io": 65536}))
    mnt = tmp_path / "mnt"
    with nydusd(mnt, "--bootstrap", str(boot), "--config", str(cfg), "--suid", log=tmp_path / "log"):
        assert (mnt / "big").read_bytes() == rich.files["big"]
        assert "nosuid" not in mount_options(mnt)[1]      # --suid: the operator opted in
    assert any(cache.iterdir())


# -- --daemon, stale mounts -----------------------------------------------------------------------
def test_daemon_mode_returns_once_mounted_and_writes_a_pid_file(oci_image, tmp_path):
    mnt, pid_file = tmp_path / "mnt", tmp_path / "nydusd.pid"
    mnt.mkdir()
    try:
        r = run_nydusd("mount", "--daemon", "--pid-file", str(pid_file), "--log-file",
                       str(tmp_path / "log"), "--image", f"oci:{oci_image}:v1", str(mnt))
        assert r.returncode == 0, r.stderr
        assert mount_entry(mnt) is not None           # mounted before the parent returned
        assert (mnt / "etc/hostname").read_bytes() == b"nydus\n"
        pid = int(pid_file.read_text())
        # it exits (not: init reaps it, nydus_py/pidwait.py) only after unmounting and
        # removing its pid file
        assert pidwait.stop(pid, 30)
        assert mount_entry(mnt) is None
        assert not pid_file.exists()
    finally:
        force_unmount(mnt)


def test_daemon_mode_reports_errors_from_the_child(tmp_path):
    (tmp_path / "mnt").mkdir()
    r = run_nydusd("mount", "--daemon", "--image", f"oci:{tmp_path / 'nothing'}", str(tmp_path / "mnt"))
    assert r.returncode == 1
    assert r.stderr.startswith("nydusd: error:") and "no such directory" in r.stderr
    assert mount_entry(tmp_path / "mnt") is None


def test_stale_mountpoint_is_recovered_after_kill_9(oci_image, tmp_path):
    mnt = tmp_path / "mnt"
    cache = ("--cache-dir", str(tmp_path / "cache"))   # a killed daemon cannot remove a temporary cache
    with nydusd(mnt, "--image", f"oci:{oci_image}:v1", *cache, log=tmp_path / "log1") as proc:
        proc.kill()
        proc.wait()
        with pytest.raises(OSError) as ei:
            os.statvfs(mnt)     # not listdir: the kernel may answer a listing from its cache
        assert ei.value.errno == errno.ENOTCONN
        with nydusd(mnt, "--image", f"oci:{oci_image}:v1", *cache, log=tmp_path / "log2"):
            assert (mnt / "etc/hostname").read_bytes() == b"nydus\n"
    assert mount_entry(mnt) is None


# -- bad input ------------------------------------------------------------------------------------
def _one_error_line(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nydusd: error:"), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_input_is_one_line_and_nothing_is_mounted(rich, tmp_path):
    boot, blobs = rich.write_flat(tmp_path / "img")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _one_error_line(run_nydusd("mount", "--bootstrap", str(tmp_path / "none"), "--blob-dir", str(blobs),
                               str(mnt)), "none")
    bad = tmp_path / "corrupt"
    bad.write_bytes(rich.bootstrap[: len(rich.bootstrap) // 2])
    _one_error_line(run_nydusd("mount", "--bootstrap", str(bad), "--blob-dir", str(blobs), str(mnt)),
                    str(bad))
    _one_error_line(run_nydusd("mount", "--bootstrap", str(boot), "--blob-dir", str(blobs),
                               str(tmp_path / "no-such-dir")), "mountpoint does not exist")
    _one_error_line(run_nydusd("mount", "--image", f"oci:{tmp_path}", str(mnt)), "not an OCI image layout")
    cfg = tmp_path / "bad.json"
    cfg.write_text('{"device": {"cache": {"type": "blobcache", "config": {"wrok_dir": "/x"}}}}')
    _one_error_line(run_nydusd("mount", "--config", str(cfg), "--bootstrap", str(boot), "--blob-dir",
                               str(blobs), str(mnt)), "device.cache.config.wrok_dir")
    assert mount_entry(mnt) is None


def test_plain_oci_image_is_refused(tmp_path):
    from nydus_py.oci import mediatypes as mt
    from nydus_py.oci.layout import OCILayoutWriter
    w = OCILayoutWriter(tmp_path / "plain")
    layer = w.put_bytes(b"tar", mt.OCI_LAYER_GZIP)
    conf = w.put_json({"os": "linux"}, mt.OCI_CONFIG)
    w.tag(w.put_json({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "config": conf.to_json(),
                      "layers": [layer.to_json()]}, mt.OCI_MANIFEST), "latest")
    (tmp_path / "mnt").mkdir()
    _one_error_line(run_nydusd("mount", "--image", f"oci:{tmp_path / 'plain'}", str(tmp_path / "mnt")),
                    "not a nydus-py image")


def test_version():
    r = run_nydusd("--version")
    assert r.returncode == 0 and "nydus-py" in r.stdout
