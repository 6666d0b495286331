"""The bootstrap: the whole filesystem's metadata in one msgpack map of packed columns.

Nothing here does I/O. The reader keeps the msgpack `bin` columns as bytes and decodes a record
only when asked (`struct.unpack_from`), so a 100k-inode image costs a few MB and mounts in
milliseconds. The layout is specified in docs/format.md; change both together and bump VERSION.

Inodes are numbered 1..N, 1 is the root. Per inode (INODE):
    mode u32, uid u32, gid u32, nlink u32, size u64, mtime_sec i64, mtime_nsec u32, rdev u64,
    parent u32, data_start u64, data_count u32, xattr_start u32, xattr_count u32
`data_*` means, by file type: dir → range of DIRENT records (sorted by name bytes);
regular → range of u32 chunk ids in `chunk_refs` (chunk k covers file bytes
[k*chunk_size, (k+1)*chunk_size); in a v3 (content-defined chunks) bootstrap it covers
[chunk_offsets[k], chunk_offsets[k] + its size) instead); symlink → (offset, length) of the
target in `strings`.
"""

from __future__ import annotations

import stat
import struct
import sys
from array import array
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import msgpack
import zstandard

from nydus_py.errors import FormatError, NydusError
from nydus_py.format import validate
from nydus_py.format.compression import CODECS
from nydus_py.format.docparse import read_document
from nydus_py.format.limits import (
    MAX_BLOB_SIZE,
    MAX_BLOBS,
    MAX_BOOTSTRAP_SIZE,
    MAX_CHUNK_SIZE,
    MAX_META_ENTRIES,
    MAX_SYMLINK_LEN,
    MAX_XATTR_NAME_LEN,
    MAX_XATTR_VALUE_LEN,
    MAX_XATTRS_PER_INODE,
)
from nydus_py.oci.digest import parse as parse_digest

MAGIC = "nydus-py.bootstrap"
VERSION = 2             # written when any chunk is a batch member; else 1, which v1 readers read
VERSION_VARIABLE = 3    # written only for variable-size (cdc) chunks: the `chunk_offsets` column
VERSIONS = (1, 2, 3)
ROOT_INO = 1
MAX_PATH_DEPTH = 4096       # levels path_of walks up before it gives up ("…")

INODE = struct.Struct("<IIIIQqIQIQIII")
DIRENT = struct.Struct("<III")          # name_off, name_len, ino
CHUNK = struct.Struct("<IQIQII")        # blob, comp_off, comp_size, uncomp_off, uncomp_size, flags
XATTR = struct.Struct("<IIII")          # name_off, name_len, value_off, value_len
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")               # per chunk ref (v3): the file offset where the chunk starts
BATCH = struct.Struct("<II")            # per chunk (v2): offset inside its batch, batch size (0: none)
DIGEST_SIZE = 32

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAX_BOOTSTRAP = MAX_BOOTSTRAP_SIZE  # decompressed or not; a bigger one is hostile, not an image
CHUNK_COMPRESSED = 1  # flags bit: stored compressed with the blob's compressor (else raw)
CHUNK_BATCH = 2       # flags bit (v2): comp_offset/comp_size are a batch shared with other chunks
MAX_BATCH = 1 << 24   # uncompressed bytes of one batch (what a reader allocates to decode it)


class Attr(NamedTuple):
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    mtime_ns: int
    rdev: int


class Chunk(NamedTuple):
    id: int
    blob: int               # index into Bootstrap.blobs
    index: int  # type: ignore[assignment]  # position within its blob (cache bitmap index); shadows tuple.index
    comp_offset: int
    comp_size: int
    offset: int             # offset in the blob's uncompressed data (cache file offset)
    size: int
    compressed: bool
    digest: bytes           # sha256 of the uncompressed bytes
    batch_offset: int = 0   # batch member: offset of its bytes inside the decoded batch
    batch_size: int = 0     # batch member: uncompressed size of the whole batch (0: not one)


@dataclass(frozen=True)
class BlobInfo:
    id: str                 # OCI digest of the blob file, e.g. "sha256:…"
    compressor: str
    compressed_size: int
    uncompressed_size: int
    chunk_start: int        # chunk ids [chunk_start, chunk_start + chunk_count) live in this blob
    chunk_count: int
    source_layer: str = ""  # digest of the OCI layer the blob was made from ("" for dict blobs)

    def to_msgpack(self) -> dict:
        return {"id": self.id, "compressor": self.compressor, "compressed_size": self.compressed_size,
                "uncompressed_size": self.uncompressed_size, "chunk_start": self.chunk_start,
                "chunk_count": self.chunk_count, "source_layer": self.source_layer}


