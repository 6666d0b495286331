"""What every source transport gives the converter: the `SourceImage` protocol and its parts.

A transport module (oci_layout, docker_archive, registry) opens a reference and returns an
object that satisfies `SourceImage`; most build it on `ImageBase`, which supplies the
uncompressed, diff_id-verified layer stream. Integrity: every blob is verified against the
digest that names it, manifests and configs when read, layers at EOF of `open_layer()`
(compressed digest + size); `open_layer_tar()` also checks the uncompressed stream against the
config's diff_id (as umoci does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Self

from converter.decompress import open_layer_stream
from nydus_py.oci import digest as dg
from nydus_py.oci import mediatypes as mt
from nydus_py.oci.layout import Descriptor


@dataclass(frozen=True)
class SourceRef:
    transport: str            # "oci" | "docker-archive" | "docker" (registry; path = reference)
    path: str
    reference: str | None = None

    def __str__(self) -> str:
        if self.transport == "docker":
            return self.path
        return f"{self.transport}:{self.path}" + (f":{self.reference}" if self.reference else "")


@dataclass(frozen=True)
class LayerInfo:
    index: int                # position in the manifest, from 0 (as Inode.layer)
    digest: str               # of the blob as stored (compressed)
    media_type: str
    size: int
    diff_id: str | None       # sha256 of the uncompressed tar, from config rootfs.diff_ids
    descriptor: Descriptor | None = field(default=None, compare=False)
    count: int = 0            # layers in the image, for messages

    @property
    def what(self) -> str:
        """`layer 2/5 (sha256:0123456789ab…)`: counted from 1, as users count."""
        n = f"{self.index + 1}/{self.count}" if self.count else f"{self.index + 1}"
        return f"layer {n} ({self.digest[:19]}…)"



@dataclass(frozen=True)
class RegistryOrigin:
    """Where a registry source lives, so that a push to the same registry can mount its blobs
    across repositories instead of uploading them."""
    host: str
    repository: str


class SourceImage(Protocol):
    """An opened source image. `open_layer()` streams one compressed layer blob whose digest
    and size are verified when it is read to EOF; `open_layer_tar()` gives the uncompressed
    tar stream (bomb-limited) with the diff_id verified too. `origin` is set by registry
    sources only."""
    name: str
    manifest_desc: Descriptor | None
    manifest: dict
    config: dict
    config_bytes: bytes
    layers: list[LayerInfo]
    manifest_bytes: bytes | None            # exact bytes, when the source has a manifest blob
    origin: RegistryOrigin | None

    def open_layer(self, layer: LayerInfo) -> Any: ...

    def open_layer_tar(self, layer: LayerInfo, *, max_uncompressed: int = ...) -> Any: ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *exc: object) -> None: ...


class ImageBase:
    """The parts of a SourceImage that are the same for every transport; a transport adds
    `open_layer`."""

    origin: RegistryOrigin | None = None

    def __init__(self, *, name: str, manifest_desc: Descriptor | None, manifest: dict,
                 config: dict, config_bytes: bytes, layers: list[LayerInfo]):
        self.name = name
        self.manifest_desc = manifest_desc
        self.manifest = manifest
        self.config = config
        self.config_bytes = config_bytes
        self.layers = layers
        self.manifest_bytes: bytes | None = None

    def open_layer(self, layer: LayerInfo) -> Any:
        raise NotImplementedError

    def open_layer_tar(self, layer: LayerInfo, *, max_uncompressed: int = 64 << 30) -> Any:
        stream = open_layer_stream(self.open_layer(layer), layer.media_type, layer.what,
                                   max_uncompressed=max_uncompressed)
        if layer.diff_id and not (layer.diff_id == layer.digest and layer.media_type in mt.TAR_LAYERS):
            stream = verify_diff_id(stream, layer)
        return stream

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def verify_diff_id(stream: Any, layer: LayerInfo) -> dg.VerifyingReader:
    """Wrap an uncompressed layer stream: at EOF its sha256 must equal the layer's diff_id."""
    assert layer.diff_id is not None
    return dg.VerifyingReader(stream, layer.diff_id, None, f"{layer.what}: uncompressed tar (diff_id)")
