"""What the workload reads: per-file counters, first-access order, and reads in flight.

    AccessRecorder.pattern()   files in the order they were first read (nydusd's
                               access_pattern; `/api/v1/metrics/pattern`). `paths()` is the
                               same list as absolute paths, one a line: exactly the file
                               `nydusify convert --prefetch-patterns` takes, so "run once,
                               record, convert again" needs no translation step.
    AccessRecorder.files()     per-file read counts and bytes (nydusd's iostats_files;
                               `/api/v1/metrics/files`)
    Inflight                   reads being served right now, with their age
                               (`/api/v1/metrics/inflight`)

Only the trio thread touches these (FUSE handlers run there), so no locks. Memory is bounded:
at most `limit` files are recorded (later first reads are counted as `dropped`).
"""

from __future__ import annotations

import itertools
import time


class AccessRecorder:
    def __init__(self, bootstrap, *, limit: int = 1 << 17):
        self.bootstrap = bootstrap
        self.limit = limit
        self._files: dict[int, list[int]] = {}   # ino -> [nr_read, read_bytes, first_ns, seq]
        self.dropped = 0
        self._seq = itertools.count()

    def record(self, ino: int, nbytes: int) -> None:
        f = self._files.get(ino)
        if f is None:
            if len(self._files) >= self.limit:
                self.dropped += 1
                return
            f = self._files[ino] = [0, 0, time.time_ns(), next(self._seq)]
        f[0] += 1
        f[1] += nbytes

    def _path(self, ino: int) -> str:
        try:
            return self.bootstrap.path_of(ino)
        except Exception:
            return ""

    def pattern(self) -> list[dict]:
        out = []
        for ino, (nr, _nb, first, _) in sorted(self._files.items(), key=lambda kv: kv[1][3]):
            out.append({"ino": ino, "path": self._path(ino), "nr_read": nr,
                        "first_access_time_secs": first // 1_000_000_000,
                        "first_access_time_nanos": first % 1_000_000_000})
        return out

    def paths(self) -> str:
        return "".join(f"{e['path']}\n" for e in self.pattern() if e["path"])

    def files(self) -> list[dict]:
        return [{"ino": ino, "path": self._path(ino), "nr_read": nr, "read_bytes": nb}
                for ino, (nr, nb, _f, _s) in sorted(self._files.items())]


class Inflight:
    def __init__(self):
        self._ops: dict[int, tuple[str, int, int, int, float]] = {}
        self._ids = itertools.count()

    def begin(self, op: str, ino: int, offset: int, size: int) -> int:
        token = next(self._ids)
        self._ops[token] = (op, ino, offset, size, time.monotonic())
        return token

    def end(self, token: int) -> None:
        self._ops.pop(token, None)

    def snapshot(self, path_of=None) -> list[dict]:
        now = time.monotonic()
        out = []
        for op, ino, off, size, t0 in self._ops.values():
            e = {"opcode": op, "inode": ino, "offset": off, "size": size,
                 "elapsed_ms": round((now - t0) * 1000, 3)}
            if path_of is not None:
                try:
                    e["path"] = path_of(ino)
                except Exception:
                    pass
            out.append(e)
        return out
