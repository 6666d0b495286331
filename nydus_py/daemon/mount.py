"""Mount lifecycle: check the mountpoint, open the image, mount, serve, unmount.

    prepare_mountpoint   refuse a missing/non-directory/live mountpoint; clear a stale FUSE
                         mount ("Transport endpoint is not connected") with fusermount3 -u -z
    open_filesystem      image → backend → chunk cache → FileReader → Vfs → Operations
    serve                pyfuse3.init (the kernel mount), trio main loop, pyfuse3.close

Signals: SIGINT/SIGTERM are blocked from just before the kernel mount until trio's signal
receiver is installed, so a signal can never kill the process between "mounted" and "able
to unmount". On either signal the FUSE loop is ended and the filesystem unmounted; an external
`umount`/`fusermount3 -u` ends the loop too. Any failure after the kernel mount still
unmounts (pyfuse3.close in a finally), so an error never leaves a mount behind.

Mount options (see fuse_options): always `ro`, `default_permissions` (the kernel checks
modes/owners for every non-root caller; root is unaffected), `nodev` (device nodes in an
image are shown with their type and rdev but cannot be opened: a container gets its own
/dev). `nosuid` unless `suid=True` was asked for (setuid binaries in an image run with
privileges only when the operator opts in; FUSE honours it only for root mounts).
Executables run (no `noexec`); `allow_other` is needed when processes of other users (a
chroot or container running as non-root) must see the tree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gc
import logging
import os
import signal
import stat
import tempfile
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable

from nydus_py import mountinfo
from nydus_py.daemon import startup_files
from nydus_py.config.schema import DaemonConfig
from nydus_py.daemon.watchdog import MOUNT_GRACE, StopWatchdog
from nydus_py.errors import ConfigError, NydusError
from nydus_py.metrics import Metrics

# pyfuse3 and trio (~0.2 s of imports) are imported by mount() while the image is being
# fetched (see _Opening), not at module import: the CLI imports this module first thing.
if TYPE_CHECKING:
    import pyfuse3

    from nydus_py.daemon.learned import LearnedPrefetch
    from nydus_py.fs.ops import NydusOperations
    from nydus_py.fs.vfs import Vfs
    from nydus_py.image_source import OpenedImage
    from nydus_py.io.prefetch import EarlyRanges
    from nydus_py.io.prefetch import Prefetcher
    from nydus_py.io.reader import FileReader      # imported when mounting (start-up cost)

log = logging.getLogger(__name__)

FSNAME = "nydus-py"
PUSH_TIMEOUT_AT_EXIT = 10.0     # seconds per registry request for a learned list at unmount
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
STOP_GRACE = MOUNT_GRACE  # seconds from a stop signal (or external unmount) to a forced exit


class MountError(NydusError):
    """The kernel mount could not be made (permissions, /dev/fuse, options)."""


@dataclass(frozen=True, kw_only=True)
class MountRequest:
    mountpoint: str
    image: str | None = None            # "oci:DIR[:TAG]" or a registry reference
    plain_http: bool = False            # registry images: http:// instead of https://
    skip_verify: bool = False           # registry images: no TLS certificate verification
    bootstrap: str | None = None        # bootstrap file (with blob_dir or config backend)
    blob_dir: str | None = None
    cache_dir: str | None = None        # overrides config device.cache.config.work_dir
    config: DaemonConfig = field(default_factory=DaemonConfig)
    allow_other: bool = False
    suid: bool = False
    max_tasks: int = 64                 # concurrent FUSE requests in flight
    io_threads: int = 16                # FileReader's trio.CapacityLimiter
    apisock: str | None = None          # serve the HTTP API on this unix socket
    daemon_id: str = ""                 # reported by /api/v1/daemon ("" = derived)
    prefetch_files: tuple[str, ...] = ()  # --prefetch-files: image paths to prefetch
    no_prefetch: bool = False           # ignore the bootstrap's prefetch list
    cache_max_size: int | None = None   # overrides device.cache.config.max_size
    readahead_kb: int = 1024            # kernel readahead of the mount (bdi read_ahead_kb)
    supervisor: str | None = None       # keep the FUSE fd in this supervisor (daemon/takeover.py)
    upgrade: bool = False               # take the session over from the supervisor, no mount


def fuse_options(req: MountRequest) -> set[str]:
    opts = {f"fsname={FSNAME}", f"subtype={FSNAME}", "ro", "default_permissions", "nodev",
            "suid" if req.suid else "nosuid"}
    if req.allow_other:
        opts.add("allow_other")
    return opts


def mount_fstype(path: str) -> str | None:
    """The filesystem type mounted at `path` (the top of a stack), or None (nydus_py/mountinfo.py:
    never stats the path, which a dead FUSE mount may answer from the attribute cache)."""
    e = mountinfo.find(path)
    return e.fstype if e is not None else None


def is_stale(path: str) -> bool:
    """A FUSE mount whose daemon is gone: statfs fails with ENOTCONN. statfs, because the kernel
    always asks the daemon for it, while attributes, directory listings (no_opendir) and file
    pages of a mount may be answered from the kernel's caches after the daemon died."""
    try:
        os.statvfs(path)
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def prepare_mountpoint(path: str) -> str:
    """The absolute mountpoint, ready to mount on; a stale FUSE mount there is cleared."""
    path = os.path.realpath(path)
    fstype = mount_fstype(path)
    if fstype is not None:
        if not (fstype.startswith("fuse") and is_stale(path)):
            raise ConfigError(f"{path}: something is already mounted there ({fstype})")
        log.warning("%s: stale FUSE mount (Transport endpoint is not connected); "
                    "clearing it with fusermount3 -u -z", path)
        mountinfo.lazy_unmount(path)
        if mount_fstype(path) is not None:
            raise MountError(f"{path}: stale FUSE mount could not be cleared")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: mountpoint does not exist") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot use as mountpoint ({e.strerror})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path}: mountpoint is not a directory")
    return path


