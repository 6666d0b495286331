"""Turns a source image into data blobs + a bootstrap.

Per layer: stream the tar (verified), merge entries into the tree (whiteouts), and push each
regular file's data through the chunk pipeline; new chunks go into this layer's blob, known
ones are referenced. After the last layer the final tree is laid out as the bootstrap.
"""

from __future__ import annotations

import fnmatch
from array import array
import os
import stat
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from converter import tar as tarlayer
from converter.blob_writer import BlobWriter, FinishedBlob
from converter.chunker import CdcParams, ChunkPipeline, cdc_pieces, read_exact_pieces
from converter.dedup import ChunkIndex, remap_ids
from converter.tree import Inode, Tree
from nydus_py import __version__
from nydus_py.errors import ConfigError, LayerError
from nydus_py.format import compression
from nydus_py.format.bootstrap import BlobInfo, Bootstrap, BootstrapWriter, ChunkSpec

MIN_CHUNK, MAX_CHUNK = 0x1000, 0x1000000  # 4 KiB .. 16 MiB, powers of two (as nydus)
DEFAULT_BATCH = 1 << 20   # measured: base image 51.6 MB -> 43.3 MB at zstd-3 (gzip 48.7 MB)
CHUNKERS = ("fixed", "cdc")
# --chunker cdc sizes: ours within pyfastcdc's ranges (min <= 1 MiB, avg <= 4 MiB, max <= 16 MiB)
CDC_MIN_LIMIT, CDC_AVG_LIMIT = 1 << 20, 1 << 22


@dataclass(frozen=True, kw_only=True)
class BuildOptions:
    chunk_size: int = 1 << 20
    compressor: str = "zstd"
    compression_level: int | None = None    # zstd only; None = 6 (compression.DEFAULT_ZSTD_LEVEL)
    max_layer_size: int = 64 << 30          # uncompressed bytes per layer (bomb limit)
    workers: int = max(2, os.cpu_count() or 2)
    prefetch_patterns: tuple[str, ...] = ()
    # chunks smaller than this are compressed together in batches of at most this many bytes
    # (format v2); 0 = every chunk alone (format v1, as before)
    batch_size: int = DEFAULT_BATCH
    # "fixed": file chunk k is bytes [k*chunk_size, (k+1)*chunk_size) (format v1/v2);
    # "cdc": FastCDC cut points (format v3); 0 sizes take the defaults (avg = chunk_size,
    # min = avg/4, max = avg*4 up to 16 MiB), and chunk_size becomes the average
    chunker: str = "fixed"
    cdc_min_size: int = 0
    cdc_avg_size: int = 0
    cdc_max_size: int = 0

    def __post_init__(self) -> None:
        cs = self.chunk_size
        if cs < MIN_CHUNK or cs > MAX_CHUNK or cs & (cs - 1):
            raise ConfigError(f"--chunk-size {cs:#x}: must be a power of two between 0x1000 and 0x1000000")
        if self.chunker not in CHUNKERS:
            raise ConfigError(f"--chunker {self.chunker!r}: must be one of {', '.join(CHUNKERS)}")
        if self.chunker == "cdc":
            self._check_cdc()
        elif self.cdc_min_size or self.cdc_avg_size or self.cdc_max_size:
            raise ConfigError("--cdc-min-size/--cdc-avg-size/--cdc-max-size need --chunker cdc")
        bs = self.batch_size
        if bs and (bs < MIN_CHUNK or bs > MAX_CHUNK or bs & (bs - 1)):
            raise ConfigError(f"--batch-size {bs:#x}: must be 0 or a power of two between 0x1000 and 0x1000000")
        compression.check_codec(self.compressor)
        compression.check_level(self.compressor, self.compression_level)

    def _check_cdc(self) -> None:
        avg = self.cdc_avg_size or self.chunk_size
        lo = self.cdc_min_size or avg // 4
        hi = self.cdc_max_size or min(avg * 4, MAX_CHUNK)
        if not (MIN_CHUNK <= lo <= avg <= hi <= MAX_CHUNK and lo <= CDC_MIN_LIMIT
                and avg <= CDC_AVG_LIMIT and not avg & (avg - 1)):
            raise ConfigError(f"--chunker cdc: min {lo:#x} / avg {avg:#x} / max {hi:#x}: need "
                              f"{MIN_CHUNK:#x} <= min <= avg <= max <= {MAX_CHUNK:#x}, min <= "
                              f"{CDC_MIN_LIMIT:#x}, avg a power of two <= {CDC_AVG_LIMIT:#x}")
        object.__setattr__(self, "chunk_size", avg)     # the image's nominal chunk size
        object.__setattr__(self, "cdc_avg_size", avg)
        object.__setattr__(self, "cdc_min_size", lo)
        object.__setattr__(self, "cdc_max_size", hi)

    @property
    def cdc(self) -> CdcParams | None:
        if self.chunker != "cdc":
            return None
        return CdcParams(self.cdc_min_size, self.cdc_avg_size, self.cdc_max_size)


