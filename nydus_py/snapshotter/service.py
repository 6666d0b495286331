"""gRPC adapter: containerd.services.snapshots.v1.Snapshots → core.Snapshotter.

Only translation lives here: protobuf in, Python out, and our exceptions to the gRPC status
codes containerd's errdefs maps back (NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION,
INVALID_ARGUMENT, UNAVAILABLE for transient backend trouble, UNKNOWN otherwise).
"""

from __future__ import annotations

import logging
import re
from concurrent import futures
from typing import Iterator

import grpc
from google.protobuf import empty_pb2

from nydus_py.errors import BackendError, ConfigError, InputError, NydusError
from nydus_py.snapshotter import overlay
from nydus_py.snapshotter.core import Snapshotter
from nydus_py.snapshotter.proto import mount_pb2, snapshots_pb2, snapshots_pb2_grpc
from nydus_py.snapshotter.store import (KIND_NAMES, Snapshot, SnapshotExists, SnapshotNotFound,
                                        SnapshotPrecondition)

log = logging.getLogger("nydus_py.snapshotter.service")
LIST_BATCH = 100


def _code(e: Exception) -> grpc.StatusCode:
    if isinstance(e, SnapshotNotFound):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(e, SnapshotExists):
        return grpc.StatusCode.ALREADY_EXISTS
    if isinstance(e, SnapshotPrecondition):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(e, (ConfigError, InputError)):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(e, BackendError) and not e.permanent:
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.UNKNOWN


def _call(name: str, context, fn):
    try:
        return fn()
    except NydusError as e:
        code = _code(e)
        level = logging.DEBUG if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS) else logging.WARNING
        log.log(level, "%s: %s", name, e)
        context.abort(code, str(e))
    except Exception as e:  # a bug: keep serving, tell containerd, log the traceback
        log.exception("%s failed", name)
        context.abort(grpc.StatusCode.UNKNOWN, f"{name}: {e.__class__.__name__}: {e}")


def _mounts(ms: list[overlay.Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=list(m.options)) for m in ms]


def _info(s: Snapshot) -> snapshots_pb2.Info:
    info = snapshots_pb2.Info(name=s.key, parent=s.parent, kind=s.kind, labels=s.labels)
    info.created_at.FromNanoseconds(s.created_ns)
    info.updated_at.FromNanoseconds(s.updated_ns)
    return info


class SnapshotsService(snapshots_pb2_grpc.SnapshotsServicer):
    def __init__(self, sn: Snapshotter):
        self.sn = sn

    def Prepare(self, request, context):
        labels = dict(request.labels)
        log.debug("Prepare key=%s parent=%s labels=%s", request.key, request.parent, labels)
        ms = _call("Prepare", context, lambda: self.sn.prepare(request.key, request.parent, labels))
        return snapshots_pb2.PrepareSnapshotResponse(mounts=_mounts(ms))

    def View(self, request, context):
        labels = dict(request.labels)
        log.debug("View key=%s parent=%s labels=%s", request.key, request.parent, labels)
        ms = _call("View", context, lambda: self.sn.view(request.key, request.parent, labels))
        return snapshots_pb2.ViewSnapshotResponse(mounts=_mounts(ms))

    def Mounts(self, request, context):
        ms = _call("Mounts", context, lambda: self.sn.mounts(request.key))
        return snapshots_pb2.MountsResponse(mounts=_mounts(ms))

    def Commit(self, request, context):
        log.debug("Commit name=%s key=%s", request.name, request.key)
        _call("Commit", context, lambda: self.sn.commit(request.name, request.key, dict(request.labels)))
        return empty_pb2.Empty()

    def Remove(self, request, context):
        log.debug("Remove key=%s", request.key)
        _call("Remove", context, lambda: self.sn.remove(request.key))
        return empty_pb2.Empty()

    def Stat(self, request, context):
        s = _call("Stat", context, lambda: self.sn.stat(request.key))
        return snapshots_pb2.StatSnapshotResponse(info=_info(s))

    def Update(self, request, context):
        paths = list(request.update_mask.paths)
        info = request.info
        s = _call("Update", context, lambda: self.sn.update(info.name, dict(info.labels), paths))
        return snapshots_pb2.UpdateSnapshotResponse(info=_info(s))

    def List(self, request, context) -> Iterator[snapshots_pb2.ListSnapshotsResponse]:
        matchers = [parse_filter(f) for f in request.filters]
        snaps = _call("List", context, self.sn.list)
        batch: list[snapshots_pb2.Info] = []
        for s in snaps:
            if matchers and not any(m(s) for m in matchers):
                continue
            batch.append(_info(s))
            if len(batch) >= LIST_BATCH:
                yield snapshots_pb2.ListSnapshotsResponse(info=batch)
                batch = []
        if batch:
            yield snapshots_pb2.ListSnapshotsResponse(info=batch)

    def Usage(self, request, context):
        size, inodes = _call("Usage", context, lambda: self.sn.usage(request.key))
        return snapshots_pb2.UsageResponse(size=size, inodes=inodes)

    def Cleanup(self, request, context):
        _call("Cleanup", context, self.sn.cleanup)
        return empty_pb2.Empty()


# ---------------------------------------------------------------------------- List filters

_TERM = re.compile(r'''\s*(labels\.(?:"(?:[^"\\]|\\.)*"|[A-Za-z0-9_./-]+)|name|parent|kind)\s*(==|!=)\s*
                       ("(?:[^"\\]|\\.)*"|[^,]*)\s*(?:,|$)''', re.X)


def parse_filter(text: str):
    """containerd's filter syntax, the subset snapshot clients use: comma-separated (AND)
    `field==value` / `field!=value` over name, parent, kind and labels."KEY". Anything we do
    not understand matches everything (containerd re-checks what Walk returns)."""
    terms = []
    pos = 0
    while pos < len(text):
        m = _TERM.match(text, pos)
        if not m or m.end() == pos:
            log.debug("filter %r not understood; matching all", text)
            return lambda s: True
        field, op, value = m.group(1), m.group(2), _unquote(m.group(3).strip())
        terms.append((field, op, value))
        pos = m.end()

    def get(s: Snapshot, field: str) -> str | None:
        if field == "name":
            return s.key
        if field == "parent":
            return s.parent
        if field == "kind":
            return KIND_NAMES.get(s.kind, "unknown")
        return s.labels.get(_unquote(field[len("labels."):]))

    def match(s: Snapshot) -> bool:
        for field, op, value in terms:
            got = get(s, field)
            if (got == value) != (op == "=="):
                return False
        return True
    return match


def _unquote(v: str) -> str:
    if len(v) >= 2 and v[0] == v[-1] == '"':
        return re.sub(r'\\(.)', r'\1', v[1:-1])
    return v


def make_server(sn: Snapshotter, address: str, *, workers: int = 8) -> grpc.Server:
    """A gRPC server on unix socket `address` (a path), not yet started."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="snapshots"))
    snapshots_pb2_grpc.add_SnapshotsServicer_to_server(SnapshotsService(sn), server)
    if server.add_insecure_port(f"unix:{address}") == 0:
        raise ConfigError(f"cannot listen on unix socket {address}")
    return server
