"""OCI distribution client: manifests, blobs, exact byte ranges, uploads (in `upload.py`).

Contract, for the converter and the daemon alike:
  * every method either returns exactly what was asked for, verified where the protocol allows
    it (manifests by digest, whole blobs at EOF), or raises from `nydus_py.errors` with one line
    naming the registry, repository, digest and HTTP status;
  * `read_range` returns exactly `length` bytes or raises; a short body is never returned;
  * transient failures (connection errors, timeouts, 429, 5xx, truncated bodies) are retried
    `retry_limit` times with exponential backoff and jitter (Retry-After wins when given);
    `retry_limit=0` turns this off for callers that wrap the client in their own retry layer;
  * 401 refreshes the token once, then AuthError; 403 is AuthError; 404 is BlobNotFoundError;
  * redirects are followed by hand (GET/HEAD only) and the registry's Authorization header
    never goes to another origin (object storage behind a 307 gets a bare request);
  * one `requests.Session` with a connection pool of `pool_size`; methods may be called from
    several threads at once (the daemon calls them from trio worker threads).

Requests, auth, redirects, error mapping and retries are the transport's (oci/transport.py,
shared with oci/upload.py); the retry policy is nydus_py/retry.py.

Mirrors and the Dragonfly proxy (`oci/mirrors.py`) are routes between several clients, one per
mirror/proxy, each built from the origin's config with `host`/`scheme`, `proxy` (the proxy as an
HTTP forward proxy) and `headers` (a mirror's extra headers) replaced; so each client's
endpoint stays its configured host and each client keeps its own auth state.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Callable, Iterable
from urllib.parse import urljoin, urlsplit

from requests.utils import parse_header_links

from nydus_py.errors import BackendError, BlobNotFoundError, DigestMismatchError, ImageFormatError
from nydus_py.oci import digest as dg
from nydus_py.oci import mediatypes as mt
from nydus_py.oci import upload
from nydus_py.oci.auth import pull_scope
from nydus_py.oci.reference import check_ref, check_repository, is_digest
from nydus_py.oci.transport import (USER_AGENT, RegistryConfig, RegistryTransport, ResponseBody,
                                    read_limited, same_origin)
from nydus_py.retry import RetryPolicy

log = logging.getLogger(__name__)

MAX_MANIFEST = 4 << 20
MAX_REFERRER_PAGES = 16         # referrers API pages followed (each at most MAX_MANIFEST)
MAX_REFERRERS = 4096            # referrer descriptors kept from all pages
MAX_TAG_PAGES = 1000            # tag list pages followed
MANIFEST_ACCEPT = (mt.OCI_MANIFEST, mt.OCI_INDEX, mt.DOCKER_MANIFEST, mt.DOCKER_MANIFEST_LIST)
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")

__all__ = ["RegistryClient", "RegistryConfig", "RepositorySink", "BlobReader", "MANIFEST_ACCEPT", "USER_AGENT"]


class RegistryClient:
    """The distribution API of one registry host (module docstring); requests go through a
    RegistryTransport, uploads through oci/upload.py."""

    def __init__(self, *, config: RegistryConfig, retry: RetryPolicy | None = None):
        self.config = config
        self.transport = RegistryTransport(config, retry)

    @property
    def retries(self) -> int:
        """Transient failures retried so far (metrics)."""
        return self.transport.retries

    def __repr__(self) -> str:
        return f"RegistryClient({self.transport.endpoint()}, credentials={self.config.credentials!r})"

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ public API: reads

    def get_manifest(self, repo: str, ref: str, accept: tuple[str, ...] = MANIFEST_ACCEPT
                     ) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of a manifest or index, by tag or digest."""
        check_repository(repo)
        check_ref(ref)
        sep = "@" if is_digest(ref) else ":"
        what = f"manifest {self.config.host}/{repo}{sep}{ref}"

        def attempt() -> tuple[bytes, str, str]:
            resp = self.transport.request("GET", f"/v2/{repo}/manifests/{ref}", what=what, scopes=(pull_scope(repo),),
                                 headers={"Accept": ", ".join(accept)}, stream=True, not_found="manifest")
            with resp:
                data = read_limited(resp, MAX_MANIFEST, what)
                ctype = resp.headers.get("Content-Type", "").split(";", 1)[0].strip()
                header_digest = resp.headers.get("Docker-Content-Digest", "")
            return data, ctype, header_digest

        data, ctype, header_digest = self.transport.retry_call(what, attempt)
        if is_digest(ref):
            dg.verify_bytes(data, ref, what)
            digest = ref
        else:
            digest = dg.of_bytes(data)
            if header_digest.startswith("sha256:") and header_digest != digest:
                raise DigestMismatchError(f"{what}: registry says {header_digest}, content hashes to {digest}")
        return data, _manifest_media_type(data, ctype, what), digest

    def head_blob(self, repo: str, digest: str) -> int | None:
        """The blob's size, or None if the repository does not have it."""
        check_repository(repo)
        dg.parse(digest)
        what = f"blob {self.config.host}/{repo}@{digest}"

        def attempt() -> int | None:
            try:
                resp = self.transport.request("HEAD", f"/v2/{repo}/blobs/{digest}", what=what,
                                     scopes=(pull_scope(repo),))
            except BlobNotFoundError:
                return None
            with resp:
                length = resp.headers.get("Content-Length")
            if length is None or not length.isdigit():
                raise BackendError(f"{what}: HEAD answered without Content-Length", permanent=True)
            return int(length)

        return self.transport.retry_call(what, attempt)

    def get_blob(self, repo: str, digest: str, size: int | None = None) -> "BlobReader":
        """A stream of the whole blob; digest (and size, if given) checked when it reaches EOF.

        Only opening the stream is retried; a failure while reading raises BackendError."""
        check_repository(repo)
        dg.parse(digest)
        what = f"blob {self.config.host}/{repo}@{digest}"
        resp = self.transport.retry_call(what, lambda: self.transport.request(
            "GET", f"/v2/{repo}/blobs/{digest}", what=what, scopes=(pull_scope(repo),), stream=True))
        return BlobReader(ResponseBody(resp, what), digest, size, what)

    def read_range(self, repo: str, digest: str, offset: int, length: int) -> bytes:
        """Exactly `length` bytes of the blob starting at `offset`, or an exception."""
        check_repository(repo)
        dg.parse(digest)
        if offset < 0 or length < 0:
            raise ValueError(f"read_range: negative offset {offset} or length {length}")
        if length == 0:
            return b""
        end = offset + length - 1
        what = f"blob {self.config.host}/{repo}@{digest} bytes {offset}-{end}"

        def attempt() -> bytes:
            resp = self.transport.request("GET", f"/v2/{repo}/blobs/{digest}", what=what, scopes=(pull_scope(repo),),
                                 headers={"Range": f"bytes={offset}-{end}"}, stream=True, ok=(200, 206))
            with resp:
                body = ResponseBody(resp, what)
                if resp.status_code == 206:
                    _check_content_range(resp.headers.get("Content-Range"), offset, end, what)
                else:
                    if offset > self.config.max_range_skip:
                        raise BackendError(f"{what}: server ignored Range (HTTP 200) and offset {offset} is "
                                           f"beyond max_range_skip {self.config.max_range_skip}", permanent=True)
                    _skip(body, offset, what)
                return _read_exact(body, length, what)

        return self.transport.retry_call(what, attempt)

    def list_tags(self, repo: str) -> list[str]:
        check_repository(repo)
        what = f"tags of {self.config.host}/{repo}"
        tags: list[str] = []
        first = self.transport.url(f"/v2/{repo}/tags/list")
        url: str | None = first
        seen = {first}
        for _ in range(MAX_TAG_PAGES):
            if url is None:
                break
            page = url
            resp = self.transport.retry_call(what, lambda: self.transport.request(
                "GET", page, what=what, scopes=(pull_scope(repo),), not_found="repository"))
            with resp:
                try:
                    tags += list(resp.json().get("tags") or [])
                except (ValueError, AttributeError):
                    raise ImageFormatError(f"{what}: response is not a tag list") from None
                url = _next_page(page, resp.headers.get("Link", ""), seen, what)
        else:
            if url is not None:
                log.warning("%s: more than %d pages; using the first %d", what, MAX_TAG_PAGES,
                            MAX_TAG_PAGES)
        return tags

    def get_referrers(self, repo: str, digest: str, artifact_type: str | None = None) -> dict | None:
        """The OCI 1.1 referrers index of `digest` (`GET /v2/<repo>/referrers/<digest>`), or
        None when the registry has no referrers API (it answers 404, which a registry with the
        API never does: the caller then uses the `sha256-<hex>` tag schema). Pages
        (`Link: <…>; rel="next"`, distribution spec) are followed and merged into one index, as
        far as MAX_REFERRER_PAGES pages and MAX_REFERRERS entries (of `artifact_type`, when
        given: a registry may ignore the filter); a Link to another origin or back to a page
        already read ends the listing with one warning (what was read is used)."""
        check_repository(repo)
        dg.parse(digest)
        what = f"referrers of {self.config.host}/{repo}@{digest}"
        url = self.transport.url(f"/v2/{repo}/referrers/{digest}")
        params = {"artifactType": artifact_type} if artifact_type else None
        index: dict | None = None
        entries: list = []
        seen = {url}
        for page in range(MAX_REFERRER_PAGES):
            got = self.transport.retry_call(what, lambda: self._referrers_page(repo, url, params, what))
            if got is None:
                return None if index is None else {**index, "manifests": entries}
            obj, link = got
            index = index or obj
            entries += [e for e in obj.get("manifests", [])
                        if not artifact_type or (isinstance(e, dict) and e.get("artifactType") == artifact_type)]
            nxt = _next_page(url, link, seen, what)
            if nxt is None:
                break
            if len(entries) >= MAX_REFERRERS:
                log.warning("%s: more than %d referrers; using the first %d", what, MAX_REFERRERS,
                            MAX_REFERRERS)
                break
            url, params = nxt, None         # the Link carries the query
        else:
            log.warning("%s: more than %d pages; using the first %d", what, MAX_REFERRER_PAGES,
                        MAX_REFERRER_PAGES)
        assert index is not None
        return {**index, "manifests": entries[:MAX_REFERRERS]}

    def _referrers_page(self, repo: str, url: str, params: dict | None,
                        what: str) -> tuple[dict, str] | None:
        """(one page's index, its Link header) or None on 404."""
        try:
            resp = self.transport.request("GET", url, what=what, scopes=(pull_scope(repo),),
                                          params=params, stream=True,
                                          headers={"Accept": mt.OCI_INDEX}, not_found="referrers API")
        except BlobNotFoundError:
            return None
        with resp:
            data = read_limited(resp, MAX_MANIFEST, what)
            link = resp.headers.get("Link", "")
        try:
            obj = json.loads(data)
        except ValueError:
            raise ImageFormatError(f"{what}: not JSON") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("manifests", []), list):
            raise ImageFormatError(f"{what}: not an OCI index")
        return obj, link

    # ------------------------------------------------------------------ public API: writes

    def push_blob(self, repo: str, src: upload.BlobSource, digest: str, size: int, *,
                  mount_from: Iterable[str] = (), on_progress: Callable[[int], None] | None = None) -> str:
        """Make `repo` have the blob; returns "exists", "mounted" or "uploaded". `src` may be
        bytes, a path, or a callable returning either: it is called only when the blob must
        really be uploaded (not present, not mountable), e.g. to download it elsewhere."""
        check_repository(repo)
        dg.parse(digest)
        mount_from = [check_repository(r) for r in mount_from if r != repo]
        if not callable(src):
            upload.check_source(src, size, digest)
        if self.head_blob(repo, digest) is not None:
            return "exists"
        return upload.upload_blob(self.transport, repo, src, digest, size, mount_from=mount_from,
                                  on_progress=on_progress)

    def put_manifest(self, repo: str, ref: str, data: bytes, media_type: str) -> str:
        """PUT a manifest or index under a tag (or its digest); returns its digest."""
        return upload.put_manifest(self.transport, repo, ref, data, media_type)


