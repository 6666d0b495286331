"""Registry credentials and the distribution auth dance (Basic, and Bearer tokens).

Where credentials come from, first hit wins (`resolve_credentials`):
  1. the explicit ones given in config (nydusd's `registry.auth`, base64 "user:pass");
  2. `IMAGE_PULL_AUTH` in the environment (nydusd's variable, base64 "user:pass");
  3. docker's config.json (`$DOCKER_CONFIG/config.json` or `~/.docker/config.json`):
     `credHelpers[host]`, else `credsStore`, running `docker-credential-<name> get`, else `auths`.

How a request gets authorized (`Authenticator`): the first request to a host goes out bare; a
401 carries a `WWW-Authenticate` challenge, which is remembered per host. For Basic, the
credentials are sent from then on. For Bearer, a token is fetched from the realm for the scopes
the request needs (plus the one the challenge names), cached per (host, scopes) until shortly
before `expires_in`, and the request is retried once; a second 401 is an AuthError.

Secrets never reach a log line or an exception message: `Credentials.__repr__` masks them.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping
from urllib.parse import urlsplit

import requests

from nydus_py.errors import AuthError, BackendError, ConfigError

log = logging.getLogger(__name__)

DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"
_HUB_HOSTS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
DEFAULT_TOKEN_TTL = 60.0
HELPER_TIMEOUT = 30.0
MAX_TOKEN_RESPONSE = 1 << 20


# ---------------------------------------------------------------------------- credentials

@dataclass(frozen=True)
class Credentials:
    """What we know about a user at one registry. All fields optional."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)   # OAuth2 refresh token (docker login to some clouds)
    registry_token: str = field(default="", repr=False)   # a bearer token to use as-is

    def __repr__(self) -> str:
        parts = [f"username={self.username!r}"]
        for name in ("password", "identity_token", "registry_token"):
            if getattr(self, name):
                parts.append(f"{name}='***'")
        return f"Credentials({', '.join(parts)})"

    __str__ = __repr__

    @property
    def has_basic(self) -> bool:
        return bool(self.username and self.password)

    @classmethod
    def from_auth_string(cls, value: str, what: str = "auth") -> "Credentials":
        """Decode docker's/nydusd's base64 "user:password" string."""
        try:
            raw = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise ConfigError(f"{what}: not base64 of 'username:password'") from None
        user, sep, password = raw.partition(":")
        if not sep or not user:
            raise ConfigError(f"{what}: decoded value is not 'username:password'")
        return cls(username=user, password=password)


def auth_key_for(host: str) -> str:
    """The key docker uses in config.json `auths` (and for credential helpers) for a host."""
    return DOCKER_HUB_AUTH_KEY if host in _HUB_HOSTS else host


def _key_hostname(key: str) -> str:
    """docker's ConvertToHostname: drop the scheme and anything after the first '/'."""
    for prefix in ("https://", "http://"):
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    return key.split("/", 1)[0]


def docker_config_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    base = env.get("DOCKER_CONFIG")
    if base:
        return Path(base) / "config.json"
    return Path(env.get("HOME") or Path.home()) / ".docker" / "config.json"


def load_docker_credentials(host: str, *, config_path: str | os.PathLike | None = None,
                            env: Mapping[str, str] | None = None) -> Credentials | None:
    """Credentials for `host` from docker's config.json (helpers included), or None."""
    path = Path(config_path) if config_path else docker_config_path(env)
    try:
        cfg = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable docker config ({e.__class__.__name__})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: docker config is not a JSON object")
    key = auth_key_for(host)
    helper = (cfg.get("credHelpers") or {}).get(_key_hostname(key)) or (cfg.get("credHelpers") or {}).get(key)
    helper = helper or cfg.get("credsStore")
    if helper:
        creds = run_credential_helper(str(helper), key)
        if creds is not None:
            return creds
    auths = cfg.get("auths") or {}
    entry = auths.get(key)
    if entry is None:
        hostname = _key_hostname(key)
        entry = next((v for k, v in auths.items() if _key_hostname(k) == hostname), None)
    if not isinstance(entry, dict):
        return None
    return _entry_credentials(entry, f"{path} auths[{key!r}]")


