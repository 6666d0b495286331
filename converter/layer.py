"""Layer blobs → tar entries: streaming decompression and a bytes-exact, bounded tar reader.

`open_layer_stream()` turns a (compressed) layer blob into the uncompressed tar stream:
gzip (multi-member), zstd (multi-frame) or plain tar, sniffing magic bytes for the Docker
media types (whose "tar.gzip" layers are sometimes plain tars) and for unknown types.
`iter_entries()` reads that stream one `TarEntry` at a time. Names, link targets and xattr
values stay `bytes` end to end. Memory is bounded whatever the layer: data is read in the
consumer's pieces, skipped data is read in 1 MiB pieces, and every header that is buffered
(PAX, GNU long names, sparse maps) has a hard limit.

Tar formats read: v7, ustar (prefix), GNU (long names 'L'/'K', base-256 numbers, old sparse
'S' with extension blocks, dumpdir 'D' as a directory), PAX (path, linkpath, size, uid, gid,
nanosecond mtime, SCHILY.xattr.*, LIBARCHIVE.xattr.*, GNU sparse 0.0/0.1/1.0). Global PAX
headers ('g') are checked and ignored (Go's archive/tar returns them to the caller as an
entry of their own; no image tool gives them meaning for a rootfs).
Name precedence is Go's (hence umoci's): GNU.sparse.name, GNU long name ('L'), PAX path,
the header; likewise GNU long link, PAX linkpath, the header. A second 'x' header before one
entry replaces the first. Numbers beyond int64, times whose nanoseconds do not fit int64,
name components over 255 bytes, symlink targets over 4095 bytes, NUL in a PAX keyword and
xattrs over Linux's limits (name 255, value 64 KiB) are errors; xattrs outside the user/
trusted/security/system namespaces are dropped (setxattr: ENOTSUP, which umoci skips); user.*
xattrs on anything but a file or directory are errors (Linux refuses them, so does umoci).
Unknown typeflags are regular files, as POSIX says ("shall be treated as a regular file");
GNU 'V' (volume label) is skipped; 'M'/'N' (multi-volume, old long names) are refused.
Header-only types (hardlink, symlink, char, block, dir, fifo) carry no data even when their
size field is non-zero: like Go's archive/tar (so umoci, containerd), the next header follows.

End of archive: two zero blocks; a single zero block then EOF, or EOF at a clean member
boundary with no zero blocks at all, are accepted (GNU tar and Go/umoci accept both). A zero
block followed by a non-zero block is an error (as Go). Bytes after the end marker are read
and discarded (so the stream's digest can still be verified), like umoci.

Path policy (umoci: oci/layer/tar_extract.go UnpackEntry, CleanPath, SecureJoin):

| entry name                     | umoci                                  | nydus-py                       |
|--------------------------------|----------------------------------------|--------------------------------|
| `/abs/path`, `./rel`           | made relative to the root (CleanPath)  | same: `abs/path`, `rel`        |
| `a/./b`, `a//b`, trailing `/`  | cleaned                                | same: `a/b`                    |
| `a/../b` (stays inside)        | cleaned lexically → `b`                | same                           |
| `../../etc/passwd`, `/../x`    | silently re-rooted → `etc/passwd`      | LayerError: escapes the root   |
| `./`, `/`, `.`                 | the root directory                     | same: path `()`                |
| empty name                     | CleanPath("") → the root               | LayerError                     |
| NUL inside (PAX path)          | fails in the syscall (EINVAL)          | LayerError                     |
| hardlink target escaping       | re-rooted (CleanPath + SecureJoin)     | LayerError                     |
| hardlink target (inside)       | cleaned lexically                      | same → `link_path`             |
| symlink target                 | kept verbatim; empty fails (ENOENT)    | same (`linkname`); empty → err |
| `d/.wh.X`                      | whiteout of `d/X`                      | WHITEOUT, path `d/X`           |
| `d/.wh..wh..opq`               | opaque directory `d`                   | OPAQUE, path `d`               |
| `d/.wh..wh.plnk` (AUFS meta)   | whiteout of `d/.wh.plnk` (no-op)       | skipped                        |
| `d/.wh.`, `d/.wh..`            | whiteout of `d` itself (!)             | LayerError                     |

Parent components that are symlinks or files are the tree's business (converter/tree.py).
We prefer a clear error to re-rooting: an image whose layer tries to escape its root was
produced by a broken or hostile tool, and a conversion pipeline should say so rather than
produce a different image than the one the user thinks they have.
"""

