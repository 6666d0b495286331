"""Writes the converted image into an OCI layout dir, all-or-nothing.

Everything is first written to a staging layout next to the target. `commit()` either renames
the staging dir into place (new target) or moves its blobs into the existing layout and then
swaps index.json atomically (existing target). Any failure before that removes the staging
dir, so a failed conversion leaves the target exactly as it was.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

from nydus_py import __version__
from nydus_py.format.bootstrap import compress_layer
from nydus_py.oci import mediatypes as mt
from nydus_py.errors import ConfigError, NydusError
from nydus_py.oci.layout import Descriptor, OCILayout, OCILayoutWriter


class Staging:
    def __init__(self, target: Path):
        self.target = target
        self.dir = target.parent / f".{target.name}.nydus-py-staging-{os.getpid()}"
        self.layout: OCILayoutWriter | None = None
        self.work_dir = self.dir / "tmp"

    def __enter__(self) -> "Staging":
        if self.target.exists() and not (self.target / "oci-layout").exists():
            if any(self.target.iterdir()):
                raise ConfigError(f"target {self.target}: exists and is not an OCI layout dir")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.layout = OCILayoutWriter(self.dir)
        self.work_dir.mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def commit(self, manifest: Descriptor, tag: str | None) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)
        if not self.target.exists() or not any(self.target.iterdir()):
            if self.target.exists():
                self.target.rmdir()
            assert self.layout is not None, "commit() inside the with block"
            self.layout.tag(manifest, tag)
            os.rename(self.dir, self.target)
            return
        dest = OCILayoutWriter(self.target)
        src_blobs = self.dir / "blobs"
        for algo in sorted(os.listdir(src_blobs)):
            for name in sorted(os.listdir(src_blobs / algo)):
                d = f"{algo}:{name}"
                p = src_blobs / algo / name
                dest.adopt_file(p, d, p.stat().st_size, "")
        dest.tag(manifest, tag)

    def target_has_blob(self, digest: str) -> bool:
        """Whether the existing target layout already holds the blob (commit keeps it)."""
        if not (self.target / "oci-layout").is_file():
            return False
        try:
            return OCILayout(self.target).has_blob(digest)
        except NydusError:
            return False


def write_image(layout: OCILayoutWriter, result, source, *, chunk_size: int, compressor: str,
                extra_annotations: dict[str, str] | None = None, external_blobs: str | None = None
                ) -> Descriptor:
    """Blobs + bootstrap layer + config + manifest into `layout`; returns the manifest descriptor.
    `external_blobs` (a backend type, e.g. "s3"): the data blobs were stored there instead, so
    the manifest lists only the bootstrap (registries refuse manifests naming absent blobs).
    Chunk-dictionary blobs the image references (`result.dict_blobs`) come first, as layers
    annotated `io.nydus-py.chunk-dict`; their files are the caller's business (copied into the
    layout, or pushed to the registry), so that the image stays self-contained."""
    from converter.chunk_dict import blob_descriptor
    layers: list[Descriptor] = [] if external_blobs else [blob_descriptor(b) for b in result.dict_blobs]
    for b in ([] if external_blobs else result.blobs):
        ann = {mt.ANNO_BLOB: "true", mt.ANNO_SOURCE_LAYER: b.source_layer,
               mt.ANNO_UNCOMPRESSED_SIZE: str(b.uncompressed_size), mt.ANNO_CHUNK_COUNT: str(b.chunk_count)}
        layers.append(layout.adopt_file(b.path, b.digest, b.size, mt.NYDUS_PY_BLOB, ann))
    boot = compress_layer(result.bootstrap)
    layers.append(layout.put_bytes(boot, mt.NYDUS_PY_BOOTSTRAP, {
        mt.ANNO_BOOTSTRAP: "true", mt.ANNO_VERSION: __version__,
        mt.ANNO_UNCOMPRESSED_SIZE: str(len(result.bootstrap))}))
    config = copy.deepcopy(source.config)
    # The image's layers are no longer tars: their "diff ids" are the blobs' own digests (as
    # upstream Nydus does), and the source history no longer lines up, so it is dropped.
    config["rootfs"] = {"type": "layers", "diff_ids": [d.digest for d in layers]}
    config.pop("history", None)
    config_desc = layout.put_json(config, mt.OCI_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "config": config_desc.to_json(),
        "layers": [d.to_json() for d in layers],
        "annotations": {
            mt.ANNO_VERSION: __version__,
            "io.nydus-py.chunk-size": str(chunk_size),
            "io.nydus-py.compressor": compressor,
            **({"io.nydus-py.blob-backend": external_blobs} if external_blobs else {}),
            **(extra_annotations or {}),
        },
    }
    if source.manifest_desc is not None:
        s = source.manifest_desc
        manifest["subject"] = {"mediaType": s.media_type, "digest": s.digest, "size": s.size}
    return layout.put_json(manifest, mt.OCI_MANIFEST)
