"""The bootstrap download is bounded (issue 9 section 2): a registry that sends more than the
manifest's descriptor size, or never stops sending, is cut off at the descriptor size
instead of being read whole into the root daemon's memory; a descriptor size over the limit
is refused before any byte is fetched. The registry is a real HTTP server on 127.0.0.1
playing the hostile image author."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading

import pytest

from nydus_py.errors import DigestMismatchError, FormatError, ImageFormatError
from nydus_py.format.limits import MAX_BOOTSTRAP_SIZE
from nydus_py.image_source import fetch_registry_image, open_registry
from nydus_py.oci import mediatypes as mt
from nydus_py.oci.reference import parse as parse_reference
from nydus_py.oci.registry import RegistryClient, RegistryConfig

BOOT_DIGEST = "sha256:" + hashlib.sha256(b"x").hexdigest()


class HostileRegistry(http.server.BaseHTTPRequestHandler):
    boot_size = 1000            # what the manifest says
    sent = 0                    # bootstrap bytes the server managed to send
    boot: bytes | None = None   # else: serve these bytes, under their true digest and size

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/v2/":
            self._send(200, b"{}", "application/json")
        elif "/manifests/" in self.path:
            boot = type(self).boot
            digest = BOOT_DIGEST if boot is None else "sha256:" + hashlib.sha256(boot).hexdigest()
            manifest = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
                        "config": {"mediaType": mt.OCI_CONFIG, "digest": BOOT_DIGEST, "size": 1},
                        "layers": [{"mediaType": mt.NYDUS_PY_BOOTSTRAP, "digest": digest,
                                    "size": type(self).boot_size if boot is None else len(boot)}]}
            self._send(200, json.dumps(manifest).encode(), mt.OCI_MANIFEST)
        elif "/blobs/" in self.path and type(self).boot is not None:
            self._send(200, type(self).boot, "application/octet-stream")
        elif "/blobs/" in self.path:
            self.send_response(200)                 # no Content-Length: it never ends
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            try:
                while type(self).sent < 1 << 30:
                    self.wfile.write(bytes(64 << 10))
                    type(self).sent += 64 << 10
            except OSError:                         # the client hung up: what we want
                pass
        else:
            self._send(404, b"{}", "application/json")

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Docker-Content-Digest", "sha256:" + hashlib.sha256(body).hexdigest())
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def registry():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HostileRegistry)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    HostileRegistry.sent = 0
    HostileRegistry.boot = None
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        t.join()


def _fetch(host: str):
    r = parse_reference(f"{host}/evil:latest")
    with RegistryClient(config=RegistryConfig.for_reference(r, scheme="http")) as c:
        return fetch_registry_image(c, r, "evil")


def test_an_endless_bootstrap_blob_is_cut_off_at_its_descriptor_size(registry):
    HostileRegistry.boot_size = 1000
    with pytest.raises(DigestMismatchError, match="larger than its descriptor size 1000"):
        _fetch(registry)
    assert HostileRegistry.sent < 64 << 20      # before: read until the server stopped (1 GiB)


def test_a_bootstrap_descriptor_over_the_limit_is_refused_before_fetching(registry):
    HostileRegistry.boot_size = MAX_BOOTSTRAP_SIZE + 1
    with pytest.raises(ImageFormatError, match="bootstrap layer"):
        _fetch(registry)
    assert HostileRegistry.sent == 0


@pytest.mark.parametrize("boot", [None, b"\x81\xa1v\x01 not a bootstrap"])
def test_a_refused_bootstrap_leaves_no_cache_dir_behind(registry, tmp_path, boot):
    """A bootstrap that fails its digest (the endless one) or its validation (bytes that match
    their digest but are no bootstrap) is refused; the cache directory named for the mount,
    and its `images/` for offline mounts, used to be created before the check and stayed."""
    HostileRegistry.boot_size = 1000
    HostileRegistry.boot = boot
    cache = tmp_path / "cache"
    with pytest.raises((DigestMismatchError, FormatError)):
        open_registry(f"{registry}/evil:latest", plain_http=True, cache_dir=str(cache))
    assert not cache.exists()
    assert list(tmp_path.iterdir()) == []
