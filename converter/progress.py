"""A progress bar on a terminal; one line per converted layer otherwise (CI logs), with the
percentage of the source's compressed bytes done, since the layer sizes are known up front:

    nydusify: layer 2/5 sha256:0123456789ab 31.2 MiB -> blob 28.0 MiB, 1840 chunks, 2.31s [47%]
"""

from __future__ import annotations

import os
import shutil
import sys


class Progress:
    def __init__(self, *, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        tty = self.stream.isatty()
        self.enabled = enabled and tty
        self.lines = enabled and not tty
        self._bar = None
        self._layers = 0
        self._done = 0
        self._total_bytes = 0
        self._done_bytes = 0

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()

    def start(self, image) -> None:
        self._layers = len(image.layers)
        self._total_bytes = sum(layer.size for layer in image.layers)
        self._done = self._done_bytes = 0           # per image (several with --all-platforms)
        if self.enabled:
            from tqdm import tqdm  # only imported for a terminal
            # a pty that never had its size set reports 0 columns, and tqdm then draws nothing
            cols = shutil.get_terminal_size((100, 24)).columns or 100
            self._bar = tqdm(total=None, unit="B", unit_scale=True, unit_divisor=1024, ncols=cols,
                             file=_FdWriter(self.stream), desc=self._desc(), leave=False)

    def _desc(self) -> str:
        return f"converting layer {min(self._done + 1, self._layers)}/{self._layers}"

    def update(self, event: str, amount: int) -> None:
        if self._bar is None:
            return
        if event == "bytes":
            self._bar.update(amount)
        elif event == "layer":
            self._done += amount
            self._bar.set_description(self._desc())


    def layer_done(self, report) -> None:
        """converter.convert.LayerReport of a finished layer."""
        self._done_bytes += report.source_size
        if not self.lines:
            return
        pct = f" [{100 * self._done_bytes // self._total_bytes}%]" if self._total_bytes else ""
        blob = (f"blob {_size(report.blob_size)}, {report.chunks} chunks" if report.blob_digest
                else "no new data")
        print(f"nydusify: layer {report.index + 1}/{report.count} {report.source_digest[:19]} "
              f"{_size(report.source_size)} -> {blob}, {report.seconds:.2f}s{pct}",
              file=self.stream, flush=True)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


class _FdWriter:
    """Writes straight to the terminal's fd. Handing tqdm sys.stderr itself drew nothing on
    some ptys here (its writes never reached the fd); an unbuffered writer always does."""

    def __init__(self, stream):
        self._fd = stream.fileno()

    def write(self, s: str) -> int:
        os.write(self._fd, s.encode("utf-8", "replace"))
        return len(s)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True
