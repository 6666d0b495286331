"""`[docker://]HOST/REPO[:TAG|@DIGEST]`: a registry (Docker Hub short names too).

Layers are downloaded concurrently into a private temp dir while earlier layers are being
converted (the merge itself must go in layer order); each download is verified against its
digest before the converter reads it.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from converter.sources.base import (
    ImageBase,
    LayerInfo,
    RegistryOrigin,
    SourceImage,
    SourceRef,
)
from converter.sources.resolve import resolve_image
from nydus_py.errors import ImageFormatError
from nydus_py.oci import digest as dg
from nydus_py.oci import mediatypes as mt
from nydus_py.oci.layout import MAX_JSON, Descriptor
from nydus_py.oci.reference import Reference
from nydus_py.oci.reference import parse as parse_reference

if TYPE_CHECKING:
    from nydus_py.oci.registry import RegistryClient


@dataclass(frozen=True, kw_only=True)
class RegistryOptions:
    plain_http: bool = False          # talk http:// (local/insecure registries)
    skip_verify: bool = False         # https without certificate verification
    ca_file: str | None = None
    work_dir: str | None = None       # where downloaded layers wait (default: $TMPDIR)
    concurrency: int = 3              # layer downloads / blob uploads in flight

    def client(self, ref: Reference) -> RegistryClient:
        # imported here: requests & co. cost ~0.1 s of every nydusify start, and a conversion
        # between local layouts never talks to a registry
        from nydus_py.oci.registry import RegistryClient, RegistryConfig
        return RegistryClient(config=RegistryConfig.for_reference(
            ref, scheme="http" if self.plain_http else "https", skip_verify=self.skip_verify,
            ca_file=self.ca_file))


class RegistryImage(ImageBase):
    def __init__(self, client: RegistryClient, ref: Reference, options: RegistryOptions, **kw):
        super().__init__(**kw)
        self.client = client
        self.ref = ref
        self.origin = RegistryOrigin(client.config.host, ref.repository)
        self._tmp = Path(tempfile.mkdtemp(prefix="nydusify-layers-", dir=options.work_dir))
        self._pool = ThreadPoolExecutor(max_workers=max(1, options.concurrency), thread_name_prefix="pull")
        self._cancel = threading.Event()
        self._downloads: dict[int, Future] = {l.index: self._pool.submit(self._download, l) for l in self.layers}

    def _download(self, layer: LayerInfo) -> Path:
        path = self._tmp / f"layer-{layer.index}"
        with self.client.get_blob(self.ref.repository, layer.digest, layer.size) as body, open(path, "wb") as out:
            while not self._cancel.is_set():
                buf = body.read(1 << 20)
                if not buf:
                    break
                out.write(buf)
        return path

    def open_layer(self, layer: LayerInfo) -> IO[bytes]:
        path = self._downloads[layer.index].result()
        return open(path, "rb")   # already verified against layer.digest while downloading

    def close(self) -> None:
        self._cancel.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self._tmp, ignore_errors=True)
        self.client.close()


def open_registry(ref: SourceRef, platform: str | None, options: RegistryOptions | None) -> SourceImage:
    options = options or RegistryOptions()
    r = parse_reference(ref.path)
    client = options.client(r)
    try:
        data, media_type, digest = client.get_manifest(r.repository, r.digest or r.tag or "latest")
        top = Descriptor(media_type, digest, len(data))

        def read_blob(desc: Descriptor, what: str) -> bytes:
            if desc.size > MAX_JSON:
                raise ImageFormatError(f"{what}: size {desc.size} exceeds limit {MAX_JSON}")
            if desc.digest == top.digest:
                return data
            if desc.media_type in mt.INDEX_TYPES + mt.MANIFEST_TYPES:
                body, _, _ = client.get_manifest(r.repository, desc.digest)
            else:
                with client.get_blob(r.repository, desc.digest, desc.size) as b:
                    body = b.read()
            dg.verify_bytes(body, desc.digest, what)
            return body

        return resolve_image(str(r), top, read_blob, platform,
                             lambda **kw: RegistryImage(client, r, options, **kw))
    except BaseException:
        client.close()
        raise


