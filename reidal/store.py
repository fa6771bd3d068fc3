"""The durable store: SQLite in WAL mode, one file in the data directory.

Everything a restart needs lives here: collections, images, vectors, query batches,
answers (with their full history) and idempotency records. Every answer a person gave is
precious, so writes commit with ``synchronous=FULL`` before the call returns: once
:meth:`Store.submit_answers` has returned, the answer survives a crash or power cut.

One connection guarded by a lock serves all threads of a gRPC server: SQLite serialises
writers anyway, and a single connection keeps transactions simple and explicit.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reidal.errors import AlreadyExists, InvalidArgument, NotFound

SCHEMA_VERSION = 1
LABELS = ("SAME", "DIFFERENT", "UNSURE")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS collections (
    id TEXT PRIMARY KEY,
    species TEXT NOT NULL DEFAULT '',
    model_name TEXT NOT NULL DEFAULT '',
    model_version TEXT NOT NULL DEFAULT '',
    params TEXT NOT NULL DEFAULT '{}',
    cycle INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    collection_id TEXT NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    image_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    uri TEXT NOT NULL DEFAULT '',
    name TEXT NOT NULL DEFAULT '',
    metadata TEXT NOT NULL DEFAULT '{}',
    excluded_reason TEXT,
    added_at REAL NOT NULL,
    PRIMARY KEY (collection_id, image_id)
);
CREATE TABLE IF NOT EXISTS vectors (
    collection_id TEXT NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    image_id TEXT NOT NULL,
    vector BLOB NOT NULL,
    PRIMARY KEY (collection_id, model_name, model_version, image_id)
);
CREATE TABLE IF NOT EXISTS answers (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    collection_id TEXT NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    image_a TEXT NOT NULL,
    image_b TEXT NOT NULL,
    label TEXT NOT NULL CHECK (label IN ('SAME', 'DIFFERENT', 'UNSURE')),
    annotator TEXT NOT NULL DEFAULT '',
    confidence REAL,
    tags TEXT NOT NULL DEFAULT '[]',
    note TEXT NOT NULL DEFAULT '',
    started_at REAL,
    ended_at REAL,
    received_at REAL NOT NULL,
    batch_id TEXT NOT NULL DEFAULT '',
    pair_id TEXT NOT NULL DEFAULT '',
    request_id TEXT NOT NULL DEFAULT '',
    superseded_by INTEGER,
    deleted_at REAL,
    deleted_by TEXT,
    CHECK (image_a < image_b)
);
CREATE INDEX IF NOT EXISTS answers_by_pair ON answers (collection_id, image_a, image_b);
CREATE TABLE IF NOT EXISTS requests (
    collection_id TEXT NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    request_id TEXT NOT NULL,
    response TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (collection_id, request_id)
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    collection_id TEXT NOT NULL,
    action TEXT NOT NULL,
    actor TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT '{}',
    at REAL NOT NULL
);
"""


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


def _now() -> float:
    return time.time()


