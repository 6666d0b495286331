"""nydusd's API as Nydus documents it, over real HTTP/1.1 on the socket: keep-alive, chunked
bodies, PUT /api/v1/daemon, /daemon/backend, /daemon/events, nydusd's mount body (204), a
second daemon refusing a live socket, and nydusctl against it all; real FUSE mounts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest

from nydus_py.daemon import api
from tests.fixtures.mounts import answering, command, mounted, running
from tests.fixtures.rich_image import build_rich

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    rich = build_rich()
    d = tmp_path_factory.mktemp("img")
    (d / "blobs").mkdir()
    (d / "blobs" / rich.blob_id.removeprefix("sha256:")).write_bytes(rich.blob)
    (d / "bootstrap").write_bytes(rich.bootstrap)
    return d / "bootstrap", d / "blobs", rich


def _http(sock_path, raw: bytes) -> bytes:
    """Sends raw bytes, reads until the server closes (it must, after Connection: close)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock_path))
        s.sendall(raw)
        out = b""
        while data := s.recv(65536):
            out += data
    return out


def _mount(tmp_path, image, *extra):
    boot, blobs, _ = image
    mnt, sock = tmp_path / "mnt", tmp_path / "api.sock"
    argv = [*command("nydusd"), "mount", "--bootstrap", str(boot), "--blob-dir", str(blobs),
            "--apisock", str(sock), "--id", "first", *extra, str(mnt)]
    return running(argv, mnt, tmp_path / "log"), mnt, sock


def test_keep_alive_chunked_log_level_backend_and_events(tmp_path, image):
    ctx, mnt, sock = _mount(tmp_path, image)
    with ctx:
        # two requests on one connection (keep-alive), the second with a chunked body
        body = b'{"log_level": "debug"}'
        raw = (b"GET /api/v1/daemon HTTP/1.1\r\nHost: x\r\n\r\n"
               b"PUT /api/v1/daemon HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
               b"Connection: close\r\n\r\n" + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
        out = _http(sock, raw)
        assert out.count(b"HTTP/1.1 ") == 2
        first, sep, _ = out.partition(b"HTTP/1.1 204")
        assert sep and first.startswith(b"HTTP/1.1 200") and b'"id": "first"' in first
        # malformed HTTP: one 400 line, the daemon keeps serving
        assert _http(sock, b"NOT HTTP\r\n\r\n").startswith(b"HTTP/1.1 400")
        assert api.get_json(str(sock), "/api/v1/daemon")[0] == 200
        status, _ = api.get_json(str(sock), "/api/v1/daemon", "PUT", {"log_level": "loud"})
        assert status == 400
        status, backend = api.get_json(str(sock), "/api/v1/daemon/backend")
        assert status == 200 and backend[str(mnt)]["type"] == "localfs"
        # a failing read (blob gone) becomes an event
        for p in image[1].iterdir():
            saved = p.read_bytes()
            p.unlink()
        try:
            with pytest.raises(OSError):
                (mnt / "big").read_bytes()
        finally:
            p.write_bytes(saved)
        status, events = api.get_json(str(sock), "/api/v1/daemon/events")
        assert status == 200 and any(e["level"] in ("WARNING", "ERROR") for e in events["events"])


def test_second_daemon_refuses_a_live_apisock(tmp_path, image):
    ctx, mnt, sock = _mount(tmp_path, image)
    with ctx:
        boot, blobs, _ = image
        mnt2 = tmp_path / "mnt2"
        mnt2.mkdir()
        r = subprocess.run([*command("nydusd"), "mount", "--bootstrap", str(boot), "--blob-dir", str(blobs),
                            "--apisock", str(sock), str(mnt2)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "another daemon is serving its API there" in r.stderr
        assert not mounted(mnt2)
        r = subprocess.run([*command("nydusd"), "serve", "--apisock", str(sock)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "another daemon" in r.stderr
        status, info = api.get_json(str(sock), "/api/v1/daemon")      # the first still answers
        assert status == 200 and info["id"] == "first"
    # once it is gone, the stale socket file is taken over
    assert not sock.exists() or not answering(mnt)


def test_nydus_mount_body_and_nydusctl(tmp_path, image):
    boot, blobs, rich = image
    sock = tmp_path / "serve.sock"
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        sup = subprocess.Popen([*command("nydusd"), "serve", "--apisock", str(sock), "--cache-dir",
                                str(tmp_path / "cache"), "--state-dir", str(tmp_path / "state")],
                               stdout=out, stderr=subprocess.STDOUT)
    mnt = tmp_path / "sub"
    mnt.mkdir()
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert sup.poll() is None, log.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ctl = [*command("nydusctl"), "--sock", str(sock)]
        cfg = tmp_path / "rafs.config"
        cfg.write_text(json.dumps({"device": {"backend": {"type": "localfs", "config": {"dir": str(blobs)}},
                                              "cache": {"type": "blobcache", "config": {"work_dir": "cache"}}},
                                   "mode": "direct", "digest_validate": True}))
        # nydusd's documented curl body: source, fs_type, config as a JSON string → 204
        status, raw = api.call_sync(str(sock), "POST", f"/api/v1/mount?mountpoint={mnt}", json.dumps(
            {"source": str(boot), "fs_type": "rafs", "config": cfg.read_text()}).encode(), timeout=60)
        assert status == 204 and raw == b"", raw
        assert (mnt / "etc/hostname").read_bytes() == rich.files["etc/hostname"]
        status, _ = api.call_sync(str(sock), "POST", f"/api/v1/mount?mountpoint={tmp_path}",
                                  json.dumps({"source": str(boot), "fs_type": "passthrough_fs"}).encode())
        assert status == 501

        def run(*args):
            return subprocess.run([*ctl, *args], capture_output=True, text=True, timeout=60)
        r = run("info")
        assert r.returncode == 0 and "mounts:" in r.stdout
        r = run("--raw", "metrics", "fsstats")
        assert r.returncode == 0 and isinstance(json.loads(r.stdout), dict)
        for cat in ("backend", "cache", "fs", "blobcache"):
            assert run("metrics", cat).returncode == 0, cat
        r = run("set", "log-level", "debug")
        assert r.returncode == 0 and "log level set to debug" in log.read_text()   # at info: was on before
        r = run("set", "log-level", "loud")
        assert r.returncode == 1 and "400" in r.stderr
        r = run("umount", "--mountpoint", str(mnt))
        assert r.returncode == 0 and not mounted(mnt)
        mnt2 = tmp_path / "sub2"
        mnt2.mkdir()
        r = run("mount", "--source", str(boot), "--mountpoint", str(mnt2), "--config", str(cfg))
        assert r.returncode == 0, r.stderr
        assert (mnt2 / "text").read_bytes() == rich.files["text"]
        r = run("umount", "-m", str(mnt2))
        assert r.returncode == 0
        r = run("umount", "-m", str(mnt2))
        assert r.returncode == 1 and r.stderr.startswith("nydusctl: error: ") and "404" in r.stderr
        r = subprocess.run([*command("nydusctl"), "--sock", str(tmp_path / "none.sock"), "info"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "no such socket" in r.stderr
    finally:
        sup.terminate()
        sup.wait(30)
        for m in (mnt, tmp_path / "sub2"):
            if mounted(m):
                subprocess.run(["fusermount3", "-u", "-z", str(m)], capture_output=True, check=False)
    assert not os.path.exists(sock)
