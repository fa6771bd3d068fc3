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
database. Each query is written once; :mod:`reidal.store_sql` holds the schema and what the
two engines do differently (connections, placeholders, column types, locking). On both, a
write transaction of a collection runs alone (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: an
advisory transaction lock on the collection), and :meth:`Store.exclusive` is a named lock
across threads and processes (what :class:`reidal.runtime.Runtime` serialises cycles with).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from reidal.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from reidal.store_sql import PostgresBackend, SqliteBackend, Tx, is_database_url, redact_url

SCHEMA_VERSION = 6
LABELS = ("SAME", "DIFFERENT", "UNSURE")
#: Counter moved by every write that changes the current answers of a collection other
#: than by inserting new ones (a deletion, an exclusion or restore of an image): a cached
#: answer state (:mod:`reidal.answer_state`) seeing it move reloads instead of catching up.
ANSWERS_EPOCH = "answers_epoch"


#: States of a training job; a job in a final state never changes again.
JOB_QUEUED, JOB_RUNNING, JOB_SUCCEEDED, JOB_FAILED, JOB_CANCELLED = (
    "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
JOB_FINAL_STATES = frozenset({JOB_SUCCEEDED, JOB_FAILED, JOB_CANCELLED})


@dataclass(frozen=True)
class TrainingJobRecord:
    """One training job as stored. ``progress``: epoch, loss, clusters, unclustered,
    pairs_asked, answers_used, metrics of the last finished epoch. ``cancel_requested``:
    CancelJob asked it to stop (on any replica); the process running it stops at its next
    check (:meth:`Store.request_training_job_cancel`)."""

    job_id: str
    collection_id: str
    state: str
    config: dict[str, Any]
    progress: dict[str, Any] = field(default_factory=dict)
    base_model_name: str = ""
    base_model_version: str = ""
    model_name: str = ""
    model_version: str = ""
    error_code: str = ""
    error_message: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    cancel_requested: bool = False

    @property
    def final(self) -> bool:
        return self.state in JOB_FINAL_STATES



@dataclass(frozen=True)
class Collection:
    id: str
    species: str
    model_name: str
    model_version: str
    params: dict[str, Any]
    cycle: int
    created_at: float


@dataclass(frozen=True)
class ImageRecord:
    image_id: str
    uri: str = ""
    name: str = ""  # the identity name the platform already knows, if any
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AnswerIn:
    image_a: str
    image_b: str
    label: str  # SAME / DIFFERENT / UNSURE
    annotator: str = ""
    confidence: float | None = None
    tags: tuple[str, ...] = ()
    note: str = ""
    started_at: float | None = None
    ended_at: float | None = None
    batch_id: str = ""
    pair_id: str = ""


@dataclass(frozen=True)
class StoredAnswer:
    seq: int
    image_a: str
    image_b: str
    label: str
    annotator: str
    confidence: float | None
    tags: tuple[str, ...]
    note: str
    received_at: float
    batch_id: str
    pair_id: str
    request_id: str
    superseded_by: int | None
    deleted: bool
    started_at: float | None = None
    ended_at: float | None = None


@dataclass(frozen=True)
class AnswerLogVersion:
    """Where a collection's answers stand: the collection's creation time (a re-created
    collection of the same id differs), :data:`ANSWERS_EPOCH` and the newest answer seq
    (-1 when none)."""

    created_at: float
    epoch: int
    max_seq: int


class AnswerRow(NamedTuple):
    """The part of an answer the constraint state needs (a tuple: a million load fast)."""

    seq: int
    image_a: str
    image_b: str
    label: str


@dataclass(frozen=True)
class ImageSource:
    """Where an image's pixels are: a blob named by ``sha256`` (kind ``data``) or ``uri``."""

    kind: str  # 'data' or 'uri'
    sha256: str  # of the bytes (data) or of the URI text (uri)
    size: int = 0  # bytes of a data image


@dataclass(frozen=True)
class ImageRow:
    """An image as listed: ingest position, ids, metadata and exclusion."""

    seq: int
    image_id: str
    uri: str
    name: str
    metadata: dict[str, str]
    excluded_reason: str | None
    added_at: float


@dataclass(frozen=True)
class PairRecord:
    """One pair of a stored query batch; ``image_a < image_b``."""

    pair_id: str
    image_a: str
    image_b: str
    pool: str
    region: int
    probability: float
    similarity: float


@dataclass(frozen=True)
class BatchRecord:
    """A stored query batch (its pairs are read with :meth:`Store.batch_pairs`)."""

    batch_id: str
    cycle: int
    budget: int
    reason: str
    finished: bool
    model_name: str
    model_version: str
    filter: dict[str, Any]
    n_items: int
    stats: dict[str, Any]
    request_id: str
    created_at: float


@dataclass(frozen=True)
class OperationRecord:
    """A long-running operation's durable state."""

    operation_id: str
    collection_id: str
    kind: str
    state: str  # PENDING, RUNNING, SUCCEEDED, FAILED
    done: int
    total: int
    stage: str
    error_code: str
    error_message: str
    result: dict[str, Any]
    created_at: float
    updated_at: float

    @property
    def final(self) -> bool:
        return self.state in ("SUCCEEDED", "FAILED")


OPERATION_STATES = ("PENDING", "RUNNING", "SUCCEEDED", "FAILED")


def _now() -> float:
    return time.time()


class Store:
    """Durable state of every collection: SQLite in ``data_dir``, or the PostgreSQL database
    at ``database_url`` (exactly one of the two)."""

    def __init__(self, data_dir: str | Path | None = None, *,
                 database_url: str | None = None) -> None:
        if (data_dir is None) == (database_url is None):
            raise ValueError("pass a data directory (SQLite) or a database_url (PostgreSQL)")
        #: This instance's id, recorded on the operations and training jobs it starts; an
        #: open store marks it alive, so no other process takes its work for abandoned.
        self.owner = uuid.uuid4().hex
        self.data_dir: Path | None = None
        self.path: Path | None = None  # the SQLite file
        self.database_url = database_url
        self._db: SqliteBackend | PostgresBackend
        if database_url is not None:
            if not is_database_url(database_url):
                raise ValueError(f"not a postgresql:// URL: {redact_url(database_url)!r}")
            self._db = PostgresBackend(database_url)
        else:
            self.data_dir = Path(data_dir)  # type: ignore[arg-type]
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._db = SqliteBackend(self.data_dir)
            self.path = self._db.path
        try:
            self._db.install_schema(SCHEMA_VERSION)
            self._db.hold_owner(self.owner)
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def open(cls, target: str | Path) -> Store:
        """A ``postgresql://`` (or ``postgres://``) URL opens PostgreSQL, anything else is a
        SQLite data directory."""
        if is_database_url(target):
            return cls(database_url=str(target))
        return cls(target)

    @property
    def backend(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self._db.kind

    def describe(self) -> str:
        """Where the data is, for logs (a URL without its password)."""
        return redact_url(self.database_url) if self.database_url else str(self.path)

    # -- plumbing -------------------------------------------------------------------------
    def _tx(self, collection_id: str | None = None) -> AbstractContextManager[Tx]:
        """One write transaction; committed (durably) on success, rolled back on error. With
        a ``collection_id`` it runs alone among that collection's transactions, in every
        process on the database, so it may read, decide and write."""
        return self._db.tx(None if collection_id is None else f"collection:{collection_id}")

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        return self._db.query(sql, args)

    def exclusive(self, name: str) -> AbstractContextManager[None]:
        """Hold the lock ``name`` against every other thread and process using this database
        (re-entrant within a thread). SQLite: an ``flock`` file; PostgreSQL: a session
        advisory lock, released by the server if the process dies."""
        return self._db.exclusive(name)

    def close(self) -> None:
        """Close (idempotent). SQLite: checkpoint the WAL into the main file first, so a clean
        shutdown leaves one file."""
        self._db.close()

    def _audit(self, db: Tx, collection_id: str, action: str, actor: str,
               detail: dict[str, Any]) -> None:
        db.execute(
            "INSERT INTO audit (collection_id, action, actor, detail, at) VALUES (?, ?, ?, ?, ?)",
            (collection_id, action, actor, json.dumps(detail, sort_keys=True), _now()),
        )

    def _bump_answers_epoch(self, db: Tx, collection_id: str) -> None:
        db.execute("INSERT INTO counters (collection_id, name, value) VALUES (?, ?, 1)"
                   " ON CONFLICT (collection_id, name) DO UPDATE SET value = counters.value + 1",
                   (collection_id, ANSWERS_EPOCH))

    # -- collections ----------------------------------------------------------------------
    def create_collection(self, collection_id: str, *, species: str = "", model_name: str = "",
                          model_version: str = "", params: dict[str, Any] | None = None) -> Collection:
        if not collection_id:
            raise InvalidArgument("collection id must be a non-empty string")
        with self._tx(collection_id) as db:
            exists = db.execute("SELECT 1 FROM collections WHERE id = ?", (collection_id,)).fetchone()
            if exists:
                raise AlreadyExists(f"collection {collection_id!r} already exists")
            db.execute(
                "INSERT INTO collections (id, species, model_name, model_version, params, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (collection_id, species, model_name, model_version,
                 json.dumps(params or {}, sort_keys=True), _now()),
            )
            self._audit(db, collection_id, "create_collection", "", {"species": species})
        return self.get_collection(collection_id)

    def get_collection(self, collection_id: str) -> Collection:
        rows = self._query("SELECT * FROM collections WHERE id = ?", (collection_id,))
        if not rows:
            raise NotFound(f"collection {collection_id!r} does not exist")
        return _collection(rows[0])

    def list_collections(self) -> list[Collection]:
        return [_collection(r) for r in self._query("SELECT * FROM collections ORDER BY created_at, id")]

    def delete_collection(self, collection_id: str, *, actor: str = "") -> None:
        """Delete the collection and everything of it (cascades; training jobs explicitly,
        as their table has no foreign key in older databases). The audit log stays."""
        with self._tx(collection_id) as db:
            cur = db.execute("DELETE FROM collections WHERE id = ?", (collection_id,))
            if cur.rowcount == 0:
                raise NotFound(f"collection {collection_id!r} does not exist")
            db.execute("DELETE FROM training_jobs WHERE collection_id = ?", (collection_id,))
            self._audit(db, collection_id, "delete_collection", actor, {})

    def set_cycle(self, collection_id: str, cycle: int) -> None:
        with self._tx(collection_id) as db:
            db.execute("UPDATE collections SET cycle = ? WHERE id = ?", (cycle, collection_id))

    # -- images and vectors ---------------------------------------------------------------
    def add_images(self, collection_id: str, images: Iterable[ImageRecord]) -> tuple[int, int]:
        """Add images idempotently per image id (:meth:`ingest` without sources or
        vectors). Returns (added, already_present)."""
        return self.ingest(collection_id, list(images), {})

    def images(self, collection_id: str, *, include_excluded: bool = True) -> list[ImageRecord]:
        """Images in ingest order."""
        sql = "SELECT * FROM images WHERE collection_id = ?"
        if not include_excluded:
            sql += " AND excluded_reason IS NULL"
        rows = self._query(sql + " ORDER BY seq", (collection_id,))
        return [ImageRecord(r["image_id"], r["uri"], r["name"], json.loads(r["metadata"])) for r in rows]

    def excluded_images(self, collection_id: str) -> dict[str, str]:
        rows = self._query(
            "SELECT image_id, excluded_reason FROM images"
            " WHERE collection_id = ? AND excluded_reason IS NOT NULL",
            (collection_id,),
        )
        return {r["image_id"]: r["excluded_reason"] for r in rows}

    def exclude_image(self, collection_id: str, image_id: str, reason: str, *, actor: str = "") -> None:
        with self._tx(collection_id) as db:
            cur = db.execute(
                "UPDATE images SET excluded_reason = ? WHERE collection_id = ? AND image_id = ?",
                (reason or "excluded", collection_id, image_id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"image {image_id!r} is not in collection {collection_id!r}")
            self._bump_answers_epoch(db, collection_id)
            self._audit(db, collection_id, "exclude_image", actor, {"image_id": image_id, "reason": reason})

    def delete_image(self, collection_id: str, image_id: str, *, actor: str = "") -> int:
        """Delete one image: its record, source, vectors of every version and saved
        identity, in one audited transaction. Answers about it stay stored but are retired
        (marked deleted by ``actor``, superseded ones too), so they never apply again, not
        even to a later image with the same id; answers about other images are untouched.
        Returns how many answers were retired. NotFound for an unknown collection or image.
        The caller collects the image's blob (Runtime.gc_blobs)."""
        self.get_collection(collection_id)
        with self._tx(collection_id) as db:
            cur = db.execute("DELETE FROM images WHERE collection_id = ? AND image_id = ?",
                             (collection_id, image_id))
            if cur.rowcount == 0:
                raise NotFound(f"image {image_id!r} is not in collection {collection_id!r}")
            for table in ("image_sources", "vectors", "identities"):
                db.execute(f"DELETE FROM {table} WHERE collection_id = ? AND image_id = ?",
                           (collection_id, image_id))
            retired = db.execute(
                "UPDATE answers SET deleted_at = ?, deleted_by = ? WHERE collection_id = ?"
                " AND (image_a = ? OR image_b = ?) AND deleted_at IS NULL",
                (_now(), actor, collection_id, image_id, image_id)).rowcount
            self._bump_answers_epoch(db, collection_id)
            self._audit(db, collection_id, "delete_image", actor,
                        {"image_id": image_id, "answers_retired": retired})
        return int(retired)

    def put_vectors(self, collection_id: str, model_name: str, model_version: str,
                    image_ids: Sequence[str], vectors: np.ndarray) -> None:
        """Store vectors of images of the collection; those of an image deleted meanwhile
        (:meth:`delete_image` while EmbedCollection ran) are dropped, so a later image with
        the same id never inherits them."""
        vecs = np.ascontiguousarray(vectors, dtype=np.float32)
        if vecs.ndim != 2 or vecs.shape[0] != len(image_ids):
            raise InvalidArgument(
                f"got {len(image_ids)} image ids but vectors of shape {vecs.shape}"
            )
        with self._tx(collection_id) as db:
            present = {r[0] for marks, chunk in self._id_chunks(image_ids)
                       for r in db.execute(f"SELECT image_id FROM images WHERE collection_id = ?"
                                           f" AND image_id IN ({marks})",
                                           (collection_id, *chunk)).fetchall()}
            keep = [k for k, iid in enumerate(image_ids) if iid in present]
            self._insert_vectors(db, collection_id, model_name, model_version,
                                 [image_ids[k] for k in keep], vecs[keep])

    def get_vectors(self, collection_id: str, model_name: str,
                    model_version: str) -> tuple[list[str], np.ndarray]:
        """Vectors of one model version, in ingest order of the images (excluded ones included)."""
        rows = self._query(
            "SELECT v.image_id, v.vector FROM vectors v JOIN images i"
            " ON i.collection_id = v.collection_id AND i.image_id = v.image_id"
            " WHERE v.collection_id = ? AND v.model_name = ? AND v.model_version = ? ORDER BY i.seq",
            (collection_id, model_name, model_version),
        )
        if not rows:
            return [], np.empty((0, 0), dtype=np.float32)
        ids = [r["image_id"] for r in rows]
        mat = np.stack([np.frombuffer(r["vector"], dtype=np.float32) for r in rows])
        return ids, mat

    # -- answers --------------------------------------------------------------------------
    def replayed_response(self, collection_id: str, request_id: str) -> dict[str, Any] | None:
        """The stored response of an earlier request with this id, for idempotent replay."""
        if not request_id:
            return None
        rows = self._query(
            "SELECT response FROM requests WHERE collection_id = ? AND request_id = ?",
            (collection_id, request_id),
        )
        return json.loads(rows[0]["response"]) if rows else None

    def submit_answers(self, collection_id: str, answers: Sequence[AnswerIn], *,
                       request_id: str = "", response: dict[str, Any] | None = None) -> list[int]:
        """Store answers durably in one transaction; returns their sequence numbers.

        A later answer on the same pair supersedes the earlier one (``superseded_by``), whose
        row is kept for the audit history. With a ``request_id`` the (caller-built) response is
        stored in the same transaction, so a retried request can be replayed exactly.
        """
        self._check_answers(collection_id, answers)
        with self._tx(collection_id) as db:
            seqs = self._insert_answers(db, collection_id, answers, request_id)
            if request_id:
                db.execute(
                    "INSERT INTO requests (collection_id, request_id, response, created_at)"
                    " VALUES (?, ?, ?, ?)",
                    (collection_id, request_id, json.dumps(response or {"seqs": seqs}), _now()),
                )
        return seqs

    def submit_answers_once(
        self,
        collection_id: str,
        answers: Sequence[AnswerIn],
        *,
        request_id: str = "",
        respond: Callable[[list[int]], dict[str, Any]] | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Store answers unless ``request_id`` was seen; returns ``(response, replayed)``.

        The replay check, the inserts and the stored response share one transaction, so two
        concurrent retries of one request store it once. ``respond(seqs)`` builds the response
        inside that transaction, after the inserts: it may read the store (same connection)
        and sees the new answers, so contradiction checks cover exactly what was committed.
        The default response is ``{"seqs": seqs}``.
        """
        self._check_answers(collection_id, answers)
        with self._tx(collection_id) as db:
            if request_id:
                row = db.execute(
                    "SELECT response FROM requests WHERE collection_id = ? AND request_id = ?",
                    (collection_id, request_id),
                ).fetchone()
                if row is not None:
                    return json.loads(row["response"]), True
            seqs = self._insert_answers(db, collection_id, answers, request_id)
            response = respond(seqs) if respond is not None else {"seqs": seqs}
            if request_id:
                db.execute(
                    "INSERT INTO requests (collection_id, request_id, response, created_at)"
                    " VALUES (?, ?, ?, ?)",
                    (collection_id, request_id, json.dumps(response), _now()),
                )
        return response, False

    def _check_answers(self, collection_id: str, answers: Sequence[AnswerIn]) -> None:
        self.get_collection(collection_id)
        known = self.present_image_ids(collection_id,  # only these: collections are large
                                       {i for a in answers for i in (a.image_a, a.image_b)})
        for a in answers:
            if a.label not in LABELS:
                raise InvalidArgument(f"answer label must be one of {LABELS}, got {a.label!r}")
            for iid in (a.image_a, a.image_b):
                if iid not in known:
                    raise NotFound(f"image {iid!r} is not in collection {collection_id!r}")
            if a.image_a == a.image_b:
                raise InvalidArgument(f"an answer pairs image {a.image_a!r} with itself")

    def _insert_answers(self, db: Tx, collection_id: str,
                        answers: Sequence[AnswerIn], request_id: str) -> list[int]:
        seqs: list[int] = []
        for a in answers:
            lo, hi = sorted((a.image_a, a.image_b))
            cur = db.execute(
                "INSERT INTO answers (collection_id, image_a, image_b, label, annotator, confidence,"
                " tags, note, started_at, ended_at, received_at, batch_id, pair_id, request_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING seq",
                (collection_id, lo, hi, a.label, a.annotator, a.confidence,
                 json.dumps(list(a.tags)), a.note, a.started_at, a.ended_at, _now(),
                 a.batch_id, a.pair_id, request_id),
            )
            seq = int(cur.fetchall()[0][0])
            db.execute(
                "UPDATE answers SET superseded_by = ? WHERE collection_id = ? AND image_a = ?"
                " AND image_b = ? AND seq < ? AND superseded_by IS NULL AND deleted_at IS NULL",
                (seq, collection_id, lo, hi, seq),
            )
            seqs.append(seq)
        return seqs

    def answers(self, collection_id: str, *, current_only: bool = True) -> list[StoredAnswer]:
        """Answers in the order given; ``current_only`` hides superseded and deleted ones."""
        sql = "SELECT * FROM answers WHERE collection_id = ?"
        if current_only:
            sql += " AND superseded_by IS NULL AND deleted_at IS NULL"
        return [_answer(r) for r in self._query(sql + " ORDER BY seq", (collection_id,))]

    def delete_answer(self, collection_id: str, seq: int, *, actor: str = "",
                      reason: str = "") -> int | None:
        """Soft-delete (audited): the row stays, marked deleted; the previous answer on the pair,
        if any, becomes current again. Returns the seq of the answer made current again, if
        deleting made one current (None when the deleted answer was not the current one)."""
        with self._tx(collection_id) as db:
            row = db.execute(
                "SELECT image_a, image_b, deleted_at FROM answers WHERE collection_id = ? AND seq = ?",
                (collection_id, seq),
            ).fetchone()
            if row is None or row["deleted_at"] is not None:
                raise NotFound(f"answer {seq} does not exist in collection {collection_id!r}")
            db.execute("UPDATE answers SET deleted_at = ?, deleted_by = ? WHERE seq = ?",
                       (_now(), actor, seq))
            prev = db.execute(
                "SELECT MAX(seq) FROM answers WHERE collection_id = ? AND image_a = ? AND image_b = ?"
                " AND deleted_at IS NULL",
                (collection_id, row["image_a"], row["image_b"]),
            ).fetchone()[0]
            restored = None
            if prev is not None:
                cur = db.execute("UPDATE answers SET superseded_by = NULL WHERE seq = ?"
                                 " AND superseded_by IS NOT NULL", (prev,))
                restored = int(prev) if cur.rowcount else None
            self._bump_answers_epoch(db, collection_id)
            self._audit(db, collection_id, "delete_answer", actor, {"seq": seq, "reason": reason})
        return restored

    # -- schema 2: image sources, ingest, counts --------------------------------------------
    def ping(self) -> bool:
        """True when the database answers (the readiness probe of the stateful services)."""
        return self._db.ping()

    def set_model(self, collection_id: str, model_name: str, model_version: str, *,
                  actor: str = "") -> None:
        """Switch the collection to another model version (audited)."""
        with self._tx(collection_id) as db:
            cur = db.execute("UPDATE collections SET model_name = ?, model_version = ? WHERE id = ?",
                             (model_name, model_version, collection_id))
            if cur.rowcount == 0:
                raise NotFound(f"collection {collection_id!r} does not exist")
            self._audit(db, collection_id, "set_model", actor,
                        {"model_name": model_name, "model_version": model_version})

    def image_sources(self, collection_id: str,
                      image_ids: Iterable[str] | None = None) -> dict[str, ImageSource]:
        """Where the pixels of (some of) a collection's images are, by image id (only the
        rows of ``image_ids`` are read when given: one image costs one indexed lookup)."""
        sql = "SELECT image_id, kind, sha256, size FROM image_sources WHERE collection_id = ?"
        rows = ([r for marks, chunk in self._id_chunks(image_ids)
                 for r in self._query(f"{sql} AND image_id IN ({marks})", (collection_id, *chunk))]
                if image_ids is not None else self._query(sql, (collection_id,)))
        return {r["image_id"]: ImageSource(r["kind"], r["sha256"], r["size"]) for r in rows}

    def image_record(self, collection_id: str, image_id: str) -> ImageRecord:
        """One image of the collection (NotFound when it is not one)."""
        rows = self._query("SELECT * FROM images WHERE collection_id = ? AND image_id = ?",
                           (collection_id, image_id))
        if not rows:
            raise NotFound(f"image {image_id!r} is not in collection {collection_id!r}")
        r = rows[0]
        return ImageRecord(r["image_id"], r["uri"], r["name"], json.loads(r["metadata"]))

    @staticmethod
    def _id_chunks(ids: Iterable[Any], size: int = 500) -> list[tuple[str, list[Any]]]:
        """(placeholders, ids) per chunk of at most ``size`` distinct ids (SQLite's
        bound-parameter limit)."""
        wanted = sorted(set(ids))
        return [(",".join("?" * len(wanted[k:k + size])), wanted[k:k + size])
                for k in range(0, len(wanted), size)]

    def referenced_blobs(self) -> set[str]:
        """SHA-256 of every blob some image of some collection still uses."""
        return {r[0] for r in self._query("SELECT DISTINCT sha256 FROM image_sources"
                                          " WHERE kind = 'data'")}

    def present_image_ids(self, collection_id: str, image_ids: Iterable[str]) -> set[str]:
        """The ids among ``image_ids`` that are images of the collection."""
        out: set[str] = set()
        for marks, chunk in self._id_chunks(image_ids):
            out.update(r[0] for r in self._query(
                f"SELECT image_id FROM images WHERE collection_id = ? AND image_id IN ({marks})",
                (collection_id, *chunk)))
        return out

    def vector_ids(self, collection_id: str, model_name: str, model_version: str) -> set[str]:
        """Ids of the images that have a vector of this model version."""
        rows = self._query(
            "SELECT image_id FROM vectors WHERE collection_id = ? AND model_name = ?"
            " AND model_version = ?", (collection_id, model_name, model_version))
        return {r["image_id"] for r in rows}

    def ingest(
        self,
        collection_id: str,
        images: Sequence[ImageRecord],
        sources: Mapping[str, ImageSource],
        *,
        model_name: str = "",
        model_version: str = "",
        vector_ids: Sequence[str] = (),
        vectors: np.ndarray | None = None,
    ) -> tuple[int, int]:
        """Add images with their sources and vectors in one transaction: all or nothing.

        Idempotent per image id (an id already present keeps its record and source).
        Vectors are stored for ``vector_ids`` under the model version; a collection whose
        model version is still empty is pinned to ``model_version``, and vectors of any
        other version than the collection's are refused.
        Returns (added, already_present).
        """
        vecs = None
        if vectors is not None or len(vector_ids):
            vecs = np.ascontiguousarray(vectors, dtype=np.float32)
            if vecs.ndim != 2 or vecs.shape[0] != len(vector_ids):
                raise InvalidArgument(
                    f"got {len(vector_ids)} image ids but vectors of shape {vecs.shape}")
            if not model_name or not model_version:
                raise InvalidArgument("vectors need a model name and version")
        added = present = 0
        with self._tx(collection_id) as db:
            self._pin_model(db, collection_id, model_name if vecs is not None else None,
                            model_version)
            (seq,) = db.execute(
                "SELECT COALESCE(MAX(seq) + 1, 0) FROM images WHERE collection_id = ?",
                (collection_id,),
            ).fetchone()
            now = _now()
            for img in images:
                if not img.image_id:
                    raise InvalidArgument("image id must be a non-empty string")
                cur = db.execute(
                    "INSERT INTO images (collection_id, image_id, seq, uri, name, metadata, added_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                    (collection_id, img.image_id, seq, img.uri, img.name,
                     json.dumps(img.metadata, sort_keys=True), now),
                )
                if cur.rowcount:
                    added += 1
                    seq += 1
                    src = sources.get(img.image_id)
                    if src is not None:
                        db.execute(
                            "INSERT INTO image_sources (collection_id, image_id, kind, sha256,"
                            " size) VALUES (?, ?, ?, ?, ?) ON CONFLICT (collection_id, image_id)"
                            " DO UPDATE SET kind = excluded.kind, sha256 = excluded.sha256,"
                            " size = excluded.size",
                            (collection_id, img.image_id, src.kind, src.sha256, src.size))
                else:
                    present += 1
            if vecs is not None and len(vector_ids):
                self._insert_vectors(db, collection_id, model_name, model_version,
                                     vector_ids, vecs)
        return added, present

    def _pin_model(self, db: Tx, collection_id: str, model_name: str | None,
                   model_version: str) -> None:
        """NotFound for an unknown collection; with a model (vectors about to be stored):
        pin a collection that pins no version yet to it, refuse vectors of any other
        model version than the one it pins (one model per collection)."""
        col = db.execute("SELECT model_name, model_version FROM collections WHERE id = ?",
                         (collection_id,)).fetchone()
        if col is None:
            raise NotFound(f"collection {collection_id!r} does not exist")
        if model_name is None:
            return
        if col["model_version"] == "":
            db.execute("UPDATE collections SET model_name = ?, model_version = ?"
                       " WHERE id = ?", (model_name, model_version, collection_id))
        elif (col["model_name"], col["model_version"]) != (model_name, model_version):
            raise FailedPrecondition(
                f"collection {collection_id!r} uses model {col['model_name']} version "
                f"{col['model_version']}, not {model_name} version {model_version}")

    @staticmethod
    def _insert_vectors(db: Tx, collection_id: str, model_name: str, model_version: str,
                        image_ids: Sequence[str], vecs: np.ndarray) -> None:
        db.executemany(
            "INSERT INTO vectors (collection_id, model_name, model_version, image_id,"
            " vector) VALUES (?, ?, ?, ?, ?) ON CONFLICT (collection_id, model_name,"
            " model_version, image_id) DO UPDATE SET vector = excluded.vector",
            [(collection_id, model_name, model_version, iid, v.tobytes())
             for iid, v in zip(image_ids, vecs, strict=True)],
        )

    def add_vectors(self, collection_id: str, model_name: str, model_version: str,
                    image_ids: Sequence[str], vectors: np.ndarray, *, actor: str = "") -> None:
        """Store vectors computed elsewhere for images already in the collection, in one
        transaction (audited): NotFound for an image that is not one, the collection pinned
        as :meth:`ingest` pins it, and InvalidArgument when their length differs from the
        stored vectors of that version (checked inside the transaction, so two writers
        cannot store two lengths)."""
        vecs = np.ascontiguousarray(vectors, dtype=np.float32)
        with self._tx(collection_id) as db:
            self._pin_model(db, collection_id, model_name, model_version)
            present = {r[0] for marks, chunk in self._id_chunks(image_ids)
                       for r in db.execute(f"SELECT image_id FROM images WHERE collection_id = ?"
                                           f" AND image_id IN ({marks})",
                                           (collection_id, *chunk)).fetchall()}
            missing = [iid for iid in image_ids if iid not in present]
            if missing:
                raise NotFound(f"image(s) not in collection {collection_id!r}: {missing[:20]}")
            row = db.execute("SELECT vector FROM vectors WHERE collection_id = ? AND"
                             " model_name = ? AND model_version = ? LIMIT 1",
                             (collection_id, model_name, model_version)).fetchone()
            if row is not None and len(row[0]) // 4 != vecs.shape[1]:
                raise InvalidArgument(
                    f"vectors have {vecs.shape[1]} components but the stored vectors of "
                    f"{model_name} version {model_version} have {len(row[0]) // 4}")
            self._insert_vectors(db, collection_id, model_name, model_version, image_ids, vecs)
            # a replaced vector changes what sampling reads: no cached state may be served
            self._bump_answers_epoch(db, collection_id)
            self._audit(db, collection_id, "add_vectors", actor,
                        {"model_name": model_name, "model_version": model_version,
                         "count": len(image_ids)})

    def list_images(self, collection_id: str, *, after_seq: int = -1,
                    limit: int | None = None) -> list[ImageRow]:
        """Images in ingest order after position ``after_seq`` (for paging)."""
        sql = "SELECT * FROM images WHERE collection_id = ? AND seq > ? ORDER BY seq"
        args: list[Any] = [collection_id, after_seq]
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        return [ImageRow(r["seq"], r["image_id"], r["uri"], r["name"], json.loads(r["metadata"]),
                         r["excluded_reason"], r["added_at"]) for r in self._query(sql, args)]

    def restore_image(self, collection_id: str, image_id: str, *, actor: str = "") -> None:
        """Undo :meth:`exclude_image` (audited)."""
        with self._tx(collection_id) as db:
            cur = db.execute(
                "UPDATE images SET excluded_reason = NULL WHERE collection_id = ? AND image_id = ?",
                (collection_id, image_id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"image {image_id!r} is not in collection {collection_id!r}")
            self._bump_answers_epoch(db, collection_id)
            self._audit(db, collection_id, "restore_image", actor, {"image_id": image_id})

    def counts(self, collection_id: str) -> dict[str, int]:
        """Images, excluded images, images with a vector of the collection's model, current
        answers and pairs asked so far."""
        col = self.get_collection(collection_id)
        q = self._query(
            "SELECT"
            " (SELECT COUNT(*) FROM images WHERE collection_id = ?) AS images,"
            " (SELECT COUNT(*) FROM images WHERE collection_id = ?"
            "   AND excluded_reason IS NOT NULL) AS excluded,"
            " (SELECT COUNT(*) FROM vectors v JOIN images i ON i.collection_id = v.collection_id"
            "   AND i.image_id = v.image_id WHERE v.collection_id = ? AND v.model_name = ?"
            "   AND v.model_version = ?) AS embedded,"
            " (SELECT COUNT(*) FROM answers WHERE collection_id = ? AND superseded_by IS NULL"
            "   AND deleted_at IS NULL) AS answers,"
            " (SELECT COUNT(*) FROM batch_pairs WHERE collection_id = ?) AS pairs_asked",
            (collection_id, collection_id, collection_id, col.model_name, col.model_version,
             collection_id, collection_id),
        )[0]
        return {k: int(q[k]) for k in ("images", "excluded", "embedded", "answers", "pairs_asked")}

    # -- answers: lookups and paging ----------------------------------------------------------
    def answer(self, collection_id: str, seq: int) -> StoredAnswer:
        rows = self._query("SELECT * FROM answers WHERE collection_id = ? AND seq = ?",
                           (collection_id, int(seq)))
        if not rows:
            raise NotFound(f"answer {seq} does not exist in collection {collection_id!r}")
        return _answer(rows[0])

    def answers_by_seq(self, collection_id: str, seqs: Iterable[int]) -> dict[int, StoredAnswer]:
        return {r["seq"]: _answer(r) for marks, chunk in self._id_chunks(int(s) for s in seqs)
                for r in self._query(f"SELECT * FROM answers WHERE collection_id = ?"
                                     f" AND seq IN ({marks})", (collection_id, *chunk))}

    def list_answers(
        self,
        collection_id: str,
        *,
        image_id: str = "",
        annotator: str = "",
        label: str = "",
        batch_id: str = "",
        include_history: bool = False,
        before_seq: int | None = None,
        limit: int = 100,
    ) -> list[StoredAnswer]:
        """Answers newest first, filtered; page with ``before_seq`` = last seq of a page."""
        sql = "SELECT * FROM answers WHERE collection_id = ?"
        args: list[Any] = [collection_id]
        if not include_history:
            sql += " AND superseded_by IS NULL AND deleted_at IS NULL"
        if image_id:
            sql += " AND (image_a = ? OR image_b = ?)"
            args += [image_id, image_id]
        for column, value in (("annotator", annotator), ("label", label), ("batch_id", batch_id)):
            if value:
                sql += f" AND {column} = ?"
                args.append(value)
        if before_seq is not None:
            sql += " AND seq < ?"
            args.append(int(before_seq))
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(int(limit))
        return [_answer(r) for r in self._query(sql, args)]

    def count_superseded_by(self, collection_id: str, seqs: Sequence[int]) -> int:
        """How many answers the answers ``seqs`` superseded."""
        return sum(int(self._query(f"SELECT COUNT(*) FROM answers WHERE collection_id = ?"
                                   f" AND superseded_by IN ({marks})", (collection_id, *chunk))[0][0])
                   for marks, chunk in self._id_chunks(int(s) for s in seqs))

    def answer_log_version(self, collection_id: str) -> AnswerLogVersion:
        """Where the collection's answers stand (three indexed lookups; NotFound when the
        collection does not exist). Inside a write transaction it sees that transaction's
        inserts."""
        rows = self._query(
            "SELECT c.created_at,"
            " (SELECT value FROM counters WHERE collection_id = c.id AND name = ?) AS epoch,"
            " (SELECT MAX(seq) FROM answers WHERE collection_id = c.id) AS max_seq"
            " FROM collections c WHERE c.id = ?", (ANSWERS_EPOCH, collection_id))
        if not rows:
            raise NotFound(f"collection {collection_id!r} does not exist")
        r = rows[0]
        return AnswerLogVersion(float(r["created_at"]), int(r["epoch"] or 0),
                                -1 if r["max_seq"] is None else int(r["max_seq"]))

    def answer_rows(self, collection_id: str, *, after_seq: int | None = None) -> list[AnswerRow]:
        """Answers in seq order: the current ones (``after_seq`` None), or every one newer
        than ``after_seq`` whether superseded since or not (what a cached state catches up
        with, together with :meth:`supersessions_after`)."""
        if after_seq is None:
            sql, args = (" AND superseded_by IS NULL AND deleted_at IS NULL", ())
        else:
            sql, args = " AND seq > ?", (int(after_seq),)
        rows = self._query("SELECT seq, image_a, image_b, label FROM answers"
                           f" WHERE collection_id = ?{sql} ORDER BY seq", (collection_id, *args))
        return [AnswerRow._make(r) for r in rows]

    def supersessions_after(self, collection_id: str, after_seq: int) -> list[tuple[int, int]]:
        """(superseded seq, superseding seq) for the answers newer than ``after_seq`` that
        superseded another, by superseding seq."""
        rows = self._query("SELECT seq, superseded_by FROM answers WHERE collection_id = ?"
                           " AND superseded_by > ? ORDER BY superseded_by, seq",
                           (collection_id, int(after_seq)))
        return [(int(r[0]), int(r[1])) for r in rows]

    # -- query batches --------------------------------------------------------------------
    def create_batch(
        self,
        collection_id: str,
        make_id: Callable[[int], str],
        pairs: Sequence[PairRecord],
        *,
        budget: int,
        reason: str,
        finished: bool,
        model_name: str,
        model_version: str,
        filter: Mapping[str, Any] | None = None,
        n_items: int = 0,
        stats: Mapping[str, Any] | None = None,
        request_id: str = "",
    ) -> tuple[BatchRecord, bool]:
        """Store a batch as the collection's next cycle; returns ``(batch, created)``.

        One transaction: the cycle counter moves to the new cycle, ``make_id(cycle)`` names
        the batch, and its pairs are stored, so a batch id and its pair ids are resolvable
        the moment a client sees them. Pair ids are assigned here as ``"<batch id>/<k>"``
        (k = draw position); the ``pair_id`` of the records passed in is ignored. With a
        ``request_id`` already used by a batch of this collection, that batch is returned
        instead (``created`` False) and nothing changes.
        """
        with self._tx(collection_id) as db:
            if request_id:
                row = db.execute(
                    _BATCH_OF_REQUEST,
                    (collection_id, request_id, request_id)).fetchone()
                if row is not None:
                    return _batch(row), False
            col = db.execute("SELECT cycle FROM collections WHERE id = ?",
                             (collection_id,)).fetchone()
            if col is None:
                raise NotFound(f"collection {collection_id!r} does not exist")
            cycle = int(col["cycle"]) + 1
            batch_id = make_id(cycle)
            now = _now()
            db.execute(
                "INSERT INTO batches (collection_id, batch_id, cycle, budget, reason, finished,"
                " model_name, model_version, filter, n_items, stats, request_id, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (collection_id, batch_id, cycle, int(budget), reason, int(bool(finished)),
                 model_name, model_version, json.dumps(dict(filter or {}), sort_keys=True),
                 int(n_items), json.dumps(dict(stats or {}), sort_keys=True, default=float),
                 request_id, now),
            )
            db.executemany(
                "INSERT INTO batch_pairs (collection_id, pair_id, batch_id, position, image_a,"
                " image_b, pool, region, probability, similarity)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(collection_id, f"{batch_id}/{k}", batch_id, k, p.image_a, p.image_b,
                  p.pool, int(p.region), float(p.probability), float(p.similarity))
                 for k, p in enumerate(pairs)],
            )
            db.execute("UPDATE collections SET cycle = ? WHERE id = ?", (cycle, collection_id))
            row = db.execute("SELECT * FROM batches WHERE collection_id = ? AND batch_id = ?",
                             (collection_id, batch_id)).fetchone()
        return _batch(row), True

    def batch(self, collection_id: str, batch_id: str) -> BatchRecord:
        rows = self._query("SELECT * FROM batches WHERE collection_id = ? AND batch_id = ?",
                           (collection_id, batch_id))
        if not rows:
            self.get_collection(collection_id)
            raise NotFound(f"batch {batch_id!r} does not exist in collection {collection_id!r}")
        return _batch(rows[0])

    def batch_by_request(self, collection_id: str, request_id: str) -> BatchRecord | None:
        """The batch a request id created, or was answered with (:meth:`record_batch_request`)."""
        if not request_id:
            return None
        rows = self._query(
            _BATCH_OF_REQUEST,
            (collection_id, request_id, request_id))
        return _batch(rows[0]) if rows else None

    def record_batch_request(self, collection_id: str, request_id: str, batch_id: str) -> BatchRecord:
        """Answer ``request_id`` with the existing batch ``batch_id`` (a retry gets it again);
        a request id already used keeps its first batch, which is returned."""
        with self._tx(collection_id) as db:
            db.execute("INSERT INTO batch_requests (collection_id, request_id, batch_id)"
                       " SELECT ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM batches WHERE"
                       " collection_id = ? AND request_id = ?) ON CONFLICT DO NOTHING",
                       (collection_id, request_id, batch_id, collection_id, request_id))
        batch = self.batch_by_request(collection_id, request_id)
        assert batch is not None
        return batch

    def newest_batch(self, collection_id: str) -> BatchRecord | None:
        rows = self._query("SELECT * FROM batches WHERE collection_id = ? ORDER BY cycle DESC"
                           " LIMIT 1", (collection_id,))
        return _batch(rows[0]) if rows else None

    def image_count(self, collection_id: str) -> tuple[int, int]:
        """(images, newest image position): what tells that images were added or removed."""
        r = self._query("SELECT COUNT(*), COALESCE(MAX(seq), -1) FROM images"
                        " WHERE collection_id = ?", (collection_id,))[0]
        return int(r[0]), int(r[1])

    def batches(self, collection_id: str, *, after_cycle: int = 0) -> list[BatchRecord]:
        """Batches with a cycle above ``after_cycle``, oldest first."""
        rows = self._query("SELECT * FROM batches WHERE collection_id = ? AND cycle > ?"
                           " ORDER BY cycle", (collection_id, int(after_cycle)))
        return [_batch(r) for r in rows]

    def batch_pairs(self, collection_id: str, batch_id: str) -> list[tuple[PairRecord, bool]]:
        """The batch's pairs in draw order, each with whether it has a current answer now."""
        rows = self._query(
            "SELECT p.*, EXISTS (SELECT 1 FROM answers a WHERE a.collection_id = p.collection_id"
            " AND a.image_a = p.image_a AND a.image_b = p.image_b AND a.superseded_by IS NULL"
            " AND a.deleted_at IS NULL) AS answered"
            " FROM batch_pairs p WHERE p.collection_id = ? AND p.batch_id = ? ORDER BY p.position",
            (collection_id, batch_id),
        )
        return [(_pair(r), bool(r["answered"])) for r in rows]

    def pairs_by_id(self, collection_id: str,
                    pair_ids: Iterable[str]) -> dict[str, tuple[str, PairRecord]]:
        """pair id -> (batch id, pair) for the ids that exist."""
        return {r["pair_id"]: (r["batch_id"], _pair(r))
                for marks, chunk in self._id_chunks(pair_ids)
                for r in self._query(f"SELECT * FROM batch_pairs WHERE collection_id = ?"
                                     f" AND pair_id IN ({marks})", (collection_id, *chunk))}

    def pending_pairs(self, collection_id: str) -> list[tuple[str, str]]:
        """Pairs asked in some batch that have no non-deleted answer yet."""
        rows = self._query(
            "SELECT DISTINCT p.image_a, p.image_b FROM batch_pairs p WHERE p.collection_id = ?"
            " AND NOT EXISTS (SELECT 1 FROM answers a WHERE a.collection_id = p.collection_id"
            " AND a.image_a = p.image_a AND a.image_b = p.image_b AND a.deleted_at IS NULL)",
            (collection_id,),
        )
        return [(r["image_a"], r["image_b"]) for r in rows]

    # -- identities -----------------------------------------------------------------------
    def identity_assignment(self, collection_id: str) -> dict[str, str]:
        """image id -> identity id of the last saved assignment."""
        rows = self._query("SELECT image_id, identity_id FROM identities WHERE collection_id = ?",
                           (collection_id,))
        return {r["image_id"]: r["identity_id"] for r in rows}

    def counter(self, collection_id: str, name: str, default: int = 0) -> int:
        rows = self._query("SELECT value FROM counters WHERE collection_id = ? AND name = ?",
                           (collection_id, name))
        return int(rows[0]["value"]) if rows else default

    def save_identities(self, collection_id: str, assignment: Mapping[str, str], *,
                        counter_name: str, counter_value: int) -> None:
        """Replace the saved assignment and move the id counter, in one transaction."""
        with self._tx(collection_id) as db:
            if db.execute("SELECT 1 FROM collections WHERE id = ?", (collection_id,)).fetchone() is None:
                raise NotFound(f"collection {collection_id!r} does not exist")
            db.execute("DELETE FROM identities WHERE collection_id = ?", (collection_id,))
            db.executemany(
                "INSERT INTO identities (collection_id, image_id, identity_id) VALUES (?, ?, ?)",
                [(collection_id, i, k) for i, k in assignment.items()],
            )
            db.execute("INSERT INTO counters (collection_id, name, value) VALUES (?, ?, ?)"
                       " ON CONFLICT (collection_id, name) DO UPDATE SET value = excluded.value",
                       (collection_id, counter_name, int(counter_value)))

    # -- operations -----------------------------------------------------------------------
    def create_operation(self, operation_id: str, collection_id: str, kind: str, *,
                         total: int = 0, result: Mapping[str, Any] | None = None) -> OperationRecord:
        now = _now()
        with self._tx(collection_id) as db:
            if db.execute("SELECT 1 FROM collections WHERE id = ?", (collection_id,)).fetchone() is None:
                raise NotFound(f"collection {collection_id!r} does not exist")
            db.execute(
                "INSERT INTO operations (operation_id, collection_id, kind, state, total, result,"
                " created_at, updated_at, owner) VALUES (?, ?, ?, 'PENDING', ?, ?, ?, ?, ?)",
                (operation_id, collection_id, kind, int(total), json.dumps(dict(result or {})),
                 now, now, self.owner),
            )
        return self.operation(operation_id)

    def update_operation(self, operation_id: str, *, state: str | None = None,
                         done: int | None = None, total: int | None = None,
                         stage: str | None = None, error_code: str | None = None,
                         error_message: str | None = None,
                         result: Mapping[str, Any] | None = None) -> None:
        """Change some fields of an operation (a no-op when its collection is gone)."""
        if state is not None and state not in OPERATION_STATES:
            raise InvalidArgument(f"operation state must be one of {OPERATION_STATES}, got {state!r}")
        sets, args = ["updated_at = ?"], [_now()]
        for column, value in (("state", state), ("done", done), ("total", total),
                              ("stage", stage), ("error_code", error_code),
                              ("error_message", error_message)):
            if value is not None:
                sets.append(f"{column} = ?")
                args.append(value)
        if result is not None:
            sets.append("result = ?")
            args.append(json.dumps(dict(result)))
        with self._tx() as db:
            db.execute(f"UPDATE operations SET {', '.join(sets)} WHERE operation_id = ?",
                       (*args, operation_id))

    def operation(self, operation_id: str) -> OperationRecord:
        rows = self._query("SELECT * FROM operations WHERE operation_id = ?", (operation_id,))
        if not rows:
            raise NotFound(f"operation {operation_id!r} does not exist")
        return _operation(rows[0])

    def operations(self, collection_id: str, *, unfinished_only: bool = False) -> list[OperationRecord]:
        sql = "SELECT * FROM operations WHERE collection_id = ?"
        if unfinished_only:
            sql += " AND state IN ('PENDING', 'RUNNING')"
        return [_operation(r) for r in self._query(sql + " ORDER BY created_at", (collection_id,))]

    def fail_unfinished_operations(self, message: str) -> int:
        """Mark FAILED (ABORTED) every PENDING or RUNNING operation that nobody runs any more:
        those of stores that are closed (their process stopped or died) and this store's own.
        Call once at start-up, before this store starts any: operations of other processes
        still open on the same database (replicas, other servers) are left alone."""
        return self._fail_abandoned("operations", ("PENDING", "RUNNING"),
                                    "state = 'FAILED', error_code = 'ABORTED', error_message = ?",
                                    (message,))

    def _fail_abandoned(self, table: str, states: Sequence[str], sets: str,
                        args: Sequence[Any]) -> int:
        marks = ", ".join("?" * len(states))
        owners = [r[0] for r in self._query(
            f"SELECT DISTINCT owner FROM {table} WHERE state IN ({marks})", tuple(states))]
        gone = [o for o in owners if o == self.owner or not self._db.owner_alive(o)]
        if not gone:
            return 0
        with self._tx() as db:
            cur = db.execute(
                f"UPDATE {table} SET {sets}, updated_at = ? WHERE state IN ({marks})"
                f" AND owner IN ({', '.join('?' * len(gone))})",
                (*args, _now(), *states, *gone))
            return int(cur.rowcount)

    def audit_log(self, collection_id: str) -> list[dict[str, Any]]:
        rows = self._query("SELECT * FROM audit WHERE collection_id = ? ORDER BY seq", (collection_id,))
        return [{"action": r["action"], "actor": r["actor"], "detail": json.loads(r["detail"]),
                 "at": r["at"]} for r in rows]

    # -- training jobs ----------------------------------------------------------------------
    def create_training_job(self, collection_id: str, config: Mapping[str, Any], *,
                            base_model_name: str, base_model_version: str) -> TrainingJobRecord:
        job_id = uuid.uuid4().hex
        now = _now()
        with self._tx(collection_id) as db:
            db.execute("INSERT INTO training_jobs (id, collection_id, state, config,"
                       " base_model_name, base_model_version, created_at, updated_at, owner)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (job_id, collection_id, JOB_QUEUED, json.dumps(dict(config), default=str),
                        base_model_name, base_model_version, now, now, self.owner))
        return self.get_training_job(job_id)

    def update_training_job(self, job_id: str, **changes: Any) -> bool:
        """Set columns of a job (``progress`` a dict); a final state is never left. False
        when nothing changed: the job is final already (e.g. cancelled while queued)."""
        unknown = set(changes) - _JOB_COLUMNS
        if unknown:
            raise InvalidArgument(f"training jobs have no column(s) {sorted(unknown)}")
        if "progress" in changes:
            changes["progress"] = json.dumps(changes["progress"])
        cols = ", ".join(f"{k} = ?" for k in changes)
        with self._tx() as db:
            cur = db.execute(f"UPDATE training_jobs SET {cols}, updated_at = ? WHERE id = ?"
                             " AND state NOT IN ('SUCCEEDED', 'FAILED', 'CANCELLED')",
                             (*changes.values(), _now(), job_id))
            return cur.rowcount > 0

    def request_training_job_cancel(self, job_id: str) -> TrainingJobRecord:
        """Record that the job must stop, where every replica sees it: the process running
        the job reads ``cancel_requested`` between training steps and ends it CANCELLED. A
        job nobody runs ends CANCELLED at once: one still QUEUED (its runner finds it final
        and never starts) or one whose owner's store is closed (its process is gone). A
        final job is left as it is. Returns the job as stored afterwards; NotFound for an
        unknown id."""
        rows = self._query("SELECT owner FROM training_jobs WHERE id = ?", (job_id,))
        if not rows:
            raise NotFound(f"training job {job_id!r} not found")
        owner = rows[0]["owner"]
        # Ids are per store instance, so a dead owner never comes back. But on PostgreSQL a
        # live owner's mark is also missing for a moment after a database restart (until its
        # next readiness probe takes it again): its job is then CANCELLED here while it still
        # runs, and it stops at its next check (cancel_requested is set too); only one in the
        # middle of its export exports anyway (logged by the runner, the job stays CANCELLED).
        orphaned = owner != self.owner and not self._db.owner_alive(owner)
        stop_now = (JOB_QUEUED, JOB_RUNNING if orphaned else JOB_QUEUED)
        with self._tx() as db:
            db.execute("UPDATE training_jobs SET cancel_requested = 1, updated_at = ?,"
                       " state = CASE WHEN state IN (?, ?) THEN ? ELSE state END"
                       " WHERE id = ? AND state NOT IN ('SUCCEEDED', 'FAILED', 'CANCELLED')",
                       (_now(), *stop_now, JOB_CANCELLED, job_id))
        return self.get_training_job(job_id)

    def get_training_job(self, job_id: str) -> TrainingJobRecord:
        rows = self._query("SELECT * FROM training_jobs WHERE id = ?", (job_id,))
        if not rows:
            raise NotFound(f"training job {job_id!r} not found")
        return _training_job(rows[0])

    def list_training_jobs(self, collection_id: str = "") -> list[TrainingJobRecord]:
        sql = "SELECT * FROM training_jobs"
        args: tuple[Any, ...] = ()
        if collection_id:
            sql += " WHERE collection_id = ?"
            args = (collection_id,)
        return [_training_job(r) for r in self._query(sql + " ORDER BY created_at, id", args)]

    def fail_interrupted_training_jobs(self, message: str) -> int:
        """Mark FAILED (ABORTED) every QUEUED or RUNNING job that nobody runs any more (as
        :meth:`fail_unfinished_operations` does for operations)."""
        return self._fail_abandoned("training_jobs", (JOB_QUEUED, JOB_RUNNING),
                                    "state = ?, error_code = 'ABORTED', error_message = ?",
                                    (JOB_FAILED, message))


