"""The registry transport: one HTTP exchange with a distribution registry, and its retries.

Both halves of the client use it: oci/registry.py (manifests, blobs, ranges) and
oci/upload.py (blob uploads, manifest PUTs). It owns

  * one `requests.Session` with a connection pool of `pool_size`, no environment proxies or
    .netrc (`trust_env=False`); safe to use from several threads at once;
  * authentication (oci/auth.py): the bare request learns the challenge, a token is fetched,
    401 refreshes it once, then AuthError;
  * redirects, followed by hand for GET/HEAD; the registry's Authorization header never goes
    to another origin (object storage behind a 307 gets a bare request);
  * status → error mapping (nydus_py/errors.py): 403 AuthError, 404 BlobNotFoundError,
    429/5xx and connection failures transient (Retry-After attached), the rest permanent;
  * the retry policy (nydus_py/retry.py) through `retry_call`, counting retries in `retries`.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, TypeVar
from urllib.parse import urljoin, urlsplit

import requests
import urllib3

from nydus_py import __version__
from nydus_py.errors import (AuthError, BackendError, BlobNotFoundError, ConfigError, DigestMismatchError,
                             ImageFormatError, NydusError)
from nydus_py.oci.auth import Authenticator, Credentials, resolve_credentials
from nydus_py.oci.reference import Reference
from nydus_py.retry import (DEFAULT_BACKOFF, DEFAULT_LIMIT, DEFAULT_MAX_BACKOFF, DEFAULT_MAX_RETRY_AFTER,
                            RetryPolicy)

log = logging.getLogger("nydus_py.oci.registry")
T = TypeVar("T")

MAX_REDIRECTS = 5
USER_AGENT = f"nydus-py/{__version__}"
_REDIRECTS = (301, 302, 303, 307, 308)


@dataclass(frozen=True, kw_only=True)
class RegistryConfig:
    """How to reach one registry host. Field names follow nydusd's `backend.registry` config."""

    host: str                              # API host[:port], e.g. registry-1.docker.io, 127.0.0.1:5000
    scheme: str = "https"                  # "http" for plain-http (insecure) registries
    skip_verify: bool = False              # do not verify the TLS certificate
    ca_file: str | None = None             # PEM bundle to verify the registry's certificate with
    timeout: float = 30.0                  # seconds between bytes once connected
    connect_timeout: float = 5.0
    retry_limit: int = DEFAULT_LIMIT       # retries after the first attempt; 0 = no retries (retry.py)
    backoff_base: float = DEFAULT_BACKOFF  # first retry waits ~backoff_base, doubling each time
    backoff_max: float = DEFAULT_MAX_BACKOFF
    max_retry_after: float = DEFAULT_MAX_RETRY_AFTER   # cap on a server's Retry-After
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
    def for_reference(cls, ref: Reference, **kw: Any) -> "RegistryConfig":
        """Config for the registry of `ref`, credentials resolved as docker would."""
        if "credentials" not in kw:
            kw["credentials"] = resolve_credentials(ref.host)
        return cls(host=ref.api_host, **kw)

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(limit=self.retry_limit, backoff=self.backoff_base, max_backoff=self.backoff_max,
                           max_retry_after=self.max_retry_after)


