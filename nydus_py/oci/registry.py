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

Mirrors and the Dragonfly proxy (`oci/mirrors.py`) are routes between several clients, one per
mirror/proxy, each built from the origin's config with `host`/`scheme`, `proxy` (the proxy as an
HTTP forward proxy) and `headers` (a mirror's extra headers) replaced; so `_endpoint()` stays the
configured host and each client keeps its own auth state.
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable, TypeVar
from urllib.parse import urljoin, urlsplit

import requests
import urllib3

from nydus_py.errors import (AuthError, BackendError, BlobNotFoundError, ConfigError,
                             DigestMismatchError, ImageFormatError)
from nydus_py.oci import digest as dg
from nydus_py.oci import mediatypes as mt
from nydus_py.oci.auth import Authenticator, Credentials, pull_scope, resolve_credentials
from nydus_py.oci.reference import Reference, check_ref, check_repository, is_digest

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_MANIFEST = 4 << 20
MAX_REDIRECTS = 5
USER_AGENT = "nydus-py/0.1"
MANIFEST_ACCEPT = (mt.OCI_MANIFEST, mt.OCI_INDEX, mt.DOCKER_MANIFEST, mt.DOCKER_MANIFEST_LIST)
_REDIRECTS = (301, 302, 303, 307, 308)
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


@dataclass(frozen=True, kw_only=True)
class RegistryConfig:
    """How to reach one registry host. Field names follow nydusd's `backend.registry` config."""

    host: str                              # API host[:port], e.g. registry-1.docker.io, 127.0.0.1:5000
    scheme: str = "https"                  # "http" for plain-http (insecure) registries
    skip_verify: bool = False              # do not verify the TLS certificate
    ca_file: str | None = None             # PEM bundle to verify the registry's certificate with
    timeout: float = 30.0                  # seconds between bytes once connected
    connect_timeout: float = 5.0
    retry_limit: int = 3                   # retries after the first attempt; 0 = no retries
    backoff_base: float = 0.25             # first retry waits ~backoff_base, doubling each time
    backoff_max: float = 8.0
    max_retry_after: float = 30.0          # cap on a server's Retry-After
    credentials: Credentials | None = None
    proxy: str | None = None               # plain HTTP proxy URL for all requests
    pool_size: int = 16                    # connections kept per host
    upload_chunk_size: int = 32 << 20      # blobs larger than this are uploaded in PATCH chunks
    max_range_skip: int = 16 << 20         # when a server ignores Range: how far we may skip a 200 body
    user_agent: str = USER_AGENT
    headers: tuple[tuple[str, str], ...] = ()   # extra headers on every request (a mirror's `headers`)

    def __post_init__(self) -> None:
        if self.scheme not in ("http", "https"):
            raise ConfigError(f"registry {self.host}: scheme must be 'http' or 'https', not {self.scheme!r}")
        if not self.host or "/" in self.host:
            raise ConfigError(f"registry host {self.host!r}: expected host[:port] without a path")
        if self.retry_limit < 0 or self.timeout <= 0 or self.connect_timeout <= 0:
            raise ConfigError(f"registry {self.host}: retry_limit must be >= 0 and timeouts > 0")
        if self.upload_chunk_size < 1:
            raise ConfigError(f"registry {self.host}: upload_chunk_size must be positive")

    @classmethod
    def for_reference(cls, ref: Reference, **kw) -> "RegistryConfig":
        """Config for the registry of `ref`, credentials resolved as docker would."""
        if "credentials" not in kw:
            kw["credentials"] = resolve_credentials(ref.host)
        return cls(host=ref.api_host, **kw)


class RegistryClient:
    def __init__(self, *, config: RegistryConfig):
        self.config = config
        self._base = f"{config.scheme}://{config.host}"
        self._session = self._make_session()
        verify: bool | str = config.ca_file or not config.skip_verify
        self._verify = verify
        self._timeouts = (config.connect_timeout, config.timeout)
        self.auth = Authenticator(config.host, config.credentials, self._session,
                                  timeout=self._timeouts, verify=verify)
        self._stats_lock = threading.Lock()
        self.retries = 0                   # transient failures retried, for metrics

    def __repr__(self) -> str:
        return f"RegistryClient({self._base}, credentials={self.config.credentials!r})"

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *exc) -> None:
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
            resp = self._request("GET", f"/v2/{repo}/manifests/{ref}", what=what, scopes=(pull_scope(repo),),
                                 headers={"Accept": ", ".join(accept)}, stream=True, not_found="manifest")
            with resp:
                data = _read_limited(resp, MAX_MANIFEST, what)
                ctype = resp.headers.get("Content-Type", "").split(";", 1)[0].strip()
                header_digest = resp.headers.get("Docker-Content-Digest", "")
            return data, ctype, header_digest

        data, ctype, header_digest = self._retrying(what, attempt)
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
                resp = self._request("HEAD", f"/v2/{repo}/blobs/{digest}", what=what,
                                     scopes=(pull_scope(repo),))
            except BlobNotFoundError:
                return None
            with resp:
                length = resp.headers.get("Content-Length")
            if length is None or not length.isdigit():
                raise BackendError(f"{what}: HEAD answered without Content-Length", permanent=True)
            return int(length)

        return self._retrying(what, attempt)

    def get_blob(self, repo: str, digest: str, size: int | None = None) -> "BlobReader":
        """A stream of the whole blob; digest (and size, if given) checked when it reaches EOF.

        Only opening the stream is retried; a failure while reading raises BackendError."""
        check_repository(repo)
        dg.parse(digest)
        what = f"blob {self.config.host}/{repo}@{digest}"
        resp = self._retrying(what, lambda: self._request(
            "GET", f"/v2/{repo}/blobs/{digest}", what=what, scopes=(pull_scope(repo),), stream=True))
        return BlobReader(_ResponseBody(resp, what), digest, size, what)

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
            resp = self._request("GET", f"/v2/{repo}/blobs/{digest}", what=what, scopes=(pull_scope(repo),),
                                 headers={"Range": f"bytes={offset}-{end}"}, stream=True, ok=(200, 206))
            with resp:
                body = _ResponseBody(resp, what)
                if resp.status_code == 206:
                    _check_content_range(resp.headers.get("Content-Range"), offset, end, what)
                else:
                    if offset > self.config.max_range_skip:
                        raise BackendError(f"{what}: server ignored Range (HTTP 200) and offset {offset} is "
                                           f"beyond max_range_skip {self.config.max_range_skip}", permanent=True)
                    _skip(body, offset, what)
                return _read_exact(body, length, what)

        return self._retrying(what, attempt)

    def list_tags(self, repo: str) -> list[str]:
        check_repository(repo)
        what = f"tags of {self.config.host}/{repo}"
        tags: list[str] = []
        url: str | None = f"/v2/{repo}/tags/list"
        while url:
            resp = self._retrying(what, lambda u=url: self._request(
                "GET", u, what=what, scopes=(pull_scope(repo),), not_found="repository"))
            with resp:
                try:
                    tags += list(resp.json().get("tags") or [])
                except (ValueError, AttributeError):
                    raise ImageFormatError(f"{what}: response is not a tag list") from None
                nxt = resp.links.get("next", {}).get("url")
            url = urljoin(resp.url, nxt) if nxt else None
        return tags

    def get_referrers(self, repo: str, digest: str, artifact_type: str | None = None) -> dict | None:
        """The OCI 1.1 referrers index of `digest` (`GET /v2/<repo>/referrers/<digest>`), or
        None when the registry has no referrers API (it answers 404, which a registry with the
        API never does: the caller then uses the `sha256-<hex>` tag schema). Not paginated
        (Link headers are not followed: the first page is plenty for our artifacts)."""
        check_repository(repo)
        dg.parse(digest)
        what = f"referrers of {self.config.host}/{repo}@{digest}"
        params = {"artifactType": artifact_type} if artifact_type else None

        def attempt() -> dict | None:
            try:
                resp = self._request("GET", f"/v2/{repo}/referrers/{digest}", what=what,
                                     scopes=(pull_scope(repo),), params=params, stream=True,
                                     headers={"Accept": mt.OCI_INDEX}, not_found="referrers API")
            except BlobNotFoundError:
                return None
            with resp:
                data = _read_limited(resp, MAX_MANIFEST, what)
            try:
                obj = json.loads(data)
            except ValueError:
                raise ImageFormatError(f"{what}: not JSON") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("manifests", []), list):
                raise ImageFormatError(f"{what}: not an OCI index")
            return obj

        return self._retrying(what, attempt)

    # ------------------------------------------------------------------ public API: writes

    def push_blob(self, repo: str, src, digest: str, size: int, *, mount_from=(),
                  on_progress: Callable[[int], None] | None = None) -> str:
        """Upload a blob unless present; returns "exists", "mounted" or "uploaded". See upload.py."""
        from nydus_py.oci import upload
        return upload.push_blob(self, repo, src, digest, size, mount_from=mount_from, on_progress=on_progress)

    def put_manifest(self, repo: str, ref: str, data: bytes, media_type: str) -> str:
        """PUT a manifest or index under a tag (or its digest); returns its digest."""
        from nydus_py.oci import upload
        return upload.put_manifest(self, repo, ref, data, media_type)

    # ------------------------------------------------------------------ transport

    def _make_session(self) -> requests.Session:
        s = requests.Session()
        s.trust_env = False            # no ~/.netrc credentials, no surprise env proxies
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=self.config.pool_size,
                                                max_retries=0)
        s.mount("http://", adapter)
        s.mount("https://", adapter)
        s.headers["User-Agent"] = self.config.user_agent
        s.headers.update(dict(self.config.headers))
        if self.config.proxy:
            s.proxies = {"http": self.config.proxy, "https": self.config.proxy}
        return s

    def _endpoint(self) -> str:
        """Base URL for the next request (mirrors/proxy are separate clients: oci/mirrors.py)."""
        return self._base

    def _url(self, path_or_url: str) -> str:
        return path_or_url if "://" in path_or_url else self._endpoint() + path_or_url

    def _request(self, method: str, path_or_url: str, *, what: str, scopes: tuple[str, ...],
                 headers: dict | None = None, data=None, params=None, stream: bool = False,
                 ok: tuple[int, ...] = (200,), not_found: str = "blob") -> requests.Response:
        """One exchange (auth, one token refresh, redirects), no retries. `data` may be a
        zero-argument callable returning a fresh body, so the 401 retry can resend it.
        Returns the response for an `ok` status; raises the mapped error otherwise."""
        url = self._url(path_or_url)
        refreshed = False
        for _ in range(3):      # bare request (learns the challenge), token, one refreshed token
            h = dict(headers or {})
            if _same_origin(url, self._endpoint()):
                h.update(self.auth.headers(scopes))
            body = data() if callable(data) else data
            resp = self._send(method, url, h, body, params, stream, what)
            sent_auth = "Authorization" in h
            if resp.status_code == 401 and not (sent_auth and refreshed):
                _discard(resp)
                self.auth.on_unauthorized(resp, scopes, what, sent=h.get("Authorization"))
                refreshed = refreshed or sent_auth
                continue
            if resp.status_code in ok:
                return resp
            err = _status_error(resp, _error_body(resp, stream), what, not_found)
            _discard(resp)
            raise err
        raise AuthError(f"{what}: HTTP 401 from {self.config.host} after authenticating")

    def _send(self, method: str, url: str, headers: dict, body, params, stream: bool,
              what: str) -> requests.Response:
        """Send and follow redirects by hand (GET/HEAD), dropping Authorization across origins."""
        for _ in range(MAX_REDIRECTS + 1):
            try:
                resp = self._session.request(method, url, headers=headers, data=body, params=params,
                                             stream=stream, allow_redirects=False,
                                             timeout=self._timeouts, verify=self._verify)
            except requests.exceptions.SSLError as e:
                raise BackendError(f"{what}: TLS error talking to {urlsplit(url).netloc} ({_short(e)}); "
                                   "set ca_file, or skip_verify / scheme=http for a test registry", permanent=True) from None
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
                raise BackendError(f"{what}: {e.__class__.__name__} talking to {urlsplit(url).netloc} "
                                   f"({_short(e)})", permanent=False) from None
            except requests.RequestException as e:
                raise BackendError(f"{what}: {e.__class__.__name__} ({_short(e)})", permanent=True) from None
            if resp.status_code not in _REDIRECTS or method not in ("GET", "HEAD"):
                return resp
            location = resp.headers.get("Location")
            _discard(resp)
            if not location:
                raise BackendError(f"{what}: HTTP {resp.status_code} redirect without Location", permanent=True)
            new = urljoin(url, location)
            if urlsplit(new).scheme not in ("http", "https"):
                raise BackendError(f"{what}: redirect to unsupported URL scheme", permanent=True)
            if not _same_origin(new, url):
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            url, params = new, None
        raise BackendError(f"{what}: more than {MAX_REDIRECTS} redirects", permanent=True)

    def _retrying(self, what: str, attempt: Callable[[], T]) -> T:
        tries = 0
        while True:
            try:
                return attempt()
            except BackendError as e:
                if e.permanent or tries >= self.config.retry_limit:
                    raise
                delay = self._backoff(tries, getattr(e, "retry_after", None))
                tries += 1
                with self._stats_lock:
                    self.retries += 1
                log.warning("%s; retry %d/%d in %.2fs", e, tries, self.config.retry_limit, delay)
                time.sleep(delay)

    def _backoff(self, tries: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.config.max_retry_after)
        ceiling = min(self.config.backoff_max, self.config.backoff_base * (2 ** tries))
        return random.uniform(ceiling / 2, ceiling)     # "equal jitter"


