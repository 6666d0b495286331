"""The entry stream: reads an uncompressed tar stream one `TarEntry` at a time.

Memory is bounded whatever the layer: file data is handed out in the consumer's pieces,
skipped data is read in 1 MiB pieces, and every header that is buffered (PAX, GNU long
names, sparse maps) has a hard limit.
"""

from __future__ import annotations

from collections.abc import Iterator

from converter.decompress import IO_SIZE, blame_digest
from converter.tar.entry import EntryKind, TarEntry, show
from converter.tar.headers import (
    BLOCK,
    HEADER_ONLY,
    TYPEFLAGS,
    ZERO_BLOCK,
    Header,
    HeaderError,
    cstr,
    dec,
    num,
    old_gnu_spans,
    parse_header,
    parse_pax,
    parse_pax_time,
    pax_xattrs,
)
from converter.tar.paths import normalize
from nydus_py.errors import DigestMismatchError, LayerError

MAX_META = 1 << 20              # one PAX header / GNU long name / sparse map (Go uses 1 MiB too)
MAX_META_PER_ENTRY = 8 << 20    # all extended headers stacked before one entry
MAX_SPARSE = 1 << 18            # sparse map entries per file
PATH_MAX = 4096                 # a symlink target + NUL


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
    __slots__ = ("_entry", "_in", "left")

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
    __slots__ = ("_data", "_i", "_pos", "_size", "_spans")

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
                blame_digest(self._in)
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

    def _next_member(self) -> tuple[Header, list] | None:
        records: list[tuple[bytes, bytes]] = []
        longs: dict[bytes, bytes] = {}
        meta = 0
        while True:
            blk = self._block()
            if blk is None or blk == ZERO_BLOCK:
                if meta:
                    raise self._err("archive ends after an extended header, without its entry")
                if blk is not None:
                    nxt = self._block()
                    if nxt is not None and nxt != ZERO_BLOCK:
                        raise self._err("zero block followed by a non-zero block")
                return None
            try:
                h = parse_header(blk)
            except HeaderError as e:
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
                    longs[t] = cstr(data)
            except HeaderError as e:
                raise self._err(str(e)) from None

    def _build(self, h: Header, records: list) -> tuple[TarEntry | None, _Data, int]:
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
        except HeaderError as e:
            raise LayerError(f"{self._what}: entry '{show(name)}': {e}") from None

    def _build_entry(self, h: Header, records: list, pax: dict, name: bytes):
        t = h.typeflag
        if t in (b"M", b"N"):
            raise HeaderError(f"unsupported GNU typeflag {t.decode()!r}")
        if t not in TYPEFLAGS and t not in (b"V",) and b"A" <= t <= b"Z":
            # POSIX reserves 'A'..'Z' for vendor extensions, nearly all of them headers about the
            # next entry (Solaris 'X' is a PAX header, 'A' an ACL, star's 'I' an inode record):
            # read as a regular file (POSIX's rule for unknown types) they become stray files
            raise HeaderError(f"typeflag {t.decode()!r} is a vendor extension (Solaris 'X' extended "
                              f"header, ACL...) that is not supported; containerd and umoci refuse it too")
        kind = TYPEFLAGS.get(t, EntryKind.REG)  # unknown typeflags: regular files (POSIX)
        if t == b"\0" and name.endswith(b"/"):
            kind = EntryKind.DIR  # v7 directory
        stored = dec(pax[b"size"], "size") if b"size" in pax else h.size
        if kind in HEADER_ONLY and t != b"D":
            stored = 0
        entry = TarEntry(path=(), kind=kind, mode=h.mode & 0o7777,
                         uid=dec(pax[b"uid"], "uid") if b"uid" in pax else h.uid,
                         gid=dec(pax[b"gid"], "gid") if b"gid" in pax else h.gid,
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
                raise HeaderError("invalid whiteout name")
            else:
                entry.kind, entry.path = EntryKind.WHITEOUT, entry.path[:-1] + (last[4:],)
            return entry, data, stored
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
                raise HeaderError(f"{kind.value} with an empty or NUL-containing target")
            if len(entry.linkname) >= PATH_MAX:
                raise HeaderError(f"{kind.value} target longer than {PATH_MAX - 1} bytes")
            if kind is EntryKind.HARDLINK:
                try:
                    entry.link_path = normalize(entry.linkname)
                except ValueError as e:
                    raise HeaderError(f"hardlink target '{show(entry.linkname)}' {e}") from None
        if kind is not EntryKind.HARDLINK:   # a hardlink has no metadata of its own (umoci)
            entry.xattrs = pax_xattrs(records)
            if kind not in (EntryKind.REG, EntryKind.DIR) and any(n.startswith(b"user.") for n in entry.xattrs):
                raise HeaderError(f"user.* xattr on a {kind.value} (Linux allows them only on files and "
                           f"directories)")
        return entry, data, stored

    def _sparse_map(self, h: Header, pax: dict, records: list, data: _Data):
        """(spans, real size) of a GNU sparse file, or (None, 0). Reads the map from extension
        blocks (old GNU) or the data prefix (PAX 1.0), reducing `data.left` accordingly."""
        real = pax.get(b"GNU.sparse.realsize") or pax.get(b"GNU.sparse.size")
        if h.typeflag == b"S" and h.gnu:
            spans = old_gnu_spans(h.raw[386:482])
            extended = h.raw[482]
            while extended:
                blk = self._in.read(BLOCK)
                if len(blk) < BLOCK:
                    raise HeaderError("truncated sparse extension header")
                spans += old_gnu_spans(blk[:504])
                extended = blk[504]
                if len(spans) > MAX_SPARSE:
                    raise HeaderError(f"more than {MAX_SPARSE} sparse map entries")
            size = num(h.raw[483:495])
        elif pax.get(b"GNU.sparse.major") == b"1" and pax.get(b"GNU.sparse.minor") == b"0":
            spans = self._sparse_10(data)
            size = dec(real or b"", "GNU.sparse.realsize")
        elif b"GNU.sparse.map" in pax:
            nums = [dec(x, "GNU.sparse.map") for x in pax[b"GNU.sparse.map"].split(b",")]
            if len(nums) % 2 or len(nums) > 2 * MAX_SPARSE:
                raise HeaderError("bad GNU.sparse.map")
            spans = list(zip(nums[0::2], nums[1::2]))
            size = dec(real or b"", "GNU.sparse.size")
        elif b"GNU.sparse.offset" in pax:
            offs = [dec(v, "GNU.sparse.offset") for k, v in records if k == b"GNU.sparse.offset"]
            lens = [dec(v, "GNU.sparse.numbytes") for k, v in records if k == b"GNU.sparse.numbytes"]
            if len(offs) != len(lens):
                raise HeaderError("GNU sparse 0.0 offsets and sizes do not pair up")
            spans, size = list(zip(offs, lens)), dec(real or b"", "GNU.sparse.size")
        else:
            return None, 0
        end = 0
        for off, length in spans:
            if off < end or length < 0 or off + length > size:
                raise HeaderError("sparse map entries overlap, go backwards or exceed the file size")
            end = off + length
        if sum(length for _, length in spans) != data.left:
            raise HeaderError(f"sparse map describes {sum(n for _, n in spans)} data bytes, "
                       f"member stores {data.left}")
        return [s for s in spans if s[1]], size

    def _sparse_10(self, data: _Data) -> list[tuple[int, int]]:
        """PAX sparse 1.0: decimal numbers, one a line (count, then offset/size pairs), at the
        start of the data, padded to a block."""
        buf, count = b"", None
        nums: list[int] = []
        while count is None or len(nums) < 2 * count:
            if b"\n" not in buf:
                if data.left < BLOCK or len(buf) > MAX_META:
                    raise HeaderError("bad or oversized GNU sparse 1.0 map")
                buf += data.read(BLOCK)
                continue
            line, buf = buf.split(b"\n", 1)
            value = dec(line, "sparse map")
            if count is None:
                if value > MAX_SPARSE:
                    raise HeaderError(f"more than {MAX_SPARSE} sparse map entries")
                count = value
            else:
                nums.append(value)
        return list(zip(nums[0::2], nums[1::2]))


