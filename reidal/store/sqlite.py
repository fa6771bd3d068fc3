"""The SQLite backend.

SQLite (:class:`SqliteBackend`, a data directory): one write connection behind a lock,
WAL, ``synchronous=FULL``. ``BEGIN IMMEDIATE`` makes every write transaction exclusive, so
read-then-write sequences need nothing more. Reads outside a write transaction go through
a read-only connection of their own thread: in WAL mode a reader sees the last committed
state and neither waits for a writer (its commit's fsync included) nor holds one up, so
GetIdentities and GetQueryPairs on an unchanged state never queue behind submits. A read
inside the thread's own write transaction uses the write connection, so it sees that
transaction's writes. Cross-process locks are ``flock`` files in
``<data dir>/locks``, so several server processes on one data directory exclude each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sqlite3
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from reidal.store.backend import OWNER_ID, PerThread, Tx
from reidal.store.schema import ADDED_COLUMNS, SCHEMA, record_version


class _Reader:
    """A thread's read connection (a holder, since a connection takes no weak reference)."""

    __slots__ = ("__weakref__", "conn")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn


class SqliteBackend:
    """``<data dir>/reidal.sqlite3`` through one write connection and a read connection per
    reading thread (see the module docstring)."""

    kind = "sqlite"

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "reidal.sqlite3"
        self._locks_dir = data_dir / "locks"
        self._locks_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._closed = False
        self._owner_fd: int | None = None
        self._owner_path: Path | None = None
        self._held = PerThread(self._flock, self._funlock)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed transaction is on disk before commit returns, WAL mode included.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.row_factory = sqlite3.Row
        self._writer: int | None = None  # the thread inside tx(), if any
        self._local = threading.local()  # .reader: this thread's _Reader
        # The live readers, for close(); a thread's reader goes (and closes its connection)
        # when the thread ends, so short-lived threads leave no open file behind.
        self._readers: weakref.WeakSet[_Reader] = weakref.WeakSet()

    def install_schema(self, version: int) -> None:
        with self.tx() as db:
            for statement in SCHEMA.split(";"):  # executescript would commit our transaction
                if statement.strip():
                    db.execute(statement)
            for table, column, definition in ADDED_COLUMNS:
                have = {r["name"] for r in db.execute(f"PRAGMA table_info({table})").fetchall()}
                if column not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
            record_version(db, version)

    @contextmanager
    def tx(self, lock: str | None = None) -> Iterator[Tx]:
        """One write transaction, exclusive from its start (``lock`` is implied)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            outer, self._writer = self._writer, threading.get_ident()
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            finally:
                self._writer = outer
            self._db.execute("COMMIT")

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        """Rows of one statement: on this thread's read connection, or inside this thread's
        write transaction on the write connection (it sees that transaction's writes)."""
        if self._writer == threading.get_ident():
            with self._lock:
                return self._db.execute(sql, args).fetchall()
        return self._reader().execute(sql, args).fetchall()

    def _reader(self) -> sqlite3.Connection:
        reader = getattr(self._local, "reader", None)
        if reader is None:
            with self._lock:
                if self._closed:
                    raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
                conn = sqlite3.connect(self.path, check_same_thread=False,
                                       isolation_level=None)
                conn.execute("PRAGMA busy_timeout=10000")
                conn.execute("PRAGMA query_only=ON")
                conn.row_factory = sqlite3.Row
                reader = self._local.reader = _Reader(conn)
                self._readers.add(reader)
        return reader.conn

    def ping(self) -> bool:
        return self.query("SELECT 1")[0][0] == 1

    # -- cross-process locks: flock on files of the data directory ---------------------------
    def exclusive(self, name: str) -> contextlib.AbstractContextManager[None]:
        return self._held.hold(name)

    def _flock(self, name: str) -> int:
        digest = hashlib.sha256(name.encode()).hexdigest()[:32]
        fd = os.open(self._locks_dir / f"{digest}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _funlock(fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def hold_owner(self, owner: str) -> None:
        """Mark ``owner`` alive for as long as this backend is open: its file is locked
        before it appears under its name (so no check ever sees it unlocked), and the
        files of owners that died without closing are removed."""
        for path in self._locks_dir.glob("owner-*.lock"):
            self.owner_alive(path.stem.removeprefix("owner-"))
        aside = self._locks_dir / f".owner-{owner}.tmp"
        self._owner_fd = os.open(aside, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._owner_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._owner_path = self._locks_dir / f"owner-{owner}.lock"
        os.replace(aside, self._owner_path)

    def owner_alive(self, owner: str) -> bool:
        """Whether another open store holds ``owner`` (its process still runs)."""
        if not OWNER_ID.fullmatch(owner):
            return False
        path = self._locks_dir / f"owner-{owner}.lock"
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return True
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a dead owner's file
        self._funlock(fd)
        return False

    def close(self) -> None:
        """Checkpoint the WAL into the main file and close: a clean shutdown leaves one file."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for reader in list(self._readers):  # first: a checkpoint waits for open reads
                reader.conn.close()
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self._db.close()
                if self._owner_fd is not None and self._owner_path is not None:
                    with contextlib.suppress(FileNotFoundError):
                        self._owner_path.unlink()
                    self._funlock(self._owner_fd)
