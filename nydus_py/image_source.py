"""Open a converted image for mounting: its bootstrap, and a backend that serves its blobs.

Two ways to name an image:
  - `oci:DIR[:TAG]`: an OCI image layout holding a converted image. The manifest's last layer
    is the bootstrap (read and digest-verified here); the data blobs are read lazily from the
    same directory (`DIR/blobs/sha256/<hex>`) through LocalFsBackend.
  - a bootstrap file (plain or zstd msgpack) plus a directory of blobs (`<dir>/<hex>` or an
    OCI layout's `blobs/sha256/<hex>`), or any backend the config names.

Every failure is a NydusError whose one-line message names the file or image involved.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from nydus_py.errors import BlobNotFoundError, ConfigError, FormatError, ImageFormatError
from nydus_py.format.bootstrap import MAX_BOOTSTRAP, Bootstrap
from nydus_py.oci import mediatypes as mt
from nydus_py.oci.layout import Descriptor, OCILayout
from nydus_py.oci.nydus_image import find_layers
from nydus_py.metrics import Metrics
from nydus_py.storage.config import BackendConfig, LocalFsConfig
from nydus_py.storage.factory import make_backend

OCI_PREFIX = "oci:"


@dataclass
class OpenedImage:
    bootstrap: Bootstrap
    backend: object                 # a BlobBackend (storage/backend.py)
    description: str                # for log lines: "oci:/path:tag" or the bootstrap path


def parse_oci_ref(ref: str) -> tuple[Path, str | None]:
    """`oci:DIR[:TAG]` → (DIR, TAG or None). A DIR that itself contains ':' works as long as
    it exists; the tag is the text after the last ':' when the rest names a directory."""
    if not ref.startswith(OCI_PREFIX):
        raise ConfigError(f"image {ref!r}: expected oci:DIR[:TAG]")
    rest = ref[len(OCI_PREFIX):]
    if not rest:
        raise ConfigError(f"image {ref!r}: missing directory after 'oci:'")
    head, sep, tag = rest.rpartition(":")
    if sep and head and "/" not in tag and not os.path.isdir(rest):
        if not tag:
            raise ConfigError(f"image {ref!r}: empty tag")
        return Path(head), tag
    return Path(rest), None


def _localfs(dir: Path, alt_dirs=(), metrics: Metrics | None = None):
    config = BackendConfig(type="localfs", localfs=LocalFsConfig(dir=str(dir), alt_dirs=list(alt_dirs)))
    return make_backend(config, metrics=metrics)


def open_oci(ref: str, *, metrics: Metrics | None = None) -> OpenedImage:
    root, tag = parse_oci_ref(ref)
    if not root.is_dir():
        raise ImageFormatError(f"{root}: no such directory (image {ref})")
    layout = OCILayout(root)
    manifest = _manifest(layout, layout.resolve(tag), ref)
    layers = find_layers(manifest, ref)
    data = layout.read_blob(layers.bootstrap, f"{ref}: bootstrap layer", limit=MAX_BOOTSTRAP)
    try:
        bootstrap = Bootstrap.from_bytes(data)
    except FormatError as e:
        raise FormatError(f"{ref}: {e}") from None
    present = {d.digest for d in layers.blobs}
    for blob in bootstrap.blobs:
        if blob.id not in present and not layout.has_blob(blob.id):
            raise BlobNotFoundError(f"{ref}: bootstrap refers to blob {blob.id}, which is not in {root}")
    for d in layers.blobs:
        if not layout.has_blob(d.digest):
            raise BlobNotFoundError(f"{ref}: data blob {d.digest} is missing from {root}")
    return OpenedImage(bootstrap, _localfs(root, metrics=metrics), ref)


def _manifest(layout: OCILayout, desc: Descriptor, ref: str) -> dict:
    """The image manifest for `desc`, descending one level into an index if need be."""
    if desc.media_type in mt.INDEX_TYPES:
        index = layout.read_json(desc, f"{ref}: index {desc.digest}")
        entries = [Descriptor.from_json(m, ref) for m in index.get("manifests") or []]
        entries = [e for e in entries if e.media_type in mt.MANIFEST_TYPES]
        linux = [e for e in entries if (e.platform or {}).get("os") in (None, "linux")]
        if len(linux) != 1:
            raise ImageFormatError(f"{ref}: index lists {len(linux)} manifests; expected one converted image")
        desc = linux[0]
    elif desc.media_type not in mt.MANIFEST_TYPES:
        raise ImageFormatError(f"{ref}: unsupported media type {desc.media_type!r}")
    return layout.read_json(desc, f"{ref}: manifest {desc.digest}")


def open_bootstrap(bootstrap_path: str | os.PathLike, backend: BackendConfig, *,
                   metrics: Metrics | None = None) -> OpenedImage:
    """A bootstrap file and the configured backend that holds its blobs."""
    bootstrap = Bootstrap.from_file(bootstrap_path)
    return OpenedImage(bootstrap, make_backend(backend, metrics=metrics), str(bootstrap_path))


def open_local(bootstrap_path: str | os.PathLike, blob_dir: str | os.PathLike, alt_dirs=(), *,
               metrics: Metrics | None = None) -> OpenedImage:
    """A bootstrap file and a directory of blobs (`<hex>` or `blobs/sha256/<hex>`)."""
    blob_dir = Path(blob_dir)
    if not blob_dir.is_dir():
        raise ConfigError(f"{blob_dir}: blob directory does not exist")
    bootstrap = Bootstrap.from_file(bootstrap_path)
    return OpenedImage(bootstrap, _localfs(blob_dir, alt_dirs, metrics), str(bootstrap_path))
