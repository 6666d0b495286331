"""Source images for `nydusify convert`: a skopeo-style reference → manifest, config, layers.

Transports (skopeo syntax):
    oci:DIR[:TAG]                    an OCI image layout directory (DIR has no colon)
    docker-archive:FILE[:REF]        a `docker save` tarball (legacy or OCI-layout-inside);
                                     REF is a RepoTag (`busybox:latest`) or `@N` (Nth image)
    [docker://]HOST/REPO[:TAG|@DIGEST]  a registry (converter/source_registry.py)
A new transport is one entry in `_PARSERS` and one in `_OPENERS`.

Integrity: every blob is verified against the digest that names it — manifests and configs
when read, layers at EOF of `open_layer()` (compressed digest + size). `open_layer_tar()`
also checks the uncompressed stream against the config's diff_id (as umoci does). In a
docker-archive, a layer's name is not its digest (legacy `ID/layer.tar`), so the layer's
digest is its diff_id when it is an uncompressed tar (what `docker save` writes), the one in
its `blobs/sha256/…` path when it has one, and otherwise the sha256 of the member.
"""

from __future__ import annotations

import hashlib
import json
import platform as _platform
import posixpath
import re
import tarfile
from dataclasses import dataclass, field

from converter.layer import open_layer_stream, sniff
from nydus_py.errors import ConfigError, ImageFormatError
from nydus_py.oci import digest as dg
from nydus_py.oci import mediatypes as mt
from nydus_py.oci.layout import MAX_JSON, Descriptor, OCILayout, json_object

LAYER_TYPES = frozenset(mt.GZIP_LAYERS + mt.ZSTD_LAYERS + mt.TAR_LAYERS)
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
MAX_INDEX_DEPTH = 4


@dataclass(frozen=True)
class SourceRef:
    transport: str            # "oci" | "docker-archive" | "docker" (registry; path = reference)
    path: str
    reference: str | None = None

    def __str__(self) -> str:
        if self.transport == "docker":
            return self.path
        return f"{self.transport}:{self.path}" + (f":{self.reference}" if self.reference else "")


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
    text = s[len("docker://"):] if s.startswith("docker://") else s
    from nydus_py.oci.reference import parse as parse_reference
    return SourceRef("docker", str(parse_reference(text)), None)


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


class SourceImage:
    """An opened source image. `open_layer()` streams one compressed layer blob whose digest
    and size are verified when it is read to EOF; `open_layer_tar()` gives the uncompressed
    tar stream (bomb-limited) with the diff_id verified too."""

    def __init__(self, *, name: str, manifest_desc: Descriptor | None, manifest: dict,
                 config: dict, config_bytes: bytes, layers: list[LayerInfo]):
        self.name = name
        self.manifest_desc = manifest_desc
        self.manifest = manifest
        self.config = config
        self.config_bytes = config_bytes
        self.layers = layers
        self.manifest_bytes: bytes | None = None   # exact bytes, when the source has a manifest blob

    def open_layer(self, layer: LayerInfo):
        raise NotImplementedError

    def open_layer_tar(self, layer: LayerInfo, *, max_uncompressed: int = 64 << 30):
        stream = open_layer_stream(self.open_layer(layer), layer.media_type, layer.what,
                                   max_uncompressed=max_uncompressed)
        if layer.diff_id and not (layer.diff_id == layer.digest and layer.media_type in mt.TAR_LAYERS):
            stream = verify_diff_id(stream, layer)
        return stream

    def close(self) -> None:
        pass

    def __enter__(self) -> "SourceImage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def verify_diff_id(stream, layer: LayerInfo) -> dg.VerifyingReader:
    """Wrap an uncompressed layer stream: at EOF its sha256 must equal the layer's diff_id."""
    return dg.VerifyingReader(stream, layer.diff_id, None, f"{layer.what}: uncompressed tar (diff_id)")


def open_source(ref: SourceRef, platform: str | None = None, *, registry=None) -> SourceImage:
    """`registry`: RegistryOptions for registry references (plain HTTP, TLS, work dir)."""
    if ref.transport == "docker":
        from converter.source_registry import open_registry
        return open_registry(ref, platform, registry)
    return _OPENERS[ref.transport](ref, platform)


# -- shared validation ---------------------------------------------------------------------------

def _check_manifest(m: dict, what: str) -> tuple[Descriptor, list[Descriptor]]:
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