@dataclass
class Filesystem:
    vfs: Vfs
    ops: NydusOperations
    metrics: Metrics
    description: str
    reader: FileReader | None = None
    cache_dir: str = ""
    backend_type: str = ""
    learned: LearnedPrefetch | None = None   # None when learned_prefetch is all off
    early: EarlyRanges | None = None         # the learned list's ranges fetched before ready


class _Opening:
    """The image opened in a thread of its own, started first thing in mount(): its network
    round trips (registry manifest and bootstrap, then the blob-size requests and the learned
    list's referrer lookup) overlap the imports of pyfuse3 and trio (~0.2 s of CPU, mostly
    waiting on nothing) instead of following them. `result()` hands the image over (or raises
    what opening it raised); `discard()` closes it if nobody took it."""

    def __init__(self, req: MountRequest):
        self.req = req
        self.metrics = Metrics()
        self._result: tuple[OpenedImage, LearnedPrefetch | None] | None = None
        self._error: BaseException | None = None
        self._taken = False
        self._ready = threading.Event()
        # set by open_filesystem once the chunk cache accepted the cache dir: the learned list
        # is looked up there (and the image held in it) only then
        self.cache_ok = threading.Event()
        self._discarded = False
        self.reader: FileReader | None = None      # set with cache_ok
        self.early: EarlyRanges | None = None
        # What the thread needs before its first request is imported here, first: two threads
        # importing at once share the GIL, and the network would start half as early.
        from nydus_py import image_source  # noqa: F401
        if req.image and not req.image.startswith(image_source.OCI_PREFIX):
            from nydus_py.oci import registry  # noqa: F401
        self._thread = threading.Thread(target=self._run, name="open-image", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from nydus_py import image_source
        lookups: list = []

        def on_manifest(origin) -> None:    # the learned list's lookup, beside the bootstrap's
            lp = self.req.config.learned_prefetch
            if lp.enable:
                from nydus_py.daemon.learned import RemoteLookup
                lookups.append(RemoteLookup(origin, _given_cache(self.req) or None))
        try:
            opened = _open_image(self.req, self.metrics, on_manifest, warm=_remote_backend(self.req))
            cfg = self.req.config
            if cfg.learned_prefetch.enable and not cfg.fs_prefetch.bandwidth_rate:
                from nydus_py.io.prefetch import EarlyRanges
                self.early = EarlyRanges(opened.backend)
                opened.backend = self.early
            if _remote_backend(self.req) and not opened.warmed:
                image_source.warm_backend(opened.backend, [b.id for b in opened.bootstrap.blobs])
            learned = _start_learned(self.req, opened, lookups[0] if lookups else None)
            # the chunk tables' digests (the cache keys: cache/entry.py) while the main thread
            # may still be importing; sha256 runs without the GIL
            from nydus_py.cache.entry import table_digest
            for i in range(len(opened.bootstrap.blobs)):
                table_digest(opened.bootstrap, i)
            self._result = (opened, learned)
        except BaseException as e:  # noqa: BLE001  (re-raised in the mounting thread)
            self._error = e
            return
        finally:
            self._ready.set()
        if self.early is not None and learned is not None:
            self.cache_ok.wait()
            if not self._discarded:
                self._fetch_early(opened, learned)

    def _fetch_early(self, opened: OpenedImage, learned: LearnedPrefetch) -> None:
        """The learned list's ranges, from now on (io/prefetch.py EarlyRanges): the mount
        set-up and the imports still under way take no bandwidth."""
        from nydus_py.io.prefetch import early_ranges
        from nydus_py.io.reader import DEFAULT_MAX_GAP
        assert self.early is not None
        try:
            ids = learned.found_ids()
            if ids and self.reader is not None:     # what the cache has is not fetched again
                ids = [c.id for c in self.reader.uncached(_chunks(opened.bootstrap, ids))]
            if ids:
                pf = self.req.config.fs_prefetch
                n = self.early.start(early_ranges(opened.bootstrap, ids, max_gap=DEFAULT_MAX_GAP,
                                                  limit=max(pf.merging_size, 4096)),
                                     pf.threads_count)
                log.debug("learned prefetch: %d ranges started early", n)
        except Exception as e:  # noqa: BLE001  (costs the head start, never the mount)
            log.warning("learned prefetch of %s: early start failed: %s", opened.description, e)
        finally:
            self.early.decided.set()

    def result(self) -> tuple[OpenedImage, LearnedPrefetch | None]:
        self._ready.wait()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        self._taken = True
        return self._result

    def discard(self) -> None:
        self._discarded = True
        self.cache_ok.set()
        self._ready.wait()
        if self._result is not None and not self._taken:
            from nydus_py.storage.backend import close_backend
            close_backend(self._result[0].backend)


def _chunks(bs, ids):
    """The chunk records of `ids` (from a checked list), skipping any that fail their check."""
    out = []
    for i in ids:
        try:
            out.append(bs.chunk(i))
        except NydusError:
            continue
    return out


def _remote_backend(req: MountRequest) -> bool:
    """Whether the image's blobs are behind a network round trip (registry, S3): only then
    is asking their sizes at mount worth it; a local blob stays unopened until it is read."""
    from nydus_py.image_source import OCI_PREFIX
    cfg = req.config
    if cfg.backend is not None:
        return cfg.backend.type != "localfs"
    if not req.image:
        return False
    return not req.image.startswith(OCI_PREFIX)


def _given_cache(req: MountRequest) -> str:
    cfg = req.config
    return req.cache_dir or (cfg.cache.work_dir if cfg.cache.type == "blobcache" else "")


def _open_image(req: MountRequest, metrics: Metrics, on_manifest=None, *,
                warm: bool = False) -> OpenedImage:
    from nydus_py import image_source

    cfg = req.config
    subject = _bootstrap_subject(req)
    if req.image:
        # a backend in the config (mirrors, proxy, S3 …) overrides where the blobs are read from
        return image_source.open_image(req.image, metrics=metrics, plain_http=req.plain_http,
                                       skip_verify=req.skip_verify, backend=cfg.backend,
                                       cache_dir=_given_cache(req) or None,
                                       on_manifest=on_manifest, warm=warm)
    if req.bootstrap and req.blob_dir:
        return image_source.open_local(req.bootstrap, req.blob_dir, metrics=metrics)
    if req.bootstrap and cfg.backend is not None:
        if subject is not None and on_manifest is not None:     # looked up beside the load
            on_manifest(image_source.ImageOrigin(bootstrap_path=req.bootstrap, **subject))
        opened = image_source.open_bootstrap(req.bootstrap, cfg.backend, metrics=metrics)
        if subject is not None:
            opened.origin = dataclasses.replace(opened.origin, **subject)
        return opened
    if req.bootstrap:
        raise ConfigError("--bootstrap needs --blob-dir or a backend in --config")
    raise ConfigError("name an image: --image oci:DIR[:TAG] or --bootstrap FILE --blob-dir DIR")


def _bootstrap_subject(req: MountRequest) -> dict | None:
    """ImageOrigin fields naming the image manifest of a bootstrap mounted with a registry
    backend (`learned_prefetch.image_manifest`, set by nydus-snapshotter): its learned lists are
    that manifest's referrers in the backend's repository. Known by digest only: a push reads
    the manifest's size and media type from the registry (LearnedPrefetch._push). Given to any
    other mount, it is said to be ignored (one line)."""
    digest = req.config.learned_prefetch.image_manifest
    backend = req.config.backend
    if not digest or not (req.image or req.bootstrap) or \
            (req.bootstrap and not req.image and not req.blob_dir and backend is None):
        return None         # no image named, or no backend: _open_image refuses the mount
    if req.image:
        why = "this mount names its image (--image)"
    elif req.blob_dir:
        why = "this mount reads a blob directory"
    elif backend is None or backend.registry is None:
        why = f"the backend is {backend.type if backend is not None else 'not set'}"
    else:
        from nydus_py.oci import mediatypes as mt
        from nydus_py.oci.layout import Descriptor
        from nydus_py.storage.registry import make_client_config
        return {"manifest": Descriptor(mt.OCI_MANIFEST, digest, 0),
                "registry": make_client_config(backend.registry), "repository": backend.registry.repo}
    log.warning("learned_prefetch.image_manifest %s ignored: it names the image of a --bootstrap "
                "mounted from a registry backend, and %s", digest, why)
    return None


def _start_learned(req: MountRequest, opened: OpenedImage, remote=None) -> LearnedPrefetch | None:
    """The mount's learned prefetch (None when all of it is off), its lookup started."""
    lp = req.config.learned_prefetch
    if not (lp.enable or lp.record or lp.push):
        return None
    from nydus_py.daemon.learned import LearnedPrefetch
    # a learned prefetch list is kept only in a lasting cache
    learned = LearnedPrefetch(opened.origin, opened.bootstrap, cache_dir=_given_cache(req) or None,
                              image=opened.description, enable=lp.enable, record=lp.record,
                              push=lp.push, window=float(lp.window_secs))
    learned.use_remote(remote)  # the lookup itself starts once the cache dir is accepted
    return learned


def open_filesystem(req: MountRequest, stack: contextlib.ExitStack,
                    opening: _Opening | None = None) -> Filesystem:
    """Everything up to (not including) the kernel mount; cleanups go on `stack`. `opening`:
    the image, already being opened (mount()); else it is opened here."""
    from nydus_py.fs.ops import NydusOperations
    from nydus_py.fs.vfs import Vfs
    from nydus_py.storage.backend import close_backend

    if opening is None:
        opening = _Opening(req)
        stack.callback(opening.discard)
    opened, learned = opening.result()
    metrics = opening.metrics
    stack.callback(close_backend, opened.backend)

    cfg = req.config
    work_dir = _given_cache(req)
    if not work_dir:  # (a given one is created, 0700, and checked by ChunkCache: cache/safedir.py)
        work_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="nydus-py-cache-"))
    reader = _make_reader(opened, work_dir, req, metrics, stack)
    _check_missing_blobs(opened, reader)
    vfs = Vfs(opened.bootstrap, reader, metrics=metrics, xattrs=cfg.enable_xattr,
              record_access=cfg.access_pattern or cfg.iostats_files, image=opened.description)
    backend_type = cfg.backend.type if cfg.backend is not None else "localfs"
    if learned is not None:
        vfs.learn = learned.recorder
        learned.start_find()        # overlaps the kernel mount and the loop's start-up
    opening.reader = reader
    opening.cache_ok.set()
    return Filesystem(vfs, NydusOperations(vfs), metrics, opened.description, reader=reader,
                      cache_dir=work_dir, backend_type=backend_type, learned=learned,
                      early=opening.early)


