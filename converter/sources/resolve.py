"""Shared by the transports: index → manifest (host or --platform), manifest and config checks.

`resolve_image()` walks an index to the manifest of the wanted platform, validates manifest
and config, and builds the transport's SourceImage through its `make` callable.
"""

from __future__ import annotations

import platform as _platform
from collections.abc import Callable
from typing import Any

from converter.sources.base import LayerInfo
from nydus_py.errors import ConfigError, ImageFormatError
from nydus_py.oci import digest as dg
from nydus_py.oci import mediatypes as mt
from nydus_py.oci.layout import Descriptor, json_object

LAYER_TYPES = frozenset(mt.GZIP_LAYERS + mt.ZSTD_LAYERS + mt.TAR_LAYERS)
MAX_INDEX_DEPTH = 4

ReadBlob = Callable[[Descriptor, str], bytes]


def check_manifest(m: dict, what: str) -> tuple[Descriptor, list[Descriptor]]:
    if m.get("schemaVersion") != 2:
        raise ImageFormatError(f"{what}: schemaVersion {m.get('schemaVersion')!r}, expected 2")
    if not isinstance(m.get("config"), dict):
        raise ImageFormatError(f"{what}: no config descriptor")
    config = Descriptor.from_json(m["config"], f"{what}: config")
    if config.media_type not in (mt.OCI_CONFIG, mt.DOCKER_CONFIG):
        raise ImageFormatError(f"{what}: config media type {config.media_type!r}: not a container image")
    if not isinstance(m.get("layers"), list):
        raise ImageFormatError(f"{what}: no layers list")
    layers = [Descriptor.from_json(d if isinstance(d, dict) else {}, f"{what}: layer {i}")
              for i, d in enumerate(m["layers"])]
    for i, d in enumerate(layers):
        if d.media_type not in LAYER_TYPES:
            raise ImageFormatError(f"{what}: layer {i} ({d.digest[:19]}…): unsupported media type {d.media_type!r}")
    return config, layers


def check_config(data: bytes, n_layers: int, what: str) -> tuple[dict, list[str]]:
    cfg = json_object(data, what)
    rootfs = cfg.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers" or not isinstance(rootfs.get("diff_ids"), list):
        raise ImageFormatError(f"{what}: missing or malformed rootfs (need type 'layers' and diff_ids)")
    diff_ids = rootfs["diff_ids"]
    for d in diff_ids:
        dg.parse(d)
    if len(diff_ids) != n_layers:
        raise ImageFormatError(f"{what}: {len(diff_ids)} diff_ids for {n_layers} layers")
    return cfg, diff_ids


# -- platforms -----------------------------------------------------------------------------------

_GOARCH = {"x86_64": ("amd64", None), "amd64": ("amd64", None), "i386": ("386", None),
           "i686": ("386", None), "aarch64": ("arm64", None), "arm64": ("arm64", None),
           "armv8l": ("arm", "v8"), "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"),
           "armv5tel": ("arm", "v5"), "ppc64le": ("ppc64le", None), "s390x": ("s390x", None),
           "riscv64": ("riscv64", None), "mips64": ("mips64", None), "loongarch64": ("loong64", None)}
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7", "amd64": "v1"}


def parse_platform(s: str | None) -> tuple[str, str, str | None]:
    """`os/arch[/variant]` (or the host's when None) → normalised (os, arch, variant)."""
    if s is None:
        machine = _platform.machine().lower()
        arch, variant = _GOARCH.get(machine, (machine, None))
        return "linux", arch, variant
    parts = s.lower().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ConfigError(f"--platform {s!r}: expected os/arch[/variant], e.g. linux/arm64")
    arch, variant = _GOARCH.get(parts[1], (parts[1], None))
    return parts[0], arch, parts[2] if len(parts) == 3 else variant


def _show_platform(p: dict | None) -> str:
    p = p or {}
    s = f"{p.get('os', '?')}/{p.get('architecture', '?')}"
    return s + (f"/{p['variant']}" if p.get("variant") else "")


def _pick_platform(index: dict, want: tuple[str, str, str | None], what: str) -> Descriptor:
    if not isinstance(index.get("manifests"), list):
        raise ImageFormatError(f"{what}: no manifests list")
    entries = [Descriptor.from_json(e if isinstance(e, dict) else {}, f"{what}: entry {i}")
               for i, e in enumerate(index["manifests"])]
    os_, arch, variant = want
    same = [d for d in entries if isinstance(d.platform, dict) and d.platform.get("os") == os_
            and d.platform.get("architecture") == arch]
    default = _DEFAULT_VARIANT.get(arch)

    def variant_of(d: Descriptor) -> str | None:
        return (d.platform or {}).get("variant") or default

    if variant is not None:
        same = [d for d in same if variant_of(d) == variant]
    else:
        same.sort(key=lambda d: variant_of(d) != default)   # stable: the default variant first
    if same:
        return same[0]
    if len(entries) == 1 and not entries[0].platform:
        return entries[0]
    avail = sorted({_show_platform(d.platform) for d in entries
                    if (d.platform or {}).get("os") not in (None, "unknown")})
    wanted = f"{os_}/{arch}" + (f"/{variant}" if variant else "")
    raise ImageFormatError(f"{what}: no image for platform {wanted}; available: {', '.join(avail) or 'none'}")



def resolve_image(name: str, desc: Descriptor, read_blob: ReadBlob, platform: str | None,
                  make: Callable[..., Any]) -> Any:
    """Walks index → manifest (host or --platform), validates manifest and config, and calls
    `make(**fields)` for the SourceImage subclass of the transport. `read_blob(desc, what)`
    fetches a small blob and verifies it against its digest. The manifest's exact bytes are
    kept (`manifest_bytes`) so it can be copied by digest (--merge-platform)."""
    want = parse_platform(platform)
    for _ in range(MAX_INDEX_DEPTH + 1):
        what = f"{name}: {desc.digest[:19]}…"
        raw = read_blob(desc, what)
        doc = json_object(raw, what)
        inner = doc.get("mediaType")
        if inner and inner != desc.media_type:
            raise ImageFormatError(f"{what}: media type {inner!r} does not match its descriptor's {desc.media_type!r}")
        if desc.media_type in mt.INDEX_TYPES:
            desc = _pick_platform(doc, want, what)
        elif desc.media_type in mt.MANIFEST_TYPES:
            break
        else:
            raise ImageFormatError(f"{what}: unsupported media type {desc.media_type!r} (not an image)")
    else:
        raise ImageFormatError(f"{name}: image indexes nested more than {MAX_INDEX_DEPTH} deep")
    config_desc, layer_descs = check_manifest(doc, f"{name}: manifest {desc.digest[:19]}…")
    cwhat = f"{name}: config {config_desc.digest[:19]}…"
    config_bytes = read_blob(config_desc, cwhat)
    config, diff_ids = check_config(config_bytes, len(layer_descs), cwhat)
    layers = [LayerInfo(i, d.digest, d.media_type, d.size, diff_ids[i], d, len(layer_descs))
              for i, d in enumerate(layer_descs)]
    image = make(name=name, manifest_desc=desc, manifest=doc, config=config,
                 config_bytes=config_bytes, layers=layers)
    image.manifest_bytes = raw
    return image
