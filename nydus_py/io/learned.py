"""Learned prefetch lists: which chunks a run of an image read, in first-access order, so that
later cold mounts of the same image (on any host) fetch them first, in a few large requests.

    ChunkRecorder     records the chunk ids behind every FUSE read (Vfs hook), first access
                      first, until its window ends, it is stopped, or it holds `limit` chunks
    LearnedList       the list itself: the digest of the bootstrap it is for + chunk ids;
                      `to_bytes` / `from_bytes` (the artifact blob, docs/format.md)
    save_local / load_local
                      `<cache_dir>/prefetch/<bootstrap hex>.json`, opened without following
                      links under the directory's fd

A list comes from the registry or from a cache directory, so it is untrusted input:
`from_bytes` caps its size and entry count, requires it to name this very bootstrap (by
digest) and only chunk ids that exist in it, and raises LearnedListError otherwise. Callers
log that one line and mount without the list; a bad list is never fatal.

Chunk level, not file level: a run reads parts of large files (a 5 MB libpython is paged in
partly), and chunk ids map straight to (blob, compressed offset), so the prefetcher can merge
neighbouring chunks of a blob into large range requests without walking any file.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

from nydus_py.errors import NydusError
from nydus_py.format.bootstrap import Bootstrap
from nydus_py.oci import digest as dg
from nydus_py.oci import mediatypes as mt

MEDIA_TYPE = mt.NYDUS_PY_PREFETCH_LIST  # the list blob
SCHEMA_VERSION = 1
MAX_LIST_BYTES = 4 << 20        # a list of MAX_CHUNKS runs of single chunks fits easily
MAX_CHUNKS = 1 << 18            # 256 Ki chunks = 256 GiB at the default 1 MiB chunk size
LOCAL_DIR = "prefetch"


class LearnedListError(NydusError):
    """A learned prefetch list that cannot be used (malformed, oversized, another image's)."""


@dataclass(frozen=True)
class LearnedList:
    bootstrap: str                      # "sha256:…" of the bootstrap the ids index into
    chunks: tuple[int, ...]             # chunk ids, in first-access order, no repeats

    def runs(self) -> list[list[int]]:
        """[[first id, count], …]: consecutive ids folded, order kept (the wire form)."""
        out: list[list[int]] = []
        for c in self.chunks:
            if out and out[-1][0] + out[-1][1] == c:
                out[-1][1] += 1
            else:
                out.append([c, 1])
        return out

    def to_bytes(self) -> bytes:
        doc = {"schemaVersion": SCHEMA_VERSION, "mediaType": MEDIA_TYPE,
               "bootstrap": self.bootstrap, "chunks": self.runs()}
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()

    @property
    def digest(self) -> str:
        return dg.of_bytes(self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes, *, bootstrap_digest: str, bootstrap: Bootstrap,
                   what: str) -> LearnedList:
        """Parses and checks a list against the mounted bootstrap; LearnedListError if unusable."""
        if len(data) > MAX_LIST_BYTES:
            raise LearnedListError(f"{what}: {len(data)} bytes, more than {MAX_LIST_BYTES}")
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise LearnedListError(f"{what}: not JSON ({e})") from None
        if not isinstance(doc, dict) or doc.get("schemaVersion") != SCHEMA_VERSION:
            raise LearnedListError(f"{what}: not a schemaVersion {SCHEMA_VERSION} prefetch list")
        if doc.get("bootstrap") != bootstrap_digest:
            raise LearnedListError(f"{what}: recorded for bootstrap {str(doc.get('bootstrap'))[:80]!r}, "
                                   f"not this image's {bootstrap_digest}")
        runs = doc.get("chunks")
        if not isinstance(runs, list):
            raise LearnedListError(f"{what}: no chunk list")
        n = bootstrap.chunk_count
        seen: set[int] = set()
        chunks: list[int] = []
        total = 0                       # entries as listed (repeats count: they cost work too)
        for run in runs:
            if (not isinstance(run, list) or len(run) != 2
                    or not all(type(x) is int for x in run)):
                raise LearnedListError(f"{what}: malformed entry {str(run)[:60]}")
            first, count = run
            if first < 0 or count < 1 or first + count > n:
                raise LearnedListError(f"{what}: chunks {first}..{first + count - 1} are not in "
                                       f"this bootstrap ({n} chunks)")
            total += count
            if total > MAX_CHUNKS:
                raise LearnedListError(f"{what}: more than {MAX_CHUNKS} chunks")
            for c in range(first, first + count):
                if c not in seen:
                    seen.add(c)
                    chunks.append(c)
        return cls(bootstrap_digest, tuple(chunks))


class ChunkRecorder:
    """The chunks behind FUSE reads, first access first. Called from the trio thread only.

    Recording ends (`done`) at the first of: `window` seconds after the first read, `stop()`,
    or `limit` chunks. The window keeps a long-running container's later reads (which have
    nothing to do with starting it) out of the list."""

    def __init__(self, bootstrap: Bootstrap, *, window: float = 60.0, limit: int = MAX_CHUNKS):
        self.bootstrap = bootstrap
        self.window = window
        self.limit = limit
        self._seen: set[int] = set()
        self.chunks: list[int] = []
        self.started: float | None = None      # monotonic time of the first read
        self.done = False
        self.on_first: Callable[[], None] | None = None   # called at the first read

    def record(self, ino: int, offset: int, size: int) -> None:
        if self.done or size <= 0:
            return
        now = time.monotonic()
        if self.started is None:
            self.started = now
            if self.on_first is not None:
                self.on_first()
        elif now - self.started > self.window:
            self.done = True
            return
        bs = self.bootstrap
        ids = bs.file_chunk_ids(ino)
        if not bs.variable:
            cs = bs.chunk_size
            k0, k1 = offset // cs, min((offset + size - 1) // cs, len(ids) - 1)
        elif offset >= bs.attr(ino).size:
            return
        else:       # v3: binary searches of the file's chunk offsets
            k0, k1 = bs.chunk_index(ino, offset), bs.chunk_index(ino, offset + size - 1)
        for k in range(k0, k1 + 1):
            c = ids[k]
            if c not in self._seen:
                if len(self.chunks) >= self.limit:
                    self.done = True
                    return
                self._seen.add(c)
                self.chunks.append(c)

    def stop(self) -> None:
        self.done = True

    def snapshot(self, bootstrap_digest: str) -> LearnedList:
        return LearnedList(bootstrap_digest, tuple(self.chunks))


# -- the copy in the cache directory -----------------------------------------------------------
def _hex(bootstrap_digest: str) -> str:
    return dg.parse(bootstrap_digest)[1]


def _open_dir(cache_dir: str, create: bool) -> int:
    """An fd of `cache_dir/prefetch` (created 0700 if asked), never through a symlink."""
    top = os.open(cache_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if create:
            try:
                os.mkdir(LOCAL_DIR, 0o700, dir_fd=top)
            except FileExistsError:
                pass
        return os.open(LOCAL_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                       dir_fd=top)
    finally:
        os.close(top)


def save_local(cache_dir: str, lst: LearnedList) -> str:
    """Writes the list atomically (temp file + rename in the same directory); returns its path."""
    name = f"{_hex(lst.bootstrap)}.json"
    tmp = f".{name}.{os.getpid()}.tmp"
    data = lst.to_bytes()
    d = _open_dir(cache_dir, create=True)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=d)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.rename(tmp, name, src_dir_fd=d, dst_dir_fd=d)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=d)
            except OSError:
                pass
            raise
    finally:
        os.close(d)
    return os.path.join(cache_dir, LOCAL_DIR, name)


def load_local(cache_dir: str, bootstrap_digest: str) -> bytes | None:
    """The stored list's bytes (at most MAX_LIST_BYTES + 1), None if there is none."""
    try:
        d = _open_dir(cache_dir, create=False)
    except FileNotFoundError:
        return None
    try:
        try:
            fd = os.open(f"{_hex(bootstrap_digest)}.json",
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=d)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            return f.read(MAX_LIST_BYTES + 1)
    finally:
        os.close(d)