def _entry_credentials(entry: dict, what: str) -> Credentials | None:
    user, password = str(entry.get("username") or ""), str(entry.get("password") or "")
    if entry.get("auth"):
        c = Credentials.from_auth_string(str(entry["auth"]), what)
        user, password = c.username, c.password
    ident = str(entry.get("identitytoken") or "")
    reg_token = str(entry.get("registrytoken") or "")
    if not (user or ident or reg_token):
        return None
    return Credentials(username=user, password=password, identity_token=ident, registry_token=reg_token)


def run_credential_helper(helper: str, server_url: str) -> Credentials | None:
    """`docker-credential-<helper> get` with the server URL on stdin; None when it has nothing."""
    exe = shutil.which(f"docker-credential-{helper}")
    if exe is None:
        raise ConfigError(f"docker credential helper 'docker-credential-{helper}' not found in PATH")
    try:
        p = subprocess.run([exe, "get"], input=server_url.encode(), capture_output=True,
                           timeout=HELPER_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"docker-credential-{helper} get: timed out after {HELPER_TIMEOUT:.0f}s") from None
    out = p.stdout.decode(errors="replace").strip()
    if p.returncode != 0:
        if "credentials not found" in out.lower():
            return None
        # Helpers print the reason on stdout or stderr; neither contains the secret itself.
        reason = (out or p.stderr.decode(errors="replace").strip()).splitlines()[:1]
        raise AuthError(f"docker-credential-{helper} get {server_url}: exit {p.returncode}"
                        f"{': ' + reason[0] if reason else ''}")
    try:
        obj = json.loads(out)
        user, secret = str(obj.get("Username") or ""), str(obj.get("Secret") or "")
    except (ValueError, AttributeError):
        raise AuthError(f"docker-credential-{helper} get {server_url}: output is not JSON") from None
    if not secret:
        return None
    if user == "<token>":
        return Credentials(identity_token=secret)
    return Credentials(username=user, password=secret)


def resolve_credentials(host: str, *, explicit: Credentials | str | None = None,
                        env: Mapping[str, str] | None = None,
                        docker_config: str | os.PathLike | None = None) -> Credentials | None:
    """Config auth > IMAGE_PULL_AUTH > docker config.json (see module doc)."""
    env = os.environ if env is None else env
    if isinstance(explicit, str) and explicit:
        return Credentials.from_auth_string(explicit, "registry auth")
    if isinstance(explicit, Credentials):
        return explicit
    if env.get("IMAGE_PULL_AUTH"):
        return Credentials.from_auth_string(env["IMAGE_PULL_AUTH"], "IMAGE_PULL_AUTH")
    return load_docker_credentials(host, config_path=docker_config, env=env)


# ---------------------------------------------------------------------------- challenges

@dataclass(frozen=True)
class Challenge:
    scheme: str                      # lowercased: "basic", "bearer"
    params: dict[str, str]           # lowercased keys: realm, service, scope, error

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")


_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_SCHEME_RE = re.compile(rf"[\s,]*({_TOKEN})")
_PARAM_RE = re.compile(rf"\s*({_TOKEN})\s*=\s*(?:\"((?:[^\"\\]|\\.)*)\"|({_TOKEN}))\s*")
_TOKEN68_RE = re.compile(r"\s+([A-Za-z0-9\-._~+/]+=*)\s*(?=,|$)")


