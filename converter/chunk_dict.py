"""`nydusify convert --chunk-dict SRC`: an earlier nydus-py image whose chunks are referenced,
not stored again.

SRC (nydusify's spelling with a `bootstrap:` prefix works too):
    oci:DIR[:TAG]          | bootstrap:oci:DIR[:TAG]        an OCI layout holding the image
    HOST/REPO[:TAG|@DIGEST] | bootstrap:registry:REF         a registry

The dictionary's bootstrap gives every chunk's digest and where it lives (blob + offsets); the
builder registers them before the first layer (Builder.add_chunk_dict). The converted image
must stay self-contained, so the dictionary blobs it references become layers of its manifest:
`fetch_blob` copies one (verified) into an OCI layout target, `blob_source` gives push.py what
to upload when a cross-repository mount is not possible.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from converter.sources import RegistryOptions
from nydus_py.errors import BlobNotFoundError, ConfigError, ImageFormatError, NydusError
from nydus_py.format.bootstrap import BlobInfo, Bootstrap
from nydus_py.oci import mediatypes as mt
from nydus_py.oci.layout import Descriptor, OCILayout
from nydus_py.oci.nydus_image import find_layers
from nydus_py.oci.reference import Reference, parse as parse_reference

ANNO_CHUNK_DICT = "io.nydus-py.chunk-dict"


@dataclass(frozen=True)
class ChunkDictRef:
    transport: str            # "oci" (path = "oci:DIR[:TAG]") or "docker" (path = reference)
    path: str


def parse_chunk_dict(text: str) -> ChunkDictRef:
    s = text.strip()
    if not s:
        raise ConfigError("--chunk-dict: empty")
    if s.startswith("bootstrap:"):
        kind, sep, rest = s[len("bootstrap:"):].partition(":")
        if not sep or not rest:
            raise ConfigError(f"--chunk-dict {text}: expected bootstrap:registry:REF or bootstrap:oci:DIR[:TAG]")
        if kind == "registry":
            s = rest
        elif kind == "oci":
            s = "oci:" + rest
        elif kind == "local":
            raise ConfigError(f"--chunk-dict {text}: a bare bootstrap file is not enough (its blobs must "
                              f"be copied into the new image); name the image: oci:DIR[:TAG] or HOST/REPO:TAG")
        else:
            raise ConfigError(f"--chunk-dict {text}: unknown source {kind!r} (registry or oci)")
    if s.startswith("oci:"):
        if s == "oci:":
            raise ConfigError(f"--chunk-dict {text}: missing directory after 'oci:'")
        return ChunkDictRef("oci", s)
    if s.startswith("docker://"):
        s = s[len("docker://"):]
    try:
        return ChunkDictRef("docker", str(parse_reference(s)))
    except ConfigError as e:
        raise ConfigError(f"--chunk-dict: {e}") from None


@dataclass
class ChunkDict:
    name: str                              # as the user wrote it, for messages
    bootstrap: Bootstrap
    layout_dir: Path | None = None         # an OCI layout holding the blobs, or
    reference: Reference | None = None     # a registry repository holding them
    registry: RegistryOptions | None = None
    external: str = ""                     # or: its blobs live in this backend (e.g. "s3"), not the image

    def fetch_blob(self, info: BlobInfo, dest_dir: Path) -> Path:
        """Copies one of the dictionary's blobs into a temp file under dest_dir, verified against
        its digest and size; returns the path."""
        desc = Descriptor(mt.NYDUS_PY_BLOB, info.id, info.compressed_size)
        what = f"--chunk-dict {self.name}: blob {info.id}"
        if self.external:
            raise BlobNotFoundError(f"{what} lives in the dictionary's {self.external} backend, "
                                    f"not in the image")
        fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix="dict-blob-")
        try:
            with os.fdopen(fd, "wb") as out:
                if self.layout_dir is not None:
                    src = OCILayout(self.layout_dir).open_blob(desc, what)
                    try:
                        shutil.copyfileobj(src, out, 1 << 20)
                        src.finish()
                    finally:
                        src.close()
                else:
                    ref = self.reference
                    if self.registry is None or ref is None:
                        raise ConfigError(f"{what}: the dictionary has neither a layout nor a registry")
                    with self.registry.client(ref) as client, \
                            client.get_blob(ref.repository, info.id, info.compressed_size) as src:
                        shutil.copyfileobj(src, out, 1 << 20)
                        src.finish()
        except BaseException:
            os.unlink(tmp)
            raise
        return Path(tmp)

    def local_path(self, info: BlobInfo) -> Path | None:
        """The blob's file when the dictionary is an OCI layout (used as-is for uploads)."""
        return OCILayout(self.layout_dir).blob_path(info.id) if self.layout_dir is not None else None