def _check_missing_blobs(opened, reader) -> None:
    """A data blob the backend lacks is fine when the cache holds every chunk of it that a file
    uses (a warm cache while the blobs are gone or unreachable); otherwise the mount is refused
    with the image source's one line. Only paid when a blob is missing."""
    if not opened.missing_blobs:
        return
    from nydus_py.cache.entry import table_digest
    from nydus_py.errors import BlobNotFoundError
    from nydus_py.format.bootstrap import ROOT_INO

    bs = opened.bootstrap
    index = {b.id: i for i, b in enumerate(bs.blobs)}
    wanted: dict[int, set[int]] = {index[bid]: set() for bid, _ in opened.missing_blobs}
    used: set[int] = set()
    for ino in range(ROOT_INO, bs.inode_count + ROOT_INO):
        used.update(bs.file_chunk_ids(ino))
    for cid in used:
        c = bs.chunk(cid)
        if c.blob in wanted:
            wanted[c.blob].add(c.index)
    for bid, message in opened.missing_blobs:
        i = index[bid]
        # the handle the reader already opened (open_blob is idempotent)
        h = reader.cache.open_blob(bs.blobs[i], table=table_digest(bs, i))
        absent = reader.cache.missing(h, sorted(wanted[i]))
        if absent:
            raise BlobNotFoundError(f"{message}, and the cache lacks {len(absent)} of its "
                                    f"{len(wanted[i])} chunks that files use")
        log.warning("%s; every chunk of it that files use is cached: mounting from the cache",
                    message)


