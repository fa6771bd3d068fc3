"""The durable store: SQLite (one file in the data directory) or PostgreSQL (shared by replicas).

Everything a restart needs lives here: collections, images (and where their pixels are),
vectors, query batches and their pairs, answers (with their full history), idempotency
records, the last identity assignment and long-running operations. Image bytes themselves
live beside the database (:mod:`reidal.blobs`), named by their SHA-256. Every answer a person gave is
precious, so writes commit durably (SQLite ``synchronous=FULL``, PostgreSQL
``synchronous_commit = on``) before the call returns: once
``store.answers.submit(...)`` has returned, the answer survives a crash or power cut.

``Store(data_dir)`` opens SQLite in WAL mode; ``Store(database_url="postgresql://...")`` or
``Store.open(url_or_dir)`` opens PostgreSQL, where any number of server processes share one
database. Each query is written once; :mod:`reidal.store.schema` holds the schema, and a
:class:`~reidal.store.backend.Backend` what each engine does differently (connections,
placeholders, column types, locking). On both, a
write transaction of a collection runs alone (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: an
advisory transaction lock on the collection), and :meth:`Store.exclusive` is a named lock
across threads and processes (what :class:`reidal.runtime.Runtime` serialises cycles with).

The store is composed, not inherited: :class:`~reidal.store.database.Database` owns the
opened Backend (transactions, the exclusive lock, this instance's owner id, the audit log),
and one small class per aggregate is given it and reached as an attribute of :class:`Store`:
``store.collections`` (:mod:`~reidal.store.collections`), ``store.images`` (images, their
sources and vectors: :mod:`~reidal.store.images`), ``store.answers``
(:mod:`~reidal.store.answers`), ``store.batches`` (:mod:`~reidal.store.batches`),
``store.jobs`` (training jobs: :mod:`~reidal.store.jobs`) and ``store.operations``
(:mod:`~reidal.store.operations`), e.g. ``store.images.add(cid, images)``,
``store.answers.submit(cid, answers)``, ``store.batches.get(cid, batch_id)``. An aggregate
that needs another is given it explicitly (answers check their images). The records every
layer imports are in :mod:`~reidal.store.records` and re-exported here. A workflow that must
decide inside a write transaction opens it itself and gets that aggregate's unit of work
(``store.answers.transaction(cid)``, ``store.batches.transaction(cid)``): the store never
calls back into a workflow.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Self

from reidal.store.answers import Answers
from reidal.store.backend import is_database_url, redact_url
from reidal.store.batches import Batches
from reidal.store.collections import Collections
from reidal.store.database import Database
from reidal.store.images import Images
from reidal.store.jobs import Jobs
from reidal.store.operations import Operations
from reidal.store.records import (
    ANSWERS_EPOCH,
    JOB_CANCELLED,
    JOB_FAILED,
    JOB_FINAL_STATES,
    JOB_QUEUED,
    JOB_RUNNING,
    JOB_SUCCEEDED,
    LABELS,
    OPERATION_STATES,
    AnswerDeletion,
    AnswerIn,
    AnswerLogVersion,
    AnswerRow,
    BatchDraft,
    BatchRecord,
    Collection,
    ConstraintColumns,
    ImageRecord,
    ImageRow,
    ImageSource,
    OperationRecord,
    PairRecord,
    StoredAnswer,
    TrainingJobRecord,
)
from reidal.store.schema import SCHEMA_VERSION


class Store:
    """Durable state of every collection: SQLite in ``data_dir``, or the PostgreSQL database
    at ``database_url`` (exactly one of the two). What it holds is reached through its
    aggregates (``store.collections``, ``store.images``, ``store.answers``,
    ``store.batches``, ``store.jobs``, ``store.operations``); the store itself only opens,
    locks, probes and closes the database they share (``store.db``)."""

    def __init__(self, data_dir: str | Path | None = None, *,
                 database_url: str | None = None) -> None:
        #: The opened database every aggregate shares (direct SQL: tests and benchmarks).
        self.db = Database(data_dir, database_url=database_url)
        #: This instance's id, recorded on the operations and training jobs it starts.
        self.owner = self.db.owner
        self.data_dir = self.db.data_dir
        self.path = self.db.path  # the SQLite file (None on PostgreSQL)
        self.database_url = self.db.database_url
        self.collections = Collections(self.db)
        self.images = Images(self.db, self.collections)
        self.answers = Answers(self.db, self.collections, self.images)
        self.batches = Batches(self.db, self.collections)
        self.jobs = Jobs(self.db)
        self.operations = Operations(self.db)

    @classmethod
    def open(cls, target: str | Path) -> Self:
        """A ``postgresql://`` (or ``postgres://``) URL opens PostgreSQL, anything else is a
        SQLite data directory."""
        if is_database_url(target):
            return cls(database_url=str(target))
        return cls(target)

    @property
    def backend(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self.db.kind

    def describe(self) -> str:
        """Where the data is, for logs (a URL without its password)."""
        return self.db.describe()

    def exclusive(self, name: str) -> AbstractContextManager[None]:
        """Hold the lock ``name`` against every other thread and process using this database
        (re-entrant within a thread): see :meth:`Database.exclusive`."""
        return self.db.exclusive(name)

    def ping(self) -> bool:
        """True when the database answers (the readiness probe of the stateful services)."""
        return self.db.ping()

    def close(self) -> None:
        """Close (idempotent). SQLite: checkpoint the WAL into the main file first, so a clean
        shutdown leaves one file."""
        self.db.close()


__all__ = [
    "ANSWERS_EPOCH", "JOB_CANCELLED", "JOB_FAILED", "JOB_FINAL_STATES", "JOB_QUEUED",
    "JOB_RUNNING", "JOB_SUCCEEDED", "LABELS", "OPERATION_STATES", "SCHEMA_VERSION",
    "AnswerDeletion", "AnswerIn", "AnswerLogVersion", "AnswerRow", "BatchDraft", "BatchRecord", "Collection", "ConstraintColumns",
    "ImageRecord", "ImageRow", "ImageSource", "OperationRecord", "PairRecord", "Store",
    "StoredAnswer", "TrainingJobRecord", "is_database_url", "redact_url",
]
