"""Chunk dictionary (`nydusify convert --chunk-dict`): the builder references chunks an earlier
image already stores, drops the dictionary blobs nothing references, and renumbers chunk ids so
that every file still reads back its own bytes."""

from __future__ import annotations

import hashlib
import io
import stat
from pathlib import Path

import pytest

from converter import tar as tarlayer
from converter.builder import Builder, BuildOptions, BuildResult
from converter.chunk_dict import ChunkDictRef, blob_descriptor, parse_chunk_dict
from nydus_py.errors import ConfigError
from nydus_py.format.bootstrap import Bootstrap, BootstrapWriter, ChunkSpec
from nydus_py.io.fetch import decode_chunk
from tests.fixtures.chunk_dict import build_layers, data, files_layer as layer
from tests.fixtures.imagegen import Layer

CS = 0x1000


def build(tmp: Path, layers: list[Layer], dictionary: Bootstrap | None = None, *,
          compressor: str = "zstd") -> BuildResult:
    return build_layers(tmp, layers, dictionary, chunk_size=CS, compressor=compressor)


def read_file(bs: Bootstrap, path: bytes, blob_files: dict[str, Path]) -> bytes:
    """A file's bytes, decoded chunk by chunk from the blob files the bootstrap names."""
    ino = 1
    for name in path.strip(b"/").split(b"/"):
        ino = bs.lookup(ino, name)
        assert ino is not None, path
    assert stat.S_ISREG(bs.attr(ino).mode)
    out = bytearray()
    for cid in bs.file_chunk_ids(ino):
        c = bs.chunk(cid)
        blob = bs.blobs[c.blob]
        with open(blob_files[blob.id], "rb") as f:
            f.seek(c.comp_offset)
            stored = f.read(c.comp_size)
        out += decode_chunk(blob, c, stored)   # verifies the sha256 (of a batch member too)
    return bytes(out)


def blob_files(*results: BuildResult) -> dict[str, Path]:
    return {b.digest: b.path for r in results for b in r.blobs}


# -- the dictionary is used ---------------------------------------------------------------------

def test_repeated_layer_stores_no_new_chunk(tmp_path):
    files = {"a/one": data(1, 5 * CS + 17), "a/two": data(2, 3 * CS)}
    a = build(tmp_path, [layer(files)])
    b = build(tmp_path, [layer(files)], Bootstrap.from_bytes(a.bootstrap))
    assert b.stats.chunks_stored == 0 and b.blobs == []
    assert b.stats.dict_chunks_used == b.stats.chunks_seen == 9
    assert [x.id for x in b.dict_blobs] == [a.blobs[0].digest]
    bs = Bootstrap.from_bytes(b.bootstrap)
    for path, content in files.items():
        assert read_file(bs, path.encode(), blob_files(a)) == content


def test_only_new_chunks_are_stored_next_to_dictionary_ones(tmp_path):
    old = data(1, 4 * CS)
    a = build(tmp_path, [layer({"old": old})])
    new = data(9, 2 * CS)
    mixed = old[:2 * CS] + new            # two dictionary chunks, then two new ones
    b = build(tmp_path, [layer({"copy": old, "mixed": mixed})], Bootstrap.from_bytes(a.bootstrap))
    assert b.stats.chunks_stored == 2
    assert b.blobs[0].uncompressed_size == len(new)
    bs = Bootstrap.from_bytes(b.bootstrap)
    assert [x.id for x in bs.blobs] == [a.blobs[0].digest, b.blobs[0].digest]   # dictionary first
    files = blob_files(a, b)
    assert read_file(bs, b"copy", files) == old
    assert read_file(bs, b"mixed", files) == mixed


def test_dictionary_wins_over_storing_a_chunk_of_a_lower_layer(tmp_path):
    content = data(3, 3 * CS)
    a = build(tmp_path, [layer({"x": content})])
    b = build(tmp_path, [layer({"x": content}), layer({"y": content})], Bootstrap.from_bytes(a.bootstrap))
    assert b.stats.chunks_stored == 0 and b.blobs == []


# -- pruning and renumbering --------------------------------------------------------------------