@dataclass
class BuiltBlob:
    digest: str
    size: int
    uncompressed_size: int
    chunk_count: int
    path: Path
    source_layer: str


@dataclass
class BuildStats:
    layers: int = 0
    entries: int = 0
    files: int = 0
    file_bytes: int = 0           # uncompressed bytes of regular file data read from layers
    chunks_seen: int = 0
    chunks_stored: int = 0
    stored_uncompressed: int = 0
    stored_compressed: int = 0
    dict_chunks_used: int = 0     # chunk references resolved to a chunk-dictionary chunk
    dict_blobs: int = 0           # blobs in the chunk dictionary
    dict_blobs_kept: int = 0      # of those, blobs the image references (the rest are dropped)


@dataclass
class BuildResult:
    bootstrap: bytes               # plain msgpack (the target compresses it into a layer)
    blobs: list[BuiltBlob]
    stats: BuildStats
    prefetch_files: int = 0
    dict_blobs: list[BlobInfo] = field(default_factory=list)  # chunk-dictionary blobs referenced


ProgressFn = Callable[[str, int], None]   # (event, amount): "bytes" read, "layer" done


class PrefetchMatcher:
    """nydusify-style prefetch list: absolute paths, one a line; a directory includes its
    subtree; shell wildcards are allowed too."""

    def __init__(self, patterns: tuple[str, ...]):
        self._exact: set[bytes] = set()
        self._globs: list[bytes] = []
        for p in patterns:
            p = p.strip()
            if not p or p.startswith("#"):
                continue
            b = os.fsencode("/" + p.strip("/")) if p != "/" else b"/"
            if any(c in p for c in "*?["):
                self._globs.append(b)
            else:
                self._exact.add(b)

    def __bool__(self) -> bool:
        return bool(self._exact or self._globs)

    def match(self, path: tuple[bytes, ...]) -> bool:
        full = b"/" + b"/".join(path)
        if b"/" in self._exact:
            return True
        for i in range(1, len(path) + 1):
            if b"/" + b"/".join(path[:i]) in self._exact:
                return True
        return any(fnmatch.fnmatchcase(full, g) for g in self._globs)