@dataclass
class ChunkSpec:
    """A chunk as the writer receives it from the converter."""
    digest: bytes
    comp_offset: int
    comp_size: int
    offset: int
    size: int
    compressed: bool
    batch_offset: int = 0   # see Chunk
    batch_size: int = 0


class BootstrapWriter:
    """Accumulates inodes, dirents, blobs and chunks; `to_bytes()` lays out the columns.

    Inodes are numbered in the order `add_inode` is called (the first one is the root), so a
    deterministic walk gives a byte-identical bootstrap.
    """

    def __init__(self, *, chunk_size: int, digester: str = "sha256", meta: dict | None = None,
                 variable: bool = False):
        self.chunk_size = chunk_size
        # variable-size chunks (cdc): files carry per-chunk offsets, the bootstrap is v3
        self.variable = variable
        self.digester = digester
        self.meta = dict(meta or {})
        self.blobs: list[BlobInfo] = []
        self._chunks = bytearray()
        self._digests = bytearray()
        self._batch = bytearray()
        self._batched = False
        self._nchunks = 0
        self._inodes: list[list] = []          # [mode, uid, gid, size, mtime_ns, rdev, data, xattrs]
        self._children: dict[int, list[tuple[bytes, int]]] = {}
        self._parent: dict[int, int] = {ROOT_INO: ROOT_INO}
        self._nlink: dict[int, int] = {}
        self.prefetch: list[int] = []

    @property
    def chunk_count(self) -> int:
        return self._nchunks

    def add_blob(self, *, blob_id: str, compressor: str, compressed_size: int,
                 uncompressed_size: int, chunks: Sequence[ChunkSpec], source_layer: str = "") -> int:
        """Registers a blob and its chunks (in blob order); chunk ids are then
        `blob.chunk_start + i`. Returns the blob index."""
        index = len(self.blobs)
        self.blobs.append(BlobInfo(blob_id, compressor, compressed_size, uncompressed_size,
                                   self._nchunks, len(chunks), source_layer))
        for c in chunks:
            if len(c.digest) != DIGEST_SIZE:
                raise ValueError("chunk digest must be 32 bytes")
            flags = (CHUNK_COMPRESSED if c.compressed else 0) | (CHUNK_BATCH if c.batch_size else 0)
            self._chunks += CHUNK.pack(index, c.comp_offset, c.comp_size, c.offset, c.size, flags)
            self._digests += c.digest
            self._batch += BATCH.pack(c.batch_offset, c.batch_size)
            self._batched = self._batched or bool(c.batch_size)
        self._nchunks += len(chunks)
        return index

    def drop_blobs(self, drop: set[int]) -> list[int] | None:
        """Removes the blobs with these indices, with their chunks (used to drop chunk-dictionary
        blobs that no file references). The remaining blobs and chunks keep their order; returns
        old chunk id → new chunk id (-1 for a dropped chunk), or None when nothing was dropped.
        Call it before any inode is added: inodes already added would keep the old ids."""
        if not drop:
            return None
        if self._inodes:
            raise ValueError("drop_blobs after add_inode")
        old_chunks, old_digests, old_batch = self._chunks, self._digests, self._batch
        mapping = [-1] * self._nchunks
        blobs: list[BlobInfo] = []
        chunks, digests, batch = bytearray(), bytearray(), bytearray()
        n = 0
        for index, b in enumerate(self.blobs):
            if index in drop:
                continue
            new_index = len(blobs)
            blobs.append(BlobInfo(b.id, b.compressor, b.compressed_size, b.uncompressed_size,
                                  n, b.chunk_count, b.source_layer))
            for cid in range(b.chunk_start, b.chunk_start + b.chunk_count):
                rec = bytearray(old_chunks[cid * CHUNK.size:(cid + 1) * CHUNK.size])
                U32.pack_into(rec, 0, new_index)          # CHUNK.blob is the first field
                chunks += rec
                digests += old_digests[cid * DIGEST_SIZE:(cid + 1) * DIGEST_SIZE]
                batch += old_batch[cid * BATCH.size:(cid + 1) * BATCH.size]
                mapping[cid] = n
                n += 1
        self.blobs, self._chunks, self._digests, self._nchunks = blobs, chunks, digests, n
        self._batch = batch
        self._batched = any(BATCH.unpack_from(batch, i)[1] for i in range(0, len(batch), BATCH.size))
        return mapping

    def add_inode(self, *, mode: int, uid: int, gid: int, mtime_ns: int, size: int = 0,
                  rdev: int = 0, xattrs: dict[bytes, bytes] | None = None,
                  symlink: bytes | None = None, chunk_ids: Sequence[int] | None = None) -> int:
        ino = len(self._inodes) + 1
        data: bytes | array[int] | tuple[array[int], array[int]] | None
        if stat.S_ISLNK(mode):
            data = symlink or b""
            size = len(data)
        elif stat.S_ISREG(mode):
            data = array("I", chunk_ids or ())
            if self.variable:
                data = (data, self._offsets(ino, data, size))
            else:
                expect = -(-size // self.chunk_size)
                if len(data) != expect:
                    raise ValueError(f"inode {ino}: {len(data)} chunks for size {size}, expected {expect}")
        else:
            data = None
        self._inodes.append([mode, uid, gid, size, mtime_ns, rdev, data,
                             sorted((xattrs or {}).items())])
        if stat.S_ISDIR(mode):
            self._children[ino] = []
        self._nlink[ino] = 2 if stat.S_ISDIR(mode) else 0
        return ino

    def _offsets(self, ino: int, ids: array, size: int) -> array:
        """The file offset of each of a file's chunks (v3), from the chunk table's sizes."""
        offs = array("Q")
        pos = 0
        for cid in ids:
            if not 0 <= cid < self._nchunks:
                raise ValueError(f"inode {ino}: chunk id {cid} not registered")
            offs.append(pos)
            pos += CHUNK.unpack_from(self._chunks, cid * CHUNK.size)[4]
        if pos != size:
            raise ValueError(f"inode {ino}: chunks hold {pos} bytes for size {size}")
        return offs

    def add_dirent(self, parent: int, name: bytes, ino: int) -> None:
        if not name or b"/" in name or name in (b".", b".."):
            raise ValueError(f"invalid name {name!r}")
        self._children[parent].append((name, ino))
        self._parent.setdefault(ino, parent)
        if ino in self._children:
            self._nlink[parent] += 1
        else:
            self._nlink[ino] += 1

    def to_bytes(self) -> bytes:
        strings = bytearray()
        interned: dict[bytes, int] = {}

        def put(s: bytes) -> int:
            off = interned.get(s)
            if off is None:
                off = interned[s] = len(strings)
                strings.extend(s)
            return off

        inodes = bytearray()
        dirents = bytearray()
        refs = bytearray()
        offsets = bytearray()
        xattrs = bytearray()
        ndirents = nrefs = nxattrs = 0
        for i, (mode, uid, gid, size, mtime_ns, rdev, data, xa) in enumerate(self._inodes):
            ino = i + 1
            if stat.S_ISDIR(mode):
                kids = sorted(self._children[ino])
                for a, b in zip(kids, kids[1:]):
                    if a[0] == b[0]:
                        raise ValueError(f"duplicate name {a[0]!r} in inode {ino}")
                start, count = ndirents, len(kids)
                for name, child in kids:
                    dirents += DIRENT.pack(put(name), len(name), child)
                ndirents += count
            elif stat.S_ISREG(mode):
                if self.variable:
                    data, offs = data
                    offsets += _le(offs)
                start, count = nrefs, len(data)
                refs += _le(data)
                nrefs += count
            elif stat.S_ISLNK(mode):
                start, count = put(data), len(data)
            else:
                start = count = 0
            xstart = nxattrs
            for name, value in xa:
                xattrs += XATTR.pack(put(name), len(name), put(value), len(value))
            nxattrs += len(xa)
            sec, nsec = divmod(mtime_ns, 1_000_000_000)
            nlink = self._nlink[ino] or 1
            inodes += INODE.pack(mode, uid, gid, nlink, size, sec, nsec, rdev,
                                 self._parent.get(ino, 0), start, count, xstart, len(xa))
        version = VERSION_VARIABLE if self.variable else VERSION if self._batched else 1
        doc = {
            "magic": MAGIC, "version": version, "chunk_size": self.chunk_size,
            "digester": self.digester, "meta": self.meta,
            "blobs": [b.to_msgpack() for b in self.blobs],
            "inodes": bytes(inodes), "dirents": bytes(dirents), "chunk_refs": bytes(refs),
            "chunks": bytes(self._chunks), "digests": bytes(self._digests),
            "xattrs": bytes(xattrs), "strings": bytes(strings),
            "prefetch": struct.pack(f"<{len(self.prefetch)}I", *self.prefetch),
        }
        if self._batched:
            doc["batch"] = bytes(self._batch)
        if self.variable:
            doc["chunk_offsets"] = bytes(offsets)
        return msgpack.packb(doc, use_bin_type=True)


def _le(a: array) -> bytes:
    if sys.byteorder == "little":
        return a.tobytes()
    b = array("I", a)
    b.byteswap()
    return b.tobytes()


def compress_layer(msgpack_bytes: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=9, write_content_size=True).compress(msgpack_bytes)


ONESHOT_RATIO = 32     # decompressed/compressed above which a bootstrap is decoded streamed


def decompress_layer(layer: bytes | memoryview) -> bytes:
    """The msgpack bytes of a zstd bootstrap layer. The frame must declare its content size
    (compress_layer always does), at most MAX_BOOTSTRAP_SIZE. Up to ONESHOT_RATIO × the
    layer's length it is decoded in one call (which allocates the declared size up front);
    beyond that, decoding is streamed in bounded steps, so memory follows the bytes actually
    produced, not the declared size, and output beyond the declared size is refused as it is
    produced."""
    try:
        declared = zstandard.frame_content_size(layer)
    except zstandard.ZstdError as e:
        raise FormatError(f"bootstrap is not valid zstd ({e})") from None
    if not 0 <= declared <= MAX_BOOTSTRAP_SIZE:
        raise FormatError(f"bootstrap layer: zstd frame content size {declared} is unknown or "
                          f"over {MAX_BOOTSTRAP_SIZE}")
    if declared <= ONESHOT_RATIO * len(layer):
        # A plausible ratio (real bootstraps: ~4×): one call, which releases the GIL and runs
        # at twice the streamed speed (15.7 MB for 100k files: 15 vs 33 ms of every mount).
        # It allocates the declared size up front, so a frame that lies about its size costs
        # at most ONESHOT_RATIO × its own length before it is refused.
        try:
            return zstandard.ZstdDecompressor().decompress(layer, max_output_size=declared)
        except zstandard.ZstdError as e:
            raise FormatError(f"bootstrap is not valid zstd (truncated or corrupt: {e})") from None
    parts: list[bytes] = []
    total = 0
    try:
        with zstandard.ZstdDecompressor().stream_reader(layer, read_size=1 << 20,
                                                         read_across_frames=False) as r:
            while True:
                piece = r.read(min(declared + 1 - total, 8 << 20))
                if not piece:
                    break
                total += len(piece)
                if total > declared:
                    raise FormatError(f"bootstrap: decompresses to more than its declared {declared} bytes")
                parts.append(piece)
    except zstandard.ZstdError as e:
        raise FormatError(f"bootstrap is not valid zstd ({e})") from None
    if total != declared:
        raise FormatError(f"bootstrap is not valid zstd (truncated: {total} of {declared} bytes)")
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _bin(doc: dict, key: str, rec: struct.Struct | None = None) -> memoryview:
    v = doc.get(key)
    if not isinstance(v, (bytes, memoryview)):
        raise FormatError(f"bootstrap: column {key!r} missing or not binary")
    if rec is not None and len(v) % rec.size:
        raise FormatError(f"bootstrap: column {key!r} length {len(v)} is not a multiple of {rec.size}")
    return memoryview(v).cast("B")


def _int(v, what: str, lo: int, hi: int) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise FormatError(f"bootstrap: {what}: {v!r} is not an integer in {lo}..{hi}")
    return v


def _str(v, what: str) -> str:
    if type(v) is not str:
        raise FormatError(f"bootstrap: {what}: {v!r} is not a string")
    return v


_BLOB_KEYS = {"id", "compressor", "compressed_size", "uncompressed_size", "chunk_start",
              "chunk_count", "source_layer"}


def _blob(b, i: int) -> BlobInfo:
    w = f"blobs[{i}]"
    if not isinstance(b, dict):
        raise FormatError(f"bootstrap: {w}: not a map")
    extra = set(b) - _BLOB_KEYS
    if extra:
        raise FormatError(f"bootstrap: {w}: unknown field {min(extra)!r}")
    blob_id = _str(b.get("id"), f"{w}.id")
    try:
        parse_digest(blob_id)
    except NydusError:
        raise FormatError(f"bootstrap: {w}.id: {blob_id!r} is not a digest") from None
    compressor = _str(b.get("compressor"), f"{w}.compressor")
    if compressor not in CODECS:
        raise FormatError(f"bootstrap: {w}.compressor: unknown compressor {compressor!r}")
    return BlobInfo(blob_id, compressor,
                    _int(b.get("compressed_size"), f"{w}.compressed_size", 0, MAX_BLOB_SIZE),
                    _int(b.get("uncompressed_size"), f"{w}.uncompressed_size", 0, MAX_BLOB_SIZE),
                    _int(b.get("chunk_start"), f"{w}.chunk_start", 0, 0xFFFFFFFF),
                    _int(b.get("chunk_count"), f"{w}.chunk_count", 0, 0xFFFFFFFF),
                    _str(b.get("source_layer", ""), f"{w}.source_layer"))


class Bootstrap:
    """Read-only, lazily decoded view of a bootstrap. Thread-safe (immutable).

    The constructor checks the header, the tables and the tree (format/validate.py): after
    it, walks from the root end and lookups stay in range. Per-record ranges that a load-time
    pass would cost too much for are checked in O(1) where the record is used (chunk(),
    file_chunk_ids(), readlink(), xattrs()): a FormatError there is EIO for that file."""

    def __init__(self, doc: dict, source: tuple[bytes, dict[str, int]] | None = None):
        """`source`: the bytes `doc` was read from and where each column starts in them
        (from_bytes), so the checks can slice columns without copying them."""
        if not isinstance(doc, dict) or doc.get("magic") != MAGIC:
            raise FormatError("not a nydus-py bootstrap (bad magic)")
        if doc.get("version") not in VERSIONS or type(doc.get("version")) is not int:
            raise FormatError(f"bootstrap version {doc.get('version')!r} not supported "
                              f"(want one of {', '.join(map(str, VERSIONS))})")
        self.version: int = doc["version"]
        cs = _int(doc.get("chunk_size"), "chunk_size", 1, MAX_CHUNK_SIZE)
        if cs & (cs - 1):
            raise FormatError(f"bootstrap: chunk_size: {cs} is not a power of two")
        self.chunk_size = cs
        self.digester = _str(doc.get("digester"), "digester")
        if self.digester != "sha256":
            raise FormatError(f"bootstrap: digester: {self.digester!r} is not supported (only sha256)")
        meta = doc.get("meta") or {}
        if not isinstance(meta, dict) or len(meta) > MAX_META_ENTRIES:
            raise FormatError(f"bootstrap: meta: not a map of at most {MAX_META_ENTRIES} entries")
        self.meta = {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool))}
        blobs = doc.get("blobs")
        if not isinstance(blobs, list) or len(blobs) > MAX_BLOBS:
            raise FormatError(f"bootstrap: blobs: not a list of at most {MAX_BLOBS} blobs")
        self.blobs = [_blob(b, i) for i, b in enumerate(blobs)]
        if len({b.id for b in self.blobs}) != len(self.blobs):
            raise FormatError("bootstrap: blobs: the same blob id listed twice")
        self._inodes = _bin(doc, "inodes", INODE)
        self._dirents = _bin(doc, "dirents", DIRENT)
        self._refs = _bin(doc, "chunk_refs", U32)
        self._chunks = _bin(doc, "chunks", CHUNK)
        self._digests = _bin(doc, "digests")
        self._xattrs = _bin(doc, "xattrs", XATTR)
        self._strings = _bin(doc, "strings")
        pf = _bin(doc, "prefetch", U32)
        # v1 has no batches (a chunk with the batch flag is refused at load); v2 always has the
        # column, v3 when some chunk is a batch member
        self._has_batch = self.version == 2 or (self.version == 3 and "batch" in doc)
        self._check(pf, source)
        self.inode_count = len(self._inodes) // INODE.size
        self.xattr_count = len(self._xattrs) // XATTR.size
        self.chunk_count = len(self._chunks) // CHUNK.size
        self._batch = _bin(doc, "batch", BATCH) if self._has_batch else None
        if self._batch is not None and len(self._batch) != self.chunk_count * BATCH.size:
            raise FormatError("bootstrap: batch column does not match chunk table")
        # v3: variable-size chunks, each file's chunk offsets (checked whole at load, below)
        self._offs = _bin(doc, "chunk_offsets", U64) if self.version == 3 else None
        self.variable = self._offs is not None
        self._chunk_limit = MAX_CHUNK_SIZE if self.variable else cs
        if self._offs is not None:
            validate.check_variable(inodes=self._inodes, refs=self._refs, offsets=self._offs,
                                    chunks=self._chunks, source=source)
        # inode numbers of files to prefetch: a view, never materialised here
        self.prefetch: Sequence[int] = pf.cast("I") if len(pf) else ()
        self._up: tuple[array, array] | None = None     # path_of's index, built on first use

    def _check(self, prefetch: memoryview, source: tuple[bytes, dict[str, int]] | None) -> None:
        validate.check(blobs=self.blobs, inodes=self._inodes, dirents=self._dirents,
                       chunks=self._chunks, digests=self._digests, strings=self._strings,
                       prefetch=prefetch,
                       max_flags=CHUNK_COMPRESSED | (CHUNK_BATCH if self._has_batch else 0),
                       source=source)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> Bootstrap:
        """Plain msgpack, or the zstd-compressed form stored as the image's bootstrap layer."""
        if len(data) > MAX_BOOTSTRAP_SIZE:
            raise FormatError(f"bootstrap: {len(data)} bytes (limit {MAX_BOOTSTRAP_SIZE})")
        if bytes(data[:4]) == ZSTD_MAGIC:
            data = decompress_layer(data)
        if not isinstance(data, bytes):
            return cls(read_document(data))
        offsets: dict[str, int] = {}
        return cls(read_document(data, offsets), (data, offsets))

    @classmethod
    def from_file(cls, path) -> Bootstrap:
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_BOOTSTRAP_SIZE + 1)
        except OSError as e:
            raise FormatError(f"{path}: cannot read bootstrap ({e.strerror})") from None
        try:
            return cls.from_bytes(data)
        except FormatError as e:
            raise FormatError(f"{path}: {e}") from None

    # -- inodes -----------------------------------------------------------------------------
    def _raw(self, ino: int) -> tuple:
        if not 1 <= ino <= self.inode_count:
            raise KeyError(ino)
        return INODE.unpack_from(self._inodes, (ino - 1) * INODE.size)

    def attr(self, ino: int) -> Attr:
        mode, uid, gid, nlink, size, sec, nsec, rdev, *_ = self._raw(ino)
        return Attr(ino, mode, uid, gid, nlink, size, sec * 1_000_000_000 + nsec, rdev)

    def parent(self, ino: int) -> int:
        return self._raw(ino)[8]

    def _name(self, off: int, length: int) -> bytes:
        return bytes(self._strings[off:off + length])

    def lookup(self, parent: int, name: bytes) -> int | None:
        raw = self._raw(parent)
        if not stat.S_ISDIR(raw[0]):
            return None
        lo, hi = raw[9], raw[9] + raw[10]
        d, s = self._dirents, self._strings
        while lo < hi:
            mid = (lo + hi) // 2
            off, ln, ino = DIRENT.unpack_from(d, mid * DIRENT.size)
            cur = s[off:off + ln]
            if cur == name:
                return ino
            if bytes(cur) < name:
                lo = mid + 1
            else:
                hi = mid
        return None

    def dir_size(self, ino: int) -> int:
        return self._raw(ino)[10]

    def readdir(self, ino: int, start: int = 0) -> Iterator[tuple[int, bytes, int]]:
        """(index, name, ino) for entries from `start`, in name order."""
        raw = self._raw(ino)
        if not stat.S_ISDIR(raw[0]):
            return
        base, count = raw[9], raw[10]
        for i in range(max(start, 0), count):
            off, ln, child = DIRENT.unpack_from(self._dirents, (base + i) * DIRENT.size)
            yield i, self._name(off, ln), child

    def _string(self, off: int, length: int, limit: int, what: str) -> bytes:
        if length > limit or off + length > len(self._strings):
            raise FormatError(f"bootstrap: {what}: {off}+{length} bytes beyond strings "
                              f"({len(self._strings)}) or over the limit ({limit})")
        return bytes(self._strings[off:off + length])

    def readlink(self, ino: int) -> bytes:
        raw = self._raw(ino)
        if not stat.S_ISLNK(raw[0]):
            raise ValueError(f"inode {ino} is not a symlink")
        return self._string(raw[9], raw[10], MAX_SYMLINK_LEN, f"inode {ino}: symlink target")

    def xattrs(self, ino: int) -> dict[bytes, bytes]:
        raw = self._raw(ino)
        start, count = raw[11], raw[12]
        if count > MAX_XATTRS_PER_INODE or start + count > self.xattr_count:
            raise FormatError(f"bootstrap: inode {ino}: xattrs {start}+{count} beyond the xattr "
                              f"table ({self.xattr_count}) or over {MAX_XATTRS_PER_INODE}")
        out = {}
        for i in range(start, start + count):
            no, nl, vo, vl = XATTR.unpack_from(self._xattrs, i * XATTR.size)
            name = self._string(no, nl, MAX_XATTR_NAME_LEN, f"inode {ino}: xattr name")
            out[name] = self._string(vo, vl, MAX_XATTR_VALUE_LEN, f"inode {ino}: xattr value")
        return out

    def _up_index(self) -> tuple[array, array]:
        """(dirent, dir) per inode: the first dirent that names it (+1; 0: none) and the
        directory holding that dirent. Built once, on the first path_of (an error path or the
        access-pattern API): one pass over the dirents, 8 bytes per inode."""
        if self._up is None:
            n = self.inode_count
            where, lister = array("I", bytes(4 * (n + 1))), array("I", bytes(4 * (n + 1)))
            kids = self._dirents.cast("I")[2::3]
            for d in range(1, n + 1):
                raw = self._raw(d)
                if not stat.S_ISDIR(raw[0]):
                    continue
                for j in range(raw[9], raw[9] + raw[10]):
                    c = kids[j]
                    if not where[c]:
                        where[c], lister[c] = j + 1, d
            self._up = (where, lister)
        return self._up

    def path_of(self, ino: int) -> str:
        """A path for log lines (the first dirent naming each inode). O(depth): one index
        lookup per level, at most MAX_PATH_DEPTH levels (a longer chain, or a cycle among
        unreachable directories, is cut and shown as "…")."""
        where, lister = self._up_index()
        parts = []
        for _ in range(MAX_PATH_DEPTH):
            if ino == ROOT_INO:
                break
            if not 1 <= ino <= self.inode_count or not where[ino]:
                parts.append(f"<inode {ino}>")          # in no directory
                break
            off, ln, _ = DIRENT.unpack_from(self._dirents, (where[ino] - 1) * DIRENT.size)
            parts.append(self._name(off, ln).decode("utf-8", "backslashreplace"))
            ino = lister[ino]
        else:
            parts.append("…")
        return "/" + "/".join(reversed(parts))

    def iter_paths(self) -> Iterator[tuple[bytes, int]]:
        """Depth-first (path, ino) for every dirent; used by tools and prefetch-by-pattern.
        Each directory is entered once (load-time checks make the tree acyclic; the visited
        set keeps this walk finite whatever the columns say)."""
        stack = [(b"", ROOT_INO)]
        seen = {ROOT_INO}
        yield b"/", ROOT_INO
        while stack:
            prefix, ino = stack.pop()
            for _, name, child in self.readdir(ino):
                path = prefix + b"/" + name
                yield path, child
                if stat.S_ISDIR(self._raw(child)[0]) and child not in seen:
                    seen.add(child)
                    stack.append((path, child))

    # -- chunks -----------------------------------------------------------------------------
    def file_chunk_ids(self, ino: int) -> memoryview:
        """The chunk ids of a regular file as a u32 memoryview (index k = file chunk k)."""
        raw = self._raw(ino)
        if not stat.S_ISREG(raw[0]):
            return memoryview(b"").cast("I")
        start, count = raw[9], raw[10]
        if start + count > len(self._refs) // 4 or \
                (self._offs is None and count != -(-raw[4] // self.chunk_size)):
            raise FormatError(f"bootstrap: inode {ino}: chunk refs {start}+{count} do not fit "
                              f"chunk_refs ({len(self._refs) // 4}) or size {raw[4]}")
        return self._refs[start * 4:(start + count) * 4].cast("I")

    def file_chunk_offsets(self, ino: int) -> memoryview | None:
        """v3: the file offset where each of a regular file's chunks starts (u64 view, index k =
        file chunk k; checked at load: 0 first, each the previous plus its chunk's size, the
        last chunk ending at the file's size). None for fixed-size chunks (k * chunk_size)."""
        if self._offs is None:
            return None
        raw = self._raw(ino)
        if not stat.S_ISREG(raw[0]):
            return memoryview(b"").cast("Q")
        start, count = raw[9], raw[10]
        return self._offs[start * 8:(start + count) * 8].cast("Q")

    def chunk_index(self, ino: int, offset: int) -> int:
        """The file chunk k holding byte `offset` (0 <= offset < the file's size): a division
        for fixed-size chunks, a binary search of the file's chunk offsets for v3."""
        if self._offs is None:
            return offset // self.chunk_size
        offs = self.file_chunk_offsets(ino)
        return bisect_right(offs, offset) - 1 if offs else 0

    def chunk(self, chunk_id: int) -> Chunk:
        if not 0 <= chunk_id < self.chunk_count:
            raise FormatError(f"bootstrap: chunk id {chunk_id} out of range")
        blob, coff, csize, off, size, flags = CHUNK.unpack_from(self._chunks, chunk_id * CHUNK.size)
        b = self.blobs[blob]        # load-time checks: the blob column matches the blob ranges
        # O(1) per use instead of a pass over every chunk at load: nothing is allocated or
        # fetched for a chunk before this passes
        if not (0 < size <= self._chunk_limit and coff + csize <= b.compressed_size
                and off + size <= b.uncompressed_size
                and (flags & (CHUNK_COMPRESSED | CHUNK_BATCH) or csize == size)):
            raise FormatError(f"bootstrap: chunk {chunk_id}: size {size}, stored {coff}+{csize}, "
                              f"at {off} does not fit chunk_size {self.chunk_size} or blob {b.id}")
        digest = bytes(self._digests[chunk_id * DIGEST_SIZE:(chunk_id + 1) * DIGEST_SIZE])
        boff = bsize = 0
        if flags & CHUNK_BATCH:
            if self._batch is None:
                raise FormatError(f"bootstrap: chunk {chunk_id} is a batch member in a bootstrap "
                                  "without a batch column")
            boff, bsize = BATCH.unpack_from(self._batch, chunk_id * BATCH.size)
            # bounds a reader relies on: the batch it decodes is at most MAX_BATCH bytes and the
            # member lies inside it; a raw (uncompressed) batch is stored at its full size
            if not (0 < bsize <= MAX_BATCH and boff + size <= bsize) or \
                    (not flags & CHUNK_COMPRESSED and csize != bsize):
                raise FormatError(f"bootstrap: chunk {chunk_id}: bad batch ({boff}+{size} in {bsize}, "
                                  f"stored {csize})")
        return Chunk(chunk_id, blob, chunk_id - b.chunk_start, coff, csize, off, size,
                     bool(flags & CHUNK_COMPRESSED), digest, boff, bsize)

    def blob_chunk_rows(self, blob: int) -> tuple[memoryview, memoryview]:
        """The raw CHUNK rows and the sha256 digests of blob `blob`'s chunks, in index order
        (what the chunk cache keys a blob's cache entry by)."""
        b = self.blobs[blob]
        start, n = b.chunk_start, b.chunk_count
        if start < 0 or n < 0 or start + n > self.chunk_count:
            raise FormatError(f"bootstrap: blob {b.id} chunks [{start}, {start + n}) out of range")
        return (self._chunks[start * CHUNK.size:(start + n) * CHUNK.size],
                self._digests[start * DIGEST_SIZE:(start + n) * DIGEST_SIZE])

    def blob_chunks(self, blob: int) -> range:
        b = self.blobs[blob]
        return range(b.chunk_start, b.chunk_start + b.chunk_count)
