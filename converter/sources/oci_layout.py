"""`oci:DIR[:TAG]`: an OCI image layout directory."""

from __future__ import annotations

from converter.sources.base import ImageBase, LayerInfo, SourceImage, SourceRef
from converter.sources.resolve import resolve_image
from nydus_py.oci.digest import VerifyingReader
from nydus_py.oci.layout import OCILayout


class OCILayoutImage(ImageBase):
    def __init__(self, layout: OCILayout, **kw):
        super().__init__(**kw)
        self._layout = layout

    def open_layer(self, layer: LayerInfo) -> VerifyingReader:
        assert layer.descriptor is not None   # resolve_image sets it
        return self._layout.open_blob(layer.descriptor, layer.what)


def open_oci(ref: SourceRef, platform: str | None) -> SourceImage:
    layout = OCILayout(ref.path)
    desc = layout.resolve(ref.reference)
    return resolve_image(str(ref), desc, layout.read_blob, platform,
                         lambda **kw: OCILayoutImage(layout, **kw))
