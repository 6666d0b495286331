"""`nydusify convert`: source image → builder → target layout, all-or-nothing."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from converter import layer as tarlayer
from converter.builder import Builder, BuildOptions, BuildResult, ProgressFn
from converter.source import SourceRef, open_source
from converter.target import Staging, write_image
from nydus_py.errors import ConfigError
from nydus_py.oci.layout import Descriptor


@dataclass
class ConvertResult:
    manifest: Descriptor
    build: BuildResult
    source_compressed: int
    seconds: float


def convert(source: SourceRef, target: SourceRef, options: BuildOptions, *,
            platform: str | None = None, progress: ProgressFn | None = None,
            on_image: "callable | None" = None) -> ConvertResult:
    if target.transport != "oci":
        raise ConfigError(f"target {target}: only oci:DIR[:TAG] targets are supported here")
    t0 = time.monotonic()
    image = open_source(source, platform)
    if on_image:
        on_image(image)
    with Staging(Path(target.path)) as staging:
        builder = Builder(options, staging.work_dir, progress)
        for layer in image.layers:
            # iter_entries reads the stream to EOF, so the digest and diff_id checks have fired
            # (or raised) by the time add_layer returns.
            stream = image.open_layer_tar(layer, max_uncompressed=options.max_layer_size)
            builder.add_layer(tarlayer.iter_entries(stream, layer.what), layer.index, layer.digest,
                              layer.what)
            if progress:
                progress("layer", 1)
        result = builder.finish()
        manifest = write_image(staging.layout, result, image, chunk_size=options.chunk_size,
                               compressor=options.compressor)
        staging.commit(manifest, target.reference)
    return ConvertResult(manifest, result, sum(l.size for l in image.layers), time.monotonic() - t0)

