"""OCI image layout directories (image-spec `image-layout.md`): read, and write atomically.

Blobs are content-addressed, so writing one is idempotent: tmp file + fsync + rename. The
index is rewritten atomically last, so a reader never sees a tag pointing at missing blobs.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from nydus_py.errors import BlobNotFoundError, ImageFormatError
from nydus_py.oci import digest as dg
from nydus_py.oci import mediatypes as mt

REF_NAME = "org.opencontainers.image.ref.name"
MAX_JSON = 4 << 20  # manifests/configs/indexes larger than this are hostile, not images


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: dict | None = None

    def to_json(self) -> dict:
        d: dict = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            d["annotations"] = dict(sorted(self.annotations.items()))
        if self.platform:
            d["platform"] = self.platform
        return d

    @classmethod
    def from_json(cls, d: dict, what: str) -> "Descriptor":
        try:
            desc = cls(media_type=str(d["mediaType"]), digest=str(d["digest"]), size=int(d["size"]),
                       annotations=dict(d.get("annotations") or {}), platform=d.get("platform"))
        except (KeyError, TypeError, ValueError) as e:
            raise ImageFormatError(f"{what}: malformed descriptor ({e!r})") from None
        dg.parse(desc.digest)
        if desc.size < 0:
            raise ImageFormatError(f"{what}: negative size in descriptor {desc.digest}")
        return desc


def canonical_json(obj) -> bytes:
    """Deterministic JSON so that the same input always gives the same digests."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def json_object(data: bytes, what: str) -> dict:
    """Parse a manifest/index/config: malformed JSON or a non-object is an ImageFormatError."""
    try:
        obj = json.loads(data)
    except ValueError as e:
        raise ImageFormatError(f"{what}: malformed JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ImageFormatError(f"{what}: expected a JSON object")
    return obj


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class OCILayout:
    """Reader for an OCI layout dir."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        marker = self.root / "oci-layout"
        if not marker.is_file():
            raise ImageFormatError(f"{self.root}: not an OCI image layout (no oci-layout file)")
        try:
            version = json.loads(marker.read_bytes()).get("imageLayoutVersion")
        except (ValueError, AttributeError):
            raise ImageFormatError(f"{marker}: malformed JSON") from None
        if version != "1.0.0":
            raise ImageFormatError(f"{marker}: unsupported imageLayoutVersion {version!r}")

    def blob_path(self, digest: str) -> Path:
        algo, hexd = dg.parse(digest)
        return self.root / "blobs" / algo / hexd

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def open_blob(self, desc: Descriptor, what: str | None = None) -> dg.VerifyingReader:
        """Stream a blob; the digest and size are verified when the reader reaches EOF."""
        p = self.blob_path(desc.digest)
        try:
            f = open(p, "rb")
        except FileNotFoundError:
            raise BlobNotFoundError(f"{what or desc.digest}: blob missing from {self.root}") from None
        return dg.VerifyingReader(f, desc.digest, desc.size, what or f"blob {desc.digest}")

    def read_blob(self, desc: Descriptor, what: str | None = None, limit: int = MAX_JSON) -> bytes:
        what = what or f"blob {desc.digest}"
        if desc.size > limit:
            raise ImageFormatError(f"{what}: size {desc.size} exceeds limit {limit}")
        p = self.blob_path(desc.digest)
        try:
            with open(p, "rb") as f:
                data = f.read(desc.size + 1)       # a bigger file is refused below, unread
        except FileNotFoundError:
            raise BlobNotFoundError(f"{what}: blob missing from {self.root}") from None
        if len(data) != desc.size:
            raise dg.DigestMismatchError(f"{what}: size {len(data)} does not match descriptor size {desc.size}")
        dg.verify_bytes(data, desc.digest, what)
        return data

    def read_json(self, desc: Descriptor, what: str) -> dict:
        return json_object(self.read_blob(desc, what), what)

    def index(self) -> dict:
        p = self.root / "index.json"
        try:
            obj = json.loads(p.read_bytes())
        except FileNotFoundError:
            raise ImageFormatError(f"{self.root}: no index.json") from None
        except ValueError as e:
            raise ImageFormatError(f"{p}: malformed JSON ({e})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("manifests", []), list):
            raise ImageFormatError(f"{p}: not an OCI index")
        return obj

    def tags(self) -> list[str]:
        return [m.get("annotations", {}).get(REF_NAME) for m in self.index().get("manifests", [])
                if m.get("annotations", {}).get(REF_NAME)]

    def resolve(self, tag: str | None) -> Descriptor:
        """The index entry named `tag` (or the only entry when no tag is given)."""
        entries = self.index().get("manifests", [])
        where = f"{self.root}/index.json"
        if tag is None:
            # referrer artifacts (learned prefetch lists …) sit beside the image, not instead of it
            entries = [e for e in entries if not (isinstance(e, dict) and "artifactType" in e)]
            if len(entries) != 1:
                raise ImageFormatError(
                    f"{self.root}: {len(entries)} images in layout, name one with oci:DIR:TAG "
                    f"(tags: {', '.join(self.tags()) or 'none'})")
            return Descriptor.from_json(entries[0], where)
        for e in entries:
            if (e.get("annotations") or {}).get(REF_NAME) == tag:
                return Descriptor.from_json(e, where)
        raise ImageFormatError(f"{self.root}: no image tagged {tag!r} (tags: {', '.join(self.tags()) or 'none'})")


class OCILayoutWriter(OCILayout):
    """Writer: creates the layout if needed; blobs first, index last."""

    def __init__(self, root: str | os.PathLike):
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        if not (root / "oci-layout").exists():
            _atomic_write(root / "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        if not (root / "index.json").exists():
            _atomic_write(root / "index.json", canonical_json(
                {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": []}))
        super().__init__(root)

    def put_bytes(self, data: bytes, media_type: str, annotations: dict | None = None) -> Descriptor:
        d = dg.of_bytes(data)
        p = self.blob_path(d)
        if not p.exists():
            _atomic_write(p, data)
        return Descriptor(media_type, d, len(data), dict(annotations or {}))

    def put_json(self, obj: dict, media_type: str, annotations: dict | None = None) -> Descriptor:
        return self.put_bytes(canonical_json(obj), media_type, annotations)

    def adopt_file(self, tmp_path: str | os.PathLike, digest: str, size: int, media_type: str,
                   annotations: dict | None = None) -> Descriptor:
        """Move an already-hashed temp file (on the same filesystem) into blobs/."""
        p = self.blob_path(digest)
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.exists():
            os.unlink(tmp_path)
        else:
            os.replace(tmp_path, p)
        return Descriptor(media_type, digest, size, dict(annotations or {}))

    def tag(self, desc: Descriptor, tag: str | None) -> None:
        idx = self.index()
        entries = [e for e in idx.get("manifests", [])
                   if tag is None or (e.get("annotations") or {}).get(REF_NAME) != tag]
        ann = dict(desc.annotations)
        if tag is not None:
            ann[REF_NAME] = tag
        entries.append(Descriptor(desc.media_type, desc.digest, desc.size, ann, desc.platform).to_json())
        idx["manifests"] = entries
        self.write_index(idx)

    def write_index(self, idx: dict) -> None:
        idx.setdefault("schemaVersion", 2)
        _atomic_write(self.root / "index.json", canonical_json(idx))
