"""Source references in skopeo's syntax → `SourceRef` (see converter/sources/__init__.py)."""

from __future__ import annotations

from converter.sources.base import SourceRef
from nydus_py.errors import ConfigError
from nydus_py.oci.reference import parse as parse_reference

# skopeo's transport names: anything else before the first colon is a registry host.
_SKOPEO_TRANSPORTS = {"docker", "docker-archive", "docker-daemon", "oci", "oci-archive", "dir",
                      "containers-storage", "sif", "tarball", "ostree"}


def _parse_path_ref(transport: str, rest: str, s: str) -> SourceRef:
    path, sep, ref = rest.partition(":")
    if not path:
        raise ConfigError(f"source {s!r}: missing path after '{transport}:'")
    if sep and not ref:
        raise ConfigError(f"source {s!r}: empty tag after the path")
    return SourceRef(transport, path, ref or None)


_PARSERS = {"oci": _parse_path_ref, "docker-archive": _parse_path_ref}


def parse_source(s: str) -> SourceRef:
    """`oci:DIR[:TAG]` or `docker-archive:FILE[:REF]` → SourceRef; anything else → ConfigError."""
    if not isinstance(s, str) or not s.strip():
        raise ConfigError("source: empty image reference")
    transport, sep, rest = s.partition(":")
    if sep and transport in _PARSERS:
        return _PARSERS[transport](transport, rest, s)
    if sep and transport in _SKOPEO_TRANSPORTS and transport != "docker":
        raise ConfigError(f"source {s!r}: transport '{transport}:' is not supported "
                          f"(use oci:DIR[:TAG] or docker-archive:FILE[:REF])")
    text = s.removeprefix("docker://")
    return SourceRef("docker", str(parse_reference(text)), None)