class RepositorySink:
    """A repository as a BlobSink (storage/backend.py), like an S3 bucket: put_blob uploads
    a file unless the repository has it (or can cross-mount it from `mount_from`)."""

    def __init__(self, client: RegistryClient, repo: str, *, mount_from: Iterable[str] = (),
                 on_progress: Callable[[int], None] | None = None):
        self.client = client
        self.repo = repo
        self.mount_from = tuple(mount_from)
        self.on_progress = on_progress

    def has_blob(self, blob_id: str) -> bool:
        return self.client.head_blob(self.repo, blob_id) is not None

    def put_blob(self, blob_id: str, path: str | os.PathLike[str]) -> str:
        return self.client.push_blob(self.repo, path, blob_id, os.path.getsize(path), mount_from=self.mount_from,
                                     on_progress=self.on_progress)


class BlobReader(dg.VerifyingReader):
    """A verifying stream over an HTTP body; use as a context manager or call close()."""

    def read(self, n: int = -1) -> bytes:
        data = super().read(n)
        if n is None or n < 0:
            self.finish()       # read-all: verify now, not on a later empty read
        return data

    def __enter__(self) -> "BlobReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------- helpers

def _next_page(current: str, header: str, seen: set[str], what: str) -> str | None:
    """The `rel="next"` page of a `Link` header, resolved against the page it came from (so
    against the registry); None when there is none, or (one warning) when it leads to another
    origin or back to a page already read. Adds it to `seen`."""
    if not header:
        return None
    nxt = next((lk.get("url") for lk in parse_header_links(header) if lk.get("rel") == "next"), None)
    if not nxt:
        return None
    url = urljoin(current, nxt)
    if urlsplit(url).scheme not in ("http", "https") or not same_origin(url, current):
        log.warning("%s: next page %s is not on the registry; not followed", what, url[:200])
        return None
    if url in seen:
        log.warning("%s: next page %s was read already (a Link loop); stopping there", what,
                    url[:200])
        return None
    seen.add(url)
    return url


