"""Learned prefetch for one mount: find the list an earlier run left next to the image, record
this run's, and keep it (cache dir) and, when asked, publish it (referrer artifact).

    find()      at mount, in a worker thread: the cache dir's list for this bootstrap, else the
                newest referrer of the image manifest in its registry or OCI layout. A list
                that fails any check (io/learned.py) is ignored with ONE warning line; so is a
                registry that cannot be asked. Never fatal.
    finish()    when recording ends (window over, `PUT /api/v1/prefetch/push`, or unmount):
                save the list in the cache dir; with push, also push it as a referrer of the
                image manifest (registry: referrers API or `sha256-<hex>` tag schema; OCI
                layout: its index.json). An empty list, or one equal to the list found at
                mount, is not pushed again.

The list is keyed by the bootstrap's digest (the bootstrap layer's digest for registry and
layout images, the file's sha256 for `--bootstrap FILE`), so it can only ever be applied to the
bootstrap whose chunk ids it names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time

import trio

from nydus_py.cache import images
from nydus_py.errors import NydusError
from nydus_py.format.bootstrap import Bootstrap
from nydus_py.io import learned as ll
from nydus_py.oci import mediatypes as mt

log = logging.getLogger(__name__)

PUSH_TIMEOUT = 10.0             # seconds per registry request when pushing at unmount


def remote_find(o) -> tuple[bytes, str] | None:
    """Blocking. (list bytes, where) of the newest referrer list of the image `o` (an
    ImageOrigin) in its registry or OCI layout, unchecked; None if it has none."""
    from nydus_py.oci import referrers
    if o.manifest is None:
        return None
    args = (o.manifest.digest, mt.NYDUS_PY_PREFETCH_ARTIFACT, mt.NYDUS_PY_PREFETCH_LIST,
            ll.MAX_LIST_BYTES)
    if o.layout:
        return referrers.layout_find(o.layout, *args)
    if o.registry is not None:
        from nydus_py.oci.registry import RegistryClient
        with RegistryClient(config=o.registry) as c:
            return referrers.registry_find(c, o.repository, *args)
    return None


class RemoteLookup:
    """remote_find in a thread of its own, started as soon as the image manifest is known
    (image_source's on_manifest), so that its round trips (referrers, tag index, artifact
    manifest, list blob) overlap the bootstrap's download and the mount set-up. Not started
    when the cache dir already holds this bootstrap's list (no registry traffic then).
    `result()` waits for it and returns or raises what remote_find did; the bytes are checked
    by LearnedPrefetch.find like any other list."""

    def __init__(self, origin, cache_dir: str | None):
        self._box: list = []
        self._thread: threading.Thread | None = None
        if cache_dir and self._kept(cache_dir, origin.bootstrap_digest):
            return

        def run() -> None:
            try:
                self._box.append((True, remote_find(origin)))
            except BaseException as e:  # noqa: BLE001  (handed to result())
                self._box.append((False, e))
        self._thread = threading.Thread(target=run, name="learned-referrer", daemon=True)
        self._thread.start()

    @staticmethod
    def _kept(cache_dir: str, digest: str) -> bool:
        try:            # read-only; find() holds the image before it reads the list for use
            return ll.load_local(cache_dir, digest) is not None
        except (OSError, NydusError):   # find() reports a bad cache dir
            return False

    def result(self) -> tuple[bytes, str] | None:
        if self._thread is None:
            return None
        self._thread.join()
        ok, value = self._box[0]
        if not ok:
            raise value
        return value


class LearnedPrefetch:
    def __init__(self, origin, bootstrap: Bootstrap, *, cache_dir: str | None, image: str,
                 enable: bool = True, record: bool = True, push: bool = False,
                 window: float = 60.0):
        self.origin = origin
        self.bootstrap = bootstrap
        self.cache_dir = cache_dir          # None: a private temporary cache, nothing to keep
        self.image = image
        self.enable = enable
        self.push = push
        self.recorder = ll.ChunkRecorder(bootstrap, window=window) if (record or push) else None
        self.found: dict | None = None      # {"source", "digest", "chunks"} of the list used
        self.ignored = ""                   # why a list that was found is not used
        self.result: dict | None = None     # what finish() did
        self._digest = origin.bootstrap_digest
        self._found_digest = ""
        self._lock = threading.Lock()
        self._early: tuple[threading.Thread, list] | None = None
        self._remote: RemoteLookup | None = None

    # -- identity ---------------------------------------------------------------------------
    def bootstrap_digest(self) -> str:
        if not self._digest and self.origin.bootstrap_path:
            h = hashlib.sha256()
            with open(self.origin.bootstrap_path, "rb") as f:
                while buf := f.read(1 << 20):
                    h.update(buf)
            self._digest = "sha256:" + h.hexdigest()
        return self._digest

    # -- find -------------------------------------------------------------------------------
    def find(self) -> list[int]:
        """Blocking. The chunk ids to prefetch first ([] when there is no usable list)."""
        if not self.enable:
            return []
        try:
            digest = self.bootstrap_digest()
        except OSError as e:
            log.warning("learned prefetch of %s: cannot hash the bootstrap (%s)", self.image, e)
            return []
        for source, fetch in (("cache", self._from_cache), ("remote", self._from_remote)):
            try:
                got = fetch(digest)
            except (NydusError, OSError) as e:
                log.warning("learned prefetch list of %s: %s lookup failed, ignored: %s",
                            self.image, source, e)
                continue
            if got is None:
                continue
            data, where = got
            try:
                lst = ll.LearnedList.from_bytes(data, bootstrap_digest=digest,
                                                bootstrap=self.bootstrap, what=where)
            except ll.LearnedListError as e:
                self.ignored = str(e)
                log.warning("learned prefetch list ignored: %s", e)
                continue
            self._found_digest = lst.digest
            self.found = {"source": where, "digest": lst.digest, "chunks": len(lst.chunks)}
            log.info("learned prefetch list of %s from %s: %d chunks", self.image, where,
                     len(lst.chunks))
            return list(lst.chunks)
        return []

    def _from_cache(self, digest: str) -> tuple[bytes, str] | None:
        if not self.cache_dir:
            return None
        images.hold(self.cache_dir, digest)     # a `cache gc` leaves this image's list alone
        data = ll.load_local(self.cache_dir, digest)
        return None if data is None else (data, f"{self.cache_dir}/{ll.LOCAL_DIR}")

    def _from_remote(self, digest: str) -> tuple[bytes, str] | None:
        if self._remote is not None:        # started while the bootstrap was being fetched
            return self._remote.result()
        return remote_find(self.origin)

    def use_remote(self, lookup: RemoteLookup | None) -> None:
        """The referrer lookup already started for this image (RemoteLookup), if any."""
        self._remote = lookup



    def start_find(self) -> None:
        """Starts the lookup now, in a thread of its own, so that its registry round trips
        (referrers, tag index, manifest, blob: ~5 RTT) overlap the rest of the mount set-up
        instead of following it; `find_async` then only collects the answer."""
        if not self.enable or self._early is not None:
            return
        box: list = []

        def run() -> None:
            try:
                box.append(self.find())
            except Exception:           # a bug here must cost the optimisation, not the mount
                log.exception("learned prefetch list of %s: lookup failed", self.image)
                box.append([])
        t = threading.Thread(target=run, name="learned-prefetch-lookup", daemon=True)
        self._early = (t, box)
        t.start()

    def found_ids(self) -> list[int]:
        """Blocking: the ids start_find's lookup found ([] when none)."""
        if self._early is None:
            self.start_find()
        assert self._early is not None
        t, box = self._early
        t.join()
        return box[0] if box else []

    async def find_async(self) -> list[int]:
        """The ids start_find's lookup found. A stop abandons the wait: the lookup (registry
        round trips, up to their timeouts) only reads, so it is left to die with the process
        instead of holding its exit until the stop watchdog's forced exit (daemon/watchdog.py),
        which would also skip keeping this run's list."""
        if self._early is None:
            self.start_find()
        assert self._early is not None
        t, box = self._early
        await trio.to_thread.run_sync(t.join, abandon_on_cancel=True)
        return box[0] if box else []

    # -- record and keep --------------------------------------------------------------------
    async def run_window(self) -> None:
        """Ends the recording `window` seconds after the first read and keeps the list."""
        rec = self.recorder
        if rec is None:
            return
        if rec.started is None:
            first = trio.Event()
            rec.on_first = first.set        # reads run on this trio loop
            await first.wait()
        assert rec.started is not None
        await trio.sleep(max(0.0, rec.window - (time.monotonic() - rec.started)))
        rec.stop()
        await trio.to_thread.run_sync(self.finish)

    def finish(self, *, push: bool | None = None, timeout: float | None = None) -> dict:
        """Blocking. Stops recording, saves the list in the cache dir and pushes it if asked
        (`push` None: as configured). Idempotent: a second call reports the first's result,
        unless it asks for a push the first did not do."""
        push = self.push if push is None else push
        with self._lock:
            if self.result is not None and (self.result.get("pushed") or not push):
                return self.result
            rec = self.recorder
            if rec is None:
                return {"chunks": 0, "saved": "", "pushed": "", "note": "recording is off"}
            rec.stop()
            res: dict = {"chunks": len(rec.chunks), "saved": "", "pushed": "", "digest": ""}
            if not rec.chunks:
                res["note"] = "nothing was read"
                self.result = res
                return res
            try:
                lst = rec.snapshot(self.bootstrap_digest())
            except OSError as e:
                res["note"] = f"cannot hash the bootstrap: {e}"
                self.result = res
                return res
            res["digest"] = lst.digest
            if self.cache_dir:
                try:
                    images.hold(self.cache_dir, lst.bootstrap)
                    res["saved"] = ll.save_local(self.cache_dir, lst)
                except OSError as e:
                    log.warning("learned prefetch list of %s not saved in %s: %s", self.image,
                                self.cache_dir, e)
            if push:
                res["pushed"] = self._push(lst, timeout)
            self.result = res
            log.info("learned prefetch list of %s: %d chunks%s%s", self.image, len(lst.chunks),
                     f", saved {res['saved']}" if res["saved"] else "",
                     f", pushed {res['pushed']}" if res["pushed"] else "")
            return res

    def _push(self, lst: ll.LearnedList, timeout: float | None) -> str:
        from nydus_py.oci import referrers
        o = self.origin
        if o.manifest is None or not (o.layout or o.registry is not None):
            log.warning("learned prefetch list of %s not pushed: the image is not from a "
                        "registry or an OCI layout", self.image)
            return ""
        if lst.digest == self._found_digest:
            return "unchanged"              # the list this mount used is already there

        def artifact(subject) -> referrers.Artifact:
            return referrers.Artifact(
                subject=subject, artifact_type=mt.NYDUS_PY_PREFETCH_ARTIFACT, blob=lst.to_bytes(),
                blob_media_type=mt.NYDUS_PY_PREFETCH_LIST,
                annotations={referrers.ANNO_CREATED: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                             "io.nydus-py.bootstrap": lst.bootstrap,
                             "io.nydus-py.prefetch.chunks": str(len(lst.chunks))})
        try:
            if o.layout:
                return f"oci:{o.layout}@" + referrers.layout_push(o.layout, artifact(o.manifest))
            from nydus_py.oci.layout import Descriptor
            from nydus_py.oci.registry import RegistryClient
            config = o.registry
            if timeout is not None:
                config = dataclasses.replace(config, timeout=timeout, retry_limit=1)
            with RegistryClient(config=config) as c:
                subject = o.manifest
                if not subject.size:        # known by digest only: the subject descriptor needs
                    data, media_type, _ = c.get_manifest(o.repository, subject.digest)  # (verified)
                    subject = Descriptor(media_type, subject.digest, len(data))
                return f"{config.host}/{o.repository}@" + referrers.registry_push(c, o.repository, artifact(subject))
        except (NydusError, OSError) as e:
            log.warning("learned prefetch list of %s not pushed: %s", self.image, e)
            return ""

    def status(self) -> dict:
        rec = self.recorder
        return {"enable": self.enable, "push": self.push, "found": self.found,
                "ignored": self.ignored,
                "recording": None if rec is None else {"chunks": len(rec.chunks), "done": rec.done},
                "result": self.result}
