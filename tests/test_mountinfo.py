"""nydus_py/mountinfo.py: the one mountinfo parser."""

import os

from nydus_py import mountinfo

LINES = (
    b"36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"
    b"37 36 0:52 / /tmp/with\\040space\\011tab\\134back rw,nosuid shared:2 master:3 - fuse.nydus-py nydus-py ro,user_id=0\n"
    b"38 36 0:53 / /tmp/caf\xc3\xa9\\012nl ro - tmpfs none rw\n"
    b"garbage line\n"
)


def test_parse_fields_and_octal_escapes():
    a, b, c = mountinfo.parse(LINES)
    assert (a.mount_id, a.parent_id, a.device, a.root, a.mountpoint) == (36, 35, "98:0", "/mnt1", "/mnt/parent")
    assert a.fstype == "ext3" and a.source == "/dev/root" and a.super_options == ("rw", "errors=continue")
    assert b.mountpoint == "/tmp/with space\ttab\\back"          # optional fields skipped
    assert b.fstype == "fuse.nydus-py" and b.options == ("rw", "nosuid") and "user_id=0" in b.super_options
    assert c.mountpoint == "/tmp/café\nnl"                        # raw UTF-8 kept, not text-unescaped


def test_non_utf8_path_round_trips_to_its_bytes():
    (e,) = mountinfo.parse(b"1 0 0:1 / /x/\xff\\040y rw - tmpfs t rw\n")
    assert os.fsencode(e.mountpoint) == b"/x/\xff y"


def test_live_namespace():
    assert mountinfo.find("/proc").fstype == "proc"
    assert mountinfo.is_mounted("/proc") and not mountinfo.is_mounted("/proc/self")
    assert all(m.startswith("/proc/") for m in mountinfo.under("/proc"))
    assert mountinfo.find("/nonexistent/dir") is None
    assert not mountinfo.lazy_unmount("/nonexistent/dir")
