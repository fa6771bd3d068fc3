"""One server-wide bound on the memory of decoded images in flight, across every request.

Each image's limits (bytes, pixels) bound one image; nothing bounded how many of them the
handler threads decode at once: 32 images of 6000 x 6000 pixels in one Embed call, 350 KiB
on the wire as 1-bit PNGs, take gigabytes once decoded. A :class:`DecodeBudget` is a
weighted semaphore over bytes: a request reserves the estimated decoded size of the images
it is about to decode (:func:`reidal.embedding.images.decoded_bytes`, read from headers),
and gives it back once they are preprocessed into the model's small input tensor. A
reservation that does not fit waits, first come first served, up to ``wait_s`` (or the
caller's deadline), then fails with RESOURCE_EXHAUSTED; a reservation larger than the whole
budget fails at once.

Deadlock-free by construction: a caller reserves all it needs for one step at once, holds
nothing while it waits, and a holder only decodes and preprocesses before releasing (no
step of it waits on the budget), so every reservation is eventually given back.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

from reidal.errors import ResourceExhausted
from reidal.metrics import gauge

_IN_FLIGHT = gauge("reidal_decode_bytes_in_flight",
                   "Estimated bytes of decoded images held by requests now (DecodeBudget)")

MIB = 1024 * 1024
#: Default bound (``reidal serve --decode-budget-mb``): about 6 of the largest images a
#: request may hold (40 MP as 1-bit PNGs, 5 bytes a pixel) or hundreds of camera-trap
#: JPEGs drafted to the model's input size.
DEFAULT_BUDGET_MB = 1024
#: Default wait for room (``--decode-wait-s``), below the clients' usual deadlines.
DEFAULT_WAIT_S = 30.0


class DecodeBudget:
    """At most ``capacity`` bytes of decoded images in flight; a reservation waits up to
    ``wait_s`` seconds for room. ``peak`` is the most ever reserved at once (a test and a
    metric read it: the budget's own accounting, not the process's RSS)."""

    def __init__(self, capacity: int, wait_s: float = DEFAULT_WAIT_S) -> None:
        if capacity < 1:
            raise ValueError(f"the decode budget must be >= 1 byte, got {capacity}")
        if wait_s < 0:
            raise ValueError(f"wait_s must be >= 0, got {wait_s}")
        self.capacity = int(capacity)
        self.wait_s = float(wait_s)
        self.in_use = 0
        self.peak = 0
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()  # waiting tickets, first come first served

    @contextmanager
    def reserve(self, nbytes: int, deadline: float | None = None) -> Iterator[None]:
        """Hold ``nbytes`` for the ``with`` block. ``deadline``: a ``time.monotonic()``
        instant after which waiting stops too. Raises ResourceExhausted when the room does
        not come in time (or ``nbytes`` exceeds the capacity)."""
        nbytes = int(nbytes)
        if nbytes > self.capacity:
            raise ResourceExhausted(
                f"decoding these images needs about {_mib(nbytes)} of memory, more than this "
                f"server's whole decode budget of {_mib(self.capacity)} (--decode-budget-mb): "
                "send fewer or smaller images per request")
        self._acquire(nbytes, deadline)
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= nbytes
                _IN_FLIGHT.set(self.in_use)
                self._cond.notify_all()

    def _acquire(self, nbytes: int, deadline: float | None) -> None:
        until = time.monotonic() + self.wait_s
        if deadline is not None:
            until = min(until, deadline)
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            try:
                while not (self._queue[0] is ticket
                           and self.in_use + nbytes <= self.capacity):
                    left = until - time.monotonic()
                    if left <= 0:
                        raise ResourceExhausted(
                            f"the server is busy decoding other requests' images "
                            f"({_mib(self.in_use)} of its {_mib(self.capacity)} decode budget "
                            f"in use; this request needs {_mib(nbytes)} more and waited "
                            f"{self.wait_s:g} s at most): retry later, or send fewer or "
                            "smaller images per request")
                    self._cond.wait(left)
                self.in_use += nbytes
                self.peak = max(self.peak, self.in_use)
                _IN_FLIGHT.set(self.in_use)
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()  # the next in line may fit now


def _mib(nbytes: int) -> str:
    return f"{nbytes / MIB:.0f} MiB" if nbytes >= MIB else f"{nbytes} bytes"
