"""How the store reaches its database: the schema, and one backend per engine.

:mod:`reidal.store` writes every query once, in the SQL that SQLite and PostgreSQL share
(``?`` placeholders, ``INSERT ... ON CONFLICT``, ``RETURNING``). A backend supplies only
what differs: connections, how a write transaction starts and what it serialises, the
column types of the schema, the placeholder style, and locks that hold across processes.

SQLite (:class:`SqliteBackend`, a data directory): one connection behind a lock, WAL,
``synchronous=FULL``. ``BEGIN IMMEDIATE`` makes every write transaction exclusive, so
read-then-write sequences need nothing more. Cross-process locks are ``flock`` files in
``<data dir>/locks``, so several server processes on one data directory exclude each other.

PostgreSQL (:class:`PostgresBackend`, a ``postgresql://`` URL): a small connection pool
shared by the threads of a process, any number of processes (replicas) on one database.
Transactions run at READ COMMITTED; a write transaction of a collection first takes
``pg_advisory_xact_lock`` on a hash of the collection id, so the read-then-write sequences
of one collection (image positions, answer supersession, request-id replay, the cycle
counter, saved identities) run one at a time across every replica, while readers and
other collections never wait. Cross-process locks are session advisory locks, each on a
connection of its own: a crashed replica's connection closes and its locks go with it.
Every commit waits for the WAL flush (``synchronous_commit = on`` is set per connection).
Text columns compare bytewise (``COLLATE "C"``) like SQLite's, whatever the database's
locale, so ``image_a < image_b`` means what Python's ``sorted`` means.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from reidal.errors import InvalidArgument

SCHEMA = """
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
-- Schema 5: the newest answer of a collection, and the answers a given answer superseded,
-- found without a scan (the incremental answer state reads both inside every submit).
CREATE INDEX IF NOT EXISTS answers_by_seq ON answers (collection_id, seq);
CREATE INDEX IF NOT EXISTS answers_by_superseder ON answers (collection_id, superseded_by);
CREATE TABLE IF NOT EXISTS requests (
    collection_id TEXT NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    request_id TEXT NOT NULL,
    response TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (collection_id, request_id)
);
CREATE TABLE IF NOT EXISTS training_jobs (
    id TEXT PRIMARY KEY,
    collection_id TEXT NOT NULL,
    state TEXT NOT NULL,
    config TEXT NOT NULL,
    progress TEXT NOT NULL DEFAULT '{}',
    base_model_name TEXT NOT NULL DEFAULT '',
    base_model_version TEXT NOT NULL DEFAULT '',
    model_name TEXT NOT NULL DEFAULT '',
    model_version TEXT NOT NULL DEFAULT '',
    error_code TEXT NOT NULL DEFAULT '',
    error_message TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS training_jobs_by_collection ON training_jobs (collection_id);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    collection_id TEXT NOT NULL,
    action TEXT NOT NULL,
    actor TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT '{}',
    at REAL NOT NULL
);
-- Schema 2 (tables only added, so a schema-1 file upgrades in place).
-- Where an image's pixels are: bytes kept as a blob (kind 'data', sha256 of the bytes) or
-- a URI the server reads (kind 'uri', sha256 of the URI text). Lets AddImages tell a
-- resent image from a changed one, and EmbedCollection re-embed a collection.
CREATE TABLE IF NOT EXISTS image_sources (
    collection_id TEXT NOT NULL,
    image_id TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('data', 'uri')),
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (collection_id, image_id),
    FOREIGN KEY (collection_id, image_id) REFERENCES images (collection_id, image_id)
        ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS batches (
    collection_id TEXT NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    batch_id TEXT NOT NULL,
    cycle INTEGER NOT NULL,
    budget INTEGER NOT NULL,
    reason TEXT NOT NULL,
    finished INTEGER NOT NULL,
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    filter TEXT NOT NULL DEFAULT '{}',
    n_items INTEGER NOT NULL,
    stats TEXT NOT NULL DEFAULT '{}',
    request_id TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    PRIMARY KEY (collection_id, batch_id)
);
CREATE INDEX IF NOT EXISTS batches_by_cycle ON batches (collection_id, cycle);
CREATE UNIQUE INDEX IF NOT EXISTS batches_by_request ON batches (collection_id, request_id)
    WHERE request_id != '';
