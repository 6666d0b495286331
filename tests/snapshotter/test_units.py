"""systemd: the units scripts/install-units.sh installs pass `systemd-analyze verify` (no
warning either), and the snapshotter tells a real notify socket READY=1 once it serves."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nydus_py.sdnotify import notify

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _install(unit_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts/install-units.sh"), "--unit-dir", str(unit_dir),
                           "--bin-dir", str(BIN), "--conf-dir", "/etc/nydus-py", "--no-reload"],
                          capture_output=True, text=True)


def test_installed_units_verify_clean(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze not installed (scripts/setup.sh installs systemd)")
    p = _install(tmp_path)
    assert p.returncode == 0, p.stderr
    units = [tmp_path / "nydus-snapshotter.service", tmp_path / "nydusd.service"]
    v = subprocess.run(["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True)
    assert v.returncode == 0 and v.stderr.strip() == "", v.stderr
    snap = units[0].read_text()
    assert "\nType=notify\n" in snap and "\nKillMode=process\n" in snap
    assert f"\nExecStart={BIN}/nydus-snapshotter --config /etc/nydus-py/config.toml\n" in snap
    assert f"ExecStart={BIN}/nydusd serve " in units[1].read_text()
    assert not re.search(r"@[A-Z]+@", "".join(u.read_text() for u in units))   # every placeholder filled


def test_install_refuses_a_bin_dir_without_the_commands(tmp_path):
    p = subprocess.run(["bash", str(REPO / "scripts/install-units.sh"), "--unit-dir", str(tmp_path / "u"),
                        "--bin-dir", str(tmp_path), "--no-reload"], capture_output=True, text=True)
    assert p.returncode == 1 and "nydus-snapshotter not found" in p.stderr and not (tmp_path / "u").exists()


def _listener(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    return s


def test_notify_sends_one_datagram_to_path_and_abstract_sockets(tmp_path):
    with _listener(str(tmp_path / "n.sock")) as s:
        assert notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "n.sock")})
        assert s.recv(4096) == b"READY=1"
    name = f"nydus-py-test-{os.getpid()}"
    with _listener("\0" + name) as s:
        assert notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert s.recv(4096) == b"STOPPING=1"
    assert not notify("READY=1", {})                                         # not under systemd
    assert not notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone")})  # logged, not raised


def test_snapshotter_notifies_ready_once_serving_and_stopping_on_sigterm(tmp_path):
    ns = str(tmp_path / "notify.sock")
    addr = tmp_path / "grpc.sock"
    with _listener(ns) as s:
        s.settimeout(120)            # a guard against hanging forever, not a performance limit
        p = subprocess.Popen([sys.executable, "-m", "nydus_py.snapshotter.cli", "--root", str(tmp_path / "root"),
                              "--address", str(addr), "--no-remote"],
                             env={**os.environ, "NOTIFY_SOCKET": ns}, stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            msg = s.recv(4096).decode()
            fields = dict(line.split("=", 1) for line in msg.splitlines())
            assert fields["READY"] == "1" and fields["MAINPID"] == str(p.pid)
            assert addr.exists()                  # READY means containerd can connect now
            p.send_signal(signal.SIGTERM)
            assert s.recv(4096) == b"STOPPING=1"
            assert p.wait(60) == 0
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
