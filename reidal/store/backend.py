"""What the store needs from a database engine: the :class:`Backend` protocol, and the
pieces both engines share.

:mod:`reidal.store` writes every query once, in the SQL that SQLite and PostgreSQL share
(``?`` placeholders, ``INSERT ... ON CONFLICT``, ``RETURNING``). A backend supplies only
what differs: connections, how a write transaction starts and what it serialises, the
column types of the schema, the placeholder style, and locks that hold across processes
(:class:`~reidal.store.sqlite.SqliteBackend`, :class:`~reidal.store.postgres.PostgresBackend`).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

OWNER_ID = re.compile(r"[0-9a-f]{32}")


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


class PerThread:
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


@runtime_checkable
class Backend(Protocol):
    """One database engine under the store (see the module docstring)."""

    #: ``"sqlite"`` or ``"postgresql"``.
    kind: str

    def install_schema(self, version: int) -> None:
        """Create the tables (or add what an older database lacks) and record ``version``."""

    def tx(self, lock: str | None = None) -> contextlib.AbstractContextManager[Tx]:
        """One write transaction, committed durably on success, rolled back on error; with
        ``lock``, serialised with every other transaction of that name in any process."""

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        """Rows of one statement (inside this thread's transaction: through it)."""

    def ping(self) -> bool:
        """True when the database answers."""

    def exclusive(self, name: str) -> contextlib.AbstractContextManager[None]:
        """A named lock across threads and processes, re-entrant per thread."""

    def hold_owner(self, owner: str) -> None:
        """Mark ``owner`` alive for as long as this backend is open."""

    def owner_alive(self, owner: str) -> bool:
        """Whether another open store holds ``owner``."""

    def close(self) -> None:
        """Release the connections and the owner mark (idempotent)."""
