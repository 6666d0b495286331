"""`nydusify convert`: source image → builder → target (OCI layout or registry), all-or-nothing."""

from __future__ import annotations

import functools
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from converter import tar as tarlayer
from converter.builder import Builder, BuildOptions, BuildResult, ProgressFn
from converter.chunk_dict import ChunkDict
from converter.readahead import ReadAhead, switch_interval
from converter.sources import RegistryOptions, SourceImage, SourceRef, open_source
from converter.target import Staging, write_image
from nydus_py.errors import BlobNotFoundError, ConfigError
from nydus_py.oci.layout import Descriptor
from nydus_py.oci.reference import parse as parse_reference
from nydus_py.storage.backend import BlobSink


@dataclass(frozen=True)
class BlobStore:
    """Where data blobs go instead of the image (nydusify --backend-type)."""
    type: str
    backend: BlobSink


@dataclass
class LayerReport:
    """One source layer's conversion, for --output-json and the progress lines."""
    index: int                     # from 0
    count: int                     # layers in the image
    source_digest: str
    source_size: int               # compressed, as in the source manifest
    blob_digest: str | None        # None: the layer held no file data (or all of it deduplicated)
    blob_size: int
    uncompressed_size: int         # of the chunks stored in the blob
    chunks: int
    seconds: float


@dataclass
class ConvertResult:
    manifest: Descriptor
    build: BuildResult
    source_compressed: int
    seconds: float
    pushed_digest: str | None = None
    layers: list[LayerReport] = field(default_factory=list)
    push_seconds: float = 0.0


def convert(source: SourceRef, target: SourceRef, options: BuildOptions, *,
            platform: str | None = None, progress: ProgressFn | None = None,
            on_image=None, registry: RegistryOptions | None = None,
            merge_platform: bool = False, blob_store: BlobStore | None = None,
            chunk_dict: ChunkDict | Sequence[ChunkDict] | None = None,
            target_registry: RegistryOptions | None = None,
            on_layer: Callable[[LayerReport], None] | None = None) -> ConvertResult:
    """`chunk_dict`: earlier images (converter/chunk_dict.py; one or several) whose chunks are
    referenced, not stored again; the dictionary blobs the result references become layers of
    the target.
    `registry` reaches the source (and the chunk dictionary), `target_registry` (default: the
    same) the target. `on_layer` hears about each layer once it is converted."""
    dicts = _dict_list(chunk_dict)
    if target.transport not in ("oci", "docker"):
        raise ConfigError(f"target {target}: use oci:DIR[:TAG] or a registry reference HOST/REPO:TAG")
    if merge_platform and target.transport != "docker":
        raise ConfigError("--merge-platform needs a registry target")
    for d in dicts:
        if d.external and (blob_store is None or blob_store.type != d.external):
            raise ConfigError(f"--chunk-dict {d.name}: its blobs live in {d.external}; convert with "
                              f"--backend-type {d.external}")
    registry = registry or RegistryOptions()
    target_registry = target_registry or registry
    t0 = time.monotonic()
    reports: list[LayerReport] = []

    def layer_done(report: LayerReport) -> None:
        reports.append(report)
        if on_layer:
            on_layer(report)

    with open_source(source, platform, registry=registry) as image:
        if on_image:
            on_image(image)
        if target.transport == "oci":
            manifest, result = _build_into(image, Path(target.path), target.reference, options,
                                           progress, blob_store, dicts, copy_dict_blobs=True,
                                           on_layer=layer_done)
            return ConvertResult(manifest, result, _total(image), time.monotonic() - t0, layers=reports)
        ref = parse_reference(target.path)
        with tempfile.TemporaryDirectory(prefix="nydusify-out-", dir=target_registry.work_dir) as tmp:
            manifest, result = _build_into(image, Path(tmp) / "oci", None, options, progress, blob_store,
                                           dicts, copy_dict_blobs=False, on_layer=layer_done)
            from converter.push import push_converted
            external = _dict_blob_sources(dicts, result, ref, Path(tmp)) if dicts and not blob_store else None
            t_push = time.monotonic()
            with target_registry.client(ref) as client:
                pushed = push_converted(Path(tmp) / "oci", manifest, ref, client, source_image=image,
                                        merge_platform=merge_platform,
                                        concurrency=target_registry.concurrency,
                                        progress=progress, external=external)
            t_push = time.monotonic() - t_push
        return ConvertResult(manifest, result, _total(image), time.monotonic() - t0, pushed,
                             layers=reports, push_seconds=t_push)