def _check_config(data: bytes, n_layers: int, what: str) -> tuple[dict, list[str]]:
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
        return d.platform.get("variant") or default

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


# -- OCI layout ----------------------------------------------------------------------------------

class _OCILayoutImage(SourceImage):
    def __init__(self, layout: OCILayout, **kw):
        super().__init__(**kw)
        self._layout = layout

    def open_layer(self, layer: LayerInfo):
        return self._layout.open_blob(layer.descriptor, layer.what)


def _open_oci(ref: SourceRef, platform: str | None, **_) -> SourceImage:
    name = str(ref)
    layout = OCILayout(ref.path)
    desc = layout.resolve(ref.reference)
    return resolve_image(name, desc, layout.read_blob, platform,
                         lambda **kw: _OCILayoutImage(layout, **kw))


def resolve_image(name: str, desc: Descriptor, read_blob, platform: str | None, make):
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
    config_desc, layer_descs = _check_manifest(doc, f"{name}: manifest {desc.digest[:19]}…")
    cwhat = f"{name}: config {config_desc.digest[:19]}…"
    config_bytes = read_blob(config_desc, cwhat)
    config, diff_ids = _check_config(config_bytes, len(layer_descs), cwhat)
    layers = [LayerInfo(i, d.digest, d.media_type, d.size, diff_ids[i], d, len(layer_descs))
              for i, d in enumerate(layer_descs)]
    image = make(name=name, manifest_desc=desc, manifest=doc, config=config,
                 config_bytes=config_bytes, layers=layers)
    image.manifest_bytes = raw
    return image


# -- docker-archive ------------------------------------------------------------------------------

class _RangeReader:
    """One member of the (uncompressed) archive, read through its own file handle."""

    def __init__(self, path: str, offset: int, size: int):
        self._f = open(path, "rb")
        self._f.seek(offset)
        self._left = size

    def read(self, n: int = -1) -> bytes:
        n = self._left if n is None or n < 0 else min(n, self._left)
        data = self._f.read(n) if n else b""
        self._left -= len(data)
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._f.close()


_BLOB_PATH = re.compile(r"^(?:.*/)?blobs/(sha256|sha512)/([0-9a-f]+)$")
_LEGACY_CONFIG = re.compile(r"^([0-9a-f]{64})\.json$")


class _DockerArchiveImage(SourceImage):
    def __init__(self, path: str, spans: dict[int, tuple[int, int]], **kw):
        super().__init__(**kw)
        self._path, self._spans = path, spans

    def open_layer(self, layer: LayerInfo):
        offset, size = self._spans[layer.index]
        return dg.VerifyingReader(_RangeReader(self._path, offset, size), layer.digest, size, layer.what)


class _Archive:
    def __init__(self, path: str, name: str):
        self.path, self.name = path, name
        try:
            with tarfile.open(path, "r:") as tf:
                self.members = {posixpath.normpath(m.name.lstrip("/")): m for m in tf}
        except FileNotFoundError:
            raise ImageFormatError(f"{name}: no such file") from None
        except IsADirectoryError:
            raise ImageFormatError(f"{name}: is a directory, not a docker-archive tarball") from None
        except tarfile.TarError as e:
            raise ImageFormatError(f"{name}: not an uncompressed tar archive ({e})") from None

    def member(self, name: str, what: str) -> tarfile.TarInfo:
        key = posixpath.normpath(name.lstrip("/"))
        for _ in range(16):
            m = self.members.get(key)
            if m is None:
                raise ImageFormatError(f"{self.name}: {what} {name!r} is missing from the archive")
            if m.isreg():
                return m
            if m.issym():
                key = posixpath.normpath(posixpath.join(posixpath.dirname(key), m.linkname))
            elif m.islnk():
                key = posixpath.normpath(m.linkname.lstrip("/"))
            else:
                raise ImageFormatError(f"{self.name}: {what} {name!r} is not a file")
        raise ImageFormatError(f"{self.name}: {what} {name!r}: too many levels of links")

    def read(self, m: tarfile.TarInfo, what: str) -> bytes:
        if m.size > MAX_JSON:
            raise ImageFormatError(f"{self.name}: {what}: {m.size} bytes exceeds limit {MAX_JSON}")
        r = _RangeReader(self.path, m.offset_data, m.size)
        try:
            data = r.read()
        finally:
            r.close()
        if len(data) != m.size:
            raise ImageFormatError(f"{self.name}: {what}: archive is truncated")
        return data


