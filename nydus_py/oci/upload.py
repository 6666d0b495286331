"""Pushing to a registry: blobs (skip / cross-repo mount / monolithic PUT / chunked PATCH) and
manifests. Used through `RegistryClient.push_blob` and `RegistryClient.put_manifest`.

A transient failure restarts the whole blob upload from a new session (simpler and as fast as
resuming for blobs of tens of MiB); `on_progress(bytes_done)` then starts again from 0.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable
from urllib.parse import urljoin

from nydus_py.errors import AuthError, BackendError, ConfigError, DigestMismatchError
from nydus_py.oci import digest as dg
from nydus_py.oci.auth import pull_scope, push_scope
from nydus_py.oci.reference import check_ref, check_repository, is_digest

if TYPE_CHECKING:
    from nydus_py.oci.registry import RegistryClient

Progress = Callable[[int], None]


def push_blob(client: "RegistryClient", repo: str, src: bytes | str | os.PathLike | Callable, digest: str,
              size: int, *, mount_from: Iterable[str] = (), on_progress: Progress | None = None) -> str:
    """Make `repo` have the blob; returns "exists", "mounted" or "uploaded". `src` may be a
    callable returning the bytes or a path: it is called only when the blob must really be
    uploaded (not present, not mountable), e.g. to download it from another registry."""
    check_repository(repo)
    dg.parse(digest)
    mount_from = [check_repository(r) for r in mount_from if r != repo]
    lazy = callable(src)
    if not lazy:
        _check_source(src, size, digest)
    what = f"blob {client.config.host}/{repo}@{digest}"
    if client.head_blob(repo, digest) is not None:
        return "exists"

    def attempt() -> str:
        nonlocal src, lazy
        location = None
        for source in mount_from:
            location = _try_mount(client, repo, source, digest, what)
            if location is None:
                return "mounted"
            break            # 202: the registry opened an upload session instead; use it
        if lazy:             # only now is the data really needed
            src, lazy = src(), False
            _check_source(src, size, digest)
        if location is None:
            location = _start_upload(client, repo, what)
        if size <= client.config.upload_chunk_size:
            _put_monolithic(client, repo, location, src, digest, size, what, on_progress)
        else:
            _put_chunked(client, repo, location, src, digest, size, what, on_progress)
        return "uploaded"

    return client._retrying(what, attempt)


def put_manifest(client: "RegistryClient", repo: str, ref: str, data: bytes, media_type: str) -> str:
    check_repository(repo)
    check_ref(ref)
    digest = ref if is_digest(ref) else dg.of_bytes(data)
    sep = "@" if is_digest(ref) else ":"
    what = f"manifest {client.config.host}/{repo}{sep}{ref}"
    if is_digest(ref):
        dg.verify_bytes(data, ref, what)

    def attempt() -> str:
        resp = client._request("PUT", f"/v2/{repo}/manifests/{ref}", what=what, scopes=(push_scope(repo),),
                               headers={"Content-Type": media_type}, data=data, ok=(200, 201, 202))
        with resp:
            said = resp.headers.get("Docker-Content-Digest", "")
        if said.split(":", 1)[0] == digest.split(":", 1)[0] and said != digest:
            raise DigestMismatchError(f"{what}: registry stored it as {said}, we computed {digest}")
        return digest

    return client._retrying(what, attempt)


# ---------------------------------------------------------------------- steps

def _check_source(src, size: int, digest: str) -> None:
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) != size:
            raise ConfigError(f"push blob {digest}: {len(src)} bytes given but size says {size}")
    else:
        actual = Path(src).stat().st_size
        if actual != size:
            raise ConfigError(f"push blob {digest}: {src} has {actual} bytes but size says {size}")


def _open(src) -> io.BufferedIOBase:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return io.BytesIO(src)
    return open(src, "rb")


def _try_mount(client: "RegistryClient", repo: str, source: str, digest: str, what: str) -> str | None:
    """None when mounted (201); else the upload URL of the session the registry opened (202)."""
    scopes = (push_scope(repo), pull_scope(source))
    try:
        resp = client._request("POST", f"/v2/{repo}/blobs/uploads/", what=f"{what} (mount from {source})",
                               scopes=scopes, params={"mount": digest, "from": source},
                               headers={"Content-Length": "0"}, ok=(201, 202))
    except AuthError:
        # No pull access to the source repository: fall back to a plain upload, as docker does.
        return _start_upload(client, repo, what)
    with resp:
        if resp.status_code == 201:
            return None
        return _location(resp, what)


def _start_upload(client: "RegistryClient", repo: str, what: str) -> str:
    resp = client._request("POST", f"/v2/{repo}/blobs/uploads/", what=f"{what} (start upload)",
                           scopes=(push_scope(repo),), headers={"Content-Length": "0"}, ok=(202,))
    with resp:
        return _location(resp, what)


def _location(resp, what: str) -> str:
    loc = resp.headers.get("Location")
    if not loc:
        raise BackendError(f"{what}: HTTP {resp.status_code} without an upload Location", permanent=True)
    return urljoin(resp.url, loc)


def _put_monolithic(client, repo, location, src, digest, size, what, on_progress) -> None:
    def body():
        return _ProgressBody(_open(src), size, on_progress, 0)
    resp = client._request("PUT", location, what=f"{what} (upload)", scopes=(push_scope(repo),),
                           params={"digest": digest}, data=body, ok=(201,),
                           headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)})
    resp.close()


def _put_chunked(client, repo, location, src, digest, size, what, on_progress) -> None:
    chunk = client.config.upload_chunk_size
    with _open(src) as f:
        done = 0
        while done < size:
            n = min(chunk, size - done)
            part = f.read(n)
            if len(part) != n:
                raise ConfigError(f"push blob {digest}: source shrank while uploading")
            start = done

            def body(part=part, start=start):
                return _ProgressBody(io.BytesIO(part), len(part), on_progress, start)
            resp = client._request(
                "PATCH", location, what=f"{what} (chunk {start}-{start + n - 1})", scopes=(push_scope(repo),),
                data=body, ok=(202,),
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(n),
                         "Content-Range": f"{start}-{start + n - 1}"})
            with resp:
                location = _location(resp, what)
            done += n
    resp = client._request("PUT", location, what=f"{what} (finish upload)", scopes=(push_scope(repo),),
                           params={"digest": digest}, headers={"Content-Length": "0"}, ok=(201,))
    resp.close()


class _ProgressBody:
    """A file-like request body with a known length (so requests sends Content-Length, not
    chunked encoding) that reports the running total of bytes handed to the socket."""

    def __init__(self, f, length: int, on_progress: Progress | None, base: int):
        self._f = f
        self._length = length
        self._cb = on_progress
        self._done = base

    def __len__(self) -> int:
        return self._length

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        if data and self._cb is not None:
            self._done += len(data)
            self._cb(self._done)
        if not data:
            self._f.close()
        return data
