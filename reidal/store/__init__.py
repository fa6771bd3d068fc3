"""The durable store: SQLite (one file in the data directory) or PostgreSQL (shared by replicas).

Everything a restart needs lives here: collections, images (and where their pixels are),
vectors, query batches and their pairs, answers (with their full history), idempotency
records, the last identity assignment and long-running operations. Image bytes themselves
live beside the database (:mod:`reidal.blobs`), named by their SHA-256. Every answer a person gave is
precious, so writes commit durably (SQLite ``synchronous=FULL``, PostgreSQL
``synchronous_commit = on``) before the call returns: once
:meth:`Store.submit_answers` has returned, the answer survives a crash or power cut.

``Store(data_dir)`` opens SQLite in WAL mode; ``Store(database_url="postgresql://...")`` or
``Store.open(url_or_dir)`` opens PostgreSQL, where any number of server processes share one
database. Each query is written once; :mod:`reidal.store.schema` holds the schema, and a
:class:`~reidal.store.backend.Backend` what each engine does differently (connections,
placeholders, column types, locking). On both, a
write transaction of a collection runs alone (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: an
advisory transaction lock on the collection), and :meth:`Store.exclusive` is a named lock
across threads and processes (what :class:`reidal.runtime.Runtime` serialises cycles with).

The package: :mod:`~reidal.store.records` (the dataclasses every layer imports),
:mod:`~reidal.store.backend` (the Backend protocol) with :mod:`~reidal.store.sqlite` and
:mod:`~reidal.store.postgres`, :mod:`~reidal.store.schema`, and one module per aggregate
(:mod:`~reidal.store.collections`, :mod:`~reidal.store.images`, :mod:`~reidal.store.answers`,
:mod:`~reidal.store.batches`, :mod:`~reidal.store.jobs`, :mod:`~reidal.store.operations`),
which :class:`Store` puts together. A workflow that must decide inside a write transaction
opens it itself and gets that aggregate's unit of work (:meth:`Store.answer_transaction`,
:meth:`Store.batch_transaction`): the store never calls back into a workflow.
"""

from __future__ import annotations

from reidal.store.answers import AnswersStore
from reidal.store.backend import is_database_url, redact_url
from reidal.store.batches import BatchesStore
from reidal.store.jobs import JobsStore
from reidal.store.operations import OperationsStore
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
    ImageRecord,
    ImageRow,
    ImageSource,
    OperationRecord,
    PairRecord,
    StoredAnswer,
    TrainingJobRecord,
)
from reidal.store.schema import SCHEMA_VERSION


class Store(AnswersStore, BatchesStore, OperationsStore, JobsStore):
    """Durable state of every collection: SQLite in ``data_dir``, or the PostgreSQL database
    at ``database_url`` (exactly one of the two). Its methods live in the aggregate modules."""


__all__ = [
    "ANSWERS_EPOCH", "JOB_CANCELLED", "JOB_FAILED", "JOB_FINAL_STATES", "JOB_QUEUED",
    "JOB_RUNNING", "JOB_SUCCEEDED", "LABELS", "OPERATION_STATES", "SCHEMA_VERSION",
    "AnswerDeletion", "AnswerIn", "AnswerLogVersion", "AnswerRow", "BatchDraft", "BatchRecord", "Collection",
    "ImageRecord", "ImageRow", "ImageSource", "OperationRecord", "PairRecord", "Store",
    "StoredAnswer", "TrainingJobRecord", "is_database_url", "redact_url",
]
