"""The batches aggregate: query batches, their pairs, and the requests they answered."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from reidal.errors import NotFound
from reidal.store.backend import Tx
from reidal.store.collections import Collections
from reidal.store.database import Database, id_chunks, timestamp
from reidal.store.records import BatchDraft, BatchRecord, PairRecord

#: The batch a request id created or was answered with (batch_requests), by request id.
_BATCH_OF_REQUEST = (
    "SELECT b.* FROM batches b WHERE b.collection_id = ? AND (b.request_id = ? OR"
    " b.batch_id IN (SELECT r.batch_id FROM batch_requests r"
    " WHERE r.collection_id = b.collection_id AND r.request_id = ?))")


class BatchTransaction:
    """The batch writes of one collection inside one write transaction (a unit of work):
    it runs alone among the collection's write transactions in every process, and what it
    stores commits together, durably, when the ``with`` block of
    :meth:`Batches.transaction` ends, or not at all."""

    def __init__(self, db: Tx, collection_id: str) -> None:
        self._db = db
        self.collection_id = collection_id

    def batch_of_request(self, request_id: str) -> BatchRecord | None:
        """The batch ``request_id`` created or was answered with (None: none, or no id)."""
        if not request_id:
            return None
        row = self._db.execute(_BATCH_OF_REQUEST,
                               (self.collection_id, request_id, request_id)).fetchone()
        return None if row is None else _batch(row)

    def next_cycle(self) -> int:
        """The cycle a batch stored now takes (NotFound when the collection is gone)."""
        col = self._db.execute("SELECT cycle FROM collections WHERE id = ?",
                               (self.collection_id,)).fetchone()
        if col is None:
            raise NotFound(f"collection {self.collection_id!r} does not exist")
        return int(col["cycle"]) + 1

    def insert(self, batch_id: str, cycle: int, draft: BatchDraft) -> BatchRecord:
        """Store the batch as cycle ``cycle`` (:meth:`next_cycle`) with its pairs and move
        the collection's cycle counter, so a batch id and its pair ids are resolvable the
        moment a client sees them. Pair ids are ``"<batch id>/<k>"`` (k = draw position)."""
        cid = self.collection_id
        self._db.execute(
            "INSERT INTO batches (collection_id, batch_id, cycle, budget, reason, finished,"
            " model_name, model_version, filter, n_items, stats, request_id, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (cid, batch_id, cycle, int(draft.budget), draft.reason, int(bool(draft.finished)),
             draft.model_name, draft.model_version,
             json.dumps(dict(draft.filter), sort_keys=True), int(draft.n_items),
             json.dumps(dict(draft.stats), sort_keys=True, default=float), draft.request_id,
             timestamp()),
        )
        self._db.executemany(
            "INSERT INTO batch_pairs (collection_id, pair_id, batch_id, position, image_a,"
            " image_b, pool, region, probability, similarity)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(cid, f"{batch_id}/{k}", batch_id, k, p.image_a, p.image_b,
              p.pool, int(p.region), float(p.probability), float(p.similarity))
             for k, p in enumerate(draft.pairs)],
        )
        self._db.execute("UPDATE collections SET cycle = ? WHERE id = ?", (cycle, cid))
        row = self._db.execute("SELECT * FROM batches WHERE collection_id = ? AND batch_id = ?",
                               (cid, batch_id)).fetchone()
        return _batch(row)


class Batches:
    """Query batches: one per cycle, its pairs, and the request ids it answered."""

    def __init__(self, db: Database, collections: Collections) -> None:
        self._db = db
        self._collections = collections

    @contextmanager
    def transaction(self, collection_id: str) -> Iterator[BatchTransaction]:
        """Open the collection's write transaction for a batch (see :class:`BatchTransaction`)."""
        with self._db.tx(collection_id) as db:
            yield BatchTransaction(db, collection_id)

    def create(
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
        """Store a batch named ``make_id(cycle)`` as the collection's next cycle, in one
        :meth:`transaction`; returns ``(batch, created)``. With a ``request_id``
        already used by a batch of this collection, that batch is returned instead
        (``created`` False) and nothing changes. The ``pair_id`` of ``pairs`` is ignored."""
        draft = BatchDraft(pairs, budget, reason, finished, model_name, model_version,
                           filter or {}, n_items, stats or {}, request_id)
        with self.transaction(collection_id) as tx:
            earlier = tx.batch_of_request(request_id)
            if earlier is not None:
                return earlier, False
            cycle = tx.next_cycle()
            return tx.insert(make_id(cycle), cycle, draft), True

    def get(self, collection_id: str, batch_id: str) -> BatchRecord:
        rows = self._db.query("SELECT * FROM batches WHERE collection_id = ? AND batch_id = ?",
                              (collection_id, batch_id))
        if not rows:
            self._collections.get(collection_id)
            raise NotFound(f"batch {batch_id!r} does not exist in collection {collection_id!r}")
        return _batch(rows[0])

    def by_request(self, collection_id: str, request_id: str) -> BatchRecord | None:
        """The batch a request id created, or was answered with (:meth:`record_request`)."""
        if not request_id:
            return None
        rows = self._db.query(
            _BATCH_OF_REQUEST,
            (collection_id, request_id, request_id))
        return _batch(rows[0]) if rows else None

    def record_request(self, collection_id: str, request_id: str, batch_id: str) -> BatchRecord:
        """Answer ``request_id`` with the existing batch ``batch_id`` (a retry gets it again);
        a request id already used keeps its first batch, which is returned."""
        with self._db.tx(collection_id) as db:
            db.execute("INSERT INTO batch_requests (collection_id, request_id, batch_id)"
                       " SELECT ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM batches WHERE"
                       " collection_id = ? AND request_id = ?) ON CONFLICT DO NOTHING",
                       (collection_id, request_id, batch_id, collection_id, request_id))
        batch = self.by_request(collection_id, request_id)
        assert batch is not None
        return batch

    def newest(self, collection_id: str) -> BatchRecord | None:
        rows = self._db.query("SELECT * FROM batches WHERE collection_id = ? ORDER BY cycle DESC"
                              " LIMIT 1", (collection_id,))
        return _batch(rows[0]) if rows else None

    def all(self, collection_id: str, *, after_cycle: int = 0) -> list[BatchRecord]:
        """Batches with a cycle above ``after_cycle``, oldest first."""
        rows = self._db.query("SELECT * FROM batches WHERE collection_id = ? AND cycle > ?"
                              " ORDER BY cycle", (collection_id, int(after_cycle)))
        return [_batch(r) for r in rows]

    def pairs(self, collection_id: str, batch_id: str) -> list[tuple[PairRecord, bool]]:
        """The batch's pairs in draw order, each with whether it has a current answer now."""
        rows = self._db.query(
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
                for marks, chunk in id_chunks(pair_ids)
                for r in self._db.query(f"SELECT * FROM batch_pairs WHERE collection_id = ?"
                                        f" AND pair_id IN ({marks})", (collection_id, *chunk))}

    def pending_pairs(self, collection_id: str) -> list[tuple[str, str]]:
        """Pairs asked in some batch that have no non-deleted answer yet."""
        rows = self._db.query(
            "SELECT DISTINCT p.image_a, p.image_b FROM batch_pairs p WHERE p.collection_id = ?"
            " AND NOT EXISTS (SELECT 1 FROM answers a WHERE a.collection_id = p.collection_id"
            " AND a.image_a = p.image_a AND a.image_b = p.image_b AND a.deleted_at IS NULL)",
            (collection_id,),
        )
        return [(r["image_a"], r["image_b"]) for r in rows]


def _batch(r: Any) -> BatchRecord:
    return BatchRecord(r["batch_id"], r["cycle"], r["budget"], r["reason"], bool(r["finished"]),
                       r["model_name"], r["model_version"], json.loads(r["filter"]),
                       r["n_items"], json.loads(r["stats"]), r["request_id"], r["created_at"])


def _pair(r: Any) -> PairRecord:
    return PairRecord(r["pair_id"], r["image_a"], r["image_b"], r["pool"], r["region"],
                      r["probability"], r["similarity"])
