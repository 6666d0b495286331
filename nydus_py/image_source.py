"""Open a converted image for mounting: its bootstrap, and a backend that serves its blobs.

Three ways to name an image:
  - `HOST/REPO:TAG` (or `@sha256:…`): a converted image in a registry. The manifest (or the
    converted entry of a merged index) and the bootstrap layer are fetched and verified; data
    blobs are read lazily with ranged GETs through the registry backend.
  - `oci:DIR[:TAG]`: an OCI image layout holding a converted image. The manifest's last layer
    is the bootstrap (read and digest-verified here); the data blobs are read lazily from the
    same directory (`DIR/blobs/sha256/<hex>`) through LocalFsBackend.
  - a bootstrap file (plain or zstd msgpack) plus a directory of blobs (`<dir>/<hex>` or an
    OCI layout's `blobs/sha256/<hex>`), or any backend the config names.

Every failure is a NydusError whose one-line message names the file or image involved.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from nydus_py.errors import (BackendError, BlobNotFoundError, ConfigError, FormatError,
                             ImageFormatError)
from nydus_py.format.bootstrap import MAX_BOOTSTRAP, Bootstrap
from nydus_py.oci import mediatypes as mt
from nydus_py.oci.layout import Descriptor, OCILayout, json_object
from nydus_py.oci.nydus_image import NydusLayers, find_layers
from nydus_py.metrics import Metrics
from nydus_py.config.schema import BackendConfig, LocalFsConfig
from nydus_py.storage.backend import BlobBackend, close_backend, hint_blob_sizes, innermost
from nydus_py.storage.factory import make_backend

OCI_PREFIX = "oci:"
WARM_THREADS = 4        # connections opened at mount, one HEAD each (warm_backend)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageOrigin:
    """Where a mounted image came from, so that its learned prefetch list can be found and
    stored beside it (daemon/learned.py): as a referrer of `manifest` in `registry`'s
    repository or in the OCI layout at `layout`, and locally under `bootstrap_digest`."""
    bootstrap_digest: str = ""      # sha256:… of the bootstrap as stored ("" = hash the file)
    bootstrap_path: str = ""        # a bootstrap file (its digest is taken when needed)
    manifest: Descriptor | None = None   # the converted image manifest: the referrer subject
    registry: object = None         # RegistryConfig of the image's registry
    repository: str = ""
    layout: str = ""                # OCI layout directory


@dataclass
class OpenedImage:
    bootstrap: Bootstrap
    backend: BlobBackend
    description: str                # for log lines: "oci:/path:tag" or the bootstrap path
    origin: ImageOrigin = ImageOrigin()
    # data blobs the backend does not have: the mount goes ahead only if the chunk cache holds
    # every chunk of them that a file uses (daemon/mount.py); (blob id, error line) pairs
    missing_blobs: list[tuple[str, str]] = field(default_factory=list)
    warmed: bool = False            # warm_backend already runs (started with the manifest)


def parse_oci_ref(ref: str) -> tuple[Path, str | None]:
    """`oci:DIR[:TAG]` → (DIR, TAG or None). A DIR that itself contains ':' works as long as
    it exists; the tag is the text after the last ':' when the rest names a directory."""
    if not ref.startswith(OCI_PREFIX):
        raise ConfigError(f"image {ref!r}: expected oci:DIR[:TAG]")
    rest = ref[len(OCI_PREFIX):]
    if not rest:
        raise ConfigError(f"image {ref!r}: missing directory after 'oci:'")
    head, sep, tag = rest.rpartition(":")
    if sep and head and "/" not in tag and not os.path.isdir(rest):
        if not tag:
            raise ConfigError(f"image {ref!r}: empty tag")
        return Path(head), tag
    return Path(rest), None


def _localfs(dir: Path, alt_dirs=(), metrics: Metrics | None = None):
    config = BackendConfig(type="localfs", localfs=LocalFsConfig(dir=str(dir), alt_dirs=list(alt_dirs)))
    return make_backend(config, metrics=metrics)


def open_oci(ref: str, *, metrics: Metrics | None = None, backend: BackendConfig | None = None
             ) -> OpenedImage:
    """`backend`: where the data blobs are instead of the layout (an image converted with
    --backend-type s3 has only its bootstrap there)."""
    root, tag = parse_oci_ref(ref)
    if not root.is_dir():
        raise ImageFormatError(f"{root}: no such directory (image {ref})")
    layout = OCILayout(root)
    mdesc, manifest = layout_manifest_desc(layout, layout.resolve(tag), ref)
    layers = find_layers(manifest, ref)
    data = layout.read_blob(layers.bootstrap, f"{ref}: bootstrap layer", limit=MAX_BOOTSTRAP)
    bootstrap = parse_bootstrap(data, ref)
    if backend is not None:
        return OpenedImage(bootstrap, make_backend(backend, metrics=metrics), ref)
    present = {d.digest for d in layers.blobs}
    missing = []
    for blob in bootstrap.blobs:
        if blob.id not in present and not layout.has_blob(blob.id):
            raise BlobNotFoundError(f"{ref}: bootstrap refers to blob {blob.id}, which is not in {root}")
        if not layout.has_blob(blob.id):    # a layer of the manifest whose file is gone
            missing.append((blob.id, f"{ref}: data blob {blob.id} is missing from {root}"))
    origin = ImageOrigin(bootstrap_digest=layers.bootstrap.digest, manifest=mdesc, layout=str(root))
    return OpenedImage(bootstrap, _localfs(root, metrics=metrics), ref, origin, missing)


def layout_manifest(layout: OCILayout, desc: Descriptor, ref: str) -> dict:
    """The image manifest for `desc`, descending one level into an index if need be."""
    return layout_manifest_desc(layout, desc, ref)[1]


def layout_manifest_desc(layout: OCILayout, desc: Descriptor, ref: str) -> tuple[Descriptor, dict]:
    """(descriptor, content) of the image manifest for `desc` (see layout_manifest)."""
    if desc.media_type in mt.INDEX_TYPES:
        index = layout.read_json(desc, f"{ref}: index {desc.digest}")
        entries = [Descriptor.from_json(m, ref) for m in index.get("manifests") or []]
        entries = [e for e in entries if e.media_type in mt.MANIFEST_TYPES]
        linux = [e for e in entries if (e.platform or {}).get("os") in (None, "linux")]
        if len(linux) != 1:
            raise ImageFormatError(f"{ref}: index lists {len(linux)} manifests; expected one converted image")
        desc = linux[0]
    elif desc.media_type not in mt.MANIFEST_TYPES:
        raise ImageFormatError(f"{ref}: unsupported media type {desc.media_type!r}")
    return desc, layout.read_json(desc, f"{ref}: manifest {desc.digest}")


def open_bootstrap(bootstrap_path: str | os.PathLike, backend: BackendConfig, *,
                   metrics: Metrics | None = None) -> OpenedImage:
    """A bootstrap file and the configured backend that holds its blobs."""
    bootstrap = Bootstrap.from_file(bootstrap_path)
    return OpenedImage(bootstrap, make_backend(backend, metrics=metrics), str(bootstrap_path),
                       ImageOrigin(bootstrap_path=str(bootstrap_path)))


def open_local(bootstrap_path: str | os.PathLike, blob_dir: str | os.PathLike, alt_dirs=(), *,
               metrics: Metrics | None = None) -> OpenedImage:
    """A bootstrap file and a directory of blobs (`<hex>` or `blobs/sha256/<hex>`)."""
    blob_dir = Path(blob_dir)
    if not blob_dir.is_dir():
        raise ConfigError(f"{blob_dir}: blob directory does not exist")
    bootstrap = Bootstrap.from_file(bootstrap_path)
    return OpenedImage(bootstrap, _localfs(blob_dir, alt_dirs, metrics), str(bootstrap_path),
                       ImageOrigin(bootstrap_path=str(bootstrap_path)))


def open_image(ref: str, *, metrics: Metrics | None = None, plain_http: bool = False,
               skip_verify: bool = False, backend: BackendConfig | None = None,
               cache_dir: str | None = None, on_manifest=None, warm: bool = False) -> OpenedImage:
    """`oci:DIR[:TAG]` or a registry reference. `backend` overrides where a registry image's
    data blobs are read from (e.g. S3, or a registry config with mirrors/proxy). With
    `cache_dir`, a registry image's bootstrap is kept there, and used when the registry is
    unreachable (cache/images.py). `on_manifest(origin)`: called with the image's origin as
    soon as a registry image's manifest is verified, before its bootstrap is fetched (to start
    other lookups meanwhile). `warm`: start warm_backend for a registry image's blobs as soon
    as its manifest names them (OpenedImage.warmed says it did)."""
    if ref.startswith(OCI_PREFIX):
        return open_oci(ref, metrics=metrics, backend=backend)
    return open_registry(ref, metrics=metrics, plain_http=plain_http, skip_verify=skip_verify,
                         backend=backend, cache_dir=cache_dir, on_manifest=on_manifest, warm=warm)


def open_registry(ref: str, *, metrics: Metrics | None = None, plain_http: bool = False,
                  skip_verify: bool = False, backend: BackendConfig | None = None,
                  cache_dir: str | None = None, on_manifest=None, warm: bool = False) -> OpenedImage:
    from nydus_py.cache.images import ImageStore
    from nydus_py.oci.reference import parse as parse_reference
    from nydus_py.oci.registry import RegistryClient, RegistryConfig

    r = parse_reference(ref)
    scheme = "http" if plain_http else "https"
    config = RegistryConfig.for_reference(r, scheme=scheme, skip_verify=skip_verify)
    # The data blobs' backend exists before the manifest is read: as soon as the manifest names
    # the blobs (and their sizes), their connections open while the bootstrap downloads.
    blobs = make_backend(_blob_backend_config(r, backend, plain_http, skip_verify), metrics=metrics)
    store = ImageStore(cache_dir) if cache_dir else None
    try:
        try:
            with RegistryClient(config=config) as c:
                keep = store.save if store is not None else None

                def told(mdesc: Descriptor, layers: NydusLayers) -> None:
                    hint_blob_sizes(blobs, {d.digest: d.size for d in layers.blobs})
                    if warm:
                        warm_backend(blobs, [d.digest for d in layers.blobs])
                    if on_manifest is not None:
                        on_manifest(ImageOrigin(bootstrap_digest=layers.bootstrap.digest,
                                                manifest=mdesc, registry=config,
                                                repository=r.repository))
                _, layers, bootstrap, mdesc = _fetch_registry_image(c, r, ref, keep=keep,
                                                                    on_manifest=told)
            bootstrap_digest: str = layers.bootstrap.digest
            named = {d.digest for d in layers.blobs}
            others = [b.id for b in bootstrap.blobs if b.id not in named]
            if warm and others:         # blobs the bootstrap uses that its manifest does not list
                # (the manifest's probes already opened the pool's connections: one HEAD each)
                warm_backend(blobs, others, threads=min(WARM_THREADS, len(others)))
        except BackendError as e:
            if e.permanent or store is None:
                raise
            bootstrap_digest, bootstrap = _offline_bootstrap(store, r, ref, e)
            mdesc = None                # offline: no referrer lookup for a learned prefetch list
            if warm:
                warm_backend(blobs, [b.id for b in bootstrap.blobs])
    except BaseException:
        close_backend(blobs)
        raise
    finally:
        if store is not None:
            store.close()
    origin = ImageOrigin(bootstrap_digest=bootstrap_digest, manifest=mdesc,
                         registry=config, repository=r.repository)
    return OpenedImage(bootstrap, blobs, str(r), origin, warmed=warm)


def _blob_backend_config(r, backend: BackendConfig | None, plain_http: bool,
                         skip_verify: bool) -> BackendConfig:
    """Where a registry image's data blobs are read from: the image's repository, or the
    configured backend (a registry config without host/repo gets the reference's)."""
    from nydus_py.config.schema import RegistryBackendConfig

    scheme = "http" if plain_http else "https"
    if backend is None:
        return BackendConfig(type="registry", registry=RegistryBackendConfig(
            host=r.api_host, repo=r.repository, scheme=scheme, skip_verify=skip_verify))
    if backend.registry is not None and not (backend.registry.host and backend.registry.repo):
        # a config without host/repo (Nydus's sample, the snapshotter's): the reference's
        import dataclasses
        return dataclasses.replace(backend, registry=dataclasses.replace(
            backend.registry, host=backend.registry.host or r.api_host,
            repo=backend.registry.repo or r.repository,
            scheme="http" if plain_http else backend.registry.scheme,
            skip_verify=backend.registry.skip_verify or skip_verify))
    return backend


def warm_backend(backend: BlobBackend, blob_ids: list[str], threads: int = WARM_THREADS) -> None:
    """Asks the backend about every data blob now, in background threads (`probe_blob`: a HEAD
    even when the manifest gave the size), so that the first read of each blob finds a
    connection open and its size known: those round trips overlap the rest of the mount
    set-up instead of preceding the first read, and `threads` connections end up in the pool.
    Errors are left for the reads to report."""
    if not blob_ids:
        return
    # at least `threads` probes, at once: each holds its own connection, so that many stay
    # open in the pool for the first reads (a cold start's misses come several at a time)
    blobs = list(blob_ids) * -(-threads // len(blob_ids))
    import threading

    probe = getattr(innermost(backend), "probe_blob", None) or backend.blob_size
    lock = threading.Lock()

    def run() -> None:
        while True:
            with lock:
                if not blobs:
                    return
                blob = blobs.pop(0)
            try:
                probe(blob)
            except Exception as e:  # noqa: BLE001  (a read of the blob reports it)
                log.debug("size of blob %s not known yet: %s", blob, e)
    for i in range(min(threads, len(blobs))):
        threading.Thread(target=run, name=f"warm-backend-{i}", daemon=True).start()


def _offline_bootstrap(store, r, ref: str, error: BackendError) -> tuple[str, Bootstrap]:
    """(digest, bootstrap) kept for `ref` (verified by that digest), or `error` if none is."""
    cached = store.load(str(r), manifest_digest=r.digest)
    if cached is None:
        raise error
    digest, layer = cached
    log.warning("%s; registry unreachable: mounting with the bootstrap %s kept in %s (chunks "
                "not in the cache will fail with EIO until it is back)", error, digest, store.dir)
    return digest, parse_bootstrap(layer, ref)


def fetch_registry_image(client, r, what: str) -> tuple[dict, NydusLayers, Bootstrap]:
    """(manifest, layers, bootstrap) of a converted image in a registry: the manifest (or the
    converted entry of a merged index) and the bootstrap layer, fetched and verified."""
    return _fetch_registry_image(client, r, what)[:3]


def _fetch_registry_image(client, r, what: str, *, keep=None,
                          on_manifest=None) -> tuple[dict, NydusLayers, Bootstrap, Descriptor]:
    """The same, and the descriptor of the converted manifest. `keep(ref, manifest digest,
    bootstrap digest, layer bytes)` is called with what was verified (to mount offline later:
    cache/images.py)."""
    data, media_type, digest = client.get_manifest(r.repository, r.ref or "latest")
    top_digest = digest     # what the reference names (an index or a manifest)
    manifest = json_object(data, f"{what}: manifest {digest}")
    if media_type in mt.INDEX_TYPES:
        entry = converted_entry(manifest, what)
        data, media_type, digest = client.get_manifest(r.repository, entry.digest)
        manifest = json_object(data, f"{what}: manifest {digest}")
    mdesc = Descriptor(media_type, digest, len(data))
    layers = find_layers(manifest, what)
    if on_manifest is not None:
        on_manifest(mdesc, layers)
    layer = read_bootstrap_blob(client, r.repository, layers.bootstrap, what)
    bootstrap = parse_bootstrap(layer, what)
    if keep is not None:
        keep(str(r), top_digest, layers.bootstrap.digest, layer)
    return manifest, layers, bootstrap, mdesc


def parse_bootstrap(data: bytes, what: str) -> Bootstrap:
    """The bootstrap layer's bytes, parsed and validated; errors name the image."""
    try:
        return Bootstrap.from_bytes(data)
    except FormatError as e:
        raise FormatError(f"{what}: {e}") from None


def read_bootstrap_blob(client, repository: str, desc: Descriptor, what: str) -> bytes:
    """The bootstrap layer's bytes: its descriptor size must be within MAX_BOOTSTRAP, the
    stream is cut off as soon as it exceeds that size (never read whole into memory first),
    and its digest is verified at the end."""
    if not 0 < desc.size <= MAX_BOOTSTRAP:
        raise ImageFormatError(f"{what}: bootstrap layer of {desc.size} bytes "
                               f"(must be 1..{MAX_BOOTSTRAP})")
    parts = []
    with client.get_blob(repository, desc.digest, desc.size) as body:
        while True:
            piece = body.read(1 << 20)      # VerifyingReader: > desc.size raises, EOF verifies
            if not piece:
                break
            parts.append(piece)
    return b"".join(parts)


def converted_entry(index: dict, ref: str) -> Descriptor:
    """In a merged index, the entry marked with our os.feature for this host's architecture."""
    import platform as _platform

    from nydus_py.oci.nydus_image import NYDUS_OS_FEATURE
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(_platform.machine(), _platform.machine())
    entries = [Descriptor.from_json(m, ref) for m in index.get("manifests") or [] if isinstance(m, dict)]
    ours = [e for e in entries if NYDUS_OS_FEATURE in ((e.platform or {}).get("os.features") or [])]
    for e in ours:
        if (e.platform or {}).get("architecture") in (arch, None):
            return e
    raise ImageFormatError(f"{ref}: index has no nydus-py image for linux/{arch} "
                           f"(convert it with nydusify; --merge-platform keeps both)")
