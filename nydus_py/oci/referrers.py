"""OCI 1.1 referrer artifacts: a small blob attached to an image manifest (its `subject`),
pushed to and found in a registry or an OCI image layout. Used for learned prefetch lists
(docs/format.md, "Learned prefetch list"); nothing here knows what the blob means.

An artifact is an image manifest with `artifactType`, the empty config
(`application/vnd.oci.empty.v1+json`, `{}`), one layer (the blob) and `subject`.

Registry: pushed by digest; found through the referrers API (`GET /v2/<repo>/referrers/<d>`,
its `Link` pages followed within bounds: RegistryClient.get_referrers) or, where the registry
has none (Debian's docker-registry 2.8 answers 404), through the distribution spec's tag schema:
an index tagged `sha256-<hex>` of the subject, which a pusher reads, extends with its
descriptor and writes back, keeping only the newest MAX_CANDIDATES entries of its artifact type
(so the index of an image pushed from many hosts stays far below the 4 MiB manifest limit).
Two hosts pushing at the same moment can lose one of the two entries (the spec's known race); a
lost list is only a lost optimisation.

OCI layout: the artifact's blobs go into `blobs/`, and its descriptor (with `artifactType`,
no ref name) into `index.json`, as image-spec 1.1 describes for layouts.

Everything read back is untrusted: manifests are verified by digest, a candidate must name the
expected subject and artifact type and have one layer of the expected media type and at most
`limit` bytes, and the blob is verified against its digest and size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from nydus_py.errors import (
    BlobNotFoundError,
    ImageFormatError,
    InputError,
    IntegrityError,
)
from nydus_py.oci import digest as dg
from nydus_py.oci import mediatypes as mt
from nydus_py.oci.layout import (
    Descriptor,
    OCILayout,
    OCILayoutWriter,
    canonical_json,
    json_object,
)

log = logging.getLogger(__name__)

EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY = b"{}"
EMPTY_DESC = Descriptor(EMPTY_MEDIA_TYPE, dg.of_bytes(EMPTY), len(EMPTY))
ANNO_CREATED = "org.opencontainers.image.created"
MAX_CANDIDATES = 16             # referrers of our type looked at, newest first


@dataclass(frozen=True)
class Artifact:
    subject: Descriptor             # the image manifest it refers to
    artifact_type: str
    blob: bytes
    blob_media_type: str
    annotations: dict

    def blob_desc(self) -> Descriptor:
        return Descriptor(self.blob_media_type, dg.of_bytes(self.blob), len(self.blob))

    def manifest(self) -> bytes:
        return canonical_json({
            "schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "artifactType": self.artifact_type,
            "config": EMPTY_DESC.to_json(), "layers": [self.blob_desc().to_json()],
            "subject": Descriptor(self.subject.media_type, self.subject.digest,
                                  self.subject.size).to_json(),
            "annotations": dict(sorted(self.annotations.items()))})

    def descriptor(self) -> dict:
        """Its entry in a referrers index."""
        data = self.manifest()
        d = Descriptor(mt.OCI_MANIFEST, dg.of_bytes(data), len(data), dict(self.annotations)).to_json()
        d["artifactType"] = self.artifact_type
        return d


def fallback_tag(digest: str) -> str:
    """The distribution spec's referrers tag for a subject: `<alg>-<hex>`, at most 128 chars."""
    algo, hexd = dg.parse(digest)
    return f"{algo}-{hexd}"[:128]


def _candidates(index: dict, artifact_type: str) -> list[dict]:
    """Index entries of `artifact_type`, newest (by the created annotation) first; later entries
    of the tag-schema index were appended later, so they win ties."""
    entries = [(i, e) for i, e in enumerate(index.get("manifests") or [])
               if isinstance(e, dict) and e.get("artifactType") == artifact_type]
    entries.sort(key=lambda ie: (str((ie[1].get("annotations") or {}).get(ANNO_CREATED, "")), ie[0]),
                 reverse=True)
    return [e for _, e in entries[:MAX_CANDIDATES]]


def _check_manifest(data: bytes, subject: str, artifact_type: str, blob_media_type: str,
                    limit: int, what: str) -> Descriptor:
    """The blob descriptor of a referrer manifest, after checking that it is ours."""
    m = json_object(data, what)
    if m.get("artifactType") != artifact_type:
        raise ImageFormatError(f"{what}: artifactType is not {artifact_type}")
    if not isinstance(m.get("subject"), dict) or m["subject"].get("digest") != subject:
        raise ImageFormatError(f"{what}: subject is not {subject}")
    layers = m.get("layers")
    if not isinstance(layers, list) or len(layers) != 1 or not isinstance(layers[0], dict):
        raise ImageFormatError(f"{what}: expected exactly one layer")
    blob = Descriptor.from_json(layers[0], what)
    if blob.media_type != blob_media_type:
        raise ImageFormatError(f"{what}: layer media type {blob.media_type!r}, not {blob_media_type}")
    if blob.size > limit:
        raise ImageFormatError(f"{what}: blob of {blob.size} bytes is larger than {limit}")
    return blob


