"""Shared measuring helpers for the benchmarks: wall time and peak resident memory per stage.

Peak RSS is sampled by a background thread (every few milliseconds) while the stage runs, so
each stage gets its own peak rather than the process's monotonic maximum.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil

GiB = 1024**3


@dataclass
class Measurement:
    seconds: float
    peak_rss: int  # bytes, whole process, while the stage ran
    result: Any = None


class PeakRSS:
    """Context manager recording the peak resident set size of this process."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def measure(fn: Callable[[], Any]) -> Measurement:
    """Run ``fn`` once, returning its result with wall seconds and peak RSS."""
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
    return Measurement(seconds=seconds, peak_rss=mem.peak, result=result)


def fmt_gib(nbytes: int) -> str:
    return f"{nbytes / GiB:.2f}"
