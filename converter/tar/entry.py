"""The tar reader's output: one `TarEntry` per member, names and values as bytes."""

from __future__ import annotations

import enum
import stat
from dataclasses import dataclass, field
from typing import Protocol


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class EntryKind(enum.Enum):
    REG = "reg"
    DIR = "dir"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    CHR = "chr"
    BLK = "blk"
    FIFO = "fifo"
    WHITEOUT = "whiteout"
    OPAQUE = "opaque"


_S_IFMT = {EntryKind.REG: stat.S_IFREG, EntryKind.DIR: stat.S_IFDIR, EntryKind.SYMLINK: stat.S_IFLNK,
           EntryKind.CHR: stat.S_IFCHR, EntryKind.BLK: stat.S_IFBLK, EntryKind.FIFO: stat.S_IFIFO}


def st_mode(kind: EntryKind, perm: int) -> int:
    """The full st_mode (file type bits | permission bits) of a tree node."""
    return _S_IFMT[kind] | (perm & 0o7777)


def show(name: bytes) -> str:
    """A raw name for messages (non-UTF-8 bytes as \\xNN)."""
    return name.decode("utf-8", "backslashreplace")


@dataclass(slots=True, eq=False)
class TarEntry:
    """One tar member. For REG, `read(n)` returns the next n bytes of the file data (fewer only
    at its end; sparse holes come out as zeros); it is valid only until the next entry is
    requested from the iterator."""
    path: tuple[bytes, ...]
    kind: EntryKind
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    linkname: bytes = b""
    link_path: tuple[bytes, ...] | None = None
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    name: bytes = b""          # the raw name from the archive, for messages
    origin: str = ""           # the layer it came from, for messages
    _data: Readable | None = field(default=None, repr=False)

    def read(self, n: int = -1) -> bytes:
        if self._data is None:
            return b""
        return self._data.read(n)

    def describe(self) -> str:
        """`layer 2 (sha256:…): entry 'usr/bin/x'` — the prefix of every message about it."""
        name = show(self.name) if self.name else "/".join(show(c) for c in self.path) or "."
        return f"{self.origin or 'layer'}: entry '{name}'"

