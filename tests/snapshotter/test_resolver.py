"""The resolver against a real registry: which Prepare is a nydus-py layer, and how many
registry round trips a pull's Prepares cost."""

from __future__ import annotations

import hashlib
import json

from nydus_py.oci import mediatypes as mt
from nydus_py.snapshotter import remote
from nydus_py.snapshotter.remote import (LABEL_TARGET, STARGZ_DIGEST, STARGZ_LAYERS, STARGZ_REF, RemoteConfig)
from nydus_py.snapshotter.resolver import Resolver
from nydus_py.snapshotter.store import REMOTE_BLOB, REMOTE_BOOTSTRAP


def _push_image(registry, repo: str, tag: str, salt: bytes) -> tuple[str, list[str]]:
    """A two-blob + bootstrap nydus-py manifest (blobs pushed, so the manifest is accepted);
    returns (manifest digest, layer digests)."""
    from nydus_py.oci.registry import RegistryClient, RegistryConfig
    layers, digests = [], []
    with RegistryClient(config=RegistryConfig(host=registry.host, scheme="http")) as c:
        for i, media in enumerate((mt.NYDUS_PY_BLOB, mt.NYDUS_PY_BLOB, mt.NYDUS_PY_BOOTSTRAP)):
            data = salt + b"layer %d" % i
            d = "sha256:" + hashlib.sha256(data).hexdigest()
            c.push_blob(repo, data, d, len(data))
            layers.append({"mediaType": media, "digest": d, "size": len(data)})
            digests.append(d)
        cfg = b"{}"
        cd = "sha256:" + hashlib.sha256(cfg).hexdigest()
        c.push_blob(repo, cfg, cd, len(cfg))
        doc = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
               "config": {"mediaType": mt.OCI_CONFIG, "digest": cd, "size": len(cfg)}, "layers": layers}
        data = json.dumps(doc).encode()
        c.put_manifest(repo, tag, data, mt.OCI_MANIFEST)
    return "sha256:" + hashlib.sha256(data).hexdigest(), digests


def _prepares(r: Resolver, ref: str, layers: list[str]) -> list:
    """The labels ctr-remote rpull gives each layer's Prepare, in pull order: the layer chain
    label lists that layer and the ones above it (as tests/e2e/test_containerd.py logs)."""
    return [r.classify({LABEL_TARGET: d, STARGZ_REF: ref, STARGZ_DIGEST: d, STARGZ_LAYERS: ",".join(layers[i:])})
            for i, d in enumerate(layers)]


def test_a_pull_resolves_its_tag_once_not_once_per_layer(registry, tmp_path):
    repo = "resolver/once"
    manifest, layers = _push_image(registry, repo, "v1", b"a")
    r = Resolver(RemoteConfig(root=tmp_path))
    try:
        registry.sync_log()
        before = registry.count_requests("GET", rf"/v2/{repo}/manifests/v1")
        got = _prepares(r, f"{registry.host}/{repo}:v1", layers)
        registry.sync_log()
        assert registry.count_requests("GET", rf"/v2/{repo}/manifests/v1") - before == 1
        assert [g.kind for g in got] == [REMOTE_BLOB, REMOTE_BLOB, REMOTE_BOOTSTRAP]
        assert {g.manifest_digest for g in got} == {manifest}
    finally:
        r.close()


def test_a_moved_tag_or_another_chain_is_resolved_again(registry, tmp_path, monkeypatch):
    """The remembered manifest answers only a Prepare whose layer chain it lists, and only for
    REF_TTL seconds: a tag pushed again (another chain) is resolved anew at once."""
    repo = "resolver/moved"
    first, layers1 = _push_image(registry, repo, "v1", b"one")
    r = Resolver(RemoteConfig(root=tmp_path))
    ref = f"{registry.host}/{repo}:v1"
    try:
        _prepares(r, ref, layers1)
        second, layers2 = _push_image(registry, repo, "v1", b"two")      # the tag moves
        registry.sync_log()
        before = registry.count_requests("GET", rf"/v2/{repo}/manifests/v1")
        got = _prepares(r, ref, layers2)
        assert {g.manifest_digest for g in got} == {second} and second != first
        registry.sync_log()
        assert registry.count_requests("GET", rf"/v2/{repo}/manifests/v1") - before == 1
        # a chain that is not how the remembered manifest ends (another image's top layers):
        # asked every time
        odd = layers2[:2]
        before = registry.count_requests("GET", rf"/v2/{repo}/manifests/v1")
        for i, d in enumerate(odd):
            r.classify({LABEL_TARGET: d, STARGZ_REF: ref, STARGZ_DIGEST: d, STARGZ_LAYERS: ",".join(odd[i:])})
        registry.sync_log()
        assert registry.count_requests("GET", rf"/v2/{repo}/manifests/v1") - before == 2
        # past REF_TTL the tag is resolved again
        monkeypatch.setattr(remote, "REF_TTL", 0.0)
        monkeypatch.setattr("nydus_py.snapshotter.resolver.REF_TTL", 0.0)
        before = registry.count_requests("GET", rf"/v2/{repo}/manifests/v1")
        _prepares(r, ref, layers2)
        registry.sync_log()
        assert registry.count_requests("GET", rf"/v2/{repo}/manifests/v1") - before == 3
    finally:
        r.close()
