"""The mounts of our mount namespace (/proc/self/mountinfo) and lazy unmount: the one place
every part of nydus-py (daemon, supervisor, snapshotter, `nydusify check`) asks "what is
mounted at this path" and detaches a mount.

Reading mountinfo never stats the mountpoint, which a dead FUSE mount answers with ENOTCONN
(or from the kernel's attribute cache) and a hung one never answers. The kernel escapes space,
tab, newline and backslash in paths as 3-digit octal (`\\040`); other bytes (UTF-8 or not) pass
through raw, so fields are decoded bytewise with surrogateescape, never as text escapes.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("nydus_py.mountinfo")

MOUNTINFO = "/proc/self/mountinfo"
_OCTAL = re.compile(rb"\\([0-7]{3})")


@dataclass(frozen=True)
class MountEntry:
    """One line of mountinfo (proc(5)); paths unescaped."""
    mount_id: int
    parent_id: int
    device: str            # "major:minor" (names the bdi in /sys/class/bdi)
    root: str
    mountpoint: str
    options: tuple[str, ...]
    fstype: str
    source: str
    super_options: tuple[str, ...]


def unescape(field: bytes) -> str:
    return _OCTAL.sub(lambda m: bytes([int(m.group(1), 8) & 0xFF]), field).decode("utf-8", "surrogateescape")


def parse_line(line: bytes) -> MountEntry | None:
    """One mountinfo line; None for a malformed one. Optional fields (shared:N, master:N...)
    end at the lone "-" separator."""
    fields = line.rstrip(b"\n").split(b" ")
    try:
        sep = fields.index(b"-", 6)
        fstype, source, super_opts = fields[sep + 1:sep + 4]
        return MountEntry(int(fields[0]), int(fields[1]), fields[2].decode("ascii"), unescape(fields[3]),
                          unescape(fields[4]), tuple(fields[5].decode("utf-8", "surrogateescape").split(",")),
                          unescape(fstype), unescape(source),
                          tuple(super_opts.decode("utf-8", "surrogateescape").split(",")))
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


def parse(data: bytes) -> list[MountEntry]:
    return [e for e in map(parse_line, data.splitlines()) if e is not None]


def entries(path: str = MOUNTINFO) -> list[MountEntry]:
    """Every mount of our namespace, in mount order; [] when mountinfo cannot be read."""
    try:
        with open(path, "rb") as f:
            return parse(f.read())
    except OSError:
        return []


def find(mountpoint: str | os.PathLike[str]) -> MountEntry | None:
    """The top mount at exactly `mountpoint` (the last one mounted there), or None. The
    path is compared as given: pass a real path."""
    target = os.fspath(mountpoint)
    found = None
    for e in entries():
        if e.mountpoint == target:
            found = e
    return found


def under(prefix: str | os.PathLike[str]) -> list[str]:
    """Mountpoints strictly below directory `prefix`."""
    base = os.fspath(prefix).rstrip("/") + "/"
    return [e.mountpoint for e in entries() if e.mountpoint.startswith(base)]


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """`path` is a mountpoint. Resolved with realpath while its parent exists (realpath
    ignores errors, so a dead mount at `path` itself still resolves)."""
    p = os.fspath(path)
    target = os.path.realpath(p) if os.path.exists(os.path.dirname(p)) else p
    return find(target) is not None


def lazy_unmount(path: str | Path) -> bool:
    """Detach the top mount at `path` (MNT_DETACH): `fusermount3 -u -z`, else `umount -l`.
    True when one of them succeeded. Works on dead and busy FUSE mounts alike."""
    for cmd in (["fusermount3", "-u", "-z", str(path)], ["umount", "-l", str(path)]):
        if shutil.which(cmd[0]) is None:
            continue
        try:
            r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            log.debug("%s: %s", " ".join(cmd), e)
            continue
        if r.returncode == 0:
            return True
        log.debug("%s: %s", " ".join(cmd), r.stderr.strip())
    return False