def _make_reader(opened, work_dir: str, req: MountRequest, metrics: Metrics,
                 stack: contextlib.ExitStack):
    import trio

    from nydus_py.cache.chunk_cache import ChunkCache
    from nydus_py.io.reader import FileReader

    max_size = req.cache_max_size if req.cache_max_size is not None else req.config.cache.max_size
    cache = ChunkCache(work_dir, max_size=max_size or None, metrics=metrics,
                       validate=req.config.digest_validate)
    close = getattr(cache, "close", None)
    if close is not None:
        stack.callback(close)
    reader = FileReader(opened.bootstrap, opened.backend, cache,
                        limiter=trio.CapacityLimiter(req.io_threads),
                        amplify_io=req.config.amplify_io, metrics=metrics,
                        predict=req.config.exec_prefetch)
    reader.open_blobs()     # cache files now, so a bad cache dir fails before the mount
    return reader


def serve(ops: pyfuse3.Operations, mountpoint: str, options: set[str], *,
          on_ready: Callable[[], None] | None = None, max_tasks: int = 64,
          services: Callable | None = None, handoff=None) -> None:
    """Mount, run the FUSE loop until a stop signal or an external unmount, unmount.
    With a `handoff` (takeover.Handoff) the session comes from / is kept by a supervisor, and
    is not unmounted when it was handed to a successor."""
    import pyfuse3
    import trio

    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        try:
            if handoff is not None:
                handoff.start(ops)
            else:
                pyfuse3.init(ops, mountpoint, options)
        except RuntimeError as e:
            raise MountError(f"{mountpoint}: FUSE mount failed ({e}); "
                             "is /dev/fuse available and are you allowed to mount?") from None

        def detach() -> list[str]:
            # a session handed to a successor is never detached: it is the new daemon's now
            return [] if handoff is not None and handoff.handed_over else [mountpoint]

        def before_exit() -> None:
            if handoff is not None and handoff.handed_over:
                log.error("shutdown after a handover did not finish within %.0f s (threads stuck "
                          "in the backend?): %s stays with the new daemon", STOP_GRACE, mountpoint)
                handoff.release()

        watchdog = StopWatchdog(detach, STOP_GRACE, before_exit=before_exit)

        def stopping() -> None:
            if handoff is not None:     # handed over: the successor may start right now
                handoff.release()
            watchdog.arm()

        try:
            trio.run(_main, old_mask, on_ready, max_tasks, services, stopping)
        finally:
            # A second Ctrl-C/SIGTERM must not interrupt the unmount: we are stopping anyway.
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            watchdog.arm()          # an error path too: the unmount itself may hang
            if handoff is not None:
                pyfuse3.close(unmount=False)
                handoff.finish()
            else:
                pyfuse3.close(unmount=True)
                log.info("unmounted %s", mountpoint)
            watchdog.cancel()
    finally:
        # Unblock with the signals ignored, so stop signals that arrived meanwhile are dropped.
        handlers = {s: signal.signal(s, signal.SIG_IGN) for s in STOP_SIGNALS}
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        for s, h in handlers.items():
            signal.signal(s, h)