CREATE TABLE IF NOT EXISTS batch_pairs (
    collection_id TEXT NOT NULL,
    pair_id TEXT NOT NULL,
    batch_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    image_a TEXT NOT NULL,
    image_b TEXT NOT NULL,
    pool TEXT NOT NULL,
    region INTEGER NOT NULL,
    probability REAL NOT NULL,
    similarity REAL NOT NULL,
    PRIMARY KEY (collection_id, pair_id),
    FOREIGN KEY (collection_id, batch_id) REFERENCES batches (collection_id, batch_id)
        ON DELETE CASCADE,
    CHECK (image_a < image_b)
);
-- Schema 6: a request answered with an existing open batch (GetQueryPairs on an unchanged
-- state) is recorded here, so its retry returns that batch as a first call's retry does.
CREATE TABLE IF NOT EXISTS batch_requests (
    collection_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    batch_id TEXT NOT NULL,
    PRIMARY KEY (collection_id, request_id),
    FOREIGN KEY (collection_id, batch_id) REFERENCES batches (collection_id, batch_id)
        ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS images_by_seq ON images (collection_id, seq);
CREATE INDEX IF NOT EXISTS batch_pairs_by_batch ON batch_pairs (collection_id, batch_id, position);
CREATE INDEX IF NOT EXISTS batch_pairs_by_images ON batch_pairs (collection_id, image_a, image_b);
-- The identity of every image at the last GetIdentities, so ids stay stable across calls.
CREATE TABLE IF NOT EXISTS identities (
    collection_id TEXT NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    image_id TEXT NOT NULL,
    identity_id TEXT NOT NULL,
    PRIMARY KEY (collection_id, image_id)
);
-- Per-collection counters (e.g. the next identity number: identity ids are never reused).
CREATE TABLE IF NOT EXISTS counters (
    collection_id TEXT NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY (collection_id, name)
);
CREATE TABLE IF NOT EXISTS operations (
    operation_id TEXT PRIMARY KEY,
    collection_id TEXT NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('PENDING', 'RUNNING', 'SUCCEEDED', 'FAILED')),
    done INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    stage TEXT NOT NULL DEFAULT '',
    error_code TEXT NOT NULL DEFAULT '',
    error_message TEXT NOT NULL DEFAULT '',
    result TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS operations_by_collection ON operations (collection_id, created_at);
"""

#: Columns added to a table after its first release, as (table, column, definition): a
#: store adds the missing ones when it opens, so an older database upgrades in place.
#: Schema 3: ``owner``, the store instance (process) that runs an operation or a job.
#: Schema 4: ``cancel_requested`` of a training job (1: CancelJob asked, on any replica; the
#: process running the job reads it and stops).
ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("operations", "owner", "TEXT NOT NULL DEFAULT ''"),
    ("training_jobs", "owner", "TEXT NOT NULL DEFAULT ''"),
    ("training_jobs", "cancel_requested", "INTEGER NOT NULL DEFAULT 0"),
)

_POSTGRES_TYPES = (
    (r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b",
     "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
    (r"\bINTEGER\b", "BIGINT"),  # SQLite's INTEGER holds 64 bits
    (r"\bREAL\b", "DOUBLE PRECISION"),
    (r"\bBLOB\b", "BYTEA"),
    (r"\bTEXT\b", 'TEXT COLLATE "C"'),  # bytewise order, as in SQLite and Python
)

_OWNER_ID = re.compile(r"[0-9a-f]{32}")


def postgres_schema(sql: str) -> str:
    """The SQLite DDL in PostgreSQL's types (see ``_POSTGRES_TYPES``)."""
    for pattern, replacement in _POSTGRES_TYPES:
        sql = re.sub(pattern, replacement, sql)
    return sql


@functools.lru_cache(maxsize=1024)
def postgres_sql(sql: str) -> str:
    """A query from ``?`` placeholders to psycopg's ``%s`` (the store's SQL has no ``%``
    and no ``?`` inside literals)."""
    return sql.replace("?", "%s")


def is_database_url(target: object) -> bool:
    """True for a ``postgresql://`` or ``postgres://`` URL; ValueError for another URL."""
    if not isinstance(target, str) or "://" not in target:
        return False
    scheme = target.split("://", 1)[0].lower()
    if scheme not in ("postgresql", "postgres"):
        raise ValueError(f"unsupported database URL scheme {scheme!r}: use postgresql://")
    return True


def redact_url(url: str) -> str:
    """The URL without its password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


def lock_key(namespace: str, name: str) -> int:
    """A signed 64-bit advisory-lock key for ``name``: stable across processes and
    versions (computed here, not by a server function)."""
    digest = hashlib.sha256(f"reidal\0{namespace}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Tx(Protocol):
    """What a store method gets inside a write transaction (``sqlite3.Connection`` is one)."""

    def execute(self, sql: str, args: Sequence[Any] = ...) -> Cursor: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Any: ...


class Row:
    """A result row read by column name or by position, as ``sqlite3.Row`` is."""

    __slots__ = ("_index", "_values")

    def __init__(self, values: Sequence[Any], index: dict[str, int]) -> None:
        self._values = values
        self._index = index

    def __getitem__(self, key: int | str) -> Any:
        return self._values[self._index[key] if isinstance(key, str) else key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def keys(self) -> list[str]:
        return list(self._index)


class _PerThread:
    """Named cross-process locks, re-entrant per thread: the outermost ``hold`` of a name
    acquires (``acquire(name) -> handle``), its exit releases (``release(handle)``)."""

    def __init__(self, acquire: Callable[[str], Any], release: Callable[[Any], None]) -> None:
        self._acquire = acquire
        self._release = release
        self._local = threading.local()

    @contextmanager
    def hold(self, name: str) -> Iterator[None]:
        held: set[str] = self._local.__dict__.setdefault("held", set())
        if name in held:
            yield
            return
        handle = self._acquire(name)
        held.add(name)
        try:
            yield
        finally:
            held.discard(name)
            self._release(handle)


# --------------------------------------------------------------------------- SQLite


class SqliteBackend:
    """``<data dir>/reidal.sqlite3`` through one connection (see the module docstring)."""

    kind = "sqlite"

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "reidal.sqlite3"
        self._locks_dir = data_dir / "locks"
        self._locks_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._closed = False
        self._owner_fd: int | None = None
        self._owner_path: Path | None = None
        self._held = _PerThread(self._flock, self._funlock)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed transaction is on disk before commit returns, WAL mode included.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.row_factory = sqlite3.Row

    def install_schema(self, version: int) -> None:
        with self.tx() as db:
            for statement in SCHEMA.split(";"):  # executescript would commit our transaction
                if statement.strip():
                    db.execute(statement)
            for table, column, definition in ADDED_COLUMNS:
                have = {r["name"] for r in db.execute(f"PRAGMA table_info({table})").fetchall()}
                if column not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
            _record_version(db, version)

    @contextmanager
    def tx(self, lock: str | None = None) -> Iterator[Tx]:
        """One write transaction, exclusive from its start (``lock`` is implied)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

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
        if not _OWNER_ID.fullmatch(owner):
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
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self._db.close()
                if self._owner_fd is not None and self._owner_path is not None:
                    with contextlib.suppress(FileNotFoundError):
                        self._owner_path.unlink()
                    self._funlock(self._owner_fd)


def _record_version(db: Tx, version: int) -> None:
    db.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)"
               " ON CONFLICT (key) DO UPDATE SET value = excluded.value", (str(version),))