class Builder:
    def __init__(self, options: BuildOptions, work_dir: Path, progress: ProgressFn | None = None):
        self.opt = options
        self.work_dir = work_dir
        self.progress = progress or (lambda event, n: None)
        self.tree = Tree()
        self.index = ChunkIndex()
        self.stats = BuildStats()
        meta = {"builder": f"nydus-py {__version__}", "compressor": options.compressor}
        if options.cdc is not None:
            c = options.cdc
            meta["chunker"] = f"fastcdc-2020 min={c.min_size} avg={c.avg_size} max={c.max_size}"
        self.writer = BootstrapWriter(chunk_size=options.chunk_size, meta=meta,
                                      variable=options.cdc is not None)
        self.blobs: list[BuiltBlob] = []
        self.prefetch = PrefetchMatcher(options.prefetch_patterns)
        self._prefetch_inodes: set[int] = set()
        self._dict_chunks = 0          # chunk ids [0, _dict_chunks) are the dictionary's

    # -- chunk dictionary -----------------------------------------------------------------------
    def add_chunk_dict(self, dictionary: Bootstrap, what: str) -> None:
        """Registers every blob and chunk of an earlier image's bootstrap, so that a chunk it
        already stores is referenced, not stored again. Before the first layer; may be called
        once per dictionary (a blob that an earlier dictionary registered is skipped; for a chunk
        in several, the first dictionary's copy is used)."""
        if self.stats.layers or len(self.writer.blobs) != self.stats.dict_blobs:
            raise ValueError("add_chunk_dict must come before the first layer")
        if self.opt.cdc is None and dictionary.variable:
            raise ConfigError(f"--chunk-dict {what}: its chunks are content-defined (--chunker cdc); "
                              "use it with --chunker cdc")
        # cdc takes any dictionary: whole small files (and, rarely, equal cuts) match by digest
        if self.opt.cdc is None and dictionary.chunk_size != self.opt.chunk_size:
            raise ConfigError(f"--chunk-dict {what}: chunk size {dictionary.chunk_size:#x} differs from "
                              f"--chunk-size {self.opt.chunk_size:#x} (no chunk could match)")
        if dictionary.digester != self.writer.digester:
            raise ConfigError(f"--chunk-dict {what}: digester {dictionary.digester!r} is not "
                              f"{self.writer.digester!r}")
        known = {b.id for b in self.writer.blobs}
        for b, info in enumerate(dictionary.blobs):
            if info.id in known:
                continue
            known.add(info.id)
            specs = []
            for cid in dictionary.blob_chunks(b):
                c = dictionary.chunk(cid)
                specs.append(ChunkSpec(c.digest, c.comp_offset, c.comp_size, c.offset, c.size, c.compressed,
                                       c.batch_offset, c.batch_size))
            start = self.writer.chunk_count
            # every chunk of the blob, in blob order: the chunk index inside a blob keys the
            # daemon's cache file, so it must be the same in every image naming the blob
            self.writer.add_blob(blob_id=info.id, compressor=info.compressor,
                                 compressed_size=info.compressed_size,
                                 uncompressed_size=info.uncompressed_size, chunks=specs)
            for i, spec in enumerate(specs):
                self.index.add_existing(spec.digest, start + i)
            self.stats.dict_blobs += 1
        self._dict_chunks = self.writer.chunk_count

    # -- per layer ----------------------------------------------------------------------------
    def add_layer(self, entries, layer_index: int, source_layer: str, what: str) -> BuiltBlob | None:
        """`entries` yields TarEntry objects of one layer (already decompressed and verified)."""
        base = self.writer.chunk_count
        # "none" gains nothing from batches; keep such images v1
        batch = self.opt.batch_size if self.opt.compressor != "none" else 0
        pipeline = ChunkPipeline(self.opt.workers)
        blob = BlobWriter(self.work_dir, self.opt.compressor, batch_size=batch,
                          level=self.opt.compression_level, executor=pipeline.executor)
        touched: list[Inode] = []

        def on_done(result, target, k):
            digest, size, data = result
            inode, prefetch = target
            self.stats.chunks_seen += 1
            cid = self.index.get(digest)
            if cid is not None and cid < self._dict_chunks:
                self.stats.dict_chunks_used += 1
            if cid is None:
                if size < batch:
                    cid = base + blob.add_member(digest, data, prefetch=prefetch)
                else:
                    cid = base + blob.add(digest, data, prefetch=prefetch)
                self.index.add_new(digest, cid)
                self.stats.chunks_stored += 1
                self.stats.stored_uncompressed += size
            inode.chunks.append(cid)  # results arrive in submission order: k == len(chunks)

        pipeline.on_done = on_done
        cs = self.opt.chunk_size
        cdc = self.opt.cdc
        cutter = cdc.cutter() if cdc is not None else None
        try:
            for entry in entries:
                self.stats.entries += 1
                inode = self.tree.apply(entry, layer_index)
                if inode is None:
                    continue
                self.stats.files += 1
                prefetch = bool(self.prefetch) and self.prefetch.match(entry.path)
                if prefetch:
                    self._prefetch_inodes.add(id(inode))
                # grown as chunks complete (u32 array: 4 bytes a chunk), so a huge declared size
                # costs nothing until its data actually arrives
                inode.chunks = array("I")
                touched.append(inode)
                try:
                    if cdc is None:
                        for k, piece in enumerate(read_exact_pieces(entry.read, entry.size, cs)):
                            pipeline.submit(piece, (inode, prefetch), k)
                            self.progress("bytes", len(piece))
                    else:
                        self._submit_cdc(pipeline, entry, (inode, prefetch), cdc, cutter)
                except EOFError as e:
                    raise LayerError(f"{what}: {_show(entry.path)}: {e}") from None
                self.stats.file_bytes += entry.size
            pipeline.drain()
            fin = blob.finish()   # waits for the batches compressing on the pipeline's threads
        except BaseException:
            blob.close()
            raise
        finally:
            pipeline.close()
        self.stats.layers += 1
        if fin is None:
            return None
        self.stats.stored_compressed += fin.size
        mapping = _final_ids(fin, base)
        self.index.renumber(mapping)
        remap_ids((i.chunks for i in touched), mapping)
        self.writer.add_blob(blob_id=fin.digest, compressor=self.opt.compressor,
                             compressed_size=fin.size, uncompressed_size=fin.uncompressed_size,
                             chunks=fin.chunks, source_layer=source_layer)
        built = BuiltBlob(fin.digest, fin.size, fin.uncompressed_size, len(fin.chunks), fin.path, source_layer)
        self.blobs.append(built)
        return built

    def _submit_cdc(self, pipeline: ChunkPipeline, entry, target, cdc: CdcParams, cutter) -> None:
        """Content-defined pieces of one file. Batching is as for fixed-size chunks: every new
        chunk below --batch-size is a batch member (small files, tails, and inner cdc chunks
        smaller than a batch). Measured on series-1 (python), with inner chunks compressed
        alone instead: 128.8 → 128.1 MB at avg 1 MiB, 133.7 → 125.9 MB at avg 64 KiB, and cold
        start fetched 7.49 → 6.56 MB (fixed 1 MiB: 6.48 MB)."""
        for k, piece in enumerate(cdc_pieces(entry.read, entry.size, cdc, cutter)):
            pipeline.submit(piece, target, k)
            self.progress("bytes", len(piece))

    # -- final layout -------------------------------------------------------------------------
    def finish(self) -> BuildResult:
        w = self.writer
        mapping = self._drop_unused_dict_blobs()
        ino_of: dict[int, int] = {}
        root = self.tree.root
        ino_of[id(root)] = self._add_inode(root, mapping)
        queue = deque([root])
        prefetch_inos = []
        while queue:
            d = queue.popleft()
            children = d.entries()
            for name in sorted(children):
                child = children[name]
                ino = ino_of.get(id(child))
                if ino is None:
                    ino = ino_of[id(child)] = self._add_inode(child, mapping)
                    if id(child) in self._prefetch_inodes:
                        prefetch_inos.append(ino)
                    if child.children is not None:
                        queue.append(child)
                w.add_dirent(ino_of[id(d)], name, ino)
        w.prefetch = prefetch_inos
        dict_blobs = w.blobs[:self.stats.dict_blobs_kept]
        return BuildResult(w.to_bytes(), self.blobs, self.stats, len(prefetch_inos), dict_blobs)

    def _drop_unused_dict_blobs(self) -> list[int] | None:
        """Drops the dictionary blobs no file of the final tree references; returns the chunk
        id mapping (None: ids unchanged). Dictionary blobs come first in the blob table, so the
        kept ones stay first, in dictionary order, and the image's own blobs follow."""
        n = self._dict_chunks
        if not n:
            return None
        used = bytearray(n)
        for node in self._files():
            for cid in node.chunks:
                if cid < n:
                    used[cid] = 1
        ndict = self.stats.dict_blobs
        drop = {b for b, info in enumerate(self.writer.blobs[:ndict])
                if not any(used[info.chunk_start:info.chunk_start + info.chunk_count])}
        self.stats.dict_blobs_kept = ndict - len(drop)
        return self.writer.drop_blobs(drop)

    def _files(self):
        """Every regular file of the final tree (a hardlinked one as often as it is linked)."""
        stack = [self.tree.root]
        while stack:
            d = stack.pop()
            for child in d.entries().values():
                if child.children is not None:
                    stack.append(child)
                elif child.chunks:
                    yield child

    def _add_inode(self, node: Inode, mapping: list[int] | None = None) -> int:
        mode = tarlayer.st_mode(node.kind, node.mode)
        rdev = os.makedev(*node.rdev) if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else 0
        return self.writer.add_inode(
            mode=mode, uid=node.uid, gid=node.gid, mtime_ns=node.mtime_ns,
            size=node.size if stat.S_ISREG(mode) else 0, rdev=rdev, xattrs=node.xattrs,
            symlink=node.target if stat.S_ISLNK(mode) else None,
            chunk_ids=(node.chunks if mapping is None else [mapping[c] for c in node.chunks])
            if stat.S_ISREG(mode) else None)


def _final_ids(fin: FinishedBlob, base: int) -> dict[int, int]:
    """fin.order[pos] = add-sequence number of the chunk now at position pos in the blob."""
    return {base + seq: base + pos for pos, seq in enumerate(fin.order) if seq != pos}


def _show(path: tuple[bytes, ...]) -> str:
    return "/" + b"/".join(path).decode("utf-8", "backslashreplace")