def parse_www_authenticate(header: str) -> list[Challenge]:
    """Parse an RFC 7235 `WWW-Authenticate` value into challenges (quoted commas are fine)."""
    out: list[Challenge] = []
    pos, n = 0, len(header)
    while pos < n:
        m = _SCHEME_RE.match(header, pos)
        if not m:
            break
        scheme, pos = m.group(1).lower(), m.end()
        params: dict[str, str] = {}
        t68 = _TOKEN68_RE.match(header, pos)
        if t68 and not _PARAM_RE.match(header, pos):
            params[""] = t68.group(1)
            pos = t68.end()
        while pos < n:
            p = _PARAM_RE.match(header, pos)
            if not p:
                break
            value = p.group(3) if p.group(2) is None else re.sub(r"\\(.)", r"\1", p.group(2))
            params[p.group(1).lower()] = value
            pos = p.end()
            if pos < n and header[pos] == ",":
                # A comma ends this param; what follows is another param or another challenge.
                nxt = _PARAM_RE.match(header, pos + 1)
                if nxt is None:
                    break
                pos += 1
        out.append(Challenge(scheme, params))
    return out


# ---------------------------------------------------------------------------- tokens

@dataclass
class _Token:
    value: str
    expires_at: float


class Authenticator:
    """Per-host auth state for one RegistryClient; safe to share between threads."""

    def __init__(self, host: str, credentials: Credentials | None, session: requests.Session, *,
                 timeout: tuple[float, float], verify: bool | str = True,
                 clock: Callable[[], float] = time.monotonic):
        self.host = host
        self._clock = clock
        self.credentials = credentials
        self._session = session
        self._timeout = timeout
        self._verify = verify
        self._challenge: Challenge | None = None
        self._tokens: dict[tuple[str, ...], _Token] = {}
        self._extra_scopes: dict[tuple[str, ...], str] = {}
        self._lock = threading.Lock()
        self._fetch_lock = threading.Lock()
        self.token_fetches = 0       # for metrics and tests

    def __repr__(self) -> str:
        return f"Authenticator(host={self.host!r}, credentials={self.credentials!r})"

    def headers(self, scopes: tuple[str, ...]) -> dict[str, str]:
        """The Authorization header for a request needing `scopes` (may fetch a token)."""
        c = self.credentials
        if c is not None and c.registry_token:
            return {"Authorization": f"Bearer {c.registry_token}"}
        with self._lock:
            challenge = self._challenge
        if challenge is None:
            return {}
        if challenge.scheme == "basic":
            if c is None or not c.has_basic:
                return {}
            raw = base64.b64encode(f"{c.username}:{c.password}".encode()).decode()
            return {"Authorization": f"Basic {raw}"}
        return {"Authorization": f"Bearer {self._token(challenge, scopes)}"}

    def on_unauthorized(self, resp: requests.Response, scopes: tuple[str, ...], what: str,
                        sent: str | None = None) -> None:
        """Learn from a 401 and drop the cached token, so that one retry can succeed.

        Raises AuthError when retrying cannot help (no usable challenge, or Basic without
        credentials)."""
        header = resp.headers.get("WWW-Authenticate", "")
        challenges = {c.scheme: c for c in parse_www_authenticate(header)}
        challenge = challenges.get("bearer") or challenges.get("basic")
        if challenge is None:
            raise AuthError(f"{what}: HTTP 401 from {self.host} without a usable WWW-Authenticate challenge")
        if challenge.scheme == "basic" and (self.credentials is None or not self.credentials.has_basic):
            raise AuthError(f"{what}: registry {self.host} requires credentials (HTTP 401, Basic auth) "
                            "and none are configured")
        if challenge.scheme == "bearer" and not challenge.realm:
            raise AuthError(f"{what}: registry {self.host} sent a Bearer challenge without a realm")
        with self._lock:
            self._challenge = challenge
            key = _scope_key(scopes, None)
            tok = self._tokens.get(key)
            # Drop the cached token only if it is the one just rejected; a bare request that
            # raced with another thread's token fetch must not throw a fresh token away.
            if tok is not None and sent is not None and sent == f"Bearer {tok.value}":
                del self._tokens[key]
            extra = challenge.params.get("scope")
            if extra and not set(extra.split()) <= set(key):
                self._extra_scopes[key] = extra   # the registry wants more than we guessed

    def forget(self) -> None:
        with self._lock:
            self._challenge = None
            self._tokens.clear()
            self._extra_scopes.clear()

    def _token(self, challenge: Challenge, scopes: tuple[str, ...]) -> str:
        key = _scope_key(scopes, None)
        now = self._clock()
        with self._lock:
            tok = self._tokens.get(key)
        if tok is not None and tok.expires_at > now:
            return tok.value
        with self._fetch_lock:           # one token fetch at a time; others reuse its result
            with self._lock:
                tok = self._tokens.get(key)
            if tok is not None and tok.expires_at > self._clock():
                return tok.value
            with self._lock:
                wanted = _scope_key(key, self._extra_scopes.get(key))
            tok = self._fetch_token(challenge, wanted)
            with self._lock:
                self._tokens[key] = tok
            return tok.value

    def _fetch_token(self, challenge: Challenge, scopes: tuple[str, ...]) -> _Token:
        realm = challenge.realm
        if urlsplit(realm).scheme not in ("http", "https"):
            raise AuthError(f"registry {self.host}: token realm {realm!r} is not an http(s) URL")
        service = challenge.params.get("service")
        c = self.credentials
        what = f"registry {self.host}: token from {realm} for {' '.join(scopes) or 'no scope'}"
        self.token_fetches += 1
        started = self._clock()
        try:
            if c is not None and c.identity_token:
                form = {"grant_type": "refresh_token", "refresh_token": c.identity_token,
                        "client_id": "nydus-py", "scope": " ".join(scopes)}
                if service:
                    form["service"] = service
                resp = self._session.post(realm, data=form, timeout=self._timeout, verify=self._verify,
                                          allow_redirects=False)
            else:
                params: list[tuple[str, str]] = []
                if service:
                    params.append(("service", service))
                params += [("scope", s) for s in scopes]
                auth = (c.username, c.password) if c is not None and c.has_basic else None
                if auth is not None:
                    params.append(("account", auth[0]))
                resp = self._session.get(realm, params=params, auth=auth, timeout=self._timeout,
                                         verify=self._verify, allow_redirects=False)
        except requests.RequestException as e:
            raise BackendError(f"{what}: {e.__class__.__name__}", permanent=False) from None
        with resp:
            if resp.status_code in (401, 403):
                who = f"user {c.username!r}" if c is not None and c.username else "anonymous access"
                raise AuthError(f"{what}: HTTP {resp.status_code}, {who} rejected")
            if resp.status_code == 429 or resp.status_code >= 500:
                raise BackendError(f"{what}: HTTP {resp.status_code}", permanent=False)
            if resp.status_code != 200:
                raise AuthError(f"{what}: HTTP {resp.status_code}")
            body = resp.content[:MAX_TOKEN_RESPONSE]
        try:
            obj = json.loads(body)
            value = obj.get("token") or obj.get("access_token")
            ttl = float(obj.get("expires_in") or DEFAULT_TOKEN_TTL)
        except (ValueError, AttributeError, TypeError):
            raise AuthError(f"{what}: token response is not JSON with a token") from None
        if not value or not isinstance(value, str):
            raise AuthError(f"{what}: token response has neither 'token' nor 'access_token'")
        ttl = max(ttl, 1.0)
        margin = min(10.0, ttl / 10)
        return _Token(value, started + ttl - margin)


def _scope_key(scopes: tuple[str, ...], extra: str | None) -> tuple[str, ...]:
    """Scopes as a canonical tuple; the challenge's own scope is added when not already asked."""
    s = set(scopes)
    if extra:
        s.update(extra.split(" "))
    return tuple(sorted(x for x in s if x))


def pull_scope(repo: str) -> str:
    return f"repository:{repo}:pull"


def push_scope(repo: str) -> str:
    return f"repository:{repo}:pull,push"