async def _main(old_mask, on_ready, max_tasks: int, services=None, stopping=None) -> None:
    import pyfuse3
    import trio

    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        # Pending stop signals are delivered now, to trio's handler.
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, signals, stopping)
            if services is not None:        # API socket bound before we report "ready"
                await nursery.start(services)
            if on_ready is not None:
                on_ready()
            await pyfuse3.main(min_tasks=1, max_tasks=max_tasks)
            if stopping is not None:        # an external unmount: the same bound applies
                stopping()
            nursery.cancel_scope.cancel()


async def _stop_on_signal(signals, stopping=None) -> None:
    import pyfuse3

    async for signum in signals:
        log.info("received %s, unmounting", signal.Signals(signum).name)
        if stopping is not None:
            stopping()
        pyfuse3.terminate()
        return


def mount(req: MountRequest, *, on_ready: Callable[[], None] | None = None) -> None:
    """The whole lifecycle; returns after a clean unmount, raises NydusError on bad input."""
    with contextlib.ExitStack() as stack:
        # A takeover serves the live mount that is already there, and must not look at it:
        # a request to it would wait for the daemon that we are about to become.
        mountpoint = (_path_of_live_mount(req.mountpoint) if req.upgrade
                      else prepare_mountpoint(req.mountpoint))
        opening = _Opening(req)             # the network, while we import what the mount needs
        stack.callback(opening.discard)
        # No collections while the modules load (they only add objects that live as long as
        # we do): ~5 ms of start-up; at ready they are frozen out of the collector's sight.
        gc.disable()
        stack.callback(gc.enable)
        import pyfuse3  # noqa: F401
        import trio  # noqa: F401

        from nydus_py.fs import ops  # noqa: F401
        from nydus_py.io import reader  # noqa: F401
        fs = open_filesystem(req, stack, opening)
        handoff = None
        if req.supervisor:
            from nydus_py.daemon.takeover import Handoff
            handoff = Handoff(supervisor=req.supervisor, upgrade=req.upgrade,
                              daemon_id=req.daemon_id or mountpoint, mountpoint=mountpoint,
                              options=fuse_options(req))
        log.info("mounting %s at %s (%d inodes)", fs.description, mountpoint,
                 fs.vfs.bootstrap.inode_count)

        def ready() -> None:
            gc.freeze()
            gc.enable()
            log.info("mounted %s at %s", fs.description, mountpoint)
            if handoff is not None:
                handoff.ready()
            if on_ready is not None:
                on_ready()
            # what the next cold start reads ahead (startup_files.py); off the loop, and a
            # no-op once the list names every file this start loaded
            startup_files.record_later()
        serve(fs.ops, mountpoint, fuse_options(req), on_ready=ready, max_tasks=req.max_tasks,
              services=_services(req, fs, mountpoint, handoff), handoff=handoff)
        startup_files.record()          # and the modules the image's first run needed
        if fs.learned is not None and fs.learned.recorder is not None:
            # a run shorter than the recording window: keep (and push) what it read
            fs.learned.finish(timeout=PUSH_TIMEOUT_AT_EXIT)


