"""Bootstraps of registry images kept next to the chunk cache, so that an image whose chunks
are all cached mounts while its registry is unreachable (docs/operations.md, "Degraded hosts").

Under `<cache dir>/images/` (0700, opened by cache/safedir.py; every file 0600, opened under the
directory fd with O_NOFOLLOW, written to a temporary name and renamed into place):

    sha256-<hex>        a bootstrap layer, content-addressed: loading checks its sha256
    ref-<sha256(ref)>   JSON {"ref", "manifest", "bootstrap"}: for an image reference, the digest
                        of the manifest last fetched for it and of that manifest's bootstrap layer

    <hex>.lock          in-use marker of the image state of bootstrap <hex>: this directory's
                        sha256-<hex>, the ref records naming it, and the learned prefetch list
                        `<cache dir>/prefetch/<hex>.json` (io/learned.py)

In use, and garbage collection. A mount holds a shared flock on `<hex>.lock` of its bootstrap
for as long as its process lives (`hold`: taken before it saves or loads a bootstrap here, and
by daemon/learned.py before it reads or writes the learned list). `collect` (run by `nydusd
cache gc` and the snapshotter through cache/gc.py) removes the state of a bootstrap only under
an exclusive flock of that file, taken without waiting, so never while a mount uses it, and
unlinks the lock file last while still holding it; a mount that was waiting for its shared
lock then sees st_nlink == 0 and takes a fresh one. Every name is opened under the directory's
fd with O_NOFOLLOW (cache/safedir.py). What is left unprotected: a bootstrap saved by a mount
of another process before it holds the lock (never: save holds first), and a learned list
between a mount's start and its lookup (then the mount just finds no list).

What is trusted: the bootstrap digest comes from a manifest that was fetched and verified when
the registry was up, and the bootstrap bytes are checked against it on every load; the only
thing taken on faith is the directory itself (root's, refused otherwise). For a tag, the
offline mount gets the manifest the tag named when it was last fetched (logged); for a digest
reference, the manifest digest must match the reference.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from nydus_py.cache import safedir
from nydus_py.errors import ConfigError

log = logging.getLogger(__name__)

SUBDIR = "images"
PREFETCH_SUBDIR = "prefetch"    # io/learned.py LOCAL_DIR: `<hex>.json` learned lists
MAX_RECORD = 4096
LOCK_EXT = ".lock"
TEMP_AGE = 3600.0               # a writer's temporary file older than this is a dead writer's
_HEX = frozenset("0123456789abcdef")


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
            hold(self.dir.parent, bootstrap_digest)     # before writing: a gc waits for it
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
        hold(self.dir.parent, digest)
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


# -- in use --------------------------------------------------------------------------------------
_held: dict[tuple[str, str], int] = {}
_held_lock = threading.Lock()


def _bootstrap_hex(digest: str) -> str | None:
    algo, _, hexd = digest.partition(":")
    return hexd if algo == "sha256" and len(hexd) == 64 and _HEX.issuperset(hexd) else None


def hold(cache_dir: str | os.PathLike, digest: str) -> bool:
    """Marks the image state of bootstrap `digest` in `cache_dir` as used by this process until
    it exits (or `release`). Idempotent; blocks only while a gc is removing that state. Best
    effort: a directory that cannot be used is one warning and False."""
    hexd = _bootstrap_hex(digest)
    if hexd is None:
        return False
    key = (os.path.abspath(cache_dir), hexd)
    with _held_lock:
        if key in _held:
            return True
        try:
            dfd = safedir.open_dir(Path(cache_dir) / SUBDIR, what="image metadata directory")
        except ConfigError as e:
            log.warning("image state of %s not marked in use: %s", digest, e)
            return False
        try:
            for _ in range(16):
                fd = safedir.open_file(hexd + LOCK_EXT, os.O_RDWR | os.O_CREAT, dfd)
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH)
                    if os.fstat(fd).st_nlink:
                        os.utime(fd)                    # last use, for collect's max_age
                        _held[key] = fd
                        return True
                except BaseException:
                    os.close(fd)
                    raise
                os.close(fd)                            # removed by a gc meanwhile: again
            return False
        except OSError as e:
            log.warning("image state of %s not marked in use: %s", digest, e.strerror)
            return False
        finally:
            os.close(dfd)


def release(cache_dir: str | os.PathLike, digest: str) -> None:
    hexd = _bootstrap_hex(digest)
    with _held_lock:
        fd = _held.pop((os.path.abspath(cache_dir), hexd or ""), -1)
    if fd >= 0:
        os.close(fd)


# -- garbage collection -----------------------------------------------------------------------------
@dataclass
class ImageGcReport:
    removed: list[str] = field(default_factory=list)    # bootstrap digests whose state went
    busy: list[str] = field(default_factory=list)       # unused for max_age, but in use
    removed_bytes: int = 0


def _open_existing(path: Path, what: str) -> int:
    """The directory's fd, -1 if it does not exist (as root, refused like the cache dir)."""
    if not os.path.lexists(path):
        return -1
    try:
        return safedir.open_dir(path, what=what, create=False)
    except ConfigError as e:
        log.warning("cache gc: %s", e)
        return -1