from __future__ import annotations

import base64
import binascii
import enum
import gzip
import re
import stat
import zlib
from dataclasses import dataclass, field
from typing import Iterator
from urllib.parse import unquote_to_bytes

import zstandard

from nydus_py.errors import DigestMismatchError, LayerError, NydusError
from nydus_py.oci import mediatypes as mt

BLOCK = 512
IO_SIZE = 1 << 20
MAX_META = 1 << 20              # one PAX header / GNU long name / sparse map (Go uses 1 MiB too)
MAX_META_PER_ENTRY = 8 << 20    # all extended headers stacked before one entry
MAX_SPARSE = 1 << 18            # sparse map entries per file
INT64_MAX = (1 << 63) - 1       # numbers beyond int64 are header errors (as Go's archive/tar)
NAME_MAX, PATH_MAX = 255, 4096                         # a name component; a symlink target + NUL
XATTR_NAME_MAX, XATTR_SIZE_MAX = 255, 1 << 16          # Linux limits (setxattr fails beyond)
XATTR_NAMESPACES = (b"user.", b"trusted.", b"security.", b"system.")
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_ZERO = bytes(BLOCK)


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
    _data: object = field(default=None, repr=False)

    def read(self, n: int = -1) -> bytes:
        if self._data is None:
            return b""
        return self._data.read(n)

    def describe(self) -> str:
        """`layer 2 (sha256:…): entry 'usr/bin/x'` — the prefix of every message about it."""
        name = show(self.name) if self.name else "/".join(show(c) for c in self.path) or "."
        return f"{self.origin or 'layer'}: entry '{name}'"


# ---------------------------------------------------------------------------------------------
# decompression

def sniff(head: bytes) -> str:
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "tar"


_OCI_CODEC = {**{t: "gzip" for t in mt.GZIP_LAYERS if ".oci." in t},
              **{t: "zstd" for t in mt.ZSTD_LAYERS},
              mt.OCI_LAYER_TAR: "tar", mt.OCI_LAYER_NONDIST_TAR: "tar"}


def open_layer_stream(raw, media_type: str, what: str, *, max_uncompressed: int = 64 << 30):
    """The uncompressed tar stream of a layer blob (`raw`: binary file-like). OCI media types
    are trusted (a gzip type that is not gzip data is an error); Docker and unknown types are
    sniffed. Corrupt or truncated data and more than `max_uncompressed` bytes → LayerError."""
    head = b""
    while len(head) < 4:
        piece = raw.read(4 - len(head))
        if not piece:
            break
        head += piece
    src = _Prepend(head, raw)
    codec = _OCI_CODEC.get(media_type)
    found = sniff(head)
    if codec is None:
        codec = found
    elif codec != "tar" and found != codec and head:
        raise LayerError(f"{what}: media type {media_type} but the data is not {codec}")
    if codec == "gzip":
        return _Decoded(gzip.GzipFile(fileobj=src, mode="rb"), src, src, what, "gzip", max_uncompressed)
    if codec == "zstd":
        tracker = _ZstdFrames(src, what)
        dec = zstandard.ZstdDecompressor().stream_reader(tracker, read_across_frames=True)
        return _Decoded(dec, tracker, src, what, "zstd", max_uncompressed, tracker)
    return _Decoded(src, src, src, what, "tar", max_uncompressed)


class _Prepend:
    def __init__(self, head: bytes, raw):
        self._head, self._raw = head, raw

    def read(self, n: int = -1) -> bytes:
        if self._head:
            if n is None or n < 0:
                out, self._head = self._head + self._raw.read(), b""
                return out
            out, self._head = self._head[:n], self._head[n:]
            return out
        return self._raw.read(n)

    def readable(self) -> bool:
        return True