class Store:
    """SQLite-backed durable state of every collection in one data directory."""

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.data_dir / "reidal.sqlite3"
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed transaction is on disk before commit returns, WAL mode included.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.row_factory = sqlite3.Row
        self._db.executescript(_SCHEMA)
        self._db.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )

    # -- plumbing -------------------------------------------------------------------------
    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; committed (and fsynced) on success, rolled back on error."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            cur = self._db.execute(sql, args)
            return cur.fetchall()

    def close(self) -> None:
        """Checkpoint the WAL into the main file and close: a clean shutdown leaves one file."""
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self._db.close()

    def _audit(self, db: sqlite3.Connection, collection_id: str, action: str, actor: str,
               detail: dict[str, Any]) -> None:
        db.execute(
            "INSERT INTO audit (collection_id, action, actor, detail, at) VALUES (?, ?, ?, ?, ?)",
            (collection_id, action, actor, json.dumps(detail, sort_keys=True), _now()),
        )

    # -- collections ----------------------------------------------------------------------
    def create_collection(self, collection_id: str, *, species: str = "", model_name: str = "",
                          model_version: str = "", params: dict[str, Any] | None = None) -> Collection:
        if not collection_id:
            raise InvalidArgument("collection id must be a non-empty string")
        with self._tx() as db:
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
        with self._tx() as db:
            cur = db.execute("DELETE FROM collections WHERE id = ?", (collection_id,))
            if cur.rowcount == 0:
                raise NotFound(f"collection {collection_id!r} does not exist")
            self._audit(db, collection_id, "delete_collection", actor, {})

    def set_cycle(self, collection_id: str, cycle: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE collections SET cycle = ? WHERE id = ?", (cycle, collection_id))

    # -- images and vectors ---------------------------------------------------------------
    def add_images(self, collection_id: str, images: Iterable[ImageRecord]) -> tuple[int, int]:
        """Add images idempotently per image id. Returns (added, already_present)."""
        self.get_collection(collection_id)
        added = present = 0
        with self._tx() as db:
            (seq,) = db.execute(
                "SELECT COALESCE(MAX(seq) + 1, 0) FROM images WHERE collection_id = ?",
                (collection_id,),
            ).fetchone()
            for img in images:
                if not img.image_id:
                    raise InvalidArgument("image id must be a non-empty string")
                cur = db.execute(
                    "INSERT OR IGNORE INTO images (collection_id, image_id, seq, uri, name, metadata,"
                    " added_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (collection_id, img.image_id, seq, img.uri, img.name,
                     json.dumps(img.metadata, sort_keys=True), _now()),
                )
                if cur.rowcount:
                    added += 1
                    seq += 1
                else:
                    present += 1
        return added, present

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
        with self._tx() as db:
            cur = db.execute(
                "UPDATE images SET excluded_reason = ? WHERE collection_id = ? AND image_id = ?",
                (reason or "excluded", collection_id, image_id),
            )
            if cur.rowcount == 0:
                raise NotFound(f"image {image_id!r} is not in collection {collection_id!r}")
            self._audit(db, collection_id, "exclude_image", actor, {"image_id": image_id, "reason": reason})

    def put_vectors(self, collection_id: str, model_name: str, model_version: str,
                    image_ids: Sequence[str], vectors: np.ndarray) -> None:
        vecs = np.ascontiguousarray(vectors, dtype=np.float32)
        if vecs.ndim != 2 or vecs.shape[0] != len(image_ids):
            raise InvalidArgument(
                f"got {len(image_ids)} image ids but vectors of shape {vecs.shape}"
            )
        with self._tx() as db:
            db.executemany(
                "INSERT OR REPLACE INTO vectors (collection_id, model_name, model_version, image_id,"
                " vector) VALUES (?, ?, ?, ?, ?)",
                [(collection_id, model_name, model_version, iid, v.tobytes())
                 for iid, v in zip(image_ids, vecs, strict=True)],
            )

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
        self.get_collection(collection_id)
        known = {r.image_id for r in self.images(collection_id)}
        for a in answers:
            if a.label not in LABELS:
                raise InvalidArgument(f"answer label must be one of {LABELS}, got {a.label!r}")
            for iid in (a.image_a, a.image_b):
                if iid not in known:
                    raise NotFound(f"image {iid!r} is not in collection {collection_id!r}")
            if a.image_a == a.image_b:
                raise InvalidArgument(f"an answer pairs image {a.image_a!r} with itself")
        seqs: list[int] = []
        with self._tx() as db:
            for a in answers:
                lo, hi = sorted((a.image_a, a.image_b))
                cur = db.execute(
                    "INSERT INTO answers (collection_id, image_a, image_b, label, annotator, confidence,"
                    " tags, note, started_at, ended_at, received_at, batch_id, pair_id, request_id)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (collection_id, lo, hi, a.label, a.annotator, a.confidence,
                     json.dumps(list(a.tags)), a.note, a.started_at, a.ended_at, _now(),
                     a.batch_id, a.pair_id, request_id),
                )
                seq = int(cur.lastrowid)
                db.execute(
                    "UPDATE answers SET superseded_by = ? WHERE collection_id = ? AND image_a = ?"
                    " AND image_b = ? AND seq < ? AND superseded_by IS NULL AND deleted_at IS NULL",
                    (seq, collection_id, lo, hi, seq),
                )
                seqs.append(seq)
            if request_id:
                db.execute(
                    "INSERT INTO requests (collection_id, request_id, response, created_at)"
                    " VALUES (?, ?, ?, ?)",
                    (collection_id, request_id, json.dumps(response or {"seqs": seqs}), _now()),
                )
        return seqs

    def answers(self, collection_id: str, *, current_only: bool = True) -> list[StoredAnswer]:
        """Answers in the order given; ``current_only`` hides superseded and deleted ones."""
        sql = "SELECT * FROM answers WHERE collection_id = ?"
        if current_only:
            sql += " AND superseded_by IS NULL AND deleted_at IS NULL"
        return [_answer(r) for r in self._query(sql + " ORDER BY seq", (collection_id,))]

    def delete_answer(self, collection_id: str, seq: int, *, actor: str = "", reason: str = "") -> None:
        """Soft-delete (audited): the row stays, marked deleted; the previous answer on the pair,
        if any, becomes current again."""
        with self._tx() as db:
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
            if prev is not None:
                db.execute("UPDATE answers SET superseded_by = NULL WHERE seq = ?", (prev,))
            self._audit(db, collection_id, "delete_answer", actor, {"seq": seq, "reason": reason})

    def audit_log(self, collection_id: str) -> list[dict[str, Any]]:
        rows = self._query("SELECT * FROM audit WHERE collection_id = ? ORDER BY seq", (collection_id,))
        return [{"action": r["action"], "actor": r["actor"], "detail": json.loads(r["detail"]),
                 "at": r["at"]} for r in rows]


def _collection(r: sqlite3.Row) -> Collection:
    return Collection(r["id"], r["species"], r["model_name"], r["model_version"],
                      json.loads(r["params"]), r["cycle"], r["created_at"])


def _answer(r: sqlite3.Row) -> StoredAnswer:
    return StoredAnswer(r["seq"], r["image_a"], r["image_b"], r["label"], r["annotator"],
                        r["confidence"], tuple(json.loads(r["tags"])), r["note"], r["received_at"],
                        r["batch_id"], r["pair_id"], r["request_id"], r["superseded_by"],
                        r["deleted_at"] is not None)
