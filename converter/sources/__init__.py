"""Source images for `nydusify convert`: a skopeo-style reference → manifest, config, layers.

Transports (skopeo syntax), one module each, all returning a `SourceImage` (base.py):
    oci:DIR[:TAG]                    oci_layout.py: an OCI image layout directory (DIR has no colon)
    docker-archive:FILE[:REF]        docker_archive.py: a `docker save` tarball; REF is a RepoTag
                                     (`busybox:latest`) or `@N` (Nth image)
    [docker://]HOST/REPO[:TAG|@DIGEST]  registry.py: a registry
A new transport is one module, one entry in `refs._PARSERS` (its syntax) and one in `_OPENERS`.
Shared: base.py (the protocol, LayerInfo, the diff_id-verified tar stream), resolve.py (index →
platform manifest, manifest and config checks), refs.py (parsing references).
"""

from __future__ import annotations

from collections.abc import Callable

from converter.sources.base import (
    ImageBase,
    LayerInfo,
    RegistryOrigin,
    SourceImage,
    SourceRef,
    verify_diff_id,
)
from converter.sources.docker_archive import open_docker_archive
from converter.sources.oci_layout import open_oci
from converter.sources.refs import parse_source
from converter.sources.registry import RegistryOptions, open_registry
from converter.sources.resolve import parse_platform

__all__ = ["ImageBase", "LayerInfo", "RegistryOptions", "RegistryOrigin", "SourceImage", "SourceRef",
           "open_source", "parse_platform", "parse_source", "verify_diff_id"]

_OPENERS: dict[str, Callable[[SourceRef, str | None], SourceImage]] = {
    "oci": open_oci, "docker-archive": open_docker_archive}


def open_source(ref: SourceRef, platform: str | None = None, *,
                registry: RegistryOptions | None = None) -> SourceImage:
    """`registry`: RegistryOptions for registry references (plain HTTP, TLS, work dir)."""
    if ref.transport == "docker":
        return open_registry(ref, platform, registry)
    return _OPENERS[ref.transport](ref, platform)
