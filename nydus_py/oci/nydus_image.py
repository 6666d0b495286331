"""The shape of a converted image: an OCI manifest whose layers are the data blobs followed by
one bootstrap layer (zstd-compressed msgpack, see format.bootstrap.compress_layer). Both the converter (writes) and the daemon and
snapshotter (read) go through here, so the convention lives in one place (docs/format.md)."""

from __future__ import annotations

from dataclasses import dataclass

from nydus_py.errors import ImageFormatError
from nydus_py.oci import mediatypes as mt
from nydus_py.oci.layout import Descriptor

# Marks the converted manifest in a merged index (nydusify --merge-platform): platform matchers
# that don't know it pick the original image; ours look for it (image-spec: os.features is for
# such extensions).
NYDUS_OS_FEATURE = "nydus-py.remoteimage.v1"


@dataclass(frozen=True)
class NydusLayers:
    bootstrap: Descriptor
    blobs: list[Descriptor]


def find_layers(manifest: dict, what: str) -> NydusLayers:
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not layers:
        raise ImageFormatError(f"{what}: manifest has no layers")
    descs = [Descriptor.from_json(d, what) for d in layers]
    boot = [d for d in descs if d.media_type == mt.NYDUS_PY_BOOTSTRAP]
    if len(boot) != 1 or descs[-1].media_type != mt.NYDUS_PY_BOOTSTRAP:
        raise ImageFormatError(f"{what}: not a nydus-py image (no {mt.NYDUS_PY_BOOTSTRAP} layer last)")
    blobs = [d for d in descs[:-1] if d.media_type == mt.NYDUS_PY_BLOB]
    if len(blobs) != len(descs) - 1:
        raise ImageFormatError(f"{what}: unexpected layer media types in a nydus-py image")
    return NydusLayers(boot[0], blobs)