class RegistryTransport:
    """Requests to one registry host as configured; `retry` defaults to the config's policy
    (tests pass one with a fake sleep and clock)."""

    def __init__(self, config: RegistryConfig, retry: RetryPolicy | None = None):
        self.config = config
        self.retry = retry if retry is not None else config.retry_policy()
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
        return f"RegistryTransport({self._base}, credentials={self.config.credentials!r})"

    def close(self) -> None:
        self._session.close()

    def retry_call(self, what: str, attempt: Callable[[], T]) -> T:
        """`attempt()` under the retry policy."""
        return self.retry.call(what, attempt, on_retry=self._count_retry)

    def _count_retry(self, _e: BackendError) -> None:
        with self._stats_lock:
            self.retries += 1

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

    def endpoint(self) -> str:
        """Base URL for the next request (mirrors/proxy are separate clients: oci/mirrors.py)."""
        return self._base

    def url(self, path_or_url: str) -> str:
        return path_or_url if "://" in path_or_url else self.endpoint() + path_or_url

    def request(self, method: str, path_or_url: str, *, what: str, scopes: tuple[str, ...],
                headers: dict[str, str] | None = None, data: Any = None, params: dict[str, str] | None = None,
                stream: bool = False, ok: tuple[int, ...] = (200,), not_found: str = "blob") -> requests.Response:
        """One exchange (auth, one token refresh, redirects), no retries. `data` may be a
        zero-argument callable returning a fresh body, so the 401 retry can resend it.
        Returns the response for an `ok` status; raises the mapped error otherwise."""
        url = self.url(path_or_url)
        refreshed = False
        for _ in range(3):      # bare request (learns the challenge), token, one refreshed token
            h = dict(headers or {})
            if same_origin(url, self.endpoint()):
                h.update(self.auth.headers(scopes))
            body = data() if callable(data) else data
            resp = self.send(method, url, h, body, params, stream, what)
            sent_auth = "Authorization" in h
            if resp.status_code == 401 and not (sent_auth and refreshed):
                discard(resp)
                self.auth.on_unauthorized(resp, scopes, what, sent=h.get("Authorization"))
                refreshed = refreshed or sent_auth
                continue
            if resp.status_code in ok:
                return resp
            err = status_error(resp, error_body(resp, stream), what, not_found, self.retry)
            discard(resp)
            raise err
        raise AuthError(f"{what}: HTTP 401 from {self.config.host} after authenticating")

    def send(self, method: str, url: str, headers: dict[str, str], body: Any, params: dict[str, str] | None,
             stream: bool, what: str) -> requests.Response:
        """Send and follow redirects by hand (GET/HEAD), dropping Authorization across origins."""
        for _ in range(MAX_REDIRECTS + 1):
            try:
                resp = self._session.request(method, url, headers=headers, data=body, params=params,
                                             stream=stream, allow_redirects=False,
                                             timeout=self._timeouts, verify=self._verify)
            except requests.exceptions.SSLError as e:
                raise BackendError(f"{what}: TLS error talking to {urlsplit(url).netloc} ({short(e)}); "
                                   "set ca_file, or skip_verify / scheme=http for a test registry", permanent=True) from None
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
                raise BackendError(f"{what}: {e.__class__.__name__} talking to {urlsplit(url).netloc} "
                                   f"({short(e)})", permanent=False) from None
            except requests.RequestException as e:
                raise BackendError(f"{what}: {e.__class__.__name__} ({short(e)})", permanent=True) from None
            if resp.status_code not in _REDIRECTS or method not in ("GET", "HEAD"):
                return resp
            location = resp.headers.get("Location")
            discard(resp)
            if not location:
                raise BackendError(f"{what}: HTTP {resp.status_code} redirect without Location", permanent=True)
            new = urljoin(url, location)
            if urlsplit(new).scheme not in ("http", "https"):
                raise BackendError(f"{what}: redirect to unsupported URL scheme", permanent=True)
            if not same_origin(new, url):
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            url, params = new, None
        raise BackendError(f"{what}: more than {MAX_REDIRECTS} redirects", permanent=True)


class ResponseBody:
    """Raw (undecoded) body of a streamed response; transport errors become transient BackendError."""

    def __init__(self, resp: requests.Response, what: str):
        self._resp = resp
        self._what = what

    def read(self, n: int = -1) -> bytes:
        try:
            return self._resp.raw.read(None if n is None or n < 0 else n, decode_content=False)
        except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as e:
            raise BackendError(f"{self._what}: body read failed ({e.__class__.__name__}: {short(e)})",
                               permanent=False) from None

    def close(self) -> None:
        self._resp.close()


# ---------------------------------------------------------------------- helpers

def same_origin(a: str, b: str) -> bool:
    pa, pb = urlsplit(a), urlsplit(b)
    return (pa.scheme, pa.hostname, pa.port) == (pb.scheme, pb.hostname, pb.port)


def discard(resp: requests.Response) -> None:
    """Drain a small error body so the connection goes back to the pool, then close."""
    try:
        if resp.raw is not None and not resp.raw.closed:
            resp.raw.read(64 << 10, decode_content=False)
    except Exception:   # the connection is discarded anyway
        pass
    resp.close()


def short(e: BaseException) -> str:
    return str(e).splitlines()[0][:200] if str(e) else e.__class__.__name__


def error_body(resp: requests.Response, streamed: bool) -> bytes:
    try:
        return resp.raw.read(64 << 10, decode_content=True) if streamed else resp.content[:64 << 10]
    except Exception:
        return b""


def registry_error(resp: requests.Response, body: bytes) -> str:
    """`CODE: message` from a distribution error body, if there is one."""
    try:
        errs = json.loads(body or b"{}").get("errors") or []
        e = errs[0]
        return f"{e.get('code', '')}: {e.get('message', '')}".strip(": ")
    except Exception:
        return ""


def status_error(resp: requests.Response, body: bytes, what: str, not_found: str,
                 retry: RetryPolicy) -> NydusError:
    """The error for a non-OK response; 429/5xx are transient and carry their Retry-After."""
    status = resp.status_code
    detail = registry_error(resp, body)
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
        err.retry_after = retry.retry_after(resp.headers.get("Retry-After"))
        return err
    return BackendError(line, permanent=True)


def read_limited(resp: requests.Response, limit: int, what: str) -> bytes:
    declared = resp.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ImageFormatError(f"{what}: size {declared} exceeds limit {limit}")
    body = ResponseBody(resp, what)
    data = body.read(limit + 1)
    if len(data) > limit:
        raise ImageFormatError(f"{what}: larger than limit {limit}")
    if declared and declared.isdigit() and len(data) != int(declared):
        raise BackendError(f"{what}: short body ({len(data)} of {declared} bytes)", permanent=False)
    return data
