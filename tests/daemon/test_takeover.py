"""Session handover pieces without a daemon: the state passed with the fd, SCM_RIGHTS framing,
the supervisor's daemon command line, and the kernel side of a kept connection (mount(2) of
/dev/fuse and its FUSE_INIT; root)."""

from __future__ import annotations

import os
import socket
import struct
import sys

import pytest

from nydus_py.daemon import fusefd
from nydus_py.daemon.cli import build_parser
from nydus_py.daemon.failover_cli import child_argv
from nydus_py.daemon.takeover import SessionState, TakeoverError


def fake_init(flags: int = 0, flags2: int = 0) -> bytes:
    body = fusefd.INIT_IN.pack(7, 41, 131072, flags, flags2) + bytes(44)
    total = fusefd.IN_HEADER.size + len(body)
    return fusefd.IN_HEADER.pack(total, fusefd.FUSE_INIT, 2, 0, 0, 0, 0, 0, 0) + body


def test_session_state_round_trip_and_validation():
    st = SessionState("id1", "/mnt/x", fake_init(), ("nodev", "ro"))
    assert SessionState.from_json(st.to_json()) == st
    with pytest.raises(TakeoverError, match="version"):
        SessionState.from_json({**st.to_json(), "version": 99})
    with pytest.raises(TakeoverError, match="malformed"):
        SessionState.from_json({"version": 1})
    not_init = bytearray(fake_init())
    struct.pack_into("<I", not_init, 4, 15)        # opcode READ
    with pytest.raises(fusefd.FuseFdError, match="not a FUSE_INIT"):
        SessionState.from_json({**st.to_json(), "init": __import__("base64").b64encode(not_init).decode()})


def test_init_flags_count_flags2_only_with_init_ext():
    assert fusefd.init_flags(fake_init(1, 0x80)) == 1
    got = fusefd.init_flags(fake_init(fusefd.FUSE_INIT_EXT, 0x80))
    assert got & fusefd.FUSE_HAS_RESEND
    with pytest.raises(fusefd.FuseFdError, match="too short"):
        fusefd.init_flags(fake_init()[:50])


def test_fds_and_payload_cross_a_unix_socket(tmp_path):
    a, b = socket.socketpair()
    f = tmp_path / "f"
    f.write_bytes(b"payload file")
    fd = os.open(f, os.O_RDONLY)
    try:
        fusefd.send_fds(a, b"x" * 70000, [fd])
        data, fds = fusefd.recv_fds(b)
        assert data == b"x" * 70000 and len(fds) == 1
        assert os.pread(fds[0], 100, 0) == b"payload file" and fds[0] != fd
        assert not os.get_inheritable(fds[0])
        os.close(fds[0])
        a.sendall(struct.pack("<I", fusefd.MAX_MSG + 1))
        with pytest.raises(fusefd.FuseFdError, match="too large"):
            fusefd.recv_fds(b)
        a.close()
        with pytest.raises(fusefd.FuseFdError, match="closed"):
            fusefd.recv_fds(b)
    finally:
        os.close(fd)
        b.close()


@pytest.mark.parametrize("argv", [
    ["mount", "--failover", "--supervisor", "/s", "--daemon", "--pid-file", "/p", "--bootstrap", "B", "M"],
    ["mount", "--failover", "--supervisor=/s", "--daem", "--pid-file=/p", "--bootstrap", "B", "M"],
    ["mount", "--pid", "/p", "--failover", "--supervisor", "/s", "--bootstrap", "B", "M"],
])
def test_daemon_command_line_drops_the_supervisor_only_options(argv):
    parser = build_parser()
    first = child_argv(parser, argv, upgrade=False)
    assert first[:3] == [sys.executable, "-m", "nydus_py.daemon.cli"]
    rest = first[3:]
    assert not any(t.startswith(("--fail", "--daem", "--pid")) or t == "/p" for t in rest), rest
    assert "--bootstrap" in rest and rest[rest.index("--bootstrap") + 1] == "B"
    assert any(t.startswith("--supervisor") for t in rest)
    assert child_argv(parser, argv, upgrade=True)[-1] == "--upgrade"


def test_kept_connection_mounts_and_yields_the_kernels_init(tmp_path):
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.fail("needs root and /dev/fuse")
    mnt = tmp_path / "m"
    mnt.mkdir()
    conn = fusefd.mount_connection(str(mnt), {"ro", "nodev", "nosuid", "fsname=t", "subtype=t"})
    try:
        assert fusefd.init_flags(conn.init) >= 0 and fusefd.is_alive(conn.fd)
        with open("/proc/self/mountinfo") as f:
            line = next(ln for ln in f if ln.split()[4] == str(mnt))
        assert " - fuse.t t " in line and line.split()[5].startswith("ro")
    finally:
        assert fusefd.unmount(str(mnt))
    assert not fusefd.is_alive(conn.fd)     # unmounted: the connection is gone (POLLERR)
    os.close(conn.fd)
    with pytest.raises(fusefd.FuseFdError, match="not supported"):
        fusefd._mount_args(0, str(mnt), {"max_read=4096"})
