"""A plain-text progress bar for ``add_images(progress=...)`` that also works without a TTY.

On a terminal the bar is redrawn in place; in a log file, a CI job or a notebook cell it
prints a line at most every ``every_s`` seconds (and always the last one), so a long
ingest neither floods the output nor stays silent.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class TextProgress:
    """``progress(done, total)`` callable: ``[#####-----]  64/305 images  21 img/s``."""

    def __init__(self, label: str = "", *, unit: str = "images", width: int = 30,
                 stream: TextIO | None = None, every_s: float = 2.0) -> None:
        self.label = label
        self.unit = unit
        self.width = width
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = every_s
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty()) if callable(isatty) else False
        self._t0 = time.perf_counter()
        self._last_print = -1e9
        self._open_line = False
        self._last_final: tuple[int, int | None] | None = None

    def line(self, done: int, total: int | None) -> str:
        rate = done / max(time.perf_counter() - self._t0, 1e-9)
        head = f"{self.label} " if self.label else ""
        if total:
            filled = min(self.width * done // total, self.width)  # full only when done
            bar = "#" * filled + "-" * (self.width - filled)
            return f"{head}[{bar}] {done}/{total} {self.unit} ({rate:.1f}/s)"
        return f"{head}{done} {self.unit} ({rate:.1f}/s)"

    def __call__(self, done: int, total: int | None = None) -> None:
        final = total is not None and done >= total
        if final and self._last_final == (done, total):
            return  # a stream that repeats its last state (running, then finished) prints once
        if final:
            self._last_final = (done, total)
        now = time.perf_counter()
        if self.tty:
            self.stream.write("\r" + self.line(done, total))
            self._open_line = True
            if final:
                self.stream.write("\n")
                self._open_line = False
        elif final or now - self._last_print >= self.every_s:
            self.stream.write(self.line(done, total) + "\n")
            self._last_print = now
        self.stream.flush()

    def close(self) -> None:
        """End a bar left open (a total that was never reached)."""
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False
