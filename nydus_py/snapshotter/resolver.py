"""Which Prepare is a nydus-py layer: labels → image reference → manifest → RemoteLayer
(remote.py's docstring says which labels containerd passes)."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

from nydus_py.errors import ConfigError, NydusError
from nydus_py.oci import mediatypes as mt
from nydus_py.oci.auth import Credentials, resolve_credentials
from nydus_py.oci.layout import json_object
from nydus_py.oci.reference import Reference, parse as parse_reference
from nydus_py.oci.registry import RegistryClient, RegistryConfig
from nydus_py.snapshotter.remote import (BLOB_TYPES, BOOTSTRAP_TYPES, CRI_IMAGE_LAYERS, CRI_IMAGE_REF,
                                         CRI_LAYER_DIGEST, CRI_MANIFEST_DIGEST, HINT_BLOB, HINT_BOOTSTRAP,
                                         LABEL_TARGET, MANIFEST_CACHE, REF_TTL, STARGZ_DIGEST, STARGZ_LAYERS,
                                         STARGZ_REF, RemoteConfig, RemoteError, RemoteLayer)
from nydus_py.snapshotter.cri import Keychain
from nydus_py.snapshotter.store import REMOTE_BLOB, REMOTE_BOOTSTRAP

log = logging.getLogger("nydus_py.snapshotter.remote")


class Resolver:
    """Labels of a Prepare → RemoteLayer for nydus-py layers, None for anything else."""

    def __init__(self, config: RemoteConfig):
        self.config = config
        self._clients: dict[tuple[str, str], RegistryClient] = {}
        self._retired: list[RegistryClient] = []
        self.keychain = Keychain()             # CRI pull secrets (cri.py)
        self._manifests: OrderedDict[tuple[str, str], dict] = OrderedDict()
        # reference -> (manifest, its digest, when) as a pull resolved it: _manifest_with
        self._resolved: OrderedDict[str, tuple[dict, str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def close(self) -> None:
        for c in [*self._clients.values(), *self._retired]:
            c.close()

    def scheme(self, host: str) -> str:
        if host in self.config.plain_http:
            return "http"
        bare = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
        if self.config.plain_http_loopback and (bare == "localhost" or bare.startswith("127.") or bare == "[::1]"):
            return "http"
        return "https"

    def credentials(self, ref: Reference) -> Credentials | None:
        """A CRI pull secret for this repository (cri.py), else IMAGE_PULL_AUTH / docker config."""
        return self.keychain.get(ref) or resolve_credentials(ref.host, docker_config=self.config.docker_config)

    def client(self, ref: Reference) -> RegistryClient:
        kc = self.keychain.get(ref)
        key = (ref.api_host, ref.repository if kc is not None else "")
        with self._lock:
            c = self._clients.get(key)
            if c is None or (kc is not None and c.config.credentials is not kc):
                creds = kc or resolve_credentials(ref.host, docker_config=self.config.docker_config)
                c = RegistryClient(config=RegistryConfig(
                    host=ref.api_host, scheme=self.scheme(ref.api_host), skip_verify=self.config.skip_verify,
                    credentials=creds))
                old = self._clients.get(key)
                if old is not None:            # may be in use by another Prepare: closed at the end
                    self._retired.append(old)
                self._clients[key] = c
            return c

    def classify(self, labels: dict[str, str]) -> RemoteLayer | None:
        if not labels.get(LABEL_TARGET):
            return None
        ref_text = labels.get(CRI_IMAGE_REF) or labels.get(STARGZ_REF)
        layer_digest = labels.get(CRI_LAYER_DIGEST) or labels.get(STARGZ_DIGEST)
        if not ref_text or not layer_digest:
            return None          # a plain `ctr pull`: nothing to find the image with
        try:
            ref = parse_reference(ref_text)
        except ConfigError as e:
            log.warning("ignoring unparsable image reference label %r: %s", ref_text, e)
            return None
        try:
            manifest, manifest_digest = self._manifest_with(
                ref, labels.get(CRI_MANIFEST_DIGEST), layer_digest,
                labels.get(CRI_IMAGE_LAYERS) or labels.get(STARGZ_LAYERS) or "")
        except NydusError as e:
            if labels.get(HINT_BLOB) or labels.get(HINT_BOOTSTRAP):
                raise RemoteError(f"{ref_text}: layer {layer_digest} is nydus-py but the manifest "
                                  f"cannot be read: {e}") from None
            log.warning("%s: cannot read manifest to classify layer %s (%s); treating it as an "
                        "ordinary layer", ref_text, layer_digest, e)
            return None
        if manifest is None:
            return None
        desc = next((d for d in manifest.get("layers") or [] if isinstance(d, dict)
                     and d.get("digest") == layer_digest), None)
        if desc is None:
            return None
        kind = layer_kind(desc, labels)
        if kind is None:
            return None
        return RemoteLayer(kind, ref, manifest_digest, layer_digest, int(desc.get("size") or 0))

    def _manifest_with(self, ref: Reference, manifest_digest: str | None, layer_digest: str,
                       chain: str = "") -> tuple[dict | None, str]:
        """The manifest holding `layer_digest`: by digest when CRI told us, else resolve the
        reference (walking an index's manifests).

        `chain`: the layer-chain label, this layer and the ones above it (containerd's
        AppendInfoHandlerWrapper and ctr-remote both write the remaining chain). A pull
        Prepares each layer in turn and, without a manifest digest, only names the reference:
        the manifest the pull's first Prepare resolved answers the next ones when its layers
        end with exactly their chain, so one pull resolves its tag once, not once per layer
        (each a registry round trip in the pull's critical path). A nydus-py manifest's last
        layer is its bootstrap, which describes every layer below it: a tag moved to another
        image never shares the chain's end with the manifest remembered for it."""
        if manifest_digest:
            return self._get_manifest(ref, manifest_digest), manifest_digest
        layers = chain.split(",") if chain else []
        if layers and layers[0] == layer_digest:
            with self._lock:
                hit = self._resolved.get(str(ref))
            if hit is not None and time.monotonic() - hit[2] < REF_TTL and \
                    _layer_digests(hit[0])[-len(layers):] == layers:
                return hit[0], hit[1]
        found, digest = self._resolve(ref, layer_digest)
        if found is not None and layers and _layer_digests(found)[-len(layers):] == layers:
            self._remember(self._resolved, str(ref), (found, digest, time.monotonic()))
        return found, digest

    def _resolve(self, ref: Reference, layer_digest: str) -> tuple[dict | None, str]:
        doc, digest = self._get_manifest_by_ref(ref)
        if doc.get("mediaType") in mt.INDEX_TYPES or "manifests" in doc:
            for m in doc.get("manifests") or []:
                child = self._get_manifest(ref, m["digest"])
                if any(d.get("digest") == layer_digest for d in child.get("layers") or []):
                    return child, m["digest"]
            return None, ""
        return doc, digest

    def _get_manifest_by_ref(self, ref: Reference) -> tuple[dict, str]:
        data, _mtype, digest = self.client(ref).get_manifest(ref.repository, ref.ref)
        doc = json_object(data, f"manifest {ref}")
        self._remember(self._manifests, (ref.name, digest), doc)
        return doc, digest

    def _get_manifest(self, ref: Reference, digest: str) -> dict:
        key = (ref.name, digest)
        with self._lock:
            if key in self._manifests:
                self._manifests.move_to_end(key)
                return self._manifests[key]
        data, _mtype, _ = self.client(ref).get_manifest(ref.repository, digest)
        doc = json_object(data, f"manifest {ref.name}@{digest}")
        self._remember(self._manifests, key, doc)
        return doc

    def _remember(self, cache: OrderedDict, key: object, value: object) -> None:
        """`cache[key] = value` as its newest entry, the oldest dropped past MANIFEST_CACHE."""
        with self._lock:
            cache[key] = value
            cache.move_to_end(key)
            while len(cache) > MANIFEST_CACHE:
                cache.popitem(last=False)


def _layer_digests(manifest: dict) -> list[str]:
    return [str(d.get("digest")) for d in manifest.get("layers") or [] if isinstance(d, dict)]


def layer_kind(desc: dict, labels: dict[str, str] | None = None) -> str | None:
    """REMOTE_BLOB / REMOTE_BOOTSTRAP for a nydus-py layer descriptor, else None."""
    labels = labels or {}
    ann = desc.get("annotations") or {}
    mtype = desc.get("mediaType", "")
    if mtype in BOOTSTRAP_TYPES or ann.get(mt.ANNO_BOOTSTRAP) == "true" or labels.get(HINT_BOOTSTRAP) == "true":
        return REMOTE_BOOTSTRAP
    if mtype in BLOB_TYPES or ann.get(mt.ANNO_BLOB) == "true" or labels.get(HINT_BLOB) == "true":
        return REMOTE_BLOB
    return None