class BlobReader(dg.VerifyingReader):
    """A verifying stream over an HTTP body; use as a context manager or call close()."""

    def read(self, n: int = -1) -> bytes:
        data = super().read(n)
        if n is None or n < 0:
            self.finish()       # read-all: verify now, not on a later empty read
        return data

    def __enter__(self) -> "BlobReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _ResponseBody:
    """Raw (undecoded) body of a streamed response; transport errors become transient BackendError."""

    def __init__(self, resp: requests.Response, what: str):
        self._resp = resp
        self._what = what

    def read(self, n: int = -1) -> bytes:
        try:
            return self._resp.raw.read(None if n is None or n < 0 else n, decode_content=False)
        except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as e:
            raise BackendError(f"{self._what}: body read failed ({e.__class__.__name__}: {_short(e)})",
                               permanent=False) from None

    def close(self) -> None:
        self._resp.close()


# ---------------------------------------------------------------------- helpers

def _same_origin(a: str, b: str) -> bool:
    pa, pb = urlsplit(a), urlsplit(b)
    return (pa.scheme, pa.hostname, pa.port) == (pb.scheme, pb.hostname, pb.port)


def _discard(resp: requests.Response) -> None:
    """Drain a small error body so the connection goes back to the pool, then close."""
    try:
        if resp.raw is not None and not resp.raw.closed:
            resp.raw.read(64 << 10, decode_content=False)
    except Exception:   # the connection is discarded anyway
        pass
    resp.close()