class _Decoded:
    """Counts (bomb limit), maps codec errors to LayerError, and at EOF drains the raw blob so
    that a VerifyingReader under it checks the digest. On a codec error the rest of the blob is
    read first, so that a blob that is not the one published is reported as the digest mismatch
    it is, and LayerError means "the published layer is malformed"."""

    def __init__(self, dec, raw, blob, what: str, codec: str, limit: int, tracker=None):
        self._dec, self._raw, self._blob, self._what, self._codec = dec, raw, blob, what, codec
        self._limit, self._tracker, self._total, self._eof = limit, tracker, 0, False

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            return b"".join(iter(lambda: self.read(IO_SIZE), b""))
        if self._eof or n == 0:
            return b""
        try:
            data = self._dec.read(n)
        except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:
            _blame_digest(self._blob)
            raise LayerError(f"{self._what}: corrupt or truncated {self._codec} data ({e})") from None
        if not data:
            self._eof = True
            while self._raw.read(IO_SIZE):   # trailing bytes the decoder left, if any
                pass
            if self._tracker is not None:
                self._tracker.check_complete()
            return b""
        self._total += len(data)
        if self._total > self._limit:
            raise LayerError(f"{self._what}: more than {self._limit} uncompressed bytes "
                             f"(limit; a compression bomb?)")
        return data

    def readable(self) -> bool:
        return True


def _blame_digest(stream) -> None:
    """After a parse error: read the rest of `stream`; a DigestMismatchError from a verifying
    reader underneath is the real cause and wins. Any other failure here is ignored."""
    try:
        while stream.read(IO_SIZE):
            pass
    except DigestMismatchError:
        raise
    except (NydusError, OSError, EOFError, ValueError, zlib.error, zstandard.ZstdError):
        pass


class _ZstdFrames:
    """Passes the compressed bytes through while following the zstd frame structure (RFC 8878:
    frame header, block headers, checksum; skippable frames), because the decompressor does not
    report a stream cut at a block boundary. Only headers are parsed; blocks are skipped."""

    def __init__(self, raw, what: str):
        self._raw, self._what = raw, what
        self._state, self._need, self._buf, self._skip = "magic", 4, b"", 0
        self._checksum = 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self._feed(data)
        return data

    def readable(self) -> bool:
        return True

    def check_complete(self) -> None:
        if self._state != "magic" or self._buf or self._skip:
            raise LayerError(f"{self._what}: truncated zstd data (stream ends inside a frame)")

    def _feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._skip:
                k = min(self._skip, n - i)
                self._skip -= k
                i += k
                continue
            k = min(self._need - len(self._buf), n - i)
            self._buf += data[i:i + k]
            i += k
            if len(self._buf) == self._need:
                b, self._buf = self._buf, b""
                self._advance(b)

    def _advance(self, b: bytes) -> None:
        st = self._state
        if st == "magic":
            magic = int.from_bytes(b, "little")
            if b == ZSTD_MAGIC:
                self._state, self._need = "fhd", 1
            elif magic & 0xFFFFFFF0 == 0x184D2A50:
                self._state, self._need = "skippable", 4
            else:
                raise LayerError(f"{self._what}: corrupt zstd data (bad frame magic)")
        elif st == "skippable":
            self._state, self._need, self._skip = "magic", 4, int.from_bytes(b, "little")
        elif st == "fhd":
            fhd = b[0]
            fcs_flag, single, self._checksum, did_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 2) & 1, fhd & 3
            fcs = (1 if single else 0, 2, 4, 8)[fcs_flag]
            rest = (0 if single else 1) + (0, 1, 2, 4)[did_flag] + fcs
            if rest:
                self._state, self._need = "header", rest
            else:
                self._state, self._need = "block", 3
        elif st == "header":
            self._state, self._need = "block", 3
        elif st == "block":
            h = int.from_bytes(b, "little")
            last, btype, bsize = h & 1, (h >> 1) & 3, h >> 3
            if btype == 3:
                raise LayerError(f"{self._what}: corrupt zstd data (reserved block type)")
            self._skip = 1 if btype == 1 else bsize
            if last:
                self._state, self._need = "magic", 4
                self._skip += 4 if self._checksum else 0