def test_unreferenced_dictionary_blobs_are_dropped_and_ids_renumbered(tmp_path):
    d0, d1, d2 = data(10, 3 * CS), data(11, 2 * CS), data(12, 4 * CS + 5)
    a = build(tmp_path, [layer({"d0": d0}), layer({"d1": d1}), layer({"d2": d2})])
    dictionary = Bootstrap.from_bytes(a.bootstrap)
    assert len(dictionary.blobs) == 3
    new = data(13, 3 * CS)
    # uses blob 0 and blob 2 of the dictionary, not blob 1 (whose file is deleted again)
    upper = Layer(compression="none")
    upper.whiteout("gone")
    b = build(tmp_path, [layer({"p": d2, "gone": d1}), layer({"q": new + d0}), upper], dictionary)
    bs = Bootstrap.from_bytes(b.bootstrap)
    assert [x.id for x in b.dict_blobs] == [a.blobs[0].digest, a.blobs[2].digest]
    assert b.stats.dict_blobs == 3 and b.stats.dict_blobs_kept == 2
    assert [x.id for x in bs.blobs] == [a.blobs[0].digest, a.blobs[2].digest, b.blobs[0].digest]
    assert bs.chunk_count == 3 + 5 + 3
    # kept dictionary blobs carry all their chunks in their own order (the daemon's cache file
    # of a blob is indexed by position), and point at the same bytes as in the dictionary
    for new_blob, old_blob in ((0, 0), (1, 2)):
        got = [bs.chunk(c) for c in bs.blob_chunks(new_blob)]
        want = [dictionary.chunk(c) for c in dictionary.blob_chunks(old_blob)]
        assert [(c.index, c.digest, c.comp_offset, c.comp_size, c.offset, c.size) for c in got] == \
               [(c.index, c.digest, c.comp_offset, c.comp_size, c.offset, c.size) for c in want]
        assert all(c.blob == new_blob for c in got)
    files = blob_files(a, b)
    assert read_file(bs, b"p", files) == d2
    assert read_file(bs, b"q", files) == new + d0
    assert bs.lookup(1, b"gone") is None


def test_dictionary_not_used_at_all_leaves_no_trace(tmp_path):
    a = build(tmp_path, [layer({"a": data(1, 2 * CS)})])
    b = build(tmp_path, [layer({"b": data(2, 2 * CS)})], Bootstrap.from_bytes(a.bootstrap))
    plain = build(tmp_path, [layer({"b": data(2, 2 * CS)})])
    assert b.dict_blobs == [] and b.stats.dict_blobs_kept == 0
    assert b.bootstrap == plain.bootstrap


def test_same_input_and_dictionary_give_identical_bootstrap(tmp_path):
    d = data(5, 6 * CS)
    a = build(tmp_path, [layer({"a": d[:3 * CS]}), layer({"b": d[3 * CS:]})])
    dictionary = Bootstrap.from_bytes(a.bootstrap)
    layers = [layer({"x": d[3 * CS:] + data(6, CS)})]
    assert build(tmp_path, layers, dictionary).bootstrap == build(tmp_path, layers, dictionary).bootstrap


def test_dictionary_with_another_compressor_reads_back(tmp_path):
    d = data(7, 3 * CS)
    a = build(tmp_path, [layer({"a": bytes(2 * CS) + d})], compressor="lz4")
    b = build(tmp_path, [layer({"b": d + bytes(CS)})], Bootstrap.from_bytes(a.bootstrap), compressor="zstd")
    bs = Bootstrap.from_bytes(b.bootstrap)
    assert [x.compressor for x in bs.blobs] == ["lz4"]
    assert read_file(bs, b"b", blob_files(a, b)) == d + bytes(CS)


def build_multi(tmp: Path, layers: list[Layer], dictionaries: list[Bootstrap]) -> BuildResult:
    work = tmp / f"work-{len(list(tmp.glob('work-*')))}"
    work.mkdir()
    b = Builder(BuildOptions(chunk_size=CS, workers=2), work)
    for i, d in enumerate(dictionaries):
        b.add_chunk_dict(d, f"dict-{i}")
    for i, l in enumerate(layers):
        b.add_layer(tarlayer.iter_entries(io.BytesIO(l.tar_bytes()), "l"), i, f"sha256:{i:064x}", "l")
    return b.finish()


def test_several_dictionaries_each_provide_their_chunks_and_a_shared_blob_counts_once(tmp_path):
    shared, only_a, only_b, new = data(1, 3 * CS), data(2, 3 * CS), data(3, 3 * CS), data(4, 2 * CS)
    base = build(tmp_path, [layer({"s": shared})])
    a = build(tmp_path, [layer({"s": shared}), layer({"a": only_a})])     # base's blob + its own
    b = build(tmp_path, [layer({"s": shared}), layer({"b": only_b})])
    assert a.blobs[0].digest == b.blobs[0].digest == base.blobs[0].digest
    c = build_multi(tmp_path, [layer({"x/a": only_a, "x/b": only_b, "x/s": shared, "x/n": new + b"tail"})],
                    [Bootstrap.from_bytes(a.bootstrap), Bootstrap.from_bytes(b.bootstrap)])
    assert c.stats.dict_blobs == 3             # base's blob once, a's and b's own
    assert sorted(x.id for x in c.dict_blobs) == sorted({base.blobs[0].digest, a.blobs[1].digest,
                                                         b.blobs[1].digest})
    assert c.stats.chunks_stored == 3          # only "new" (2 chunks) and its tail
    bs = Bootstrap.from_bytes(c.bootstrap)
    files = blob_files(a, b, c)
    for name, want in [(b"x/a", only_a), (b"x/b", only_b), (b"x/s", shared), (b"x/n", new + b"tail")]:
        assert read_file(bs, name, files) == want


