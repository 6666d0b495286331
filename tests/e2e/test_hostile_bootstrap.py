"""One file never takes a mount down (issue 9 section 3), through real FUSE mounts: a bad chunk
on the prefetch list, a bootstrap with a directory cycle, failing reads in a big directory,
and SIGTERM with prefetch running and reads stuck in a backend that never answers."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import threading
from pathlib import Path

import msgpack
import pytest

from nydus_py.format.bootstrap import Bootstrap
from tests.fixtures.daemon import Daemon, exit_serve, mounted, nydusd_cmd, read_errno, reap, wait_for
from tests.fixtures.nydus_build import build

pytestmark = pytest.mark.e2e

CS = 4096


def with_prefetch(bootstrap: bytes, paths: list[str], bad_ref: str | None = None) -> bytes:
    """The same bootstrap with these files as its prefetch list (what --prefetch-patterns
    writes); `bad_ref`: a file whose first chunk ref names a chunk that does not exist."""
    bs = Bootstrap.from_bytes(bootstrap)
    ino_of = {p.decode(): ino for p, ino in bs.iter_paths()}
    doc = msgpack.unpackb(bootstrap, raw=False)
    doc["prefetch"] = b"".join(ino_of[p].to_bytes(4, "little") for p in paths)
    if bad_ref is not None:
        start = int.from_bytes(doc["inodes"][(ino_of[bad_ref] - 1) * 68 + 48:][:4], "little")
        refs = bytearray(doc["chunk_refs"])
        refs[start * 4:start * 4 + 4] = (10**6).to_bytes(4, "little")
        doc["chunk_refs"] = bytes(refs)
    return msgpack.packb(doc, use_bin_type=True)


def test_bad_chunk_on_the_prefetch_list_is_counted_not_fatal(tmp_path):
    files = {"bad/f": os.urandom(3 * CS), "good/g": os.urandom(2 * CS), "other/h": b"hello\n",
             "worse/w": os.urandom(CS)}
    b = build(files, chunk_size=CS, compressor="none")
    boot = with_prefetch(b.bootstrap, ["/bad/f", "/worse/w", "/good/g"], bad_ref="/worse/w")
    (bid, blob), = b.blobs.items()
    bs = Bootstrap.from_bytes(boot)
    bad_ino = next(i for p, i in bs.iter_paths() if p == b"/bad/f")
    first = bs.chunk(bs.file_chunk_ids(bad_ino)[1])
    bad = bytearray(blob)
    bad[first.comp_offset] ^= 0xFF              # the second chunk of bad/f no longer verifies
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / bid.split(":")[1]).write_bytes(bytes(bad))
    (tmp_path / "bootstrap").write_bytes(boot)
    with Daemon(tmp_path, "--bootstrap", str(tmp_path / "bootstrap"), "--blob-dir",
                str(tmp_path / "blobs"), "--cache-dir", str(tmp_path / "cache")) as d:
        done = wait_for(lambda: d.proc.poll() is not None or
                        (m := d.api("/api/v1/metrics/prefetch")).get("state") in (2, 3) and m,
                        "prefetch to finish", log=d.log)
        assert d.proc.poll() is None, f"nydusd exited: {d.log.read_text()}"
        assert done["state"] == 2 and done["errors"] >= 2, done
        assert mounted(d.mnt)
        assert (d.mnt / "good/g").read_bytes() == files["good/g"]
        assert (d.mnt / "other/h").read_bytes() == files["other/h"]
        assert read_errno(d.mnt / "bad/f") == errno.EIO
        assert read_errno(d.mnt / "worse/w") == errno.EIO
        with open(d.mnt / "bad/f", "rb") as f:          # the good first chunk still reads
            assert f.read(CS) == files["bad/f"][:CS]
        assert "prefetch" in d.log.read_text() and d.proc.poll() is None


def test_sigterm_ends_the_daemon_with_prefetch_and_reads_stuck_in_the_backend(tmp_path):
    """The blob is a FIFO nobody writes: every backend read blocks forever (a hung NFS blob
    directory, a registry that stops sending). SIGTERM must still end the daemon and take the
    mount away within a bounded time."""
    files = {f"d/f{i}": os.urandom(2 * CS) for i in range(8)}
    b = build(files, chunk_size=CS, compressor="none")
    boot = with_prefetch(b.bootstrap, [f"/d/f{i}" for i in range(4)])
    (bid, _), = b.blobs.items()
    (tmp_path / "blobs").mkdir()
    os.mkfifo(tmp_path / "blobs" / bid.split(":")[1])
    (tmp_path / "bootstrap").write_bytes(boot)
    d = Daemon(tmp_path, "--bootstrap", str(tmp_path / "bootstrap"), "--blob-dir",
               str(tmp_path / "blobs"), "--cache-dir", str(tmp_path / "cache"))
    readers: list[threading.Thread] = []
    outcome: dict[str, int | None] = {}
    try:
        d.start()
        for name in ("f5", "f6"):
            t = threading.Thread(target=lambda n=name: outcome.__setitem__(n, read_errno(d.mnt / "d" / n)),
                                 daemon=True)
            t.start()
            readers.append(t)
        wait_for(lambda: len(d.api("/api/v1/metrics/inflight")["values"]) >= 2, "two reads in flight",
                 log=d.log)
        assert d.api("/api/v1/metrics/prefetch")["state"] == 1      # prefetch stuck too
        d.proc.send_signal(signal.SIGTERM)
        try:
            d.proc.wait(30)         # the daemon bounds its own shutdown (STOP_GRACE = 5 s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"nydusd still running 30 s after SIGTERM: {d.log.read_text()}")
        assert not mounted(d.mnt)
        for t in readers:
            t.join(30)
            assert not t.is_alive()
        assert all(v is not None for v in outcome.values()), outcome  # failed, never data
        assert "did not finish" in d.log.read_text()
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
        subprocess.run(["fusermount3", "-u", "-z", str(d.mnt)], check=False, capture_output=True)


def _accepted_mutations(per_family: int) -> list[tuple[str, int, bytes]]:
    from nydus_py.errors import FormatError
    from tests.format.bootstrap_fuzz import case, original
    out = []
    for family in ("fields", "bytes", "zstd", "structure"):
        found = 0
        for seed in range(400):
            data = case(family, seed)
            if data == original():
                continue
            try:
                Bootstrap.from_bytes(data)
            except FormatError:
                continue
            out.append((family, seed, data))
            found += 1
            if found == per_family:
                break
    return out


def _walk_and_read(mnt: Path, bs: Bootstrap) -> tuple[int, int]:
    """Every entry stat'ed, every file read whole, every symlink read: (ok files, EIOs).
    Bytes that come back must be the chunks the bootstrap names."""
    from tests.format.bootstrap_fuzz import _verify
    ino_of = {p: i for p, i in bs.iter_paths()}
    ok = eio = 0
    stack = [mnt]
    seen: set[int] = set()
    while stack:
        d = stack.pop()
        try:
            names = os.listdir(d)
        except OSError as e:
            assert e.errno == errno.EIO, e
            eio += 1
            continue
        for name in names:
            p = d / name
            st = os.lstat(p)
            rel = b"/" + os.fsencode(p.relative_to(mnt))
            if stat.S_ISDIR(st.st_mode):
                if st.st_ino not in seen:
                    seen.add(st.st_ino)
                    stack.append(p)
            elif stat.S_ISREG(st.st_mode):
                try:
                    data = p.read_bytes()
                except OSError as e:
                    assert e.errno == errno.EIO, e
                    eio += 1
                    continue
                _verify(bs, ino_of[rel], 0, data, st.st_size)
                ok += 1
            elif stat.S_ISLNK(st.st_mode):
                try:
                    os.readlink(p)
                except OSError as e:
                    assert e.errno == errno.EIO, e
                    eio += 1
    return ok, eio


def test_fuse_mounts_of_mutated_but_accepted_bootstraps_read_correct_bytes_or_eio(tmp_path):
    from tests.format.bootstrap_fuzz import rich_blob
    blob_id, blob = rich_blob()
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / blob_id.split(":")[1]).write_bytes(blob)
    cases = _accepted_mutations(2)
    assert len(cases) >= 6
    total_ok = 0
    for k, (family, seed, data) in enumerate(cases):
        boot = tmp_path / f"bootstrap-{k}"
        boot.write_bytes(data)
        d = Daemon(tmp_path, "--bootstrap", str(boot), "--blob-dir", str(tmp_path / "blobs"),
                   "--cache-dir", str(tmp_path / f"cache-{k}"), name=f"m{k}")
        with d:
            ok, _eio = _walk_and_read(d.mnt, Bootstrap.from_bytes(data))
            total_ok += ok
            assert d.proc.poll() is None, f"{family} {seed}: {d.log.read_text()}"
            assert d.stop() == 0, f"{family} {seed}: {d.log.read_text()}"
        assert not mounted(d.mnt)
        assert "Traceback" not in d.log.read_text(), f"{family} {seed}: {d.log.read_text()}"
    assert total_ok > 0


def test_a_cyclic_bootstrap_is_refused_at_mount_with_one_line(tmp_path):
    """Before: it mounted, and prefetch_all walked the cycle forever (SIGTERM ignored)."""
    import json

    from nydus_py.format.bootstrap import ROOT_INO, BootstrapWriter
    w = BootstrapWriter(chunk_size=CS)
    root = w.add_inode(mode=stat.S_IFDIR | 0o755, uid=0, gid=0, mtime_ns=0)
    a = w.add_inode(mode=stat.S_IFDIR | 0o755, uid=0, gid=0, mtime_ns=0)
    w.add_dirent(root, b"a", a)
    w.add_dirent(a, b"loop", ROOT_INO)
    (tmp_path / "bootstrap").write_bytes(w.to_bytes())
    (tmp_path / "blobs").mkdir()
    (tmp_path / "cfg.json").write_text(json.dumps({"fs_prefetch": {"enable": True, "prefetch_all": True}}))
    (tmp_path / "mnt").mkdir()
    proc = subprocess.Popen([*nydusd_cmd(), "mount", "--bootstrap", str(tmp_path / "bootstrap"),
                             "--blob-dir", str(tmp_path / "blobs"), "--config", str(tmp_path / "cfg.json"),
                             str(tmp_path / "mnt")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)
    try:
        _out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("nydusd did not refuse the cyclic bootstrap")
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(tmp_path / "mnt")], check=False, capture_output=True)
    assert proc.returncode != 0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "root directory listed as a child" in lines[0], err


@pytest.mark.parametrize("failover", [False, True])
def test_a_bootstrap_refused_in_nydusd_serve_leaves_no_mount_files(tmp_path, failover):
    """`nydusd serve` answers a refused mount with the child's one line; the child's files in
    the state dir (config with maybe registry auth, log, err, socket) used to stay behind."""
    from nydus_py.daemon.api import get_json
    (tmp_path / "bootstrap").write_bytes(msgpack.packb({"version": 1, "not": "a bootstrap"}))
    (tmp_path / "blobs").mkdir()
    (tmp_path / "mnt").mkdir()
    state, sock, log = tmp_path / "state", tmp_path / "sup.sock", tmp_path / "sup.log"
    with open(log, "wb") as out:
        sup = subprocess.Popen([*nydusd_cmd(), "serve", "--apisock", str(sock), "--state-dir",
                                str(state), "--cache-dir", str(tmp_path / "cache"),
                                *(["--failover"] if failover else [])],
                               stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for(sock.exists, "supervisor socket", log=log)
        st, info = get_json(str(sock), f"/api/v1/mount?mountpoint={tmp_path / 'mnt'}", "POST",
                            {"bootstrap": str(tmp_path / "bootstrap"), "blob_dir": str(tmp_path / "blobs"),
                             "config": {"device": {"backend": {"type": "localfs",
                                                               "config": {"dir": str(tmp_path / "blobs")}}}}})
        assert st == 500 and "bootstrap" in info["message"] and "\n" not in info["message"], info
        assert sorted(os.listdir(state)) == []
        assert not mounted(tmp_path / "mnt")
        exit_serve(sock, sup)
    finally:
        reap(sup)
