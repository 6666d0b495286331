"""Finding referrer artifacts (oci/referrers.py, RegistryClient.get_referrers) against
registries that paginate, loop, point elsewhere or never end (a tiny hostile server), and the
tag schema's index staying bounded however often an image's list is pushed (the real Debian
docker-registry, which has no referrers API)."""

from __future__ import annotations

import json

import pytest

from nydus_py.oci import mediatypes as mt
from nydus_py.oci import referrers
from nydus_py.oci.layout import Descriptor
from nydus_py.oci.registry import MAX_REFERRER_PAGES, MAX_REFERRERS, RegistryClient, RegistryConfig
from tests.fixtures.referrers_server import ReferrersServer

TYPE, BLOB_TYPE = mt.NYDUS_PY_PREFETCH_ARTIFACT, mt.NYDUS_PY_PREFETCH_LIST
SUBJECT = Descriptor(mt.OCI_MANIFEST, "sha256:" + "ab" * 32, 321)
D = SUBJECT.digest


def art(n: int, artifact_type: str = TYPE) -> referrers.Artifact:
    return referrers.Artifact(subject=SUBJECT, artifact_type=artifact_type, blob=f"list {n}".encode(),
                              blob_media_type=BLOB_TYPE,
                              annotations={referrers.ANNO_CREATED: f"2026-01-01T00:00:{n:02d}Z"})


@pytest.fixture()
def server():
    s = ReferrersServer()
    yield s
    s.close()


def _find(server: ReferrersServer) -> tuple[bytes, str] | None:
    with RegistryClient(config=RegistryConfig(host=server.host, scheme="http")) as c:
        return referrers.registry_find(c, "r", D, TYPE, BLOB_TYPE, 1 << 20)


def _page(n: int, host: str = "") -> str:
    return f'<{f"http://{host}" if host else ""}/v2/r/referrers/{D}?page={n}>; rel="next"'


def test_the_newest_referrer_on_a_later_page_is_found(server):
    """Before, only the first page was read: the list on page 3 (relative, then absolute Link)
    was never seen, and an older one was used."""
    old, other, newest = server.add(art(1)), server.add(art(9, "application/x-other")), server.add(art(7))
    pages = {0: ([old, other], _page(1)), 1: ([], _page(2, server.host)), 2: ([newest], None)}
    server.pages = lambda n: pages[n]
    assert _find(server) == (b"list 7", f"referrer {server.host}/r@{newest['digest']}")
    assert server.count("/referrers/") == 3


def test_a_link_loop_ends_the_listing(server):
    a, b = server.add(art(1)), server.add(art(2))
    pages = {0: ([a], _page(1)), 1: ([b], _page(0))}       # 0 -> 1 -> 0 -> 1 (seen): stop
    server.pages = lambda n: pages[n]
    assert _find(server) == (b"list 2", f"referrer {server.host}/r@{b['digest']}")
    assert server.count("/referrers/") == 3


@pytest.mark.parametrize("form", ["absolute", "scheme-relative"])
def test_a_link_to_another_host_is_not_followed(server, form):
    other = ReferrersServer("127.0.0.2")
    try:
        mine, theirs = server.add(art(1)), other.add(art(5))
        other.pages = lambda n: ([theirs], None)
        link = f"{'http:' if form == 'absolute' else ''}//{other.host}/v2/r/referrers/{D}"
        server.pages = lambda n: ([mine], f'<{link}>; rel="next"')
        assert _find(server) == (b"list 1", f"referrer {server.host}/r@{mine['digest']}")
        assert other.requests == []
    finally:
        other.close()


def test_pages_and_entries_are_bounded(server):
    server.pages = lambda n: ([], _page(n + 1))               # never ends, a new URL each time
    assert _find(server) is None
    assert server.count("/referrers/") == MAX_REFERRER_PAGES
    server.requests.clear()
    junk = [{"mediaType": mt.OCI_MANIFEST, "digest": "sha256:" + f"{i:064x}", "size": 1,
             "artifactType": TYPE} for i in range(1000)]
    server.pages = lambda n: (junk, _page(n + 1))
    with RegistryClient(config=RegistryConfig(host=server.host, scheme="http")) as c:
        index = c.get_referrers("r", D, TYPE)
    assert index is not None and len(index["manifests"]) == MAX_REFERRERS
    assert server.count("/referrers/") == -(-MAX_REFERRERS // 1000)


def test_tag_schema_index_keeps_the_newest_of_our_type_and_every_other_entry(registry):
    """Every push of a list used to append to the `sha256-<hex>` index, until it passed the
    4 MiB manifest limit and both push and lookup failed for good."""
    with RegistryClient(config=RegistryConfig(host=registry.host, scheme="http")) as c:
        referrers.registry_push(c, "bound/app", art(0, "application/x-other"))
        for n in range(1, 21):
            referrers.registry_push(c, "bound/app", art(n))
        assert c.get_referrers("bound/app", D) is None         # no referrers API: tag schema
        raw, _, _ = c.get_manifest("bound/app", referrers.fallback_tag(D))
        entries = json.loads(raw)["manifests"]
        ours = [e for e in entries if e["artifactType"] == TYPE]
        assert len(ours) == referrers.MAX_CANDIDATES
        assert [e["annotations"][referrers.ANNO_CREATED][-3:-1] for e in ours] == \
            [f"{n:02d}" for n in range(21 - referrers.MAX_CANDIDATES, 21)]
        assert [e["artifactType"] for e in entries].count("application/x-other") == 1
        found = referrers.registry_find(c, "bound/app", D, TYPE, BLOB_TYPE, 1 << 20)
        assert found is not None and found[0] == b"list 20"
