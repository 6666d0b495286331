"""gRPC adapter: containerd.services.snapshots.v1.Snapshots → core.Snapshotter.

Only translation lives here: protobuf in, Python out, and our exceptions to the gRPC status
codes containerd's errdefs maps back (NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION,
INVALID_ARGUMENT, UNAVAILABLE for transient backend trouble, UNKNOWN otherwise).
"""

from __future__ import annotations

import errno
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
    if isinstance(e, SnapshotPrecondition):       # errdefs: ErrInvalidArgument vs ErrFailedPrecondition
        return grpc.StatusCode.INVALID_ARGUMENT if e.errno == errno.EINVAL else grpc.StatusCode.FAILED_PRECONDITION
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
        matchers = _call("List", context, lambda: [parse_filter(f) for f in request.filters])
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

_FIELD = r'''(?:labels\.(?:"(?:[^"\\]|\\.)*"|[A-Za-z0-9_./-]+)|name|parent|kind)'''
_TERM = re.compile(r'''\s*(%s)\s*(?:(==|!=|~=)\s*("(?:[^"\\]|\\.)*"|/(?:[^/\\]|\\.)*/|[^,|]*))?\s*(,|\|\||$)'''
                   % _FIELD, re.X)


def parse_filter(text: str):
    """containerd's filter syntax (containerd/filters) over the fields containerd's
    snapshot adaptor knows: `name`, `parent`, `kind` and `labels.KEY` / `labels."KEY"`.
    Terms are joined by `,` (AND); `||` separates alternatives (OR). Operators: `==`, `!=`,
    `~=` (regexp, Go RE2 syntax read as Python's); a field alone tests presence. A filter
    we cannot parse is an INVALID_ARGUMENT error (FilterError), as in containerd: matching
    everything would hand a client snapshots it did not ask for."""
    alternatives: list[list[tuple[str, str | None, object]]] = [[]]
    pos = 0
    text = text.strip()
    if not text:
        return lambda s: True
    while pos < len(text):
        m = _TERM.match(text, pos)
        if not m or m.end() == pos:
            raise FilterError(f"filter {text!r}: cannot parse at offset {pos}")
        field, op, raw, sep = m.group(1), m.group(2), m.group(3), m.group(4)
        if op is None:
            value: object = None
        else:
            raw = (raw or "").strip()
            if op == "~=":
                pattern = raw[1:-1] if len(raw) >= 2 and raw[0] == raw[-1] == "/" else _unquote(raw)
                try:
                    value = re.compile(pattern)
                except re.error as e:
                    raise FilterError(f"filter {text!r}: bad regexp {pattern!r}: {e}") from None
            else:
                value = _unquote(raw)
        alternatives[-1].append((field, op, value))
        pos = m.end()
        if sep == "||":
            alternatives.append([])
        elif sep == "," and pos >= len(text):
            raise FilterError(f"filter {text!r}: ends with ','")
    if not alternatives[-1]:
        raise FilterError(f"filter {text!r}: ends with '||'")

    def get(s: Snapshot, field: str) -> str | None:
        if field == "name":
            return s.key
        if field == "parent":
            return s.parent
        if field == "kind":
            return KIND_NAMES.get(s.kind, "unknown")
        return s.labels.get(_unquote(field[len("labels."):]))

    def term(s: Snapshot, field: str, op: str | None, value) -> bool:
        got = get(s, field)
        if op is None:
            return got not in (None, "")
        if op == "~=":
            return got is not None and value.search(got) is not None
        return (got == value) == (op == "==")

    def match(s: Snapshot) -> bool:
        return any(all(term(s, *t) for t in alt) for alt in alternatives)
    return match


class FilterError(SnapshotPrecondition):
    """A List filter we cannot parse (gRPC INVALID_ARGUMENT)."""
    errno = errno.EINVAL


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
