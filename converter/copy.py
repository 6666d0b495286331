"""`nydusify copy`: a converted image with every blob it needs, registry → registry, registry →
OCI layout, layout → registry or layout → layout.

The manifest is copied byte for byte (same digest); each blob is verified against its digest
on the way. From a merged index (--merge-platform) the converted entry is taken. A layout
target is written all-or-nothing (converter/target.py's Staging); a registry target gets its
blobs first and the manifest last (converter/push.py), so the tag never names missing content.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from converter.sources import RegistryOptions, SourceRef, parse_source
from nydus_py.errors import ConfigError, ImageFormatError
from nydus_py.oci import mediatypes as mt
from nydus_py.oci.layout import Descriptor, OCILayout, OCILayoutWriter, json_object
from nydus_py.oci.nydus_image import find_layers
from nydus_py.oci.reference import parse as parse_reference


@dataclass
class CopyResult:
    manifest: Descriptor
    blobs: int
    bytes: int
    pushed_digest: str | None = None


def copy_image(source: str, target: str, *, source_registry: RegistryOptions | None = None,
               target_registry: RegistryOptions | None = None) -> CopyResult:
    src, dst = parse_source(source), parse_source(target)
    if src.transport not in ("oci", "docker") or dst.transport not in ("oci", "docker"):
        raise ConfigError("copy: source and target are oci:DIR[:TAG] or registry references")
    source_registry = source_registry or RegistryOptions()
    target_registry = target_registry or source_registry
    with tempfile.TemporaryDirectory(prefix="nydusify-copy-", dir=target_registry.work_dir) as tmp:
        if dst.transport == "oci":
            from converter.target import Staging
            with Staging(Path(dst.path)) as staging:
                assert staging.layout is not None
                desc, n, total = _fetch(src, source, staging.layout, source_registry)
                staging.commit(desc, dst.reference)
            return CopyResult(desc, n, total)
        layout = OCILayoutWriter(Path(tmp) / "oci")
        desc, n, total = _fetch(src, source, layout, source_registry)
        from converter.push import push_converted
        ref = parse_reference(dst.path)
        with target_registry.client(ref) as client:
            pushed = push_converted(Path(tmp) / "oci", desc, ref, client,
                                    concurrency=target_registry.concurrency)
        return CopyResult(desc, n, total, pushed)


def _check(manifest: dict, what: str) -> list[Descriptor]:
    """The blobs of a converted image's manifest (config first), refusing what cannot be copied."""
    find_layers(manifest, what)
    backend = (manifest.get("annotations") or {}).get("io.nydus-py.blob-backend")
    if backend:
        raise ConfigError(f"{what}: its data blobs are in {backend} (converted with --backend-type "
                          f"{backend}), not in the image; copying them is not supported")
    return [Descriptor.from_json(manifest.get("config") or {}, what)] + \
        [Descriptor.from_json(d, what) for d in manifest["layers"]]


def _fetch(src: SourceRef, what: str, out: OCILayoutWriter, options: RegistryOptions
           ) -> tuple[Descriptor, int, int]:
    if src.transport == "oci":
        from nydus_py.image_source import converted_entry
        layout = OCILayout(Path(src.path))
        desc = layout.resolve(src.reference)
        if desc.media_type in mt.INDEX_TYPES:
            index = layout.read_json(desc, f"{what}: index")
            desc = converted_entry(index, what) if _merged(index) else _only(index, what)
        data = layout.read_blob(desc, f"{what}: manifest")
        blobs = _check(json_object(data, f"{what}: manifest"), what)
        for b in blobs:
            body = layout.open_blob(b, f"{what}: blob {b.digest}")
            try:
                _adopt(out, body, b)
            finally:
                body.close()
        return out.put_bytes(data, desc.media_type), len(blobs), sum(b.size for b in blobs)
    ref = parse_reference(src.path)
    with options.client(ref) as client:
        data, media_type, digest = client.get_manifest(ref.repository, ref.digest or ref.tag or "latest")
        if media_type in mt.INDEX_TYPES:
            from nydus_py.image_source import converted_entry
            index = json_object(data, f"{what}: index")
            entry = converted_entry(index, what) if _merged(index) else _only(index, what)
            data, media_type, digest = client.get_manifest(ref.repository, entry.digest)
        blobs = _check(json_object(data, f"{what}: manifest {digest}"), what)
        for b in blobs:
            with client.get_blob(ref.repository, b.digest, b.size) as body:
                _adopt(out, body, b)
    return out.put_bytes(data, media_type), len(blobs), sum(b.size for b in blobs)


def _merged(index: dict) -> bool:
    from nydus_py.oci.nydus_image import NYDUS_OS_FEATURE
    return any(NYDUS_OS_FEATURE in ((m.get("platform") or {}).get("os.features") or [])
               for m in index.get("manifests") or [] if isinstance(m, dict))


def _only(index: dict, what: str) -> Descriptor:
    entries = [Descriptor.from_json(m, what) for m in index.get("manifests") or []]
    entries = [e for e in entries if e.media_type in mt.MANIFEST_TYPES]
    if len(entries) != 1:
        raise ImageFormatError(f"{what}: index lists {len(entries)} manifests; expected one converted image")
    return entries[0]


def _adopt(out: OCILayoutWriter, body, desc: Descriptor) -> None:
    """Streams a blob (a verifying reader: a wrong digest raises at EOF) into the layout."""
    path = out.root / ".blob.part"      # same filesystem as blobs/, for the rename
    with open(path, "wb") as f:
        shutil.copyfileobj(body, f, 1 << 20)
    out.adopt_file(path, desc.digest, desc.size, desc.media_type)
