"""`docker-archive:FILE[:REF]`: a `docker save` tarball (legacy or OCI-layout-inside).

REF is a RepoTag (`busybox:latest`) or `@N` (the Nth image). A layer's name is not its digest
(legacy `ID/layer.tar`), so the layer's digest is its diff_id when it is an uncompressed tar
(what `docker save` writes), the one in its `blobs/sha256/…` path when it has one, and
otherwise the sha256 of the member.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import tarfile

from converter.decompress import sniff
from converter.sources.base import ImageBase, LayerInfo, SourceImage, SourceRef
from converter.sources.resolve import check_config
from nydus_py.errors import ConfigError, ImageFormatError
from nydus_py.oci import digest as dg
from nydus_py.oci import mediatypes as mt
from nydus_py.oci.layout import MAX_JSON

DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"


class _RangeReader:
    """One member of the (uncompressed) archive, read through its own file handle."""

    def __init__(self, path: str, offset: int, size: int):
        self._f = open(path, "rb")  # noqa: SIM115 - closed by close(), the reader outlives this call
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


class DockerArchiveImage(ImageBase):
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
        t = t.removeprefix(prefix)
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


def open_docker_archive(ref: SourceRef, platform: str | None) -> SourceImage:
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
    config, diff_ids = check_config(config_bytes, len(entry["Layers"]), f"{name}: config {cname}")
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
    return DockerArchiveImage(ref.path, spans, name=name, manifest_desc=None, manifest=manifest,
                              config=config, config_bytes=config_bytes, layers=layers)


