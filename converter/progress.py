"""A progress bar on a terminal, silence otherwise (CI logs stay clean)."""

from __future__ import annotations

import os
import shutil
import sys


class Progress:
    def __init__(self, *, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self._bar = None
        self._layers = 0
        self._done = 0

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()

    def start(self, image) -> None:
        self._layers = len(image.layers)
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
