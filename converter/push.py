"""Pushing a converted image from a local OCI layout to a registry.

Blobs first (concurrently; ones the target already has are skipped by HEAD, ones in another
repository of the same registry are cross-mounted), the manifest last, so a tag never points
at missing content. With `merge_platform`, an index holding the source manifest and the
converted one is pushed under the tag, as nydusify's --merge-platform does.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from converter.sources import SourceImage
from nydus_py.oci import mediatypes as mt
from nydus_py.oci.layout import Descriptor, OCILayout, canonical_json
from nydus_py.oci.nydus_image import NYDUS_OS_FEATURE
from nydus_py.oci.reference import Reference
from nydus_py.oci.registry import RegistryClient, RepositorySink
from nydus_py.oci.upload import BlobSource

Progress = Callable[[str, int], None]


@dataclass(frozen=True)
class ExternalBlob:
    """A layer of the manifest that is not in the local layout (a chunk-dictionary blob):
    `src` is a file path, or a callable giving one, called only if the blob must be uploaded
    (after HEAD said absent and no cross-repository mount from `mount_from` worked)."""
    src: BlobSource
    mount_from: tuple[str, ...] = ()


def push_converted(layout_dir: Path, manifest: Descriptor, target: Reference, client: RegistryClient, *,
                   source_image: SourceImage | None = None, merge_platform: bool = False, concurrency: int = 3,
                   progress: Progress | None = None, external: dict[str, ExternalBlob] | None = None) -> str:
    """Returns the digest that the target tag now names. `external`: digest → where to get the
    layers that are not in `layout_dir` (chunk-dictionary blobs)."""
    layout = OCILayout(layout_dir)
    doc = layout.read_json(manifest, "converted manifest")
    blobs = [Descriptor.from_json(d, "layer") for d in [doc["config"], *doc["layers"]]]
    progress = progress or (lambda event, n: None)
    repo = target.repository

    external = external or {}
    sink = RepositorySink(client, repo)

    def push_one(desc: Descriptor) -> str:
        ext = external.get(desc.digest)
        if ext is not None:
            result = client.push_blob(repo, ext.src, desc.digest, desc.size, mount_from=ext.mount_from)
        else:
            result = sink.put_blob(desc.digest, layout.blob_path(desc.digest))
        progress("pushed", desc.size)
        return result

    # a source without a manifest blob of its own (docker-archive) cannot be part of an index
    merge = (source_image if merge_platform and source_image is not None
             and source_image.manifest_desc is not None and source_image.manifest_bytes is not None else None)
    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="push") as pool:
        list(pool.map(push_one, blobs))
        if merge is not None:
            _push_source(merge, target, client, pool)
    ref = target.tag or target.digest or "latest"
    manifest_bytes = layout.read_blob(manifest, "converted manifest")
    if merge is None or merge.manifest_desc is None:
        return client.put_manifest(repo, ref, manifest_bytes, manifest.media_type)
    pushed = client.put_manifest(repo, manifest.digest, manifest_bytes, manifest.media_type)
    platform = _platform_of(merge.config)
    src = merge.manifest_desc
    index = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_INDEX,
        "manifests": [
            {"mediaType": src.media_type, "digest": src.digest, "size": src.size, "platform": platform},
            {"mediaType": manifest.media_type, "digest": pushed, "size": manifest.size,
             "platform": {**platform, "os.features": [NYDUS_OS_FEATURE]}},
        ],
    }
    return client.put_manifest(repo, ref, canonical_json(index), mt.OCI_INDEX)


def _platform_of(config: dict) -> dict:
    p = {"architecture": config.get("architecture", "amd64"), "os": config.get("os", "linux")}
    if config.get("variant"):
        p["variant"] = config["variant"]
    return p


def _push_source(image: SourceImage, target: Reference, client: RegistryClient, pool: ThreadPoolExecutor) -> None:
    """Makes the source manifest and its blobs exist in the target repository."""
    repo = target.repository
    descs = [Descriptor.from_json(image.manifest["config"], "config")] + [
        Descriptor(l.media_type, l.digest, l.size) if l.descriptor is None else l.descriptor for l in image.layers]
    origin = image.origin
    mount_from = [origin.repository] if origin is not None and origin.host == client.config.host else []

    def copy(desc: Descriptor) -> None:
        if client.head_blob(repo, desc.digest) is not None:
            return
        with tempfile.TemporaryDirectory(prefix="nydusify-copy-") as tmp:
            path = Path(tmp) / "blob"
            if desc.digest == descs[0].digest:
                path.write_bytes(image.config_bytes)
            else:
                layer = next(l for l in image.layers if l.digest == desc.digest)
                with image.open_layer(layer) as src, open(path, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
            client.push_blob(repo, path, desc.digest, desc.size, mount_from=mount_from)

    list(pool.map(copy, descs))
    assert image.manifest_desc is not None and image.manifest_bytes is not None   # checked by the caller
    client.put_manifest(repo, image.manifest_desc.digest, image.manifest_bytes, image.manifest_desc.media_type)