def _norm_tag(t: str) -> str:
    for prefix in ("docker.io/library/", "docker.io/"):
        if t.startswith(prefix):
            t = t[len(prefix):]
    return t if "@" in t or ":" in t.rsplit("/", 1)[-1] else t + ":latest"


def _pick_archive_image(entries: list, ref: str | None, name: str) -> dict:
    tags = [t for e in entries for t in (e.get("RepoTags") or [])]
    listing = f"tags: {', '.join(tags) or 'none'}"
    if ref is None:
        if len(entries) != 1:
            raise ImageFormatError(f"{name}: {len(entries)} images in the archive, name one with "
                                   f"docker-archive:FILE:TAG or :@N ({listing})")
        return entries[0]
    if ref.startswith("@"):
        if not ref[1:].isdigit() or int(ref[1:]) >= len(entries):
            raise ConfigError(f"{name}: no image {ref} (the archive has {len(entries)})")
        return entries[int(ref[1:])]
    for e in entries:
        if _norm_tag(ref) in {_norm_tag(t) for t in (e.get("RepoTags") or [])}:
            return e
    raise ImageFormatError(f"{name}: no image tagged {ref!r} ({listing})")


def _member_digest(path: str, m: tarfile.TarInfo) -> str:
    h, r = hashlib.sha256(), _RangeReader(path, m.offset_data, m.size)
    try:
        while piece := r.read(1 << 20):
            h.update(piece)
    finally:
        r.close()
    return f"sha256:{h.hexdigest()}"


def _open_docker_archive(ref: SourceRef, platform: str | None) -> SourceImage:
    name = f"docker-archive:{ref.path}"
    arc = _Archive(ref.path, name)
    try:
        entries = json.loads(arc.read(arc.member("manifest.json", "manifest"), "manifest.json"))
    except ValueError as e:
        raise ImageFormatError(f"{name}: manifest.json: malformed JSON ({e})") from None
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ImageFormatError(f"{name}: manifest.json: expected a non-empty list of images")
    entry = _pick_archive_image(entries, ref.reference, name)
    if not isinstance(entry.get("Config"), str) or not isinstance(entry.get("Layers"), list):
        raise ImageFormatError(f"{name}: manifest.json: image without Config or Layers")
    cname = entry["Config"]
    config_bytes = arc.read(arc.member(cname, "config"), f"config {cname}")
    config_digest = dg.of_bytes(config_bytes)
    m = _BLOB_PATH.match(cname) or _LEGACY_CONFIG.match(posixpath.basename(cname))
    if m:
        expected = f"{m.group(1)}:{m.group(2)}" if m.re is _BLOB_PATH else f"sha256:{m.group(1)}"
        dg.verify_bytes(config_bytes, expected, f"{name}: config {cname}")
        config_digest = expected
    config, diff_ids = _check_config(config_bytes, len(entry["Layers"]), f"{name}: config {cname}")
    layers, spans = [], {}
    for i, lname in enumerate(entry["Layers"]):
        if not isinstance(lname, str):
            raise ImageFormatError(f"{name}: manifest.json: layer {i} is not a path")
        lm = arc.member(lname, f"layer {i}")
        r = _RangeReader(ref.path, lm.offset_data, min(lm.size, 4))
        codec = sniff(r.read())
        r.close()
        bm = _BLOB_PATH.match(posixpath.normpath(lname))
        if bm:
            digest = f"{bm.group(1)}:{bm.group(2)}"
        elif codec == "tar":
            digest = diff_ids[i]
        else:
            digest = _member_digest(ref.path, lm)
        media = {"tar": DOCKER_LAYER_TAR, "gzip": mt.DOCKER_LAYER_GZIP, "zstd": mt.OCI_LAYER_ZSTD}[codec]
        layers.append(LayerInfo(i, digest, media, lm.size, diff_ids[i], count=len(entry["Layers"])))
        spans[i] = (lm.offset_data, lm.size)
    manifest = {"schemaVersion": 2, "mediaType": mt.DOCKER_MANIFEST,
                "config": {"mediaType": mt.DOCKER_CONFIG, "digest": config_digest, "size": len(config_bytes)},
                "layers": [{"mediaType": l.media_type, "digest": l.digest, "size": l.size} for l in layers]}
    return _DockerArchiveImage(ref.path, spans, name=name, manifest_desc=None, manifest=manifest,
                               config=config, config_bytes=config_bytes, layers=layers)


_OPENERS = {"oci": _open_oci, "docker-archive": _open_docker_archive}
