"""The chunk table digest that keys a blob's cache entry (cache/entry.py): the same for every
image that describes a blob identically (wherever the blob sits in its bootstrap), different as
soon as anything about a chunk differs, and b"" (never cached) for overlapping chunks."""

from __future__ import annotations

import hashlib
import stat

import pytest

from nydus_py.cache.entry import table_digest
from nydus_py.errors import FormatError
from nydus_py.format.bootstrap import Bootstrap, BootstrapWriter, ChunkSpec

BLOB = "sha256:" + "ab" * 32


def _specs(n: int = 3, size: int = 4096) -> list[ChunkSpec]:
    return [ChunkSpec(hashlib.sha256(bytes([i])).digest(), i * 100, 100, i * size, size, True)
            for i in range(n)]


def _bootstrap(blobs: list[tuple[str, list[ChunkSpec]]]) -> Bootstrap:
    w = BootstrapWriter(chunk_size=4096)
    for bid, specs in blobs:
        w.add_blob(blob_id=bid, compressor="zstd", compressed_size=100 * len(specs),
                   uncompressed_size=sum(s.size for s in specs) + 4096, chunks=specs)
    w.add_inode(mode=stat.S_IFDIR | 0o755, uid=0, gid=0, mtime_ns=0)
    return Bootstrap.from_bytes(w.to_bytes())


def test_same_table_same_key_wherever_the_blob_sits():
    alone = _bootstrap([(BLOB, _specs())])
    second = _bootstrap([("sha256:" + "cd" * 32, _specs(2)), (BLOB, _specs())])
    assert table_digest(alone, 0) == table_digest(second, 1) != b""
    assert len(table_digest(alone, 0)) == 32


@pytest.mark.parametrize("field", ["digest", "comp_offset", "comp_size", "size", "compressed"])
def test_any_change_to_a_chunk_changes_the_key(field):
    specs = _specs()
    c = specs[2]                # the last chunk: its size can change and chunks stay back to back
    changed = {"digest": hashlib.sha256(b"evil").digest(), "comp_offset": c.comp_offset + 1,
               "comp_size": c.comp_size + 1, "size": c.size - 1,
               "compressed": not c.compressed}[field]
    setattr(specs[2], field, changed)
    assert table_digest(_bootstrap([(BLOB, specs)]), 0) not in (
        table_digest(_bootstrap([(BLOB, _specs())]), 0), b"")


def test_overlapping_chunks_never_reach_the_cache():
    """Storing one chunk must never change another: the loader refuses such tables."""
    specs = _specs()
    specs[2].offset = specs[1].offset + 10       # chunk 2 overwrites part of chunk 1
    with pytest.raises(FormatError, match="back to back"):
        _bootstrap([(BLOB, specs)])
    specs = _specs()
    specs[2].offset += 2 * 4096                  # past the blob's uncompressed size
    with pytest.raises(FormatError):
        _bootstrap([(BLOB, specs)])