# ---------------------------------------------------------------------------------------------
# tar

_NUM_RE = re.compile(rb"[0-7]*")
_DEC_RE = re.compile(rb"[0-9]{1,40}")
_TIME_RE = re.compile(rb"(-?)([0-9]{1,30})(?:\.([0-9]{0,100}))?")
_HEADER_ONLY = {EntryKind.HARDLINK, EntryKind.SYMLINK, EntryKind.CHR, EntryKind.BLK,
                EntryKind.DIR, EntryKind.FIFO}
_TYPES = {b"0": EntryKind.REG, b"\0": EntryKind.REG, b"7": EntryKind.REG, b"S": EntryKind.REG,
          b"1": EntryKind.HARDLINK, b"2": EntryKind.SYMLINK, b"3": EntryKind.CHR, b"4": EntryKind.BLK,
          b"5": EntryKind.DIR, b"D": EntryKind.DIR, b"6": EntryKind.FIFO}


class _Bad(Exception):
    """Internal: a malformed field; the reader turns it into a LayerError with context."""


def _num(field: bytes) -> int:
    """A numeric header field: octal (space/NUL padded) or GNU base-256 (two's complement)."""
    if field and field[0] & 0x80:
        bits = 8 * len(field) - 1
        v = int.from_bytes(field, "big") & ((1 << bits) - 1)
        v = v - (1 << bits) if v >> (bits - 1) else v
    else:
        s = field.strip(b" \0")
        if not _NUM_RE.fullmatch(s):
            raise _Bad(f"invalid numeric field {field!r}")
        v = int(s, 8) if s else 0
    if not -INT64_MAX - 1 <= v <= INT64_MAX:
        raise _Bad(f"numeric field out of range {field!r}")
    return v


def _cstr(field: bytes) -> bytes:
    return field.split(b"\0", 1)[0]


def _dec(value: bytes, key: str) -> int:
    if not _DEC_RE.fullmatch(value) or int(value) > INT64_MAX:
        raise _Bad(f"bad PAX {key} {value[:40]!r}")
    return int(value)


def parse_pax_time(value: bytes) -> int:
    """A PAX time ("-1.5", "1700000000.123456789123") → exact nanoseconds (sign applies to the
    whole value; digits after the 9th are truncated)."""
    m = _TIME_RE.fullmatch(value)
    if not m:
        raise _Bad(f"bad PAX time {value[:40]!r}")
    ns = int(m.group(2)) * 1_000_000_000 + int(((m.group(3) or b"") + b"000000000")[:9])
    if ns > INT64_MAX:   # nanoseconds must fit int64 (years 1678..2262): the bootstrap and FUSE
        raise _Bad(f"PAX time out of range {value[:40]!r}")
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
            raise _Bad("malformed PAX record (no length)")
        end = pos + int(data[pos:sp])
        if end <= sp + 1 or end > n or data[end - 1] != 0x0A:
            raise _Bad("malformed PAX record (bad length)")
        key, eq, value = data[sp + 1:end - 1].partition(b"=")
        if not eq or not key:
            raise _Bad("malformed PAX record (no key=value)")
        if b"\0" in key:
            raise _Bad("malformed PAX record (NUL in the keyword)")   # as Go's archive/tar
        records.append((key, value))
        pos = end


def normalize(name: bytes) -> tuple[bytes, ...]:
    """Name → components (policy in the module docstring); ValueError says why not."""
    if not name:
        raise ValueError("has an empty name")
    if b"\0" in name:
        raise ValueError("has a NUL byte in its name")
    parts: list[bytes] = []
    for c in name.split(b"/"):
        if c == b"" or c == b".":
            continue
        if c == b"..":
            if not parts:
                raise ValueError("escapes the image root")
            parts.pop()
        elif len(c) > NAME_MAX:
            raise ValueError(f"has a name component longer than {NAME_MAX} bytes")
        else:
            parts.append(c)
    return tuple(parts)


def iter_entries(stream, what: str, *, max_size: int = 64 << 30) -> Iterator[TarEntry]:
    """TarEntry objects of an uncompressed tar stream; `what` names the layer in errors.
    `max_size` bounds the layer's bytes with sparse files expanded (their holes cost no stream
    bytes, so open_layer_stream's limit alone does not stop a sparse bomb)."""
    return _TarReader(stream, what, max_size).entries()