def _build_into(image: SourceImage, target_dir: Path, tag: str | None, options: BuildOptions,
                progress: ProgressFn | None, blob_store: BlobStore | None = None,
                dicts: Sequence[ChunkDict] = (), *, copy_dict_blobs: bool = True,
                on_layer: Callable[[LayerReport], None] | None = None
                ) -> tuple[Descriptor, BuildResult]:
    with Staging(target_dir) as staging:
        builder = Builder(options, staging.work_dir, progress)
        for d in dicts:
            builder.add_chunk_dict(d.bootstrap, d.name)
        for layer in image.layers:
            # iter_entries reads the stream to EOF, so the digest and diff_id checks have fired
            # (or raised) by the time add_layer returns.
            t = time.monotonic()
            stream = image.open_layer_tar(layer, max_uncompressed=options.max_layer_size)
            # fetch + gunzip + both digests run ahead on a thread of their own (see readahead.py)
            with switch_interval(), ReadAhead(stream, name=f"layer-{layer.index}") as ahead:
                built = builder.add_layer(
                    tarlayer.iter_entries(ahead, layer.what, max_size=options.max_layer_size),
                    layer.index, layer.digest, layer.what)
            if progress:
                progress("layer", 1)
            if on_layer:
                on_layer(LayerReport(
                    index=layer.index, count=len(image.layers), source_digest=layer.digest,
                    source_size=layer.size, blob_digest=built.digest if built else None,
                    blob_size=built.size if built else 0,
                    uncompressed_size=built.uncompressed_size if built else 0,
                    chunks=built.chunk_count if built else 0, seconds=time.monotonic() - t))
        result = builder.finish()
        layout = staging.layout
        assert layout is not None               # set while the Staging is entered
        if blob_store is not None:
            _store_dict_blobs(dicts, result, blob_store, staging.work_dir)
        elif copy_dict_blobs:
            for info in result.dict_blobs:
                # a target layout that already holds the blob (e.g. the dictionary's own
                # layout, another tag) keeps it at commit; otherwise copy it in, verified
                if not staging.target_has_blob(info.id):
                    tmp = _owner(dicts, info.id).fetch_blob(info, staging.work_dir)
                    layout.adopt_file(tmp, info.id, info.compressed_size, "")
        if blob_store is not None:
            for blob in result.blobs:
                blob_store.backend.put_blob(blob.digest, blob.path)
                if progress:
                    progress("pushed", blob.size)
        manifest = write_image(layout, result, image, chunk_size=options.chunk_size,
                               compressor=options.compressor,
                               external_blobs=blob_store.type if blob_store is not None else None)
        staging.commit(manifest, tag)
    return manifest, result


def _store_dict_blobs(dicts: Sequence[ChunkDict], result: BuildResult, blob_store: BlobStore,
                      work_dir: Path) -> None:
    """--backend-type: the image's blobs, dictionary ones included, must all be in the store
    (its manifest lists none of them). Blobs already there (e.g. the dictionary was converted
    into the same bucket) are not copied again."""
    for info in result.dict_blobs:
        if blob_store.backend.has_blob(info.id):
            continue
        d = _owner(dicts, info.id)
        if d.external:
            raise BlobNotFoundError(f"--chunk-dict {d.name}: blob {info.id} is not in the target's "
                                    f"{blob_store.type} store")
        tmp = d.fetch_blob(info, work_dir)
        try:
            blob_store.backend.put_blob(info.id, tmp)
        finally:
            tmp.unlink()


def _dict_list(chunk_dict) -> list[ChunkDict]:
    if chunk_dict is None:
        return []
    return [chunk_dict] if isinstance(chunk_dict, ChunkDict) else list(chunk_dict)


def _owner(dicts: Sequence[ChunkDict], blob_id: str) -> ChunkDict:
    """The first dictionary naming the blob (the builder registered the blob from that one)."""
    for d in dicts:
        if any(b.id == blob_id for b in d.bootstrap.blobs):
            return d
    raise ValueError(f"blob {blob_id} is in no chunk dictionary")


def _dict_blob_sources(dicts: Sequence[ChunkDict], result: BuildResult, target, tmp: Path) -> dict:
    """digest → ExternalBlob for the dictionary blobs the image references: a cross-repository
    mount when the dictionary lives in the target's registry, else an upload from the
    dictionary's layout file or (only if the target lacks it) a download from its registry."""
    from converter.push import ExternalBlob
    out = {}
    for info in result.dict_blobs:
        chunk_dict = _owner(dicts, info.id)
        path = chunk_dict.local_path(info)
        if path is not None:
            if not path.is_file():
                raise BlobNotFoundError(f"--chunk-dict {chunk_dict.name}: blob {info.id} is missing from "
                                        f"{chunk_dict.layout_dir}")
            out[info.id] = ExternalBlob(path)
            continue
        ref = chunk_dict.reference
        assert ref is not None                  # no layout: a registry dictionary
        same = ref.api_host == target.api_host
        out[info.id] = ExternalBlob(functools.partial(chunk_dict.fetch_blob, info, tmp),
                                    mount_from=(ref.repository,) if same else ())
    return out


def _total(image: SourceImage) -> int:
    return sum(layer.size for layer in image.layers)