def _short(e: BaseException) -> str:
    return str(e).splitlines()[0][:200] if str(e) else e.__class__.__name__


def _error_body(resp: requests.Response, streamed: bool) -> bytes:
    try:
        return resp.raw.read(64 << 10, decode_content=True) if streamed else resp.content[:64 << 10]
    except Exception:
        return b""


def _registry_error(resp: requests.Response, body: bytes) -> str:
    """`CODE: message` from a distribution error body, if there is one."""
    try:
        errs = json.loads(body or b"{}").get("errors") or []
        e = errs[0]
        return f"{e.get('code', '')}: {e.get('message', '')}".strip(": ")
    except Exception:
        return ""


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _status_error(resp: requests.Response, body: bytes, what: str, not_found: str) -> BackendError:
    status = resp.status_code
    detail = _registry_error(resp, body)
    line = f"{what}: HTTP {status}" + (f" {detail}" if detail else "")
    if status == 401:
        return AuthError(f"{line} (credentials rejected after token refresh)")
    if status == 403:
        return AuthError(f"{line} (access denied)")
    if status == 404:
        return BlobNotFoundError(f"{what}: {not_found} not found (HTTP 404)")
    if status == 400 and detail.startswith("DIGEST_INVALID"):
        return DigestMismatchError(line)
    if status == 429 or status >= 500:
        err = BackendError(line, permanent=False)
        err.retry_after = _retry_after(resp.headers.get("Retry-After"))  # type: ignore[attr-defined]
        return err
    return BackendError(line, permanent=True)


def _read_limited(resp: requests.Response, limit: int, what: str) -> bytes:
    declared = resp.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ImageFormatError(f"{what}: size {declared} exceeds limit {limit}")
    body = _ResponseBody(resp, what)
    data = body.read(limit + 1)
    if len(data) > limit:
        raise ImageFormatError(f"{what}: larger than limit {limit}")
    if declared and declared.isdigit() and len(data) != int(declared):
        raise BackendError(f"{what}: short body ({len(data)} of {declared} bytes)", permanent=False)
    return data


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


def _skip(body: _ResponseBody, n: int, what: str) -> None:
    while n > 0:
        got = body.read(min(n, 1 << 20))
        if not got:
            raise BackendError(f"{what}: body ended while skipping to the offset", permanent=False)
        n -= len(got)


def _read_exact(body: _ResponseBody, length: int, what: str) -> bytes:
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
