"""A progress bar on a terminal, silence otherwise (CI logs stay clean)."""

from __future__ import annotations

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
            self._bar = tqdm(total=None, unit="B", unit_scale=True, unit_divisor=1024,
                             file=self.stream, desc=self._desc(), leave=False)

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