#: The batch a request id created or was answered with (batch_requests), by request id.
_BATCH_OF_REQUEST = (
    "SELECT b.* FROM batches b WHERE b.collection_id = ? AND (b.request_id = ? OR"
    " b.batch_id IN (SELECT r.batch_id FROM batch_requests r"
    " WHERE r.collection_id = b.collection_id AND r.request_id = ?))")

_JOB_COLUMNS = frozenset({"state", "progress", "model_name", "model_version", "error_code",
                          "error_message"})


def _training_job(r: Any) -> TrainingJobRecord:
    return TrainingJobRecord(
        r["id"], r["collection_id"], r["state"], json.loads(r["config"]),
        json.loads(r["progress"]), r["base_model_name"], r["base_model_version"],
        r["model_name"], r["model_version"], r["error_code"], r["error_message"],
        r["created_at"], r["updated_at"], bool(r["cancel_requested"]))


def _collection(r: Any) -> Collection:
    return Collection(r["id"], r["species"], r["model_name"], r["model_version"],
                      json.loads(r["params"]), r["cycle"], r["created_at"])


def _answer(r: Any) -> StoredAnswer:
    return StoredAnswer(r["seq"], r["image_a"], r["image_b"], r["label"], r["annotator"],
                        r["confidence"], tuple(json.loads(r["tags"])), r["note"], r["received_at"],
                        r["batch_id"], r["pair_id"], r["request_id"], r["superseded_by"],
                        r["deleted_at"] is not None, r["started_at"], r["ended_at"])


def _batch(r: Any) -> BatchRecord:
    return BatchRecord(r["batch_id"], r["cycle"], r["budget"], r["reason"], bool(r["finished"]),
                       r["model_name"], r["model_version"], json.loads(r["filter"]),
                       r["n_items"], json.loads(r["stats"]), r["request_id"], r["created_at"])


def _pair(r: Any) -> PairRecord:
    return PairRecord(r["pair_id"], r["image_a"], r["image_b"], r["pool"], r["region"],
                      r["probability"], r["similarity"])


def _operation(r: Any) -> OperationRecord:
    return OperationRecord(r["operation_id"], r["collection_id"], r["kind"], r["state"], r["done"],
                           r["total"], r["stage"], r["error_code"], r["error_message"],
                           json.loads(r["result"]), r["created_at"], r["updated_at"])
