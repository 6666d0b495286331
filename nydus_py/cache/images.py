"""Bootstraps of registry images kept next to the chunk cache, so that an image whose chunks
are all cached mounts while its registry is unreachable (docs/operations.md, "Degraded hosts").

Under `<cache dir>/images/` (0700, opened by cache/safedir.py; every file 0600, opened under the
directory fd with O_NOFOLLOW, written to a temporary name and renamed into place):

    sha256-<hex>        a bootstrap layer, content-addressed: loading checks its sha256
    ref-<sha256(ref)>   JSON {"ref", "manifest", "bootstrap"}: for an image reference, the digest
                        of the manifest last fetched for it and of that manifest's bootstrap layer

What is trusted: the bootstrap digest comes from a manifest that was fetched and verified when
the registry was up, and the bootstrap bytes are checked against it on every load; the only
thing taken on faith is the directory itself (root's, refused otherwise). For a tag, the
offline mount gets the manifest the tag named when it was last fetched (logged); for a digest
reference, the manifest digest must match the reference.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from pathlib import Path

from nydus_py.cache import safedir
from nydus_py.errors import ConfigError

log = logging.getLogger(__name__)

SUBDIR = "images"
MAX_RECORD = 4096


class ImageStore:
    """Opens (or creates) its directory only when it first needs it: a save after the image was
    verified, or a load. A refused image (bad digest, invalid bootstrap) so leaves no
    `images/`, nor a cache directory created for it, behind."""

    def __init__(self, cache_dir: str | os.PathLike):
        self.dir = Path(cache_dir) / SUBDIR
        self.fd = -1

    def _open(self, create: bool) -> bool:
        """True once the directory is open; False when it does not exist and `create` is off.
        A directory that cannot be used raises ConfigError (cache/safedir.py)."""
        if self.fd < 0:
            if not create and not os.path.lexists(self.dir):
                return False
            self.fd = safedir.open_dir(self.dir, what="image metadata directory", create=create)
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "ImageStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _ref_name(ref: str) -> str:
        return "ref-" + hashlib.sha256(ref.encode()).hexdigest()

    def save(self, ref: str, manifest_digest: str, bootstrap_digest: str, layer: bytes) -> None:
        """Remembers `layer` (already verified against `bootstrap_digest`) for `ref`. Best
        effort: a full or failing disk is logged, never an error."""
        try:
            algo, _, hexd = bootstrap_digest.partition(":")
            if algo != "sha256" or hashlib.sha256(layer).hexdigest() != hexd:
                raise ValueError(f"bootstrap layer does not match {bootstrap_digest}")
            self._open(create=True)
            self._write(f"sha256-{hexd}", layer)
            record = {"ref": ref, "manifest": manifest_digest, "bootstrap": bootstrap_digest}
            self._write(self._ref_name(ref), json.dumps(record).encode())
        except (OSError, ValueError, ConfigError) as e:
            log.warning("%s: cannot keep the bootstrap of %s for offline mounts: %s", self.dir,
                        ref, getattr(e, "strerror", None) or e)

    def load(self, ref: str, manifest_digest: str | None = None) -> tuple[str, bytes] | None:
        """(bootstrap digest, verified bootstrap layer) last saved for `ref`, or None. With
        `manifest_digest` (a digest reference), only if it came from that manifest."""
        if not self._open(create=False):
            return None
        raw = self._read(self._ref_name(ref), MAX_RECORD)
        if raw is None:
            return None
        try:
            record = json.loads(raw)
            digest = str(record["bootstrap"])
            if record.get("ref") != ref:
                return None
            if manifest_digest is not None and record.get("manifest") != manifest_digest:
                return None
        except (ValueError, KeyError, TypeError):
            log.warning("%s: unreadable record for %s; ignoring it", self.dir, ref)
            return None
        algo, _, hexd = digest.partition(":")
        if algo != "sha256" or len(hexd) != 64:
            return None
        from nydus_py.format.bootstrap import MAX_BOOTSTRAP
        layer = self._read(f"sha256-{hexd}", MAX_BOOTSTRAP)
        if layer is None or hashlib.sha256(layer).hexdigest() != hexd:
            log.warning("%s: cached bootstrap %s is missing or does not match its digest",
                        self.dir, digest)
            return None
        return digest, layer

    def _write(self, name: str, data: bytes) -> None:
        tmp = f".{name}.{secrets.token_hex(4)}"
        fd = safedir.open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self.fd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp, dir_fd=self.fd)
            raise
        os.close(fd)
        os.rename(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def _read(self, name: str, limit: int) -> bytes | None:
        try:
            fd = safedir.open_file(name, os.O_RDONLY, self.fd)
        except OSError:
            return None
        try:
            size = os.fstat(fd).st_size
            if size > limit:
                return None
            return os.pread(fd, size, 0)
        except OSError:
            return None
        finally:
            os.close(fd)
