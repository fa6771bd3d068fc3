"""The answers aggregate: every answer with its history, and request-id replay records.

A workflow that must decide inside the transaction that stores answers (SubmitConstraints:
replay or store, then the contradictions of exactly what was committed) opens that
transaction itself, :meth:`Answers.transaction`, and gets an
:class:`AnswerTransaction`: the store never calls back into the workflow.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from reidal.errors import InvalidArgument, NotFound
from reidal.store.backend import Tx
from reidal.store.collections import Collections
from reidal.store.database import Database, id_chunks, timestamp
from reidal.store.images import Images
from reidal.store.records import (
    ANSWERS_EPOCH,
    LABELS,
    AnswerDeletion,
    AnswerIn,
    AnswerLogVersion,
    AnswerRow,
    ConstraintColumns,
    StoredAnswer,
)

#: Between the image ids of one aggregated column (:meth:`AnswersStore.constraint_columns`):
#: a control character, which image ids may not hold (reidal.collection_state.check_id).
_ID_SEPARATOR = "\x1f"
_RESPONSE_OF = "SELECT response FROM requests WHERE collection_id = ? AND request_id = ?"


class AnswerTransaction:
    """The answer writes of one collection inside one write transaction (a unit of work).

    It runs alone among the collection's write transactions in every process; reads made
    through the store by the same thread meanwhile see its writes; everything commits
    together, durably, when the ``with`` block of :meth:`Answers.transaction`
    ends, or nothing does (an exception rolls it back)."""

    def __init__(self, db: Tx, collection_id: str) -> None:
        self._db = db
        self.collection_id = collection_id

    def response_of(self, request_id: str) -> dict[str, Any] | None:
        """The response recorded for an earlier request with this id (None: none was)."""
        if not request_id:
            return None
        row = self._db.execute(_RESPONSE_OF, (self.collection_id, request_id)).fetchone()
        return None if row is None else json.loads(row["response"])

    def insert(self, answers: Sequence[AnswerIn], request_id: str = "") -> list[int]:
        """Store answers checked by :meth:`Answers.check`; returns their seqs.
        A later answer on the same pair supersedes the earlier one (``superseded_by``),
        whose row is kept for the audit history."""
        seqs: list[int] = []
        for a in answers:
            lo, hi = sorted((a.image_a, a.image_b))
            cur = self._db.execute(
                "INSERT INTO answers (collection_id, image_a, image_b, label, annotator, confidence,"
                " tags, note, started_at, ended_at, received_at, batch_id, pair_id, request_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING seq",
                (self.collection_id, lo, hi, a.label, a.annotator, a.confidence,
                 json.dumps(list(a.tags)), a.note, a.started_at, a.ended_at, timestamp(),
                 a.batch_id, a.pair_id, request_id),
            )
            seq = int(cur.fetchall()[0][0])
            self._db.execute(
                "UPDATE answers SET superseded_by = ? WHERE collection_id = ? AND image_a = ?"
                " AND image_b = ? AND seq < ? AND superseded_by IS NULL AND deleted_at IS NULL",
                (seq, self.collection_id, lo, hi, seq),
            )
            seqs.append(seq)
        return seqs

    def record_response(self, request_id: str, response: dict[str, Any]) -> None:
        """Keep ``response`` for ``request_id`` (nothing without one), so a retry of the
        request gets it from :meth:`response_of` instead of storing its answers again."""
        if request_id:
            self._db.execute(
                "INSERT INTO requests (collection_id, request_id, response, created_at)"
                " VALUES (?, ?, ?, ?)",
                (self.collection_id, request_id, json.dumps(response), timestamp()),
            )


class Answers:
    """Answers: durable submission, supersession, soft deletion and the reads of the answer state."""

    def __init__(self, db: Database, collections: Collections, images: Images) -> None:
        self._db = db
        self._collections = collections
        self._images = images

    @contextmanager
    def transaction(self, collection_id: str) -> Iterator[AnswerTransaction]:
        """Open the collection's write transaction for answers (see :class:`AnswerTransaction`)."""
        with self._db.tx(collection_id) as db:
            yield AnswerTransaction(db, collection_id)

    def replayed(self, collection_id: str, request_id: str) -> dict[str, Any] | None:
        """The stored response of an earlier request with this id, for idempotent replay."""
        if not request_id:
            return None
        rows = self._db.query(_RESPONSE_OF, (collection_id, request_id))
        return json.loads(rows[0]["response"]) if rows else None

    def submit(self, collection_id: str, answers: Sequence[AnswerIn], *,
               request_id: str = "", response: dict[str, Any] | None = None) -> list[int]:
        """Store answers durably in one transaction; returns their sequence numbers. With a
        ``request_id`` the response (default ``{"seqs": seqs}``) is stored in the same
        transaction, so a retried request can be replayed exactly."""
        self.check(collection_id, answers)
        with self.transaction(collection_id) as tx:
            seqs = tx.insert(answers, request_id)
            tx.record_response(request_id, response or {"seqs": seqs})
        return seqs

    def submit_once(self, collection_id: str, answers: Sequence[AnswerIn], *,
                    request_id: str = "") -> tuple[dict[str, Any], bool]:
        """Store answers unless ``request_id`` was seen; returns ``(response, replayed)``
        (the response ``{"seqs": seqs}``). The replay check, the inserts and the recorded
        response share one transaction, so concurrent retries of one request store it once."""
        self.check(collection_id, answers)
        with self.transaction(collection_id) as tx:
            earlier = tx.response_of(request_id)
            if earlier is not None:
                return earlier, True
            response = {"seqs": tx.insert(answers, request_id)}
            tx.record_response(request_id, response)
        return response, False

    def check(self, collection_id: str, answers: Sequence[AnswerIn]) -> None:
        """NotFound for an unknown collection or image, InvalidArgument for a label that is
        not one or a pair of an image with itself: what :meth:`AnswerTransaction.insert`
        relies on."""
        self._collections.get(collection_id)
        known = self._images.present(collection_id,  # only these: collections are large
                                     {i for a in answers for i in (a.image_a, a.image_b)})
        for a in answers:
            if a.label not in LABELS:
                raise InvalidArgument(f"answer label must be one of {LABELS}, got {a.label!r}")
            for iid in (a.image_a, a.image_b):
                if iid not in known:
                    raise NotFound(f"image {iid!r} is not in collection {collection_id!r}")
            if a.image_a == a.image_b:
                raise InvalidArgument(f"an answer pairs image {a.image_a!r} with itself")

    def all(self, collection_id: str, *, current_only: bool = True) -> list[StoredAnswer]:
        """Answers in the order given; ``current_only`` hides superseded and deleted ones."""
        sql = "SELECT * FROM answers WHERE collection_id = ?"
        if current_only:
            sql += " AND superseded_by IS NULL AND deleted_at IS NULL"
        return [_answer(r) for r in self._db.query(sql + " ORDER BY seq", (collection_id,))]

    def get(self, collection_id: str, seq: int) -> StoredAnswer:
        rows = self._db.query("SELECT * FROM answers WHERE collection_id = ? AND seq = ?",
                              (collection_id, int(seq)))
        if not rows:
            raise NotFound(f"answer {seq} does not exist in collection {collection_id!r}")
        return _answer(rows[0])

    def by_seq(self, collection_id: str, seqs: Iterable[int]) -> dict[int, StoredAnswer]:
        return {r["seq"]: _answer(r) for marks, chunk in id_chunks(int(s) for s in seqs)
                for r in self._db.query(f"SELECT * FROM answers WHERE collection_id = ?"
                                        f" AND seq IN ({marks})", (collection_id, *chunk))}

    def page(
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
        return [_answer(r) for r in self._db.query(sql, args)]

    def delete(self, collection_id: str, seq: int, *, actor: str = "",
               reason: str = "") -> int | None:
        """Soft-delete (audited): the row stays, marked deleted; the previous answer on the pair,
        if any, becomes current again. Returns the seq of the answer made current again, if
        deleting made one current (None when the deleted answer was not the current one)."""
        with self._db.tx(collection_id) as db:
            row = db.execute(
                "SELECT image_a, image_b, deleted_at FROM answers WHERE collection_id = ? AND seq = ?",
                (collection_id, seq),
            ).fetchone()
            if row is None or row["deleted_at"] is not None:
                raise NotFound(f"answer {seq} does not exist in collection {collection_id!r}")
            db.execute("UPDATE answers SET deleted_at = ?, deleted_by = ? WHERE seq = ?",
                       (timestamp(), actor, seq))
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
            epoch = self._db.bump_answers_epoch(db, collection_id)
            self._db.log_deletions(db, collection_id, epoch, "seq = ?", (seq,), restored)
            self._db.audit(db, collection_id, "delete_answer", actor,
                           {"seq": seq, "reason": reason})
        return restored

    def count_superseded_by(self, collection_id: str, seqs: Sequence[int]) -> int:
        """How many answers the answers ``seqs`` superseded."""
        return sum(int(self._db.query(f"SELECT COUNT(*) FROM answers WHERE collection_id = ?"
                                      f" AND superseded_by IN ({marks})",
                                      (collection_id, *chunk))[0][0])
                   for marks, chunk in id_chunks(int(s) for s in seqs))

    def log_version(self, collection_id: str) -> AnswerLogVersion:
        """Where the collection's answers stand (three indexed lookups; NotFound when the
        collection does not exist). Inside a write transaction it sees that transaction's
        inserts."""
        rows = self._db.query(
            "SELECT c.created_at,"
            " (SELECT value FROM counters WHERE collection_id = c.id AND name = ?) AS epoch,"
            " (SELECT MAX(seq) FROM answers WHERE collection_id = c.id) AS max_seq"
            " FROM collections c WHERE c.id = ?", (ANSWERS_EPOCH, collection_id))
        if not rows:
            raise NotFound(f"collection {collection_id!r} does not exist")
        r = rows[0]
        return AnswerLogVersion(float(r["created_at"]), int(r["epoch"] or 0),
                                -1 if r["max_seq"] is None else int(r["max_seq"]))

    def rows(self, collection_id: str, *, after_seq: int | None = None) -> list[AnswerRow]:
        """Answers in seq order: the current ones (``after_seq`` None), or every one newer
        than ``after_seq`` whether superseded since or not (what a cached state catches up
        with, together with :meth:`supersessions_after`)."""
        if after_seq is None:
            sql, args = (" AND superseded_by IS NULL AND deleted_at IS NULL", ())
        else:
            sql, args = " AND seq > ?", (int(after_seq),)
        rows = self._db.query("SELECT seq, image_a, image_b, label FROM answers"
                              f" WHERE collection_id = ?{sql} ORDER BY seq", (collection_id, *args))
        return [AnswerRow._make(r) for r in rows]

    def constraint_columns(self, collection_id: str, max_seq: int) -> ConstraintColumns:
        """The current SAME / DIFFERENT answers up to ``max_seq`` between images not
        excluded, in seq order, as integer columns (see :class:`ConstraintColumns`): what
        a process's first answer state loads when it finds no snapshot
        (:meth:`snapshot`). The filters run in SQL, and each column comes back as
        one string (``group_concat``; PostgreSQL's ``string_agg``), split in C, so no
        Python object is made per row; image ids become indices by one C-level dict
        lookup each."""
        image_ids = [r[0] for r in self._db.query(  # first: a later deletion retires answers
            "SELECT image_id FROM images WHERE collection_id = ? ORDER BY seq", (collection_id,))]
        where = (" FROM answers WHERE collection_id = ? AND seq <= ? AND superseded_by IS NULL"
                 " AND deleted_at IS NULL AND label != 'UNSURE'"
                 " AND image_a NOT IN (SELECT image_id FROM images"
                 "  WHERE collection_id = ? AND excluded_reason IS NOT NULL)"
                 " AND image_b NOT IN (SELECT image_id FROM images"
                 "  WHERE collection_id = ? AND excluded_reason IS NOT NULL)")
        args = (collection_id, int(max_seq), collection_id, collection_id)
        # the four aggregates read the same rows in the same order: the columns align
        seqs, a, b, same = self._db.query(
            "SELECT group_concat(CAST(seq AS TEXT), ','), group_concat(image_a, ?),"
            " group_concat(image_b, ?),"
            " group_concat(CASE WHEN label = 'SAME' THEN '1' ELSE '0' END, '')" + where,
            (_ID_SEPARATOR, _ID_SEPARATOR, *args))[0]
        seq_col = np.array(seqs.split(","), dtype=np.int64) if seqs else np.empty(0, np.int64)
        a_ids, b_ids = (a.split(_ID_SEPARATOR), b.split(_ID_SEPARATOR)) if seqs else ([], [])
        if not len(a_ids) == len(b_ids) == len(seq_col):  # an id holding the separator
            rows = self._db.query("SELECT seq, image_a, image_b,"
                               " CASE WHEN label = 'SAME' THEN '1' ELSE '0' END" + where, args)
            seq_col = np.array([r[0] for r in rows], dtype=np.int64)
            a_ids, b_ids = [r[1] for r in rows], [r[2] for r in rows]
            same = "".join(r[3] for r in rows)
        index = dict(zip(image_ids, range(len(image_ids)), strict=True)).__getitem__
        return ConstraintColumns(
            image_ids, seq_col,
            np.fromiter(map(index, a_ids), dtype=np.int64, count=len(a_ids)),
            np.fromiter(map(index, b_ids), dtype=np.int64, count=len(b_ids)),
            np.frombuffer((same or "").encode(), dtype=np.uint8) == ord("1"))

    def snapshot(self, collection_id: str) -> tuple[AnswerLogVersion, bytes] | None:
        """The last answer-state snapshot kept for the collection (None: none), with the
        version of the answers it holds (:meth:`put_snapshot`)."""
        rows = self._db.query("SELECT created_at, epoch, max_seq, data FROM answer_snapshots"
                           " WHERE collection_id = ?", (collection_id,))
        if not rows:
            return None
        r = rows[0]
        return (AnswerLogVersion(float(r[0]), int(r[1]), int(r[2])), bytes(r[3]))

    def put_snapshot(self, collection_id: str, version: AnswerLogVersion,
                            data: bytes) -> None:
        """Keep ``data`` (an encoded answer state, reidal.answer_state) as the snapshot of
        the collection's answers at ``version``, replacing the one before unless that one
        is newer (another process's). A cache: the answers themselves are the truth; a
        snapshot of a re-created collection or an unlogged epoch step is never used. Its
        own transaction, not the collection's."""
        with self._db.tx() as db:
            db.execute(
                "INSERT INTO answer_snapshots (collection_id, created_at, epoch, max_seq, data,"
                " written_at) SELECT id, ?, ?, ?, ?, ? FROM collections WHERE id = ?"
                " ON CONFLICT (collection_id) DO UPDATE SET created_at = excluded.created_at,"
                " epoch = excluded.epoch, max_seq = excluded.max_seq, data = excluded.data,"
                " written_at = excluded.written_at"
                " WHERE answer_snapshots.created_at != excluded.created_at"
                " OR (answer_snapshots.max_seq, answer_snapshots.epoch)"
                " <= (excluded.max_seq, excluded.epoch)",
                (version.created_at, version.epoch, version.max_seq, data, timestamp(),
                 collection_id))

    def deletions(self, collection_id: str, after_epoch: int) -> list[AnswerDeletion]:
        """The answers retired at the epochs after ``after_epoch``, by epoch (an epoch
        step that retired none, e.g. an exclusion, has no row: a cached state reloads)."""
        rows = self._db.query("SELECT epoch, seq, restored FROM answer_deletions"
                              " WHERE collection_id = ? AND epoch > ? ORDER BY epoch, seq",
                              (collection_id, int(after_epoch)))
        return [AnswerDeletion(int(r[0]), int(r[1]), None if r[2] is None else int(r[2]))
                for r in rows]

    def supersessions_after(self, collection_id: str, after_seq: int) -> list[tuple[int, int]]:
        """(superseded seq, superseding seq) for the answers newer than ``after_seq`` that
        superseded another, by superseding seq."""
        rows = self._db.query("SELECT seq, superseded_by FROM answers WHERE collection_id = ?"
                              " AND superseded_by > ? ORDER BY superseded_by, seq",
                              (collection_id, int(after_seq)))
        return [(int(r[0]), int(r[1])) for r in rows]


def _answer(r: Any) -> StoredAnswer:
    return StoredAnswer(r["seq"], r["image_a"], r["image_b"], r["label"], r["annotator"],
                        r["confidence"], tuple(json.loads(r["tags"])), r["note"], r["received_at"],
                        r["batch_id"], r["pair_id"], r["request_id"], r["superseded_by"],
                        r["deleted_at"] is not None, r["started_at"], r["ended_at"])