def _path_of_live_mount(path: str) -> str:
    """The absolute path of a mountpoint without a stat of the mount itself."""
    path = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def set_readahead(mountpoint: str, kb: int) -> None:
    """Raise the mount's readahead window (the kernel's default is 128 KiB, so sequential reads
    arrive as 128 KiB requests). With 1 MiB the kernel sends 1 MiB reads (libfuse negotiates
    max_pages 256): warm sequential reads went from 320 to 785 MB/s here. The device is taken
    from mountinfo (its major:minor names the bdi)."""
    if kb <= 0:
        return
    try:
        e = mountinfo.find(mountpoint)
        if e is not None:
            with open(f"/sys/class/bdi/{e.device}/read_ahead_kb", "w") as f:
                f.write(str(kb))
    except OSError as e:  # not fatal: reads work, in smaller requests
        log.warning("cannot set readahead of %s to %d KiB: %s", mountpoint, kb, e)


def make_prefetcher(req: MountRequest, fs: Filesystem) -> Prefetcher | None:
    """The background prefetcher, or None when there is nothing to prefetch (module
    docstring of io/prefetch.py; enabled by fs_prefetch.enable, --prefetch-files, a
    prefetch list in the bootstrap unless --no-prefetch, or learned_prefetch.enable)."""
    import trio

    from nydus_py.io.prefetch import Prefetcher

    pf = req.config.fs_prefetch
    bs = fs.vfs.bootstrap
    learned: Callable[[], Awaitable[list[int]]] | None = None
    if fs.learned is not None and fs.learned.enable:
        found, early = fs.learned.find_async, fs.early

        async def learned_ids() -> list[int]:
            ids = await found()
            if early is not None:       # the early ranges are claimed before we ask for any
                # (abandoned by a stop: only waits for the lookup, as find_async)
                await trio.to_thread.run_sync(early.decided.wait, abandon_on_cancel=True)
            return ids
        learned = learned_ids
    if fs.reader is None or not (pf.enable or req.prefetch_files or (bs.prefetch and not req.no_prefetch)
                                 or learned):
        return None
    return Prefetcher(fs.reader, bs, threads_count=pf.threads_count, merging_size=pf.merging_size,
                      bandwidth_rate=pf.bandwidth_rate, prefetch_all=pf.prefetch_all and pf.enable,
                      paths=req.prefetch_files, metrics=fs.metrics, image=fs.description,
                      learned=learned, bootstrap_list=not req.no_prefetch)


