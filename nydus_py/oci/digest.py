"""Content digests (`algo:hex`) as the OCI image spec defines them."""

from __future__ import annotations

import hashlib
import re

from nydus_py.errors import DigestMismatchError, ImageFormatError

_DIGEST_RE = re.compile(r"^(sha256|sha512):([a-f0-9]+)$")
_HEX_LEN = {"sha256": 64, "sha512": 128}


def parse(digest: str) -> tuple[str, str]:
    """Split and validate a digest; a malformed one is an ImageFormatError (it may name a path)."""
    m = _DIGEST_RE.match(digest) if isinstance(digest, str) else None
    if not m or len(m.group(2)) != _HEX_LEN[m.group(1)]:
        raise ImageFormatError(f"invalid digest {digest!r}")
    return m.group(1), m.group(2)


def hasher(digest: str):
    algo, _ = parse(digest)
    return hashlib.new(algo)


def of_bytes(data: bytes | memoryview, algo: str = "sha256") -> str:
    return f"{algo}:{hashlib.new(algo, data).hexdigest()}"


def verify_bytes(data: bytes | memoryview, digest: str, what: str) -> None:
    h = hasher(digest)
    h.update(data)
    actual = f"{digest.split(':', 1)[0]}:{h.hexdigest()}"
    if actual != digest:
        raise DigestMismatchError(f"{what}: digest mismatch (expected {digest}, got {actual})")


class VerifyingReader:
    """A read-only file wrapper that hashes what passes through and, at EOF, checks the digest
    and size. Lets a layer be streamed (decompressed, untarred) while still being verified: the
    consumer must read to EOF (or call `finish()`), which raises DigestMismatchError on a bad blob.
    """

    def __init__(self, raw, digest: str, size: int | None, what: str):
        self._raw = raw
        self._digest = digest
        self._h = hasher(digest)
        self._size = size
        self._seen = 0
        self._what = what
        self._done = False

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        if data:
            self._h.update(data)
            self._seen += len(data)
            if self._size is not None and self._seen > self._size:
                raise DigestMismatchError(f"{self._what}: larger than its descriptor size {self._size}")
        elif n != 0:
            self._check()
        return data

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def finish(self) -> None:
        """Drain whatever the consumer did not read, then verify."""
        while self.read(1 << 20):
            pass
        self._check()

    def _check(self) -> None:
        if self._done:
            return
        self._done = True
        if self._size is not None and self._seen != self._size:
            raise DigestMismatchError(
                f"{self._what}: size {self._seen} does not match descriptor size {self._size}")
        actual = f"{self._digest.split(':', 1)[0]}:{self._h.hexdigest()}"
        if actual != self._digest:
            raise DigestMismatchError(f"{self._what}: digest mismatch (expected {self._digest}, got {actual})")

    def close(self) -> None:
        self._raw.close()
