"""A dependency-free progress bar on stderr.

On a terminal it redraws one line in place; when stderr is not a TTY (CI logs, pipes) it stays silent and
writes only the final summary line, so logs are not flooded with carriage returns.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

_WIDTH = 28


class Progress:
    """``with Progress(n, "compiling") as bar: ... bar.advance(note=name)``"""

    def __init__(self, total: int, label: str, stream: TextIO | None = None):
        self.total, self.label, self.done = total, label, 0
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty()
        self._t0 = time.perf_counter()

    def __enter__(self) -> "Progress":
        self._draw("")
        return self

    def advance(self, n: int = 1, note: str = "") -> None:
        self.done += n
        self._draw(note)

    def _draw(self, note: str) -> None:
        if not self.live:
            return
        filled = _WIDTH * self.done // max(self.total, 1)
        line = f"{self.label} [{'#' * filled}{'.' * (_WIDTH - filled)}] {self.done}/{self.total} {note}"
        # \r plus clear-to-end-of-line (ESC[K) so a shorter note does not leave the tail of a longer one.
        self.stream.write("\r" + line + "\x1b[K")
        self.stream.flush()

    def __exit__(self, *exc) -> None:
        elapsed = time.perf_counter() - self._t0
        end = "\r\x1b[K" if self.live else ""
        self.stream.write(f"{end}{self.label}: {self.done}/{self.total} in {elapsed:.1f}s\n")
        self.stream.flush()
