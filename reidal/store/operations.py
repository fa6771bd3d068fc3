"""The operations aggregate: long-running operations and their progress."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from reidal.errors import InvalidArgument, NotFound
from reidal.store.database import Database, timestamp
from reidal.store.records import OPERATION_STATES, OperationRecord


class Operations:
    """Long-running operations (EmbedCollection and the like)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def create(self, operation_id: str, collection_id: str, kind: str, *,
               total: int = 0, result: Mapping[str, Any] | None = None) -> OperationRecord:
        now = timestamp()
        with self._db.tx(collection_id) as db:
            if db.execute("SELECT 1 FROM collections WHERE id = ?", (collection_id,)).fetchone() is None:
                raise NotFound(f"collection {collection_id!r} does not exist")
            db.execute(
                "INSERT INTO operations (operation_id, collection_id, kind, state, total, result,"
                " created_at, updated_at, owner) VALUES (?, ?, ?, 'PENDING', ?, ?, ?, ?, ?)",
                (operation_id, collection_id, kind, int(total), json.dumps(dict(result or {})),
                 now, now, self._db.owner),
            )
        return self.get(operation_id)

    def update(self, operation_id: str, *, state: str | None = None,
               done: int | None = None, total: int | None = None,
               stage: str | None = None, error_code: str | None = None,
               error_message: str | None = None,
               result: Mapping[str, Any] | None = None) -> None:
        """Change some fields of an operation (a no-op when its collection is gone)."""
        if state is not None and state not in OPERATION_STATES:
            raise InvalidArgument(f"operation state must be one of {OPERATION_STATES}, got {state!r}")
        sets, args = ["updated_at = ?"], [timestamp()]
        for column, value in (("state", state), ("done", done), ("total", total),
                              ("stage", stage), ("error_code", error_code),
                              ("error_message", error_message)):
            if value is not None:
                sets.append(f"{column} = ?")
                args.append(value)
        if result is not None:
            sets.append("result = ?")
            args.append(json.dumps(dict(result)))
        with self._db.tx() as db:
            db.execute(f"UPDATE operations SET {', '.join(sets)} WHERE operation_id = ?",
                       (*args, operation_id))

    def get(self, operation_id: str) -> OperationRecord:
        rows = self._db.query("SELECT * FROM operations WHERE operation_id = ?", (operation_id,))
        if not rows:
            raise NotFound(f"operation {operation_id!r} does not exist")
        return _operation(rows[0])

    def all(self, collection_id: str, *, unfinished_only: bool = False) -> list[OperationRecord]:
        sql = "SELECT * FROM operations WHERE collection_id = ?"
        if unfinished_only:
            sql += " AND state IN ('PENDING', 'RUNNING')"
        return [_operation(r)
                for r in self._db.query(sql + " ORDER BY created_at", (collection_id,))]

    def fail_unfinished(self, message: str) -> int:
        """Mark FAILED (ABORTED) every PENDING or RUNNING operation that nobody runs any more:
        those of stores that are closed (their process stopped or died) and this store's own.
        Call once at start-up, before this store starts any: operations of other processes
        still open on the same database (replicas, other servers) are left alone."""
        return self._db.fail_abandoned(
            "operations", ("PENDING", "RUNNING"),
            "state = 'FAILED', error_code = 'ABORTED', error_message = ?", (message,))


def _operation(r: Any) -> OperationRecord:
    return OperationRecord(r["operation_id"], r["collection_id"], r["kind"], r["state"], r["done"],
                           r["total"], r["stage"], r["error_code"], r["error_message"],
                           json.loads(r["result"]), r["created_at"], r["updated_at"])
