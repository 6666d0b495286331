"""`[docker://]HOST/REPO[:TAG|@DIGEST]`: a registry (Docker Hub short names too).

Layers are downloaded concurrently (`concurrency` at a time) into a private temp dir. The
converter does not wait for a whole layer: `open_layer` returns a `_Follower` that reads the
file as the download writes it, so gunzip and chunking of a layer overlap its download. The
follower gives EOF only once the download finished and `get_blob`'s body verified digest and
size at its end; if the download fails (HTTP error, truncated body, digest mismatch, `close()`)
the follower raises that error at whatever point it is, so the converter discards its output
as for any bad layer. Reads come from the file, so memory stays bounded whatever the layer size.
"""

from __future__ import annotations

import io
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
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
from nydus_py.errors import ImageFormatError, NydusError
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


class _Download:
    """How far one layer's download got; the writer updates it, followers wait on it."""

    def __init__(self, path: Path):
        self.path = path
        self.cond = threading.Condition()
        self.written = 0                        # bytes on disk (flushed: unbuffered writes)
        self.done = False                       # body read to EOF and verified
        self.error: BaseException | None = None

    def advance(self, n: int) -> None:
        with self.cond:
            self.written += n
            self.cond.notify_all()

    def finish(self, error: BaseException | None = None) -> None:
        with self.cond:
            if not self.done and self.error is None:
                self.done, self.error = error is None, error
            self.cond.notify_all()


class _Follower(io.RawIOBase):
    """Reads a layer file while it is being downloaded: blocks when it catches up with the
    writer, EOF only after a verified finish, the download's error when it failed."""

    def __init__(self, dl: _Download, what: str):
        self._dl = dl
        self._what = what
        self._f: io.FileIO | None = None
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        dl = self._dl
        with dl.cond:
            dl.cond.wait_for(lambda: dl.error is not None or dl.done or dl.written > self._pos)
            if dl.error is not None:
                if isinstance(dl.error, NydusError) and self._what not in str(dl.error):
                    raise type(dl.error)(f"{self._what}: {dl.error}") from dl.error
                raise dl.error
            avail = dl.written - self._pos
        if avail == 0 or len(buf) == 0:
            return 0
        if self._f is None:                     # the file exists once a byte was written
            self._f = io.FileIO(dl.path, "rb")
        n = self._f.readinto(memoryview(buf)[:min(len(buf), avail)])
        self._pos += n
        return n

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        super().close()


class RegistryImage(ImageBase):
    def __init__(self, client: RegistryClient, ref: Reference, options: RegistryOptions, **kw):
        super().__init__(**kw)
        self.client = client
        self.ref = ref
        self.origin = RegistryOrigin(client.config.host, ref.repository)
        self._tmp = Path(tempfile.mkdtemp(prefix="nydusify-layers-", dir=options.work_dir))
        self._pool = ThreadPoolExecutor(max_workers=max(1, options.concurrency), thread_name_prefix="pull")
        self._cancel = threading.Event()
        self._downloads = {l.index: _Download(self._tmp / f"layer-{l.index}") for l in self.layers}
        for l in self.layers:
            self._pool.submit(self._download, l)

    def _download(self, layer: LayerInfo) -> None:
        dl = self._downloads[layer.index]
        try:
            with self.client.get_blob(self.ref.repository, layer.digest, layer.size) as body, \
                    open(dl.path, "wb", buffering=0) as out:
                while True:
                    if self._cancel.is_set():
                        raise NydusError(f"{layer.what}: download cancelled")
                    buf = body.read(1 << 20)    # b"" only after the digest and size checked out
                    if not buf:
                        break
                    view = memoryview(buf)
                    while view:
                        view = view[out.write(view):]
                    dl.advance(len(buf))
        except BaseException as e:
            dl.finish(e)
            raise
        dl.finish()

    def open_layer(self, layer: LayerInfo) -> IO[bytes]:
        return io.BufferedReader(_Follower(self._downloads[layer.index], layer.what), 1 << 20)

    def close(self) -> None:
        self._cancel.set()
        for dl in self._downloads.values():     # wakes followers, also of downloads never started
            dl.finish(NydusError("download cancelled: the source image was closed"))
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