def _stat(dfd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _ref_target(dfd: int, name: str) -> str | None:
    try:
        fd = safedir.open_file(name, os.O_RDONLY | os.O_NONBLOCK, dfd)
    except OSError:
        return None
    try:
        record = json.loads(os.pread(fd, MAX_RECORD, 0))
        return _bootstrap_hex(str(record["bootstrap"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    finally:
        os.close(fd)


def collect(cache_dir: str | os.PathLike, max_age: float, *, now: float | None = None) -> ImageGcReport:
    """Removes the image state (kept bootstrap, ref records naming it, learned prefetch list) of
    every bootstrap that no process holds (`hold`) and that was last used more than `max_age`
    seconds ago (0: every unused one). Ref records naming nothing usable go too, and temporary
    files of writers dead for TEMP_AGE."""
    now = time.time() if now is None else now
    report = ImageGcReport()
    ifd = _open_existing(Path(cache_dir) / SUBDIR, "image metadata directory")
    pfd = _open_existing(Path(cache_dir) / PREFETCH_SUBDIR, "prefetch list directory")
    try:
        files: dict[str, list[tuple[int, str]]] = {}      # bootstrap hex -> (dir fd, name)
        for dfd in (ifd, pfd):
            if dfd < 0:
                continue
            for name in os.listdir(dfd):
                st = _stat(dfd, name)
                if st is None:
                    continue
                if name.startswith("."):
                    if now - st.st_mtime > TEMP_AGE and (name.endswith(".tmp") or dfd == ifd):
                        _unlink(dfd, name, report)
                    continue
                hexd = None
                if dfd == pfd and name.endswith(".json"):
                    hexd = _bootstrap_hex("sha256:" + name[:-5])
                elif dfd == ifd and name.startswith("sha256-"):
                    hexd = _bootstrap_hex("sha256:" + name[7:])
                elif dfd == ifd and name.endswith(LOCK_EXT):
                    hexd = _bootstrap_hex("sha256:" + name[:-len(LOCK_EXT)])
                elif dfd == ifd and name.startswith("ref-"):
                    hexd = _ref_target(dfd, name) or "-"     # "-": names nothing usable
                if hexd is not None:
                    files.setdefault(hexd, []).append((dfd, name))
        for hexd, names in sorted(files.items()):
            if hexd == "-":
                for dfd, name in names:
                    _unlink(dfd, name, report)
                continue
            stats = [st for dfd, name in names if (st := _stat(dfd, name)) is not None]
            if stats and now - max(st.st_mtime for st in stats) < max_age:
                continue
            _remove_unused(ifd, hexd, names, report)
    finally:
        for dfd in (ifd, pfd):
            if dfd >= 0:
                os.close(dfd)
    if report.removed:
        log.info("cache %s: removed the image state of %d unused bootstraps (%d bytes)", cache_dir,
                 len(report.removed), report.removed_bytes)
    return report


def _remove_unused(ifd: int, hexd: str, names: list[tuple[int, str]], report: ImageGcReport) -> None:
    lock = -1
    if ifd >= 0:        # no images/ dir: no mount holds anything (hold creates it)
        try:
            lock = safedir.open_file(hexd + LOCK_EXT, os.O_RDWR | os.O_CREAT, ifd)
        except OSError as e:
            log.warning("cache gc: cannot open %s%s: %s", hexd, LOCK_EXT, e.strerror)
            return
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(lock)
            if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                report.busy.append(f"sha256:{hexd}")
                return
            raise
    try:
        for dfd, name in names:
            if name != hexd + LOCK_EXT:
                _unlink(dfd, name, report)
        if lock >= 0:
            _unlink(ifd, hexd + LOCK_EXT, report)      # last, still locked: see the docstring
        report.removed.append(f"sha256:{hexd}")
    finally:
        if lock >= 0:
            os.close(lock)


def _unlink(dfd: int, name: str, report: ImageGcReport) -> None:
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        os.unlink(name, dir_fd=dfd)
        report.removed_bytes += st.st_blocks * 512
    except FileNotFoundError:
        pass