class _Input:
    """Small read-ahead over the decompressed stream (whose read(n) may return less than n)."""

    def __init__(self, f):
        self._f, self._buf, self._pos, self.offset = f, b"", 0, 0

    def read(self, n: int) -> bytes:
        """Up to n bytes; fewer only at EOF."""
        avail = len(self._buf) - self._pos
        if avail >= n:
            out = self._buf[self._pos:self._pos + n]
            self._pos += n
        else:
            parts = [self._buf[self._pos:]] if avail else []
            self._buf, self._pos = b"", 0
            need = n - avail
            while need > 0:
                piece = self._f.read(max(need, 1 << 16) if need < IO_SIZE else need)
                if not piece:
                    break
                if len(piece) > need:
                    self._buf, self._pos = piece, need
                    piece = piece[:need]
                parts.append(piece)
                need -= len(piece)
            out = b"".join(parts)
        self.offset += len(out)
        return out

    def skip(self, n: int) -> int:
        done = 0
        while done < n:
            got = len(self.read(min(IO_SIZE, n - done)))
            if not got:
                break
            done += got
        return done


class _Data:
    """The stored bytes of one member."""
    __slots__ = ("_in", "left", "_entry")

    def __init__(self, inp: _Input, size: int, entry: TarEntry):
        self._in, self.left, self._entry = inp, size, entry

    def read(self, n: int = -1) -> bytes:
        n = self.left if n is None or n < 0 else min(n, self.left)
        if n <= 0:
            return b""
        data = self._in.read(n)
        self.left -= len(data)
        if len(data) < n:
            raise LayerError(f"{self._entry.describe()}: truncated member data")
        return data


class _Sparse:
    """Expands a sparse file: the stored data regions at their offsets, zeros in the holes."""
    __slots__ = ("_data", "_spans", "_i", "_pos", "_size")

    def __init__(self, data: _Data, spans: list[tuple[int, int]], size: int):
        self._data, self._spans, self._i, self._pos, self._size = data, spans, 0, 0, size

    def read(self, n: int = -1) -> bytes:
        want = self._size - self._pos if n is None or n < 0 else min(n, self._size - self._pos)
        out = []
        while want > 0:
            spans, i = self._spans, self._i
            if i < len(spans) and self._pos >= spans[i][0]:
                k = min(want, spans[i][0] + spans[i][1] - self._pos)
                if k <= 0:
                    self._i += 1
                    continue
                out.append(self._data.read(k))
            else:
                k = min(want, (spans[i][0] if i < len(spans) else self._size) - self._pos)
                out.append(bytes(k))
            self._pos += k
            want -= k
        return b"".join(out)


class _Expired:
    @staticmethod
    def read(n: int = -1) -> bytes:
        raise RuntimeError("TarEntry.read() after the next entry was requested")


@dataclass(slots=True)
class _Header:
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


def _parse_header(blk: bytes) -> _Header:
    try:
        chk = _num(blk[148:156])
    except _Bad:
        raise _Bad("bad header checksum (not a tar header)") from None
    unsigned = sum(blk) - sum(blk[148:156]) + 8 * 32
    if chk != unsigned:  # old tars summed signed chars; only pay for that when needed
        signed = unsigned - 256 * sum(1 for b in blk if b & 0x80) + 256 * sum(1 for b in blk[148:156] if b & 0x80)
        if chk != signed:
            raise _Bad("bad header checksum (corrupt or not a tar header)")
    magic = blk[257:265]
    name = _cstr(blk[0:100])
    if magic[:6] == b"ustar\0":
        prefix = _cstr(blk[345:500])
        if prefix:
            name = prefix + b"/" + name
    h = _Header(name=name, mode=_num(blk[100:108]), uid=_num(blk[108:116]), gid=_num(blk[116:124]),
                size=_num(blk[124:136]), mtime=_num(blk[136:148]), typeflag=blk[156:157],
                linkname=_cstr(blk[157:257]), devmajor=_num(blk[329:337]), devminor=_num(blk[337:345]),
                gnu=magic == b"ustar  \0", raw=blk)
    if h.size < 0 or h.uid < 0 or h.gid < 0 or h.devmajor < 0 or h.devminor < 0:
        raise _Bad("negative size, owner or device number")
    return h


