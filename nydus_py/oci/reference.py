"""Image references as docker and containerd users write them.

    busybox                          -> docker.io/library/busybox:latest
    user/img:1.0                     -> docker.io/user/img:1.0
    localhost:5000/x                 -> localhost:5000/x:latest
    [::1]:5000/x@sha256:<64 hex>     -> [::1]:5000/x@sha256:...
    ghcr.io/org/app:v1@sha256:...    -> tag and digest both kept (the digest wins when pulling)

The grammar is docker/distribution's `reference` package (name components, tag, digest); the
"is the first component a registry host?" rule is docker's: it is a host when it contains a
'.' or ':', or is exactly 'localhost'. Every failure is one ConfigError line quoting the input.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nydus_py.errors import ConfigError, ImageFormatError
from nydus_py.oci import digest as dg

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
MAX_NAME_LEN = 255

_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH_RE = re.compile(rf"^{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*$")
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$", re.ASCII)
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME_RE = re.compile(rf"^{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*$")
_IPV6_RE = re.compile(r"^\[[0-9a-fA-F:.]+\]$")


@dataclass(frozen=True)
class Reference:
    """A fully qualified reference. `tag` and `digest` may both be set; at least one is."""

    host: str            # registry host as users name it, with port: docker.io, localhost:5000, [::1]:5000
    repository: str      # library/busybox
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        s = f"{self.host}/{self.repository}"
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s

    @property
    def name(self) -> str:
        """host/repository, without tag or digest."""
        return f"{self.host}/{self.repository}"

    @property
    def ref(self) -> str:
        """What to ask the manifests endpoint for: the digest when known, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def api_host(self) -> str:
        """The host to send distribution API requests to (Docker Hub's API lives elsewhere)."""
        return DOCKER_HUB_API if self.host == DOCKER_HUB else self.host


def parse(text: str) -> Reference:
    """Parse a user-written reference; raises ConfigError with one line naming the input."""
    if not isinstance(text, str) or not text:
        raise ConfigError(f"invalid image reference {text!r}: empty")
    if text != text.strip() or any(c.isspace() for c in text):
        raise ConfigError(f"invalid image reference {text!r}: contains whitespace")
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        digest = _check_digest(digest, text)
    host, path = _split_host(rest, text)
    tag = None
    # A ':' after the last '/' is a tag separator (a ':' in the host was split off already).
    if ":" in path:
        path, tag = path.rsplit(":", 1)
        tag = _check_tag(tag, text)
    if host == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    check_repository(path, text)
    if len(f"{host}/{path}") > MAX_NAME_LEN:
        raise ConfigError(f"invalid image reference {text!r}: name longer than {MAX_NAME_LEN} characters")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(host, path, tag, digest)


def check_repository(repo: str, what: str | None = None) -> str:
    """Validate a repository path (`library/busybox`); returns it."""
    if not repo:
        raise ConfigError(f"invalid image reference {what or repo!r}: empty repository name")
    if not _PATH_RE.match(repo):
        hint = " (must be lowercase)" if repo.lower() != repo and _PATH_RE.match(repo.lower()) else ""
        raise ConfigError(f"invalid image reference {what or repo!r}: bad repository name {repo!r}{hint}")
    return repo


def check_ref(ref: str, what: str | None = None) -> str:
    """Validate a manifest reference: a tag or a digest."""
    if ":" in ref:
        return _check_digest(ref, what or ref)
    return _check_tag(ref, what or ref)


def is_digest(ref: str) -> bool:
    return ":" in ref


def _split_host(rest: str, text: str) -> tuple[str, str]:
    if rest.startswith("["):  # IPv6 host: [::1]:5000/repo
        end = rest.find("]")
        slash = rest.find("/", end + 1)
        if end < 0 or slash < 0:
            raise ConfigError(f"invalid image reference {text!r}: IPv6 host needs [addr]:port/repository")
        return _check_host(rest[:slash], text), rest[slash + 1:]
    first, sep, remainder = rest.partition("/")
    if not sep:
        return DOCKER_HUB, rest
    if "." in first or ":" in first or first == "localhost":
        host = _check_host(first, text)
        if host in _HUB_ALIASES:
            host = DOCKER_HUB
        return host, remainder
    return DOCKER_HUB, rest


def _check_host(host: str, text: str) -> str:
    name, port = host, None
    if host.startswith("["):
        end = host.index("]")
        name, after = host[:end + 1], host[end + 1:]
        if after:
            if not after.startswith(":"):
                raise ConfigError(f"invalid image reference {text!r}: bad host {host!r}")
            port = after[1:]
        ok = bool(_IPV6_RE.match(name)) and name.count(":") >= 2
    else:
        if ":" in host:
            name, port = host.rsplit(":", 1)
        ok = bool(_DOMAIN_NAME_RE.match(name))
    if not ok:
        raise ConfigError(f"invalid image reference {text!r}: bad registry host {host!r}")
    if port is not None and (not port.isdigit() or not 0 < int(port) < 65536 or not port.isascii()):
        raise ConfigError(f"invalid image reference {text!r}: bad port in registry host {host!r}")
    return host


def _check_tag(tag: str, text: str) -> str:
    if not _TAG_RE.match(tag):
        raise ConfigError(f"invalid image reference {text!r}: bad tag {tag!r} "
                          "(letters, digits, '_', '.', '-'; at most 128; not starting with '.' or '-')")
    return tag


def _check_digest(digest: str, text: str) -> str:
    try:
        dg.parse(digest)
    except ImageFormatError:
        raise ConfigError(f"invalid image reference {text!r}: bad digest {digest!r} "
                          "(expected sha256:<64 hex> or sha512:<128 hex>)") from None
    return digest
