"""The collections aggregate: a collection's row, its model, cycle counter and saved
identities."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from reidal.errors import AlreadyExists, InvalidArgument, NotFound
from reidal.store.database import Database, timestamp
from reidal.store.records import Collection


class Collections:
    """Collections, their model, cycle counter, counts, saved identities and audit log."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def create(self, collection_id: str, *, species: str = "", model_name: str = "",
               model_version: str = "", params: dict[str, Any] | None = None) -> Collection:
        if not collection_id:
            raise InvalidArgument("collection id must be a non-empty string")
        with self._db.tx(collection_id) as db:
            exists = db.execute("SELECT 1 FROM collections WHERE id = ?", (collection_id,)).fetchone()
            if exists:
                raise AlreadyExists(f"collection {collection_id!r} already exists")
            db.execute(
                "INSERT INTO collections (id, species, model_name, model_version, params, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (collection_id, species, model_name, model_version,
                 json.dumps(params or {}, sort_keys=True), timestamp()),
            )
            self._db.audit(db, collection_id, "create_collection", "", {"species": species})
        return self.get(collection_id)

    def get(self, collection_id: str) -> Collection:
        rows = self._db.query("SELECT * FROM collections WHERE id = ?", (collection_id,))
        if not rows:
            raise NotFound(f"collection {collection_id!r} does not exist")
        return _collection(rows[0])

    def all(self) -> list[Collection]:
        return [_collection(r)
                for r in self._db.query("SELECT * FROM collections ORDER BY created_at, id")]

    def delete(self, collection_id: str, *, actor: str = "") -> None:
        """Delete the collection and everything of it (cascades; training jobs explicitly,
        as their table has no foreign key in older databases). The audit log stays."""
        with self._db.tx(collection_id) as db:
            cur = db.execute("DELETE FROM collections WHERE id = ?", (collection_id,))
            if cur.rowcount == 0:
                raise NotFound(f"collection {collection_id!r} does not exist")
            db.execute("DELETE FROM training_jobs WHERE collection_id = ?", (collection_id,))
            self._db.audit(db, collection_id, "delete_collection", actor, {})

    def set_cycle(self, collection_id: str, cycle: int) -> None:
        with self._db.tx(collection_id) as db:
            db.execute("UPDATE collections SET cycle = ? WHERE id = ?", (cycle, collection_id))

    def set_model(self, collection_id: str, model_name: str, model_version: str, *,
                  actor: str = "") -> None:
        """Switch the collection to another model version (audited)."""
        with self._db.tx(collection_id) as db:
            cur = db.execute("UPDATE collections SET model_name = ?, model_version = ? WHERE id = ?",
                             (model_name, model_version, collection_id))
            if cur.rowcount == 0:
                raise NotFound(f"collection {collection_id!r} does not exist")
            self._db.audit(db, collection_id, "set_model", actor,
                           {"model_name": model_name, "model_version": model_version})

    def counts(self, collection_id: str) -> dict[str, int]:
        """Images, excluded images, images with a vector of the collection's model, current
        answers and pairs asked so far."""
        col = self.get(collection_id)
        q = self._db.query(
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

    def identities(self, collection_id: str) -> dict[str, str]:
        """image id -> identity id of the last saved assignment."""
        rows = self._db.query("SELECT image_id, identity_id FROM identities"
                              " WHERE collection_id = ?", (collection_id,))
        return {r["image_id"]: r["identity_id"] for r in rows}

    def counter(self, collection_id: str, name: str, default: int = 0) -> int:
        rows = self._db.query("SELECT value FROM counters WHERE collection_id = ? AND name = ?",
                              (collection_id, name))
        return int(rows[0]["value"]) if rows else default

    def save_identities(self, collection_id: str, assignment: Mapping[str, str], *,
                        counter_name: str, counter_value: int) -> None:
        """Replace the saved assignment and move the id counter, in one transaction."""
        with self._db.tx(collection_id) as db:
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

    def audit_log(self, collection_id: str) -> list[dict[str, Any]]:
        """The collection's audit entries, oldest first (they outlive the collection)."""
        rows = self._db.query("SELECT * FROM audit WHERE collection_id = ? ORDER BY seq",
                              (collection_id,))
        return [{"action": r["action"], "actor": r["actor"], "detail": json.loads(r["detail"]),
                 "at": r["at"]} for r in rows]


def _collection(r: Any) -> Collection:
    return Collection(r["id"], r["species"], r["model_name"], r["model_version"],
                      json.loads(r["params"]), r["cycle"], r["created_at"])