def _check_content_range(header: str | None, start: int, end: int, what: str) -> None:
    if header is None:
        return                      # trust Content-Length checks in _read_exact
    m = _CONTENT_RANGE_RE.match(header.strip())
    if not m:
        raise BackendError(f"{what}: malformed Content-Range {header!r}", permanent=True)
    got_start, got_end, total = int(m.group(1)), int(m.group(2)), m.group(3)
    if got_start != start:
        raise BackendError(f"{what}: server sent range starting at {got_start}", permanent=True)
    if got_end < end:
        size = f" (blob size {total})" if total != "*" else ""
        raise BackendError(f"{what}: range extends past the end of the blob{size}", permanent=True)


def _skip(body: ResponseBody, n: int, what: str) -> None:
    while n > 0:
        got = body.read(min(n, 1 << 20))
        if not got:
            raise BackendError(f"{what}: body ended while skipping to the offset", permanent=False)
        n -= len(got)


def _read_exact(body: ResponseBody, length: int, what: str) -> bytes:
    data = body.read(length)
    if len(data) < length:
        raise BackendError(f"{what}: short body ({len(data)} of {length} bytes)", permanent=False)
    return data


def _manifest_media_type(data: bytes, ctype: str, what: str) -> str:
    if ctype in MANIFEST_ACCEPT:
        return ctype
    try:
        obj = json.loads(data)
    except ValueError:
        raise ImageFormatError(f"{what}: not JSON (Content-Type {ctype or 'none'})") from None
    declared = obj.get("mediaType") if isinstance(obj, dict) else None
    if isinstance(declared, str) and declared:
        return declared
    if isinstance(obj, dict) and "manifests" in obj:
        return mt.OCI_INDEX
    if isinstance(obj, dict) and "layers" in obj:
        return mt.OCI_MANIFEST
    raise ImageFormatError(f"{what}: cannot tell the media type (Content-Type {ctype or 'none'})")