def _services(req: MountRequest, fs: Filesystem, mountpoint: str, handoff=None):
    """The trio tasks that run beside the FUSE loop: API server, then prefetch."""
    import pyfuse3
    import trio

    prefetcher = make_prefetcher(req, fs)

    async def run(task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            if req.apisock:
                from nydus_py.daemon.api import DaemonApi, serve_unix
                api = DaemonApi(daemon_id=req.daemon_id or f"nydusd-{os.getpid()}",
                                mountpoint=mountpoint, fs=fs, stop=pyfuse3.terminate,
                                prefetcher=prefetcher, learned=fs.learned,
                                access_pattern=req.config.access_pattern,
                                iostats_files=req.config.iostats_files,
                                backend_config=req.config.backend, handoff=handoff)
                await nursery.start(serve_unix, req.apisock, api.handle)
                log.info("API listening on %s", req.apisock)
            if handoff is not None:
                await nursery.start(handoff.run)
            if req.readahead_kb > 0:    # before pyfuse3.main can read the INIT request
                nursery.start_soon(tune_readahead_after_init, fs.ops, mountpoint, req.readahead_kb)
            task_status.started()
            if prefetcher is not None:
                async def prefetch() -> None:
                    await prefetcher.run()
                    if fs.early is not None:        # what nobody asked for is not kept
                        fs.early.clear()
                nursery.start_soon(prefetch)
            if fs.learned is not None and fs.learned.recorder is not None:
                nursery.start_soon(fs.learned.run_window)
    return run


async def tune_readahead_after_init(ops, mountpoint: str, kb: int) -> None:
    """Sets the readahead window once the kernel has applied the INIT reply (INIT caps the bdi's
    window at its max_readahead, so an earlier write would be undone).

    `ops.init` runs inside libfuse's do_init, before the reply is written; the reply's write(2)
    makes the kernel apply it before returning, and a task woken from `init` runs only after
    pyfuse3's worker waits again, i.e. after that write. Nothing here touches the mount: a
    stat() of the mountpoint (how this used to wait for INIT) holds the mount while its GETATTR
    is in flight, and an unmount right after the mount appeared then failed with EBUSY."""
    import trio

    inited = trio.Event()
    orig_init = ops.init

    def init() -> None:
        orig_init()
        inited.set()
    ops.init = init
    await inited.wait()
    await trio.to_thread.run_sync(set_readahead, mountpoint, kb)