# ------------------------------------------------------------------------------ PostgreSQL


def _row_factory(cursor: Any) -> Callable[[Sequence[Any]], Row]:
    index = {c.name: k for k, c in enumerate(cursor.description or ())}
    return lambda values: Row(values, index)


@contextmanager
def _values_checked(psycopg: Any) -> Iterator[None]:
    """A value PostgreSQL refuses (a NUL character in a text, which SQLite takes; a number
    out of range) is the caller's error: InvalidArgument, not an internal one."""
    try:
        yield
    except psycopg.DataError as exc:
        raise InvalidArgument(f"the database refuses a value: {str(exc).strip()}") from exc


class _PgTx:
    """A transaction's connection, taking the store's ``?`` SQL. Results come in binary
    format (the same Python values, but vectors travel as bytes rather than hex)."""

    def __init__(self, conn: Any, psycopg: Any) -> None:
        self._conn = conn
        self._psycopg = psycopg

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        with _values_checked(self._psycopg):
            return self._conn.execute(postgres_sql(sql), tuple(args) or None, binary=True)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = list(rows)
        if rows:
            with _values_checked(self._psycopg), self._conn.cursor() as cur:
                cur.executemany(postgres_sql(sql), rows)


class _Pool:
    """Idle connections for reuse (at most ``max_idle``); more open on demand, so a thread
    never waits for a connection another thread holds."""

    def __init__(self, connect: Callable[[], Any], max_idle: int) -> None:
        self._connect = connect
        self._max_idle = max_idle
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False

    def get(self) -> tuple[Any, bool]:
        """A connection and whether it was reused (it may have died while idle)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the store is closed")
            conn = self._idle.pop() if self._idle else None
        return (conn, True) if conn is not None else (self._connect(), False)

    def put(self, conn: Any) -> None:
        from psycopg.pq import TransactionStatus

        usable = (not conn.closed and not conn.broken
                  and conn.info.transaction_status == TransactionStatus.IDLE)
        with self._lock:
            if usable and not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class PostgresBackend:
    """A PostgreSQL database through a connection pool (see the module docstring)."""

    kind = "postgresql"

    def __init__(self, url: str, *, max_idle: int = 16, connect_timeout_s: int = 10) -> None:
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        self.url = url
        self._psycopg = psycopg
        given = conninfo_to_dict(url)
        self._extra = {k: v for k, v in (("connect_timeout", str(connect_timeout_s)),
                                         ("application_name", "reidal")) if k not in given}
        self._pool = _Pool(self._connect, max_idle)
        self._local = threading.local()
        self._held = _PerThread(self._advisory_lock, self._advisory_unlock)
        self._owner = ""
        self._owner_conn: Any = None
        self._owner_lock = threading.Lock()
        self._closed = False
        try:  # fail now, with the server's message, if it cannot be reached
            self._pool.put(self._connect())
        except psycopg.OperationalError as exc:
            raise RuntimeError(f"cannot connect to PostgreSQL at {redact_url(url)}: "
                               f"{str(exc).strip()}") from exc

    def _connect(self) -> Any:
        conn = self._psycopg.connect(self.url, autocommit=True, row_factory=_row_factory,
                                     **self._extra)
        conn.execute("SET synchronous_commit = on")  # a commit is durable when it returns
        return conn

    def install_schema(self, version: int) -> None:
        # A current schema is left alone: DDL locks whole tables (ADD COLUMN even when the
        # column exists), so a replica starting would stall the running replicas' writes.
        if self._schema_version() >= version:
            return
        with self.tx("schema") as db:  # replicas starting together create it once
            for statement in postgres_schema(SCHEMA).split(";"):
                if statement.strip():
                    db.execute(statement)
            for table, column, definition in ADDED_COLUMNS:
                db.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} "
                           f"{postgres_schema(definition)}")
            _record_version(db, version)

    def _schema_version(self) -> int:
        """The schema version recorded in the database (0 before the first start)."""
        if not self.query("SELECT to_regclass('meta') IS NOT NULL")[0][0]:
            return 0
        rows = self.query("SELECT value FROM meta WHERE key = 'schema_version'")
        return int(rows[0][0]) if rows else 0

    @contextmanager
    def tx(self, lock: str | None = None) -> Iterator[Tx]:
        """One write transaction; with ``lock``, serialised with every other transaction
        of that name in any process (``pg_advisory_xact_lock``, released at the end)."""
        if getattr(self._local, "conn", None) is not None:
            raise RuntimeError("store transactions do not nest")
        conn, _ = self._checkout("BEGIN")
        self._local.conn = conn
        try:
            try:
                if lock is not None:
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key("tx", lock),))
                yield _PgTx(conn, self._psycopg)
            except BaseException:
                if not conn.broken:
                    with contextlib.suppress(self._psycopg.Error):
                        conn.execute("ROLLBACK")
                raise
            # A statement that failed inside (its error caught by the caller) aborted the
            # transaction, and PostgreSQL answers COMMIT with a silent ROLLBACK: say so.
            if conn.execute("COMMIT").statusmessage != "COMMIT":
                raise RuntimeError("the transaction was rolled back: a statement in it failed")
        finally:
            self._local.conn = None
            self._pool.put(conn)

    def _checkout(self, sql: str, args: Sequence[Any] = (), *,
                  keep_on_error: bool = True) -> tuple[Any, Any]:
        """A pooled connection and the cursor of its first statement ``sql``.

        A pooled connection that died while idle (a database restart ends them all) is
        dropped and the next one tried, each once, so a restart fails no call; a new
        connection that fails raises. On an error the connection goes back to the pool,
        which keeps it only if usable, or with ``keep_on_error`` False is closed (a
        session lock the statement may have taken goes with it)."""
        while True:
            conn, reused = self._pool.get()
            try:
                with _values_checked(self._psycopg):
                    return conn, conn.execute(postgres_sql(sql), tuple(args) or None,
                                              binary=True)
            except BaseException as exc:
                dead = (reused and conn.broken
                        and isinstance(exc, self._psycopg.OperationalError))
                if keep_on_error:
                    self._pool.put(conn)
                else:
                    conn.close()
                if not dead:
                    raise

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        """Rows of one statement; inside this thread's transaction it sees that
        transaction's writes (a callback run inside :meth:`tx` reads through it)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return _PgTx(conn, self._psycopg).execute(sql, args).fetchall()
        conn, cur = self._checkout(sql, args)
        try:
            return cur.fetchall()
        finally:
            self._pool.put(conn)

    # -- cross-process locks: session advisory locks -------------------------------------------
    def exclusive(self, name: str) -> contextlib.AbstractContextManager[None]:
        return self._held.hold(name)

    def _advisory_lock(self, name: str) -> tuple[Any, int]:
        key = lock_key("exclusive", name)
        conn, _ = self._checkout("SELECT pg_advisory_lock(?)", (key,), keep_on_error=False)
        return conn, key

    def _advisory_unlock(self, handle: tuple[Any, int]) -> None:
        conn, key = handle
        try:
            conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
        except BaseException:
            conn.close()  # closing the session releases its locks
            raise
        self._pool.put(conn)

    def hold_owner(self, owner: str) -> None:
        """Mark ``owner`` alive for as long as this backend is open (a lock of a session of
        its own: if the process dies, the server ends the session and the mark goes)."""
        with self._owner_lock:
            self._owner = owner
            self._take_owner_mark()

    def _take_owner_mark(self) -> None:  # under self._owner_lock
        conn = self._connect()
        try:
            conn.execute("SELECT pg_advisory_lock(%s)", (lock_key("owner", self._owner),))
        except BaseException:
            conn.close()
            raise
        self._owner_conn = conn

    def ping(self) -> bool:
        """The database answers; also takes the owner mark again if its session was lost
        (a database restart), so this store's work is not taken for abandoned for long."""
        with self._owner_lock:  # one re-take at a time, and none once closed
            if self._closed:
                raise RuntimeError("the store is closed")
            try:
                self._owner_conn.execute("SELECT 1")
            except self._psycopg.OperationalError:
                self._owner_conn.close()
                self._take_owner_mark()
        return self.query("SELECT 1")[0][0] == 1

    def owner_alive(self, owner: str) -> bool:
        if not _OWNER_ID.fullmatch(owner):
            return False
        key = lock_key("owner", owner)
        # One session for the try and the release.
        conn, cur = self._checkout("SELECT pg_try_advisory_lock(?)", (key,),
                                   keep_on_error=False)
        try:
            free = cur.fetchone()[0]
            if free:  # nobody held it: release it at once
                conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
        except BaseException:
            conn.close()
            raise
        self._pool.put(conn)
        return not free

    def close(self) -> None:
        with self._owner_lock:
            if self._closed:
                return
            self._closed = True
            self._pool.close()
            if self._owner_conn is not None:
                # Unlock first: closing alone frees the mark only once the server has
                # noticed, a moment later, and a store opened right after must see it gone.
                with contextlib.suppress(self._psycopg.Error):
                    self._owner_conn.execute("SELECT pg_advisory_unlock_all()")
                self._owner_conn.close()
