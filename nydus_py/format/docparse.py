"""A strict, bounded msgpack reader for the bootstrap document (docs/format.md).

msgpack.unpackb would build whatever structure the bytes describe: a 1 GiB document of
one-byte integers becomes an 8 GiB list, and every `bin` column is copied. The bootstrap's
shape is known (one map of scalars, `bin` columns, the `blobs` array of maps and the `meta`
map), so this reader accepts only that shape: at most MAX_HEADER_ITEMS objects outside the
columns, nesting at most three deep, no ext types, UTF-8 strings of at most MAX_HEADER_STR
bytes, and `bin` values returned as zero-copy memoryviews of the input. Any violation is a
FormatError naming the field ("blobs[2].id: ..."), so memory stays about the input's size.
"""

from __future__ import annotations

import struct

from nydus_py.errors import FormatError
from nydus_py.format.limits import MAX_HEADER_ITEMS, MAX_HEADER_STR

MAX_DEPTH = 3           # document map → blobs array → blob map → scalar
_U8, _U16, _U32, _U64 = (struct.Struct(f) for f in (">B", ">H", ">I", ">Q"))
_I8, _I16, _I32, _I64 = (struct.Struct(f) for f in (">b", ">h", ">i", ">q"))
_F32, _F64 = struct.Struct(">f"), struct.Struct(">d")
_FIXED = {0xcc: _U8, 0xcd: _U16, 0xce: _U32, 0xcf: _U64, 0xd0: _I8, 0xd1: _I16, 0xd2: _I32,
          0xd3: _I64, 0xca: _F32, 0xcb: _F64}
_LEN = {0xc4: _U8, 0xc5: _U16, 0xc6: _U32, 0xd9: _U8, 0xda: _U16, 0xdb: _U32,
        0xdc: _U16, 0xdd: _U32, 0xde: _U16, 0xdf: _U32}


class _Reader:
    def __init__(self, buf: memoryview):
        self.buf = buf
        self.pos = 0
        self.items = 0
        self.bins: dict[str, int] = {}      # top-level key -> offset of its `bin` value

    def _take(self, n: int, where: str) -> memoryview:
        end = self.pos + n
        if end > len(self.buf):
            raise FormatError(f"bootstrap: {where}: truncated ({n} bytes declared, "
                              f"{len(self.buf) - self.pos} left)")
        v = self.buf[self.pos:end]
        self.pos = end
        return v

    def _len(self, tag: int, where: str) -> int:
        s = _LEN[tag]
        return s.unpack(self._take(s.size, where))[0]

    def value(self, where: str, depth: int = 0):
        self.items += 1
        if self.items > MAX_HEADER_ITEMS:
            raise FormatError(f"bootstrap: {where}: more than {MAX_HEADER_ITEMS} header objects")
        tag = self._take(1, where)[0]
        if tag <= 0x7f:
            return tag
        if tag >= 0xe0:
            return tag - 0x100
        if 0xa0 <= tag <= 0xbf or tag in (0xd9, 0xda, 0xdb):
            n = tag & 0x1f if tag <= 0xbf else self._len(tag, where)
            if n > MAX_HEADER_STR:
                raise FormatError(f"bootstrap: {where}: string of {n} bytes (limit {MAX_HEADER_STR})")
            try:
                return str(self._take(n, where), "utf-8")
            except UnicodeDecodeError:
                raise FormatError(f"bootstrap: {where}: string is not UTF-8") from None
        if tag in (0xc4, 0xc5, 0xc6):
            return self._take(self._len(tag, where), where)
        if tag in _FIXED:
            s = _FIXED[tag]
            return s.unpack(self._take(s.size, where))[0]
        if tag == 0xc0:
            return None
        if tag in (0xc2, 0xc3):
            return tag == 0xc3
        is_map = 0x80 <= tag <= 0x8f or tag in (0xde, 0xdf)
        is_array = 0x90 <= tag <= 0x9f or tag in (0xdc, 0xdd)
        if not (is_map or is_array):
            raise FormatError(f"bootstrap: {where}: unsupported msgpack type 0x{tag:02x}")
        if depth >= MAX_DEPTH:
            raise FormatError(f"bootstrap: {where}: nested too deeply")
        n = tag & 0x0f if tag <= 0x9f else self._len(tag, where)
        if n > MAX_HEADER_ITEMS:       # each element is at least one byte: checked as we go
            raise FormatError(f"bootstrap: {where}: {n} elements (limit {MAX_HEADER_ITEMS})")
        if is_array:
            return [self.value(f"{where}[{i}]", depth + 1) for i in range(n)]
        out: dict = {}
        for _ in range(n):
            key = self.value(f"{where} key", depth + 1)
            if not isinstance(key, str):
                raise FormatError(f"bootstrap: {where}: map key {key!r} is not a string")
            if key in out:
                raise FormatError(f"bootstrap: {where}: duplicate key {key!r}")
            v = out[key] = self.value(f"{where}.{key}" if where else key, depth + 1)
            if depth == 0 and isinstance(v, memoryview):
                self.bins[key] = self.pos - len(v)      # a bin is the last thing taken
        return out


def read_document(data: bytes | bytearray | memoryview, offsets: dict[str, int] | None = None) -> dict:
    """The bootstrap map, its `bin` values as memoryviews of `data` (which they keep alive).
    `offsets`, when given, receives where in `data` each top-level `bin` value starts (the
    load-time checks slice the columns out of `data` itself: format/validate.py Raw)."""
    buf = memoryview(data).cast("B")
    r = _Reader(buf)
    doc = r.value("")
    if not isinstance(doc, dict):
        raise FormatError("bootstrap: not a msgpack map (bad magic)")
    if r.pos != len(buf):
        raise FormatError(f"bootstrap: {len(buf) - r.pos} trailing bytes after the document")
    if offsets is not None:
        offsets.update(r.bins)
    return doc