class _TarReader:
    def __init__(self, stream, what: str, max_size: int = 64 << 30):
        self._in = _Input(stream)
        self._what = what
        self._max, self._holes = max_size, 0
        self._last: str | None = None   # the previous entry, to say where a bad header is

    def _err(self, msg: str, name: bytes | None = None) -> LayerError:
        if name:
            where = f"entry '{show(name)}'"
        elif self._last is not None:
            where = f"header at offset {self._in.offset} (after entry '{self._last}')"
        else:
            where = f"header at offset {self._in.offset}"
        return LayerError(f"{self._what}: {where}: {msg}")

    def entries(self) -> Iterator[TarEntry]:
        try:
            yield from self._entries()
        except LayerError as e:
            try:
                _blame_digest(self._in)
            except DigestMismatchError as d:
                raise d from e
            raise

    def _entries(self) -> Iterator[TarEntry]:
        while True:
            member = self._next_member()
            if member is None:
                break
            h, records = member
            entry, data, stored = self._build(h, records)
            self._last = show(entry.name if entry else h.name)
            if entry is not None:
                yield entry
                entry._data = _Expired
            pad = -stored % BLOCK
            want = data.left + pad
            if self._in.skip(want) != want:
                raise self._err("truncated member data", h.name)
        while self._in.read(IO_SIZE):   # padding / trailing junk: read so digests can be checked
            pass

    def _block(self) -> bytes | None:
        blk = self._in.read(BLOCK)
        if not blk:
            return None
        if len(blk) < BLOCK:
            raise self._err("truncated header (archive cut short)")
        return blk

    def _next_member(self) -> tuple[_Header, list] | None:
        records: list[tuple[bytes, bytes]] = []
        longs: dict[bytes, bytes] = {}
        meta = 0
        while True:
            blk = self._block()
            if blk is None or blk == _ZERO:
                if meta:
                    raise self._err("archive ends after an extended header, without its entry")
                if blk is not None:
                    nxt = self._block()
                    if nxt is not None and nxt != _ZERO:
                        raise self._err("zero block followed by a non-zero block")
                return None
            try:
                h = _parse_header(blk)
            except _Bad as e:
                raise self._err(str(e)) from None
            t = h.typeflag
            if t not in (b"x", b"g", b"L", b"K"):
                h.long_name, h.long_link = longs.get(b"L", b""), longs.get(b"K", b"")
                return h, records
            if h.size > MAX_META or meta + h.size > MAX_META_PER_ENTRY:
                raise self._err(f"extended header of {h.size} bytes exceeds the {MAX_META} byte limit")
            meta += h.size + 1
            data = self._in.read(h.size)
            if len(data) < h.size or self._in.skip(-h.size % BLOCK) != -h.size % BLOCK:
                raise self._err("truncated extended header")
            try:
                if t == b"x":
                    records.clear()       # a second 'x' replaces the first (Go's archive/tar)
                    parse_pax(data, records)
                elif t == b"g":
                    parse_pax(data, [])
                else:
                    longs[t] = _cstr(data)
            except _Bad as e:
                raise self._err(str(e)) from None

    def _build(self, h: _Header, records: list) -> tuple[TarEntry | None, _Data, int]:
        pax = {}
        for key, value in records:
            if value:
                pax[key] = value
            else:
                pax.pop(key, None)   # an empty value deletes (PAX); xattrs read `records`
        # precedence as Go's archive/tar (so umoci, containerd): sparse name, GNU long name, PAX
        # path, header name (an empty one never overrides)
        name = pax.get(b"GNU.sparse.name") or h.long_name or pax.get(b"path") or h.name
        if not name:
            raise self._err("entry has an empty name")
        try:
            return self._build_entry(h, records, pax, name)
        except _Bad as e:
            raise LayerError(f"{self._what}: entry '{show(name)}': {e}") from None

    def _build_entry(self, h: _Header, records: list, pax: dict, name: bytes):
        t = h.typeflag
        if t in (b"M", b"N"):
            raise _Bad(f"unsupported GNU typeflag {t.decode()!r}")
        kind = _TYPES.get(t, EntryKind.REG)  # unknown typeflags: regular files (POSIX)
        if t == b"\0" and name.endswith(b"/"):
            kind = EntryKind.DIR  # v7 directory
        stored = _dec(pax[b"size"], "size") if b"size" in pax else h.size
        if kind in _HEADER_ONLY and t != b"D":
            stored = 0
        entry = TarEntry(path=(), kind=kind, mode=h.mode & 0o7777,
                         uid=_dec(pax[b"uid"], "uid") if b"uid" in pax else h.uid,
                         gid=_dec(pax[b"gid"], "gid") if b"gid" in pax else h.gid,
                         mtime_ns=parse_pax_time(pax[b"mtime"]) if b"mtime" in pax else h.mtime * 10**9,
                         name=name, origin=self._what)
        data = _Data(self._in, stored, entry)
        if t == b"V":
            return None, data, stored
        try:
            entry.path = normalize(name)
        except ValueError as e:
            raise LayerError(f"{self._what}: entry '{show(name)}' {e}") from None
        spans, real = self._sparse_map(h, pax, records, data)   # (old GNU: consumes extension blocks)
        last = entry.path[-1] if entry.path else b""
        if last.startswith(b".wh."):
            # a whiteout is its name: its typeflag, link target, owner... mean nothing (umoci)
            if last == b".wh..wh..opq":
                entry.kind, entry.path = EntryKind.OPAQUE, entry.path[:-1]
            elif last.startswith(b".wh..wh."):
                return None, data, stored          # AUFS metadata (.wh..wh.plnk etc.)
            elif last[4:] in (b"", b".", b".."):
                raise _Bad("invalid whiteout name")
            else:
                entry.kind, entry.path = EntryKind.WHITEOUT, entry.path[:-1] + (last[4:],)
            return entry, data, stored
        if not -INT64_MAX - 1 <= entry.mtime_ns <= INT64_MAX:
            raise _Bad("mtime out of range")
        if kind is EntryKind.REG:
            entry.size = stored if spans is None else real
            if spans is not None:
                self._holes += real - data.left
            if entry.size > self._max or self._in.offset + self._holes > self._max:
                raise LayerError(f"{self._what}: entry '{show(name)}': more than {self._max} bytes "
                                 f"(layer size limit; with sparse files expanded)")
            entry._data = data if spans is None else _Sparse(data, spans, real)
        elif kind in (EntryKind.CHR, EntryKind.BLK):
            entry.devmajor, entry.devminor = h.devmajor, h.devminor
        elif kind in (EntryKind.HARDLINK, EntryKind.SYMLINK):
            entry.linkname = h.long_link or pax.get(b"linkpath") or h.linkname
            if not entry.linkname or b"\0" in entry.linkname:
                raise _Bad(f"{kind.value} with an empty or NUL-containing target")
            if len(entry.linkname) >= PATH_MAX:
                raise _Bad(f"{kind.value} target longer than {PATH_MAX - 1} bytes")
            if kind is EntryKind.HARDLINK:
                try:
                    entry.link_path = normalize(entry.linkname)
                except ValueError as e:
                    raise _Bad(f"hardlink target '{show(entry.linkname)}' {e}") from None
        if kind is not EntryKind.HARDLINK:   # a hardlink has no metadata of its own (umoci)
            entry.xattrs = _xattrs(records)
            if kind not in (EntryKind.REG, EntryKind.DIR) and any(n.startswith(b"user.") for n in entry.xattrs):
                raise _Bad(f"user.* xattr on a {kind.value} (Linux allows them only on files and "
                           f"directories)")
        return entry, data, stored

    def _sparse_map(self, h: _Header, pax: dict, records: list, data: _Data):
        """(spans, real size) of a GNU sparse file, or (None, 0). Reads the map from extension
        blocks (old GNU) or the data prefix (PAX 1.0), reducing `data.left` accordingly."""
        real = pax.get(b"GNU.sparse.realsize") or pax.get(b"GNU.sparse.size")
        if h.typeflag == b"S" and h.gnu:
            spans = _old_gnu_spans(h.raw[386:482])
            extended = h.raw[482]
            while extended:
                blk = self._in.read(BLOCK)
                if len(blk) < BLOCK:
                    raise _Bad("truncated sparse extension header")
                spans += _old_gnu_spans(blk[:504])
                extended = blk[504]
                if len(spans) > MAX_SPARSE:
                    raise _Bad(f"more than {MAX_SPARSE} sparse map entries")
            size = _num(h.raw[483:495])
        elif pax.get(b"GNU.sparse.major") == b"1" and pax.get(b"GNU.sparse.minor") == b"0":
            spans = self._sparse_10(data)
            size = _dec(real or b"", "GNU.sparse.realsize")
        elif b"GNU.sparse.map" in pax:
            nums = [_dec(x, "GNU.sparse.map") for x in pax[b"GNU.sparse.map"].split(b",")]
            if len(nums) % 2 or len(nums) > 2 * MAX_SPARSE:
                raise _Bad("bad GNU.sparse.map")
            spans = list(zip(nums[0::2], nums[1::2]))
            size = _dec(real or b"", "GNU.sparse.size")
        elif b"GNU.sparse.offset" in pax:
            offs = [_dec(v, "GNU.sparse.offset") for k, v in records if k == b"GNU.sparse.offset"]
            lens = [_dec(v, "GNU.sparse.numbytes") for k, v in records if k == b"GNU.sparse.numbytes"]
            if len(offs) != len(lens):
                raise _Bad("GNU sparse 0.0 offsets and sizes do not pair up")
            spans, size = list(zip(offs, lens)), _dec(real or b"", "GNU.sparse.size")
        else:
            return None, 0
        end = 0
        for off, length in spans:
            if off < end or length < 0 or off + length > size:
                raise _Bad("sparse map entries overlap, go backwards or exceed the file size")
            end = off + length
        if sum(length for _, length in spans) != data.left:
            raise _Bad(f"sparse map describes {sum(n for _, n in spans)} data bytes, "
                       f"member stores {data.left}")
        return [s for s in spans if s[1]], size

    def _sparse_10(self, data: _Data) -> list[tuple[int, int]]:
        """PAX sparse 1.0: decimal numbers, one a line (count, then offset/size pairs), at the
        start of the data, padded to a block."""
        buf, nums, count = b"", [], None
        while count is None or len(nums) < 2 * count:
            if b"\n" not in buf:
                if data.left < BLOCK or len(buf) > MAX_META:
                    raise _Bad("bad or oversized GNU sparse 1.0 map")
                buf += data.read(BLOCK)
                continue
            line, buf = buf.split(b"\n", 1)
            value = _dec(line, "sparse map")
            if count is None:
                if value > MAX_SPARSE:
                    raise _Bad(f"more than {MAX_SPARSE} sparse map entries")
                count = value
            else:
                nums.append(value)
        return list(zip(nums[0::2], nums[1::2]))


def _old_gnu_spans(area: bytes) -> list[tuple[int, int]]:
    spans = []
    for i in range(0, len(area) - 23, 24):
        if not area[i:i + 24].strip(b"\0"):
            break
        spans.append((_num(area[i:i + 12]), _num(area[i + 12:i + 24])))
    return spans


def _xattrs(records: list) -> dict[bytes, bytes]:
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
                raise _Bad(f"bad base64 in PAX {show(key)}") from None
        else:
            continue
        if not name or b"\0" in name:
            raise _Bad("PAX xattr with an empty or NUL-containing name")
        if len(name) > XATTR_NAME_MAX or len(value) > XATTR_SIZE_MAX:
            raise _Bad(f"xattr '{show(name[:60])}': name longer than {XATTR_NAME_MAX} or value larger "
                       f"than {XATTR_SIZE_MAX} bytes (Linux limits)")
        if not name.startswith(XATTR_NAMESPACES):
            continue   # no such namespace: setxattr says ENOTSUP and umoci/containerd skip it
        out[name] = value
    return out
