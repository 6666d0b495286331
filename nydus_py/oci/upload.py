"""Pushing to a registry: blobs (skip / cross-repo mount / monolithic PUT / chunked PATCH) and
manifests, over the registry transport (oci/transport.py). Used through
`RegistryClient.push_blob` and `RegistryClient.put_manifest`.

A transient failure restarts the whole blob upload from a new session (simpler and as fast as
resuming for blobs of tens of MiB); `on_progress(bytes_done)` then starts again from 0.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import IO, Callable, Iterable, Union
from urllib.parse import urljoin

import requests

from nydus_py.errors import AuthError, BackendError, ConfigError, DigestMismatchError
from nydus_py.oci import digest as dg
from nydus_py.oci.auth import pull_scope, push_scope
from nydus_py.oci.reference import check_ref, check_repository, is_digest
from nydus_py.oci.transport import RegistryTransport

Progress = Callable[[int], None]
BlobData = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]"]
BlobSource = Union[BlobData, Callable[[], BlobData]]   # a callable is called only when needed


def upload_blob(transport: RegistryTransport, repo: str, src: BlobSource, digest: str, size: int, *,
                mount_from: Iterable[str] = (), on_progress: Progress | None = None) -> str:
    """Make `repo` have a blob it does not have yet: cross-repository mount from one of
    `mount_from`, else upload `src`; returns "mounted" or "uploaded". The caller checked
    that the blob is absent (RegistryClient.push_blob)."""
    what = f"blob {transport.config.host}/{repo}@{digest}"
    mount_from = list(mount_from)
    data: BlobData | None = None if callable(src) else src

    def attempt() -> str:
        nonlocal data
        location = None
        for source in mount_from:
            location = _try_mount(transport, repo, source, digest, what)
            if location is None:
                return "mounted"
            break            # 202: the registry opened an upload session instead; use it
        if data is None:     # only now is the data really needed
            assert callable(src)
            data = src()
            check_source(data, size, digest)
        if location is None:
            location = _start_upload(transport, repo, what)
        if size <= transport.config.upload_chunk_size:
            _put_monolithic(transport, repo, location, data, digest, size, what, on_progress)
        else:
            _put_chunked(transport, repo, location, data, digest, size, what, on_progress)
        return "uploaded"

    return transport.retry_call(what, attempt)


def put_manifest(transport: RegistryTransport, repo: str, ref: str, data: bytes, media_type: str) -> str:
    """PUT a manifest or index under a tag (or its digest); returns its digest."""
    check_repository(repo)
    check_ref(ref)
    digest = ref if is_digest(ref) else dg.of_bytes(data)
    sep = "@" if is_digest(ref) else ":"
    what = f"manifest {transport.config.host}/{repo}{sep}{ref}"
    if is_digest(ref):
        dg.verify_bytes(data, ref, what)

    def attempt() -> str:
        resp = transport.request("PUT", f"/v2/{repo}/manifests/{ref}", what=what, scopes=(push_scope(repo),),
                                 headers={"Content-Type": media_type}, data=data, ok=(200, 201, 202))
        with resp:
            said = resp.headers.get("Docker-Content-Digest", "")
        if said.split(":", 1)[0] == digest.split(":", 1)[0] and said != digest:
            raise DigestMismatchError(f"{what}: registry stored it as {said}, we computed {digest}")
        return digest

    return transport.retry_call(what, attempt)


# ---------------------------------------------------------------------- steps

def check_source(src: BlobData, size: int, digest: str) -> None:
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) != size:
            raise ConfigError(f"push blob {digest}: {len(src)} bytes given but size says {size}")
    else:
        actual = Path(src).stat().st_size
        if actual != size:
            raise ConfigError(f"push blob {digest}: {src} has {actual} bytes but size says {size}")


def _open(src: BlobData) -> IO[bytes]:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(src))
    return open(src, "rb")


def _try_mount(transport: RegistryTransport, repo: str, source: str, digest: str, what: str) -> str | None:
    """None when mounted (201); else the upload URL of the session the registry opened (202)."""
    scopes = (push_scope(repo), pull_scope(source))
    try:
        resp = transport.request("POST", f"/v2/{repo}/blobs/uploads/", what=f"{what} (mount from {source})",
                               scopes=scopes, params={"mount": digest, "from": source},
                               headers={"Content-Length": "0"}, ok=(201, 202))
    except AuthError:
        # No pull access to the source repository: fall back to a plain upload, as docker does.
        return _start_upload(transport, repo, what)
    with resp:
        if resp.status_code == 201:
            return None
        return _location(resp, what)


def _start_upload(transport: RegistryTransport, repo: str, what: str) -> str:
    resp = transport.request("POST", f"/v2/{repo}/blobs/uploads/", what=f"{what} (start upload)",
                           scopes=(push_scope(repo),), headers={"Content-Length": "0"}, ok=(202,))
    with resp:
        return _location(resp, what)


def _location(resp: requests.Response, what: str) -> str:
    loc = resp.headers.get("Location")
    if not loc:
        raise BackendError(f"{what}: HTTP {resp.status_code} without an upload Location", permanent=True)
    return urljoin(resp.url, loc)


def _put_monolithic(transport: RegistryTransport, repo: str, location: str, src: BlobData, digest: str,
                    size: int, what: str, on_progress: Progress | None) -> None:
    def body() -> _ProgressBody:
        return _ProgressBody(_open(src), size, on_progress, 0)
    resp = transport.request("PUT", location, what=f"{what} (upload)", scopes=(push_scope(repo),),
                           params={"digest": digest}, data=body, ok=(201,),
                           headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)})
    resp.close()


def _put_chunked(transport: RegistryTransport, repo: str, location: str, src: BlobData, digest: str,
                 size: int, what: str, on_progress: Progress | None) -> None:
    chunk = transport.config.upload_chunk_size
    with _open(src) as f:
        done = 0
        while done < size:
            n = min(chunk, size - done)
            part = f.read(n)
            if len(part) != n:
                raise ConfigError(f"push blob {digest}: source shrank while uploading")
            start = done

            def body(part: bytes = part, start: int = start) -> _ProgressBody:
                return _ProgressBody(io.BytesIO(part), len(part), on_progress, start)
            resp = transport.request(
                "PATCH", location, what=f"{what} (chunk {start}-{start + n - 1})", scopes=(push_scope(repo),),
                data=body, ok=(202,),
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(n),
                         "Content-Range": f"{start}-{start + n - 1}"})
            with resp:
                location = _location(resp, what)
            done += n
    resp = transport.request("PUT", location, what=f"{what} (finish upload)", scopes=(push_scope(repo),),
                           params={"digest": digest}, headers={"Content-Length": "0"}, ok=(201,))
    resp.close()


class _ProgressBody:
    """A file-like request body with a known length (so requests sends Content-Length, not
    chunked encoding) that reports the running total of bytes handed to the socket."""

    def __init__(self, f: IO[bytes], length: int, on_progress: Progress | None, base: int):
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
