"""Consecutive elements of a stream gathered into batches of up to N items, waiting at most
T for more.

Why: a client streams images in messages of a few dozen, while the embedder runs best on
full batches and every stored batch costs one transaction (an fsync). The stream is read
by a thread of its own into a small queue, so the next messages arrive while a batch is
being embedded, and a batch is cut ``max_wait_s`` after its first element even when no
next message has come yet: a slow client sees its images stored within that time, not
only at the end of its stream. Nothing here knows of gRPC or images.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

#: Elements read ahead of the batch being gathered (the queue's bound: memory).
DEFAULT_READ_AHEAD = 2


@dataclass(frozen=True)
class _Raised:
    exc: BaseException


_END = object()


@dataclass(frozen=True)
class BatchLimits(Generic[T]):
    """When a batch is cut. max_items: most items (``size`` of each element summed; an
    element larger alone makes a batch alone). max_wait_s: longest a batch waits for more
    after its first element. fits(batch, next): False cuts the batch before ``next`` (an
    element that must not share a batch with the ones gathered)."""

    max_items: int
    max_wait_s: float
    size: Callable[[T], int] = lambda _: 1
    fits: Callable[[Sequence[T], T], bool] = lambda _batch, _next: True

    def __post_init__(self) -> None:
        if self.max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {self.max_items}")
        if self.max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {self.max_wait_s}")


def gather(source: Iterable[T], limits: BatchLimits[T], *,
           read_ahead: int = DEFAULT_READ_AHEAD) -> Iterator[list[T]]:
    """Yield lists of consecutive elements of ``source`` cut by ``limits``; the last one at
    the end of ``source``. An exception raised by ``source`` is raised here after the
    elements read before it were yielded, so the caller handles them first. ``source`` is
    iterated on a daemon thread (it may block, e.g. on a network stream); closing this
    generator stops it reading ahead."""
    q: queue.Queue[object] = queue.Queue(read_ahead)
    stop = threading.Event()

    def put(element: object) -> bool:
        while not stop.is_set():
            try:
                q.put(element, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for element in source:
                if not put(element):
                    return
            put(_END)
        except BaseException as exc:  # handed to the consumer, in order
            put(_Raised(exc))

    threading.Thread(target=read, name="reidal-stream-reader", daemon=True).start()
    batch: list[T] = []
    items = 0
    cut_at = 0.0
    try:
        while True:
            try:
                element = (q.get() if not batch
                           else q.get(timeout=max(cut_at - time.monotonic(), 1e-6)))
            except queue.Empty:  # waited long enough: the batch goes as it is
                yield batch
                batch, items = [], 0
                continue
            if element is _END or isinstance(element, _Raised):
                if batch:
                    yield batch
                if isinstance(element, _Raised):
                    raise element.exc
                return
            n = limits.size(element)  # type: ignore[arg-type]
            if batch and (items + n > limits.max_items
                          or not limits.fits(batch, element)):  # type: ignore[arg-type]
                yield batch
                batch, items = [], 0
            if not batch:
                cut_at = time.monotonic() + limits.max_wait_s
            batch.append(element)  # type: ignore[arg-type]
            items += n
            if items >= limits.max_items:
                yield batch
                batch, items = [], 0
    finally:
        stop.set()
