"""Tar headers and PAX records: the 512-byte header block, numeric fields, PAX `LEN KEY=VALUE`
records, PAX times, the old GNU sparse map and the xattr records (SCHILY / LIBARCHIVE).

Everything here parses bytes that are already in memory; the reader (reader.py) decides how
many bytes to buffer. Malformed fields raise `HeaderError`, which the reader turns into a
LayerError naming the layer and entry.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from converter.tar.entry import EntryKind, show

BLOCK = 512
INT64_MAX = (1 << 63) - 1       # numbers beyond int64 are header errors (as Go's archive/tar)
XATTR_NAME_MAX, XATTR_SIZE_MAX = 255, 1 << 16          # Linux limits (setxattr fails beyond)
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.", b"system.")
OVERLAY_XATTRS = b"trusted.overlay."
ZERO_BLOCK = bytes(BLOCK)
_NUM_RE = re.compile(rb"[0-7]*")
_OCTAL_RE = re.compile(rb"[0-7]+")
_DEC_RE = re.compile(rb"[0-9]{1,40}")
_TIME_RE = re.compile(rb"(-?)([0-9]{1,30})(?:\.([0-9]{0,100}))?")
HEADER_ONLY = {EntryKind.HARDLINK, EntryKind.SYMLINK, EntryKind.CHR, EntryKind.BLK,
                EntryKind.DIR, EntryKind.FIFO}
TYPEFLAGS = {b"0": EntryKind.REG, b"\0": EntryKind.REG, b"7": EntryKind.REG, b"S": EntryKind.REG,
          b"1": EntryKind.HARDLINK, b"2": EntryKind.SYMLINK, b"3": EntryKind.CHR, b"4": EntryKind.BLK,
          b"5": EntryKind.DIR, b"D": EntryKind.DIR, b"6": EntryKind.FIFO}


class HeaderError(Exception):
    """Internal: a malformed field; the reader turns it into a LayerError with context."""


def num(field: bytes) -> int:
    """A numeric header field: octal (space/NUL padded) or GNU base-256 (two's complement)."""
    if field and field[0] & 0x80:
        bits = 8 * len(field) - 1
        v = int.from_bytes(field, "big") & ((1 << bits) - 1)
        v = v - (1 << bits) if v >> (bits - 1) else v
    else:
        s = field.strip(b" \0")
        if not _NUM_RE.fullmatch(s):
            raise HeaderError(f"invalid numeric field {field!r}")
        v = int(s, 8) if s else 0
    if not -INT64_MAX - 1 <= v <= INT64_MAX:
        raise HeaderError(f"numeric field out of range {field!r}")
    return v


def cstr(field: bytes) -> bytes:
    return field.split(b"\0", 1)[0]


def dec(value: bytes, key: str) -> int:
    if not _DEC_RE.fullmatch(value) or int(value) > INT64_MAX:
        raise HeaderError(f"bad PAX {key} {value[:40]!r}")
    return int(value)


def parse_pax_time(value: bytes) -> int:
    """A PAX time ("-1.5", "1700000000.123456789123") → exact nanoseconds (sign applies to the
    whole value; digits after the 9th are truncated)."""
    m = _TIME_RE.fullmatch(value)
    if not m:
        raise HeaderError(f"bad PAX time {value[:40]!r}")
    sec = int(m.group(2))
    if sec > INT64_MAX:   # seconds must fit int64, as in Go's parsePAXTime (so umoci, containerd)
        raise HeaderError(f"PAX time out of range {value[:40]!r}")
    # nanoseconds are a Python int: times beyond int64 nanoseconds (before 1678, after 2262) are
    # fine, the bootstrap keeps seconds and nanoseconds apart
    ns = sec * 1_000_000_000 + int(((m.group(3) or b"") + b"000000000")[:9])
    return -ns if m.group(1) else ns


def parse_pax(data: bytes, records: list[tuple[bytes, bytes]]) -> None:
    """Append the `LEN KEY=VALUE\\n` records of a PAX header to `records` (order kept: GNU
    sparse 0.0 repeats its keys)."""
    pos, n = 0, len(data)
    while pos < n:
        sp = data.find(b" ", pos, pos + 24)
        if sp < 0 or not data[pos:sp].isdigit():
            if not data[pos:].strip(b"\0"):
                return  # NUL padding after the last record: tolerated
            raise HeaderError("malformed PAX record (no length)")
        end = pos + int(data[pos:sp])
        if end <= sp + 1 or end > n or data[end - 1] != 0x0A:
            raise HeaderError("malformed PAX record (bad length)")
        key, eq, value = data[sp + 1:end - 1].partition(b"=")
        if not eq or not key:
            raise HeaderError("malformed PAX record (no key=value)")
        if b"\0" in key:
            raise HeaderError("malformed PAX record (NUL in the keyword)")   # as Go's archive/tar
        records.append((key, value))
        pos = end




@dataclass(slots=True)
class Header:
    name: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    typeflag: bytes
    linkname: bytes
    devmajor: int
    devminor: int
    gnu: bool
    raw: bytes
    long_name: bytes = b""    # from a GNU 'L' member
    long_link: bytes = b""    # from a GNU 'K' member


def parse_header(blk: bytes) -> Header:
    try:
        chk = num(blk[148:156])
    except HeaderError:
        raise HeaderError("bad header checksum (not a tar header)") from None
    unsigned = sum(blk) - sum(blk[148:156]) + 8 * 32
    if chk != unsigned:  # old tars summed signed chars; only pay for that when needed
        signed = unsigned - 256 * sum(1 for b in blk if b & 0x80) + 256 * sum(1 for b in blk[148:156] if b & 0x80)
        if chk != signed:
            raise HeaderError("bad header checksum (corrupt or not a tar header)")
    magic = blk[257:265]
    name = cstr(blk[0:100])
    prefix = b""
    if magic[:6] == b"ustar\0":
        # star (Schily) keeps atime/ctime after a shorter prefix and says so in its trailer
        prefix = cstr(blk[345:476]) if blk[508:512] == b"tar\0" else cstr(blk[345:500])
    elif magic == b"ustar  \0" and not (_go_numeric_ok(blk[345:357]) and _go_numeric_ok(blk[357:369])):
        # Go before 1.8 wrote a ustar prefix into GNU headers, over the atime/ctime fields; Go's
        # reader (hence containerd, umoci) takes the prefix back when those fields are not numbers
        # and the prefix is ASCII, and so do we, so that such an entry lands where they put it
        candidate = cstr(blk[345:500])
        if candidate.isascii():
            prefix = candidate
    if prefix:
        name = prefix + b"/" + name
    h = Header(name=name, mode=num(blk[100:108]), uid=num(blk[108:116]), gid=num(blk[116:124]),
                size=num(blk[124:136]), mtime=num(blk[136:148]), typeflag=blk[156:157],
                linkname=cstr(blk[157:257]), devmajor=num(blk[329:337]), devminor=num(blk[337:345]),
                gnu=magic == b"ustar  \0", raw=blk)
    if h.size < 0 or h.uid < 0 or h.gid < 0 or h.devmajor < 0 or h.devminor < 0:
        raise HeaderError("negative size, owner or device number")
    return h

def _go_numeric_ok(field: bytes) -> bool:
    """Whether Go's tar reader parses a GNU atime/ctime field without error (an unused field
    starts with NUL and is not parsed)."""
    if not field or field[0] == 0:
        return True
    if field[0] & 0x80:
        try:
            num(field)
        except HeaderError:
            return False
        return True
    digits = field.strip(b" \0").split(b"\0", 1)[0]
    return bool(_OCTAL_RE.fullmatch(digits)) and int(digits, 8) < 1 << 64


def old_gnu_spans(area: bytes) -> list[tuple[int, int]]:
    spans = []
    for i in range(0, len(area) - 23, 24):
        if not area[i:i + 24].strip(b"\0"):
            break
        spans.append((num(area[i:i + 12]), num(area[i + 12:i + 24])))
    return spans



def pax_xattrs(records: list) -> dict[bytes, bytes]:
    """SCHILY.xattr.NAME=value (binary-exact) and LIBARCHIVE.xattr.%-encoded-NAME=base64;
    SCHILY wins when both name one attribute (bsdtar writes both)."""
    out: dict[bytes, bytes] = {}
    schily = set()
    for key, value in records:
        if key.startswith(b"SCHILY.xattr."):
            name = key[13:]
            schily.add(name)
            if not value:  # an empty PAX value unsets the keyword (as Go's tar, hence umoci)
                out.pop(name, None)
                continue
        elif key.startswith(b"LIBARCHIVE.xattr."):
            name = unquote_to_bytes(key[17:])
            if name in schily:
                continue
            try:
                value = base64.b64decode(value + b"=" * (-len(value) % 4), validate=True)
            except binascii.Error:
                raise HeaderError(f"bad base64 in PAX {show(key)}") from None
        else:
            continue
        if not name or b"\0" in name:
            raise HeaderError("PAX xattr with an empty or NUL-containing name")
        if len(name) > XATTR_NAME_MAX or len(value) > XATTR_SIZE_MAX:
            raise HeaderError(f"xattr '{show(name[:60])}': name longer than {XATTR_NAME_MAX} or value larger "
                       f"than {XATTR_SIZE_MAX} bytes (Linux limits)")
        if not name.startswith(XATTR_NAMESPACES):
            continue   # no such namespace: setxattr says ENOTSUP and umoci/containerd skip it
        if name.startswith(OVERLAY_XATTRS):
            continue   # overlayfs' own metadata: an image must not steer the overlay mounted above it
        out[name] = value
    return out