def test_chunk_size_mismatch_is_a_config_error(tmp_path):
    a = build(tmp_path, [layer({"a": data(1, CS)})])
    b = Builder(BuildOptions(chunk_size=2 * CS), tmp_path)
    with pytest.raises(ConfigError, match="chunk size 0x1000 differs from --chunk-size 0x2000"):
        b.add_chunk_dict(Bootstrap.from_bytes(a.bootstrap), "oci:/x")


# -- the writer ----------------------------------------------------------------------------------

def spec(n: int, k: int = 0) -> ChunkSpec:
    """Chunk n, the k-th of its blob (a blob's chunks lie back to back from offset 0)."""
    return ChunkSpec(hashlib.sha256(b"%d" % n).digest(), k * 10, 10, k * 20, 20, True)


def test_drop_blobs_patches_blob_indices_and_returns_the_id_mapping():
    w = BootstrapWriter(chunk_size=CS)
    w.add_blob(blob_id="sha256:" + "a" * 64, compressor="zstd", compressed_size=20, uncompressed_size=40,
               chunks=[spec(0), spec(1, 1)])
    w.add_blob(blob_id="sha256:" + "b" * 64, compressor="zstd", compressed_size=10, uncompressed_size=20,
               chunks=[spec(2)])
    w.add_blob(blob_id="sha256:" + "c" * 64, compressor="lz4", compressed_size=30, uncompressed_size=60,
               chunks=[spec(3), spec(4, 1), spec(5, 2)])
    assert w.drop_blobs(set()) is None
    mapping = w.drop_blobs({1})
    assert mapping == [0, 1, -1, 2, 3, 4]
    w.add_inode(mode=stat.S_IFDIR | 0o755, uid=0, gid=0, mtime_ns=0)
    ino = w.add_inode(mode=stat.S_IFREG | 0o644, uid=0, gid=0, mtime_ns=0, size=CS + 1, chunk_ids=[1, 4])
    w.add_dirent(1, b"f", ino)
    bs = Bootstrap.from_bytes(w.to_bytes())
    assert [(b.id[7], b.chunk_start, b.chunk_count) for b in bs.blobs] == [("a", 0, 2), ("c", 2, 3)]
    c = bs.chunk(mapping[4])
    assert (c.blob, c.index, c.digest, c.comp_offset) == (1, 1, spec(4).digest, 10)
    assert list(bs.file_chunk_ids(ino)) == [1, 4]
    with pytest.raises(ValueError):
        w.drop_blobs({0})


# -- the command-line spelling ------------------------------------------------------------------

@pytest.mark.parametrize("text,want", [
    ("oci:/imgs/a:v1", ChunkDictRef("oci", "oci:/imgs/a:v1")),
    ("bootstrap:oci:/imgs/a", ChunkDictRef("oci", "oci:/imgs/a")),
    ("localhost:5000/app/base:v1", ChunkDictRef("docker", "localhost:5000/app/base:v1")),
    ("bootstrap:registry:localhost:5000/app/base:v1", ChunkDictRef("docker", "localhost:5000/app/base:v1")),
    ("docker://localhost:5000/app/base", ChunkDictRef("docker", "localhost:5000/app/base:latest")),
])
def test_chunk_dict_spellings(text, want):
    assert parse_chunk_dict(text) == want


@pytest.mark.parametrize("text,message", [
    ("bootstrap:local:/var/lib/nydus/dict.boot", "a bare bootstrap file is not enough"),
    ("bootstrap:s3:bucket", "unknown source 's3'"),
    ("bootstrap:registry", "expected bootstrap:registry:REF"),
    ("", "empty"),
])
def test_chunk_dict_bad_spellings(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_chunk_dict(text)


def test_dictionary_blob_layer_is_marked_and_has_no_source_layer():
    from nydus_py.format.bootstrap import BlobInfo
    d = blob_descriptor(BlobInfo("sha256:" + "a" * 64, "zstd", 123, 456, 0, 7))
    assert d.media_type == "application/vnd.oci.image.layer.nydus-py.blob.v1"
    assert d.size == 123
    assert d.annotations == {"io.nydus-py.blob": "true", "io.nydus-py.chunk-dict": "true",
                             "io.nydus-py.uncompressed-size": "456", "io.nydus-py.chunk-count": "7"}