# -- registry ---------------------------------------------------------------------------------
def registry_push(client, repo: str, art: Artifact) -> str:
    """Pushes the artifact (blobs, manifest by digest) and, when the registry has no referrers
    API, adds it to the subject's `sha256-<hex>` tag index. Returns the manifest digest."""
    blob = art.blob_desc()
    client.push_blob(repo, EMPTY, EMPTY_DESC.digest, EMPTY_DESC.size)
    client.push_blob(repo, art.blob, blob.digest, blob.size)
    data = art.manifest()
    digest = client.put_manifest(repo, dg.of_bytes(data), data, mt.OCI_MANIFEST)
    if client.get_referrers(repo, art.subject.digest, art.artifact_type) is not None:
        return digest                       # the registry indexes referrers itself
    tag = fallback_tag(art.subject.digest)
    try:
        raw, media_type, _ = client.get_manifest(repo, tag, accept=(mt.OCI_INDEX,))
        index = json_object(raw, f"{repo}:{tag}")
        if media_type != mt.OCI_INDEX or not isinstance(index.get("manifests"), list):
            raise ImageFormatError(f"{repo}:{tag} is not a referrers index")
    except BlobNotFoundError:
        index = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": []}
    entries = [e for e in index["manifests"] if not (isinstance(e, dict) and e.get("digest") == digest)]
    entries.append(art.descriptor())
    # bounded: only the newest MAX_CANDIDATES of our type are ever looked at, so older ones
    # are dropped (their manifests stay, untagged); other types' entries are not ours to drop
    keep = {id(e) for e in _candidates({"manifests": entries}, art.artifact_type)}
    index["manifests"] = [e for e in entries if id(e) in keep or not
                          (isinstance(e, dict) and e.get("artifactType") == art.artifact_type)]
    out = canonical_json(index)
    client.put_manifest(repo, tag, out, mt.OCI_INDEX)
    return digest


def registry_find(client, repo: str, subject: str, artifact_type: str, blob_media_type: str,
                  limit: int) -> tuple[bytes, str] | None:
    """(blob bytes, where) of the newest usable referrer of `subject`, or None if it has none.
    Candidates that fail a check are logged and skipped; errors talking to the registry raise."""
    index = client.get_referrers(repo, subject, artifact_type)
    if index is None:
        try:
            raw, _, _ = client.get_manifest(repo, fallback_tag(subject), accept=(mt.OCI_INDEX,))
        except BlobNotFoundError:
            return None
        index = json_object(raw, f"{repo}:{fallback_tag(subject)}")
    for entry in _candidates(index, artifact_type):
        digest = str(entry.get("digest", ""))
        what = f"referrer {client.config.host}/{repo}@{digest}"
        try:
            dg.parse(digest)
            data, _, _ = client.get_manifest(repo, digest, accept=(mt.OCI_MANIFEST,))
            blob = _check_manifest(data, subject, artifact_type, blob_media_type, limit, what)
            with client.get_blob(repo, blob.digest, blob.size) as body:
                content = body.read()
            return content, what
        except (InputError, IntegrityError, BlobNotFoundError, ValueError) as e:
            log.warning("%s skipped: %s", what, e)      # bad content; transport errors raise
    return None


# -- OCI image layout -------------------------------------------------------------------------
def layout_push(root: str | Path, art: Artifact) -> str:
    w = OCILayoutWriter(root)
    w.put_bytes(EMPTY, EMPTY_MEDIA_TYPE)
    w.put_bytes(art.blob, art.blob_media_type)
    m = w.put_bytes(art.manifest(), mt.OCI_MANIFEST)
    idx = w.index()
    if not any(isinstance(e, dict) and e.get("digest") == m.digest for e in idx.get("manifests", [])):
        entry = art.descriptor()
        idx["manifests"] = [*idx.get("manifests", []), entry]
        w.write_index(idx)
    return m.digest


def layout_find(root: str | Path, subject: str, artifact_type: str, blob_media_type: str,
                limit: int) -> tuple[bytes, str] | None:
    layout = OCILayout(root)
    for entry in _candidates(layout.index(), artifact_type):
        what = f"referrer {root}@{entry.get('digest')}"
        try:
            desc = Descriptor.from_json(entry, what)
            blob = _check_manifest(layout.read_blob(desc, what), subject, artifact_type,
                                   blob_media_type, limit, what)
            return layout.read_blob(blob, what, limit=limit), what
        except (InputError, IntegrityError, BlobNotFoundError, ValueError, OSError) as e:
            log.warning("%s skipped: %s", what, e)
    return None


__all__ = [
    "Artifact",
    "fallback_tag",
    "layout_find",
    "layout_push",
    "registry_find",
    "registry_push",
]
