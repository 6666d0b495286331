"""Hand-built tar pieces for the converter input tests (malformed ones included).

Import the helpers with `from tests.converter.conftest import ...`.
"""

from __future__ import annotations

import io
import tarfile

from converter.tar import iter_entries

BLOCK = 512


def _num(value: int, width: int) -> bytes:
    """Octal when it fits, else GNU base-256 (two's complement for negatives)."""
    if 0 <= value < 8 ** (width - 1):
        return b"%0*o\0" % (width - 1, value)
    bits = 8 * width - 1
    return ((1 << (8 * width - 1)) | (value & ((1 << bits) - 1))).to_bytes(width, "big")


def header(name: bytes, *, type: bytes = b"0", size: int = 0, mode: int = 0o644, uid: int = 0,
           gid: int = 0, mtime: int = 0, linkname: bytes = b"", magic: bytes = b"ustar\x0000",
           prefix: bytes = b"", devmajor: int = 0, devminor: int = 0, patch: dict | None = None,
           checksum: bool = True) -> bytes:
    b = bytearray(BLOCK)
    b[0:len(name[:100])] = name[:100]
    b[100:108] = _num(mode, 8)
    b[108:116] = _num(uid, 8)
    b[116:124] = _num(gid, 8)
    b[124:136] = _num(size, 12)
    b[136:148] = _num(mtime, 12)
    b[156:157] = type
    b[157:157 + len(linkname[:100])] = linkname[:100]
    b[257:265] = magic
    b[329:337] = _num(devmajor, 8)
    b[337:345] = _num(devminor, 8)
    if prefix:
        b[345:345 + len(prefix)] = prefix
    for off, raw in (patch or {}).items():
        b[off:off + len(raw)] = raw
    if checksum:
        b[148:156] = b" " * 8
        b[148:156] = b"%06o\0 " % sum(b)
    return bytes(b)


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def member(name: bytes, data: bytes = b"", **kw) -> bytes:
    kw.setdefault("size", len(data))
    return header(name, **kw) + pad(data)


def pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(b"%d" % n) + len(body) != n:
        n = len(b"%d" % n) + len(body)
    return b"%d" % n + body


def pax(records: list[tuple[bytes, bytes]], type: bytes = b"x") -> bytes:
    data = b"".join(pax_record(k, v) for k, v in records)
    return member(b"PaxHeaders/x", data, type=type)


END = bytes(2 * BLOCK)


def read_all(tar: bytes, what: str = "layer 0 (sha256:test)", piece: int = 7) -> list[tuple]:
    """[(entry, data)] reading each file's data in odd-sized pieces."""
    out = []
    for e in iter_entries(io.BytesIO(tar), what):
        chunks = []
        while True:
            b = e.read(piece)
            if not b:
                break
            chunks.append(b)
        out.append((e, b"".join(chunks)))
    return out


def tar_of(*members: tarfile.TarInfo | tuple, format=tarfile.PAX_FORMAT) -> bytes:
    """A tarfile-written archive; items are TarInfo or (TarInfo, data)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=format, encoding="utf-8", errors="surrogateescape") as tf:
        for m in members:
            info, data = m if isinstance(m, tuple) else (m, None)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def info(name: str, type=tarfile.REGTYPE, size: int = 0, **kw) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = type
    ti.size = size
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti
