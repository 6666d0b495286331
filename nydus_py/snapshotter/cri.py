"""Kubernetes pull secrets for nydusd: a CRI image-service proxy (Nydus's `enable_cri_keychain`).

kubelet passes an image's pull secret only in CRI's `ImageService.PullImage`, to containerd's
CRI plugin, which never hands it to a snapshotter. So, as Nydus's snapshotter does, the
snapshotter serves `runtime.v1.ImageService` on its own gRPC socket: kubelet (or crictl) uses it
as its image endpoint (`--image-service-endpoint=unix://<address>`), every call is forwarded
unchanged to containerd's CRI socket (`image_service_address`), and PullImage's `auth` is kept
in memory for the image's registry and repository first. The Prepare that follows (CRI labels:
`cri.image-ref`) finds the credentials there: they are used for the manifest and bootstrap and
written into that image's nydusd config, like docker-config credentials (docs/containerd.md).

The proxy forwards the bytes it received (fields this proto omits pass through) and only parses
PullImageRequest. The keychain lives in memory, as Nydus's (stargz's CRI keychain, a map in the
snapshotter process). What an image was started with is also kept next to it (`keep`/`kept`:
ROOT/images/<id>/cri-auth.json, 0600 in the 0700 root, where its nydusd.json holds the same
secret already), so that a daemon the snapshotter restarts after its own restart still
authenticates; Nydus's snapshotter loses them there. Deleted with the image; never logged.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import secrets
import threading
from pathlib import Path
from typing import Any, Callable

import grpc

from nydus_py.cache import safedir
from nydus_py.oci.auth import Credentials
from nydus_py.errors import NydusError
from nydus_py.oci.reference import Reference
from nydus_py.oci.reference import parse as parse_reference

log = logging.getLogger("nydus_py.snapshotter.cri")
SERVICE = "runtime.v1.ImageService"
METHODS = ("PullImage", "ImageStatus", "ListImages", "RemoveImage", "ImageFsInfo")
KEPT = "cri-auth.json"
MAX_KEPT = 64 << 10
_FIELDS = ("username", "password", "identity_token", "registry_token")


class Keychain:
    """(registry host, repository) → the credentials of the last PullImage that carried them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._creds: dict[tuple[str, str], Credentials] = {}

    def add(self, image: str, creds: Credentials) -> None:
        ref = parse_reference(image)
        with self._lock:
            self._creds[(ref.host, ref.repository)] = creds

    def get(self, ref: Reference) -> Credentials | None:
        with self._lock:
            return self._creds.get((ref.host, ref.repository))


def credentials_of(auth: Any) -> Credentials | None:
    """CRI AuthConfig → Credentials (None when it carries nothing)."""
    user, password = auth.username, auth.password
    if auth.auth and not user:
        try:
            user, _, password = base64.b64decode(auth.auth, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise ValueError("auth: not base64 of user:password") from None
    creds = Credentials(username=user, password=password, identity_token=auth.identity_token,
                        registry_token=auth.registry_token)
    return creds if (user or auth.identity_token or auth.registry_token) else None


class ImageServiceProxy(grpc.GenericRpcHandler):
    """Every `/runtime.v1.ImageService/*` unary call, forwarded as bytes to `target`."""

    def __init__(self, target: str, keychain: Keychain):
        self.target = target if "://" in target or target.startswith("unix:") else f"unix:{target}"
        self.keychain = keychain
        self._channel = grpc.insecure_channel(self.target)

    def close(self) -> None:
        self._channel.close()

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if not method.startswith(f"/{SERVICE}/"):
            return None
        forward = self._channel.unary_unary(method)     # bytes in, bytes out (no serializers)
        name = method.rsplit("/", 1)[1]

        def call(request: bytes, context: grpc.ServicerContext) -> bytes:
            if name == "PullImage":
                self._record(request, context)
            try:
                return forward(request, timeout=context.time_remaining(),
                               metadata=_forwardable(context.invocation_metadata()))
            except grpc.RpcError as e:
                context.abort(e.code(), e.details() or "")
                raise  # unreachable: abort raises

        return grpc.unary_unary_rpc_method_handler(call)

    def _record(self, request: bytes, context: grpc.ServicerContext) -> None:
        from nydus_py.snapshotter.proto import cri_image_pb2
        req = cri_image_pb2.PullImageRequest.FromString(request)
        if not req.HasField("auth"):
            return
        try:
            creds = credentials_of(req.auth)
            if creds is not None:
                self.keychain.add(req.image.image, creds)
                log.info("CRI PullImage %s: credentials for its registry kept (user %r)",
                         req.image.image, creds.username)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"PullImage {req.image.image}: {e}")
        except NydusError as e:            # containerd answers a bad reference itself
            log.warning("CRI PullImage %r: %s", req.image.image, e)


def _forwardable(md: Any) -> list[tuple[str, str | bytes]]:
    return [(k, v) for k, v in (md or ()) if not k.startswith(":") and k not in ("user-agent",)]


def add_to_server(server: grpc.Server, target: str, keychain: Keychain) -> Callable[[], None]:
    """Serve the proxy on `server`; returns its close()."""
    proxy = ImageServiceProxy(target, keychain)
    server.add_generic_rpc_handlers((proxy,))
    return proxy.close


# -- the copy an image keeps --------------------------------------------------------------------
def _open_dir(image_dir: Path) -> int:
    return os.open(image_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def keep(image_dir: Path, creds: Credentials) -> None:
    """Writes `creds` as the image's kept CRI credentials (0600, temp + rename under the dir's
    fd, no link followed). Best effort: a failure is one warning, without the secret."""
    data = json.dumps({k: getattr(creds, k) for k in _FIELDS}).encode()
    tmp = f".{KEPT}.{secrets.token_hex(4)}"
    try:
        d = _open_dir(image_dir)
    except OSError as e:
        log.warning("%s: CRI credentials not kept: %s", image_dir, e.strerror)
        return
    try:
        fd = safedir.open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, d, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.rename(tmp, KEPT, src_dir_fd=d, dst_dir_fd=d)
    except OSError as e:
        log.warning("%s: CRI credentials not kept: %s", image_dir, e.strerror)
        try:
            os.unlink(tmp, dir_fd=d)
        except OSError:
            pass
    finally:
        os.close(d)


def kept(image_dir: Path) -> Credentials | None:
    """The image's kept CRI credentials, None if there are none (or they are unreadable)."""
    try:
        d = _open_dir(image_dir)
    except OSError:
        return None
    try:
        fd = safedir.open_file(KEPT, os.O_RDONLY | os.O_NONBLOCK, d)
    except OSError:
        return None
    finally:
        os.close(d)
    try:
        doc = json.loads(os.read(fd, MAX_KEPT))
        creds = Credentials(**{k: str(doc.get(k) or "") for k in _FIELDS})
    except (OSError, ValueError, AttributeError):
        log.warning("%s/%s: unreadable; ignored", image_dir, KEPT)
        return None
    finally:
        os.close(fd)
    return creds if (creds.username or creds.identity_token or creds.registry_token) else None
