"""What every aggregate of the store stands on: :class:`Database`, the one object that owns
the opened :class:`~reidal.store.backend.Backend` (connections, transactions, the exclusive
lock, this instance's owner id), writes the audit log and holds the helpers the aggregates'
queries share. Each aggregate is given it in its ``__init__``; none inherits from another."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from reidal.store.backend import Backend, Tx, is_database_url, redact_url
from reidal.store.postgres import PostgresBackend
from reidal.store.records import ANSWERS_EPOCH
from reidal.store.schema import SCHEMA_VERSION
from reidal.store.sqlite import SqliteBackend


def timestamp() -> float:
    """The time a row records (seconds since the epoch)."""
    return time.time()


def id_chunks(ids: Iterable[Any], size: int = 500) -> list[tuple[str, list[Any]]]:
    """(placeholders, ids) per chunk of at most ``size`` distinct ids (SQLite's
    bound-parameter limit)."""
    wanted = sorted(set(ids))
    return [(",".join("?" * len(wanted[k:k + size])), wanted[k:k + size])
            for k in range(0, len(wanted), size)]


class Database:
    """SQLite in ``data_dir``, or the PostgreSQL database at ``database_url`` (exactly one of
    the two), opened with its schema installed and this instance's owner id held."""

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
        self.engine: Backend
        if database_url is not None:
            if not is_database_url(database_url):
                raise ValueError(f"not a postgresql:// URL: {redact_url(database_url)!r}")
            self.engine = PostgresBackend(database_url)
        else:
            self.data_dir = Path(data_dir)  # type: ignore[arg-type]
            self.data_dir.mkdir(parents=True, exist_ok=True)
            sqlite = SqliteBackend(self.data_dir)
            self.path = sqlite.path
            self.engine = sqlite
        try:
            self.engine.install_schema(SCHEMA_VERSION)
            self.engine.hold_owner(self.owner)
        except BaseException:
            self.engine.close()
            raise

    @property
    def kind(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self.engine.kind

    def describe(self) -> str:
        """Where the data is, for logs (a URL without its password)."""
        return redact_url(self.database_url) if self.database_url else str(self.path)

    def tx(self, collection_id: str | None = None) -> AbstractContextManager[Tx]:
        """One write transaction; committed (durably) on success, rolled back on error. With
        a ``collection_id`` it runs alone among that collection's transactions, in every
        process on the database, so it may read, decide and write."""
        return self.engine.tx(None if collection_id is None else f"collection:{collection_id}")

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        """The rows of one read (inside a write transaction of this thread: what it wrote)."""
        return self.engine.query(sql, args)

    def exclusive(self, name: str) -> AbstractContextManager[None]:
        """Hold the lock ``name`` against every other thread and process using this database
        (re-entrant within a thread). SQLite: an ``flock`` file; PostgreSQL: a session
        advisory lock, released by the server if the process dies."""
        return self.engine.exclusive(name)

    def close(self) -> None:
        """Close (idempotent). SQLite: checkpoint the WAL into the main file first, so a clean
        shutdown leaves one file."""
        self.engine.close()

    def ping(self) -> bool:
        """True when the database answers (the readiness probe of the stateful services)."""
        return self.engine.ping()

    def owner_alive(self, owner: str) -> bool:
        """Whether the store instance ``owner`` is open (this one or another process's)."""
        return owner == self.owner or self.engine.owner_alive(owner)

    def audit(self, db: Tx, collection_id: str, action: str, actor: str,
              detail: dict[str, Any]) -> None:
        """Append one entry to the collection's audit log, inside the transaction ``db``."""
        db.execute(
            "INSERT INTO audit (collection_id, action, actor, detail, at) VALUES (?, ?, ?, ?, ?)",
            (collection_id, action, actor, json.dumps(detail, sort_keys=True), timestamp()),
        )

    def bump_answers_epoch(self, db: Tx, collection_id: str) -> int:
        """Move the collection's answers epoch on: what a cached answer state was built
        from changed in a way the answer log alone does not show (such a state reloads, or
        applies what :meth:`log_deletions` logged for the epoch); returns the new epoch."""
        return int(db.execute(
            "INSERT INTO counters (collection_id, name, value) VALUES (?, ?, 1)"
            " ON CONFLICT (collection_id, name) DO UPDATE SET value = counters.value + 1"
            " RETURNING value", (collection_id, ANSWERS_EPOCH)).fetchall()[0][0])

    @staticmethod
    def log_deletions(db: Tx, collection_id: str, epoch: int, where: str,
                      args: Sequence[Any], restored: int | None = None) -> None:
        """Log the answers ``where`` selects as retired at ``epoch``, or seq -1 when it
        selects none (see :class:`~reidal.store.records.AnswerDeletion`)."""
        cur = db.execute("INSERT INTO answer_deletions (collection_id, epoch, seq, restored)"
                         " SELECT collection_id, ?, seq, ? FROM answers WHERE collection_id = ?"
                         f" AND ({where})", (epoch, restored, collection_id, *args))
        if cur.rowcount == 0:
            db.execute("INSERT INTO answer_deletions (collection_id, epoch, seq) VALUES (?, ?, -1)",
                       (collection_id, epoch))

    def fail_abandoned(self, table: str, states: Sequence[str], sets: str,
                       args: Sequence[Any]) -> int:
        """Set ``sets`` on the rows of ``table`` in ``states`` whose owner is this instance
        or is no longer open; returns how many changed."""
        marks = ", ".join("?" * len(states))
        owners = [r[0] for r in self.query(
            f"SELECT DISTINCT owner FROM {table} WHERE state IN ({marks})", tuple(states))]
        gone = [o for o in owners if o == self.owner or not self.engine.owner_alive(o)]
        if not gone:
            return 0
        with self.tx() as db:
            cur = db.execute(
                f"UPDATE {table} SET {sets}, updated_at = ? WHERE state IN ({marks})"
                f" AND owner IN ({', '.join('?' * len(gone))})",
                (*args, timestamp(), *states, *gone))
            return int(cur.rowcount)
