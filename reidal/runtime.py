"""What the collection, sampling and constraint services share inside one process.

A :class:`Runtime` holds the durable store, the blob store, the embedder, one lock per
collection (sampling cycles and identity exports of one collection run one at a time, so
cycle numbers and identity ids never race; the lock is a :class:`SharedLock`, so it also
holds against other processes on the same database: replicas sharing PostgreSQL, servers
sharing a SQLite data directory), a :class:`Notifier` that wakes streaming calls
(WatchQueue, WatchOperation) when something they watch changed, and an
:class:`OperationRunner` for long work a client polls or watches.

The store is the source of truth: a notification only says "look again". A streaming call
re-reads the store when woken and also every ``poll_s`` seconds, so it never misses a change
made by another process on the same data directory. On PostgreSQL the notifier also reaches
the other replicas (:mod:`reidal.notify_pg`, LISTEN/NOTIFY): their streams wake at once, and
the poll stays the safety net.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Hashable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from reidal.answer_state import answer_states
from reidal.blobs import BlobStore
from reidal.embedding.embedder import Embedder
from reidal.embedding.images import SERVER_LIMITS, ImageLimits
from reidal.errors import Aborted, FailedPrecondition, status_code
from reidal.logs import log_kv
from reidal.store import OperationRecord, Store

log = logging.getLogger("reidal.runtime")


class Closeable(Protocol):
    def close(self) -> None: ...


class Notifier:
    """Version counters per key with a condition to wait on; ``close`` wakes everybody.

    A publisher (:meth:`set_publisher`, e.g. :class:`reidal.notify_pg.PgNotifications`)
    is told of every local bump so other processes on the same database wake too; what they
    send back is bumped with ``publish=False``, so nothing is sent on twice.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._versions: dict[Hashable, int] = {}
        self._epoch = 0  # added to every key's version: wake_all moves them all at once
        self._publisher: Callable[[Hashable], None] | None = None
        self.closed = False

    def set_publisher(self, publisher: Callable[[Hashable], None] | None) -> None:
        """Call ``publisher(key)`` after every bump made here (None: stop publishing)."""
        self._publisher = publisher

    def _version(self, key: Hashable) -> int:  # under self._cond
        return self._versions.get(key, 0) + self._epoch

    def version(self, key: Hashable) -> int:
        with self._cond:
            return self._version(key)

    def bump(self, key: Hashable, *, publish: bool = True) -> None:
        """``key`` changed: wake its waiters here, and (``publish``) in other processes."""
        with self._cond:
            self._versions[key] = self._versions.get(key, 0) + 1
            self._cond.notify_all()
        publisher = self._publisher
        if publish and publisher is not None:
            publisher(key)

    def wake_all(self) -> None:
        """Every key may have changed (notifications were lost): all waiters look again."""
        with self._cond:
            self._epoch += 1
            self._cond.notify_all()

    def wait(self, key: Hashable, seen: int, timeout: float) -> int:
        """Block until ``key`` moves past ``seen``, the notifier closes, or ``timeout``."""
        with self._cond:
            self._cond.wait_for(lambda: self.closed or self._version(key) != seen,
                                timeout=timeout)
            return self._version(key)

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class SharedLock:
    """A re-entrant lock that also holds the store's lock of the same name
    (:meth:`reidal.store.Store.exclusive`): it excludes other threads of this process
    (which then wait here, not on the database) and other processes on the database."""

    def __init__(self, store: Store, name: str) -> None:
        self._store = store
        self._name = name
        self._local = threading.RLock()
        self._held = threading.local()

    def __enter__(self) -> None:
        self._local.acquire()
        try:
            shared = self._store.exclusive(self._name)
            shared.__enter__()
        except BaseException:
            self._local.release()
            raise
        self._held.__dict__.setdefault("stack", []).append(shared)

    def __exit__(self, *exc: object) -> None:
        try:
            self._held.stack.pop().__exit__(*exc)
        finally:
            self._local.release()


def queue_key(collection_id: str) -> tuple[str, str]:
    return ("queue", collection_id)


def operation_key(operation_id: str) -> tuple[str, str]:
    return ("operation", operation_id)


