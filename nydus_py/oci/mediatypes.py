"""OCI / Docker media types, and the ones nydus-py defines for its own artifacts.

Our types are deliberately distinct from upstream Nydus RAFS (`application/vnd.oci.image.layer.
nydus.blob.v1`), so neither implementation mistakes the other's bootstrap for its own.
"""

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDIST_TAR = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_NONDIST_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_NONDIST_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"

DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_FOREIGN_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

# nydus-py artifacts (documented in docs/format.md). containerd only treats descriptors whose
# type starts with "application/vnd.oci.image.layer." as layers, so ours live under that prefix.
NYDUS_PY_BLOB = "application/vnd.oci.image.layer.nydus-py.blob.v1"
NYDUS_PY_BOOTSTRAP = "application/vnd.oci.image.layer.nydus-py.bootstrap.v1"

# Learned prefetch lists (io/learned.py): an OCI 1.1 referrer artifact of the converted image.
NYDUS_PY_PREFETCH_ARTIFACT = "application/vnd.nydus-py.prefetch.v1"
NYDUS_PY_PREFETCH_LIST = "application/vnd.nydus-py.prefetch.v1+json"

# Annotations we put on layer descriptors / manifests.
ANNO_BOOTSTRAP = "io.nydus-py.bootstrap"          # "true" on the bootstrap layer
ANNO_BLOB = "io.nydus-py.blob"                    # "true" on data blob layers
ANNO_SOURCE_LAYER = "io.nydus-py.source-layer"    # digest of the OCI layer a blob came from
ANNO_UNCOMPRESSED_SIZE = "io.nydus-py.uncompressed-size"
ANNO_CHUNK_COUNT = "io.nydus-py.chunk-count"
ANNO_VERSION = "io.nydus-py.version"

INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)

GZIP_LAYERS = (OCI_LAYER_GZIP, OCI_LAYER_NONDIST_GZIP, DOCKER_LAYER_GZIP, DOCKER_LAYER_FOREIGN_GZIP)
ZSTD_LAYERS = (OCI_LAYER_ZSTD, OCI_LAYER_NONDIST_ZSTD)
TAR_LAYERS = (OCI_LAYER_TAR, OCI_LAYER_NONDIST_TAR, "application/vnd.docker.image.rootfs.diff.tar")