def blob_descriptor(info: BlobInfo) -> Descriptor:
    """The manifest layer for a dictionary blob the image references: a data blob like the
    image's own, marked as coming from a chunk dictionary (it has no source layer)."""
    return Descriptor(mt.NYDUS_PY_BLOB, info.id, info.compressed_size, {
        mt.ANNO_BLOB: "true", ANNO_CHUNK_DICT: "true",
        mt.ANNO_UNCOMPRESSED_SIZE: str(info.uncompressed_size),
        mt.ANNO_CHUNK_COUNT: str(info.chunk_count)})


def open_chunk_dict(text: str, registry: RegistryOptions, *, insecure: bool = False,
                    blob_backend: str | None = None) -> ChunkDict:
    """Reads the dictionary image's bootstrap. Every failure is one line naming the dictionary;
    an image that is not a nydus-py image says so. `blob_backend` (the target's
    --backend-type, e.g. "s3"): a dictionary whose blobs live in that backend type is accepted
    (the target's store must then hold them; convert checks)."""
    ref = parse_chunk_dict(text)
    try:
        if ref.transport == "oci":
            return _open_oci(text, ref.path, blob_backend)
        if insecure:
            registry = RegistryOptions(plain_http=True, skip_verify=True, ca_file=registry.ca_file,
                                       work_dir=registry.work_dir, concurrency=registry.concurrency)
        return _open_registry(text, parse_reference(ref.path), registry, blob_backend)
    except NydusError as e:
        msg = f"--chunk-dict: {e}"
        if "not a nydus-py image" in msg:
            msg += "; a chunk dictionary is an image converted by nydusify"
        raise e.__class__(msg, permanent=e.permanent, errno=e.errno) from None


def _open_oci(name: str, ref: str, blob_backend: str | None = None) -> ChunkDict:
    from nydus_py.image_source import open_oci, parse_oci_ref
    from nydus_py.storage.backend import close_backend
    external = _check_nydus_manifest_oci(ref, blob_backend)
    if external:
        return ChunkDict(name, _oci_bootstrap(ref), external=external)
    opened = open_oci(ref)   # also proves every blob the bootstrap names is in the layout
    close_backend(opened.backend)
    return ChunkDict(name, opened.bootstrap, layout_dir=parse_oci_ref(ref)[0])


def _check_nydus_manifest_oci(ref: str, blob_backend: str | None = None) -> str:
    from nydus_py.image_source import layout_manifest, parse_oci_ref
    root, tag = parse_oci_ref(ref)
    if not root.is_dir():
        raise ImageFormatError(f"{ref}: no such directory {root}")
    layout = OCILayout(root)
    return _check_external(layout_manifest(layout, layout.resolve(tag), ref), ref, blob_backend)


def _oci_bootstrap(ref: str) -> Bootstrap:
    from nydus_py.image_source import MAX_BOOTSTRAP, layout_manifest, parse_oci_ref
    root, tag = parse_oci_ref(ref)
    layout = OCILayout(root)
    layers = find_layers(layout_manifest(layout, layout.resolve(tag), ref), ref)
    data = layout.read_blob(layers.bootstrap, f"{ref}: bootstrap layer", limit=MAX_BOOTSTRAP)
    return Bootstrap.from_bytes(data)


def _open_registry(name: str, r: Reference, options: RegistryOptions,
                   blob_backend: str | None = None) -> ChunkDict:
    from nydus_py.image_source import fetch_registry_image
    what = str(r)
    with options.client(r) as c:
        manifest, layers, bootstrap = fetch_registry_image(c, r, what)
    external = _check_external(manifest, what, blob_backend)
    if external:
        return ChunkDict(name, bootstrap, external=external)
    listed = {d.digest for d in layers.blobs}
    for blob in bootstrap.blobs:
        if blob.id not in listed:
            raise ImageFormatError(f"{what}: bootstrap refers to blob {blob.id}, which its manifest does not list")
    return ChunkDict(name, bootstrap, reference=r, registry=options)


def _check_external(manifest: dict, what: str, blob_backend: str | None = None) -> str:
    """The backend type holding the image's blobs when they are outside it ("" when inside)."""
    find_layers(manifest, what)   # "not a nydus-py image" for anything else
    backend = (manifest.get("annotations") or {}).get("io.nydus-py.blob-backend")
    if backend and backend != blob_backend:
        raise ConfigError(f"{what}: its data blobs live in {backend}, outside the image; "
                          f"a chunk dictionary must carry its blobs (or convert with "
                          f"--backend-type {backend})")
    return backend or ""