class OperationAborted(Aborted):
    """The server is stopping: the operation ends (FAILED, ABORTED) at its next update."""


class Progress:
    """Handed to a running operation: records progress in the store and wakes watchers.

    Every update is also where a long operation learns that the server is stopping: it
    raises :class:`OperationAborted` then, so a graceful stop never waits for a whole
    collection to be embedded.
    """

    def __init__(self, store: Store, notifier: Notifier, operation_id: str,
                 stopping: threading.Event | None = None) -> None:
        self._store = store
        self._notifier = notifier
        self._stopping = stopping or threading.Event()
        self.operation_id = operation_id

    def update(self, *, done: int | None = None, total: int | None = None,
               stage: str | None = None) -> None:
        if self._stopping.is_set():
            raise OperationAborted("the server stopped during the operation; start it again")
        self._store.operations.update(self.operation_id, done=done, total=total, stage=stage)
        self._notifier.bump(operation_key(self.operation_id))


class OperationRunner:
    """Runs operations on a small thread pool, their state durable in the store.

    A failure is recorded with its domain error's status code name and message
    (:func:`reidal.errors.status_code`: the code a call would answer); anything else is
    logged with its traceback and recorded as INTERNAL.
    """

    def __init__(self, store: Store, notifier: Notifier, *, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.store = store
        self.notifier = notifier
        self._pool = futures.ThreadPoolExecutor(workers, thread_name_prefix="reidal-op")
        self._running: dict[tuple[str, str], str] = {}  # (collection, kind) -> operation id
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def start(self, collection_id: str, kind: str, work: Callable[[Progress], dict[str, Any]],
              *, total: int = 0, exclusive: bool = True) -> OperationRecord:
        """Record a PENDING operation and queue ``work``; its dict result is stored.

        ``exclusive``: refuse (FailedPrecondition) while an operation of the same kind runs
        on the same collection in this process.
        """
        op_id = f"op-{uuid.uuid4().hex[:16]}"
        key = (collection_id, kind)
        with self._lock:
            if exclusive and key in self._running:
                raise FailedPrecondition(
                    f"operation {self._running[key]} ({kind}) is still running on collection "
                    f"{collection_id!r}; watch it or wait for it to finish")
            record = self.store.operations.create(op_id, collection_id, kind, total=total)
            if exclusive:
                self._running[key] = op_id
        self._pool.submit(self._run, op_id, key if exclusive else None, work)
        return record

    def _run(self, op_id: str, key: tuple[str, str] | None,
             work: Callable[[Progress], dict[str, Any]]) -> None:
        progress = Progress(self.store, self.notifier, op_id, self._stopping)
        try:
            self.store.operations.update(op_id, state="RUNNING")
            self.notifier.bump(operation_key(op_id))
            result = work(progress)
            self._finish(op_id, key, state="SUCCEEDED", result=result or {})
            log_kv(log, logging.INFO, "operation_succeeded", operation=op_id)
        except BaseException as exc:  # the worker must record every failure
            code, message = status_code(exc), str(exc)
            if code is None:
                log.error("operation %s failed", op_id, exc_info=exc)
                code, message = "INTERNAL", f"{type(exc).__name__}: {exc}"
            log_kv(log, logging.WARNING, "operation_failed", operation=op_id, code=code,
                   detail=message)
            try:
                self._finish(op_id, key, state="FAILED", error_code=code,
                             error_message=message)
            except Exception:  # the store may be closing: the restart marks it ABORTED
                log.exception("could not record the failure of operation %s", op_id)
        finally:
            if key is not None:
                with self._lock:
                    if self._running.get(key) == op_id:
                        del self._running[key]
            self.notifier.bump(operation_key(op_id))

    def _finish(self, op_id: str, key: tuple[str, str] | None, **fields: Any) -> None:
        """Record the final state and free the operation's slot in one step under the lock,
        so a caller that sees the operation final (watch, GetOperation) can start the next
        one at once: :meth:`start` takes the same lock."""
        with self._lock:
            try:
                self.store.operations.update(op_id, **fields)
            finally:
                if key is not None and self._running.get(key) == op_id:
                    del self._running[key]

    def watch(self, operation_id: str, is_active: Callable[[], bool], *,
              poll_s: float = 2.0) -> Iterator[OperationRecord]:
        """The operation now, then at every change, until a final state (or the caller
        leaves, or the notifier closes)."""
        key = operation_key(operation_id)
        last: OperationRecord | None = None
        while True:
            seen = self.notifier.version(key)
            record = self.store.operations.get(operation_id)
            if last is None or record != last:
                yield record
                last = record
            if record.final or not is_active() or self.notifier.closed:
                return
            self.notifier.wait(key, seen, poll_s)

    def close(self, wait: bool = True) -> None:
        """Stop: queued operations never start (the next start-up marks them ABORTED),
        running ones end at their next progress update."""
        self._stopping.set()
        self._pool.shutdown(wait=wait, cancel_futures=True)


@dataclass
class Runtime:
    """Shared state of the stateful services in one process (see the module docstring).

    ``notifications``: what carries the notifier's bumps to and from other processes
    (:class:`reidal.notify_pg.PgNotifications` on PostgreSQL; None: this process only);
    :meth:`close` closes it after the operations, so their last bumps still go out.
    ``image_limits``: what an image URI a caller stores may name, and what GetImage and
    training read again (a server's default: no local path; ``serve(image_roots=...)``).
    ``ingest_batch``: most images an AddImages stream gathers from its messages into one
    embedding call and one transaction (the embedder's batch size); ``ingest_wait_s``:
    longest a gathered batch waits for the stream's next message before it is embedded
    and stored anyway (OURS: short against an embedding batch, about 0.3 s at 120 images/s,
    so a client that sends slowly still sees its images stored within a moment).
    """

    store: Store
    blobs: BlobStore
    embedder: Embedder | None = None
    notifier: Notifier = field(default_factory=Notifier)
    operations: OperationRunner | None = None
    embed_chunk: int = 64  # images per embedding call of EmbedCollection
    ingest_batch: int = 32
    ingest_wait_s: float = 0.2
    notifications: Closeable | None = None
    image_limits: ImageLimits = SERVER_LIMITS
    _locks: dict[str, SharedLock] = field(default_factory=dict)
    _locks_guard: threading.Lock = field(default_factory=threading.Lock)
    #: Held between writing blobs and referencing them, and by blob GC (all processes).
    blob_lock: SharedLock = field(init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.ingest_batch <= 1024:
            raise ValueError(f"ingest_batch must be in [1, 1024], got {self.ingest_batch}")
        if self.ingest_wait_s < 0:
            raise ValueError(f"ingest_wait_s must be >= 0, got {self.ingest_wait_s}")
        self.blob_lock = SharedLock(self.store, "blobs")
        if self.operations is None:
            self.operations = OperationRunner(self.store, self.notifier)

    @contextmanager
    def lock(self, collection_id: str) -> Iterator[None]:
        """Serialise the sampling cycles of one collection (in every process)."""
        with self._shared_lock(f"collection:{collection_id}"):
            yield

    @contextmanager
    def identities_lock(self, collection_id: str) -> Iterator[None]:
        """Serialise the identity computations of one collection (in every process: each
        reads the saved assignment, then replaces it). A lock of its own, not the cycles':
        GetIdentities never waits for a sampling cycle, which reads the same state and
        writes nothing identities read."""
        with self._shared_lock(f"identities:{collection_id}"):
            yield

    def _shared_lock(self, name: str) -> SharedLock:
        with self._locks_guard:
            lock = self._locks.get(name)
            if lock is None:
                lock = self._locks[name] = SharedLock(self.store, name)
        return lock

    def require_embedder(self) -> Embedder:
        if self.embedder is None:
            raise FailedPrecondition("this server has no embedding service configured")
        return self.embedder

    def gc_blobs(self) -> int:
        """Remove the blobs no image references any more (after a collection is deleted)."""
        with self.blob_lock:
            return self.blobs.remove_except(self.store.images.referenced_blobs())

    def close(self) -> None:
        self.notifier.close()
        if self.operations is not None:
            self.operations.close(wait=True)
        # a clean stop leaves the answer states as snapshots: the next start catches up nothing
        answer_states(self.store).snapshot_all(self.store)
        if self.notifications is not None:
            self.notifications.close()
