"""Wake the watch streams of every replica on one PostgreSQL database, not only this one.

A :class:`~reidal.runtime.Notifier` is process-local: a WatchQueue on replica B would see a
batch replica A stored only at its next poll. :class:`PgNotifications` closes that gap with
PostgreSQL's LISTEN/NOTIFY: every local bump is also sent with ``pg_notify`` on
:data:`CHANNEL` (payload: this process's origin id and the key as JSON), and one daemon
thread per process, on a connection of its own, LISTENs there and bumps the local notifier
for the keys other processes sent (never re-sending them, and skipping its own).

Nothing depends on a notification arriving: the store stays the source of truth and the
watch streams keep their poll. A lost listener connection is reopened with backoff, and
every watcher is then woken once (:meth:`~reidal.runtime.Notifier.wake_all`), since the
notifications sent meanwhile are gone; a failed send is logged and dropped. Either way a
change is late, never missed. SQLite needs none of this (one process, or several on one
data directory, where the poll stays the only cross-process path).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Hashable
from typing import Any

from reidal.logs import log_kv
from reidal.runtime import Notifier
from reidal.store import redact_url

log = logging.getLogger("reidal.notify_pg")

#: The NOTIFY channel every reidal process on a database shares.
CHANNEL = "reidal_changes"
#: Largest payload sent; PostgreSQL refuses 8000 bytes and more. A key that does not fit
#: (or is not JSON) is sent as "wake everything" instead.
MAX_PAYLOAD = 7000
#: application_name of the listening and sending connections (pg_stat_activity).
APPLICATION_NAME = "reidal-notify"
#: TCP settings of both connections (a ``database_url`` that names one wins): a database
#: host that vanishes without closing them (node lost, failover, a NAT dropping the flow) is
#: noticed within ~25 s by the idle listener (keepalives; the kernel default waits 2 h) and
#: within 15 s by a send waiting on it (tcp_user_timeout; default: ~15 min of retransmits,
#: all that time holding the send lock, so every bump of the process waits behind it).
DEAD_PEER = (("keepalives", "1"), ("keepalives_idle", "10"), ("keepalives_interval", "5"),
             ("keepalives_count", "3"), ("tcp_user_timeout", "15000"))


def encode(origin: str, key: Hashable) -> str:
    """The payload for ``key``; a key that is not a JSON-able tuple / str / int, or too
    long, becomes ``null``, which makes receivers wake all their watchers."""
    try:
        payload = json.dumps({"o": origin, "k": list(key) if isinstance(key, tuple) else key},
                             separators=(",", ":"))
    except (TypeError, ValueError):
        payload = ""
    if not payload or len(payload.encode()) > MAX_PAYLOAD:
        payload = json.dumps({"o": origin, "k": None}, separators=(",", ":"))
    return payload


def decode(payload: str) -> tuple[str, Hashable | None]:
    """``(origin, key)`` of a payload (key None: wake all); ValueError if not ours."""
    try:
        data = json.loads(payload)
        origin, key = data["o"], data["k"]
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"not a reidal notification: {payload[:80]!r}") from exc
    key = _as_key(key)
    if not isinstance(origin, str):
        raise ValueError(f"not a reidal notification: {payload[:80]!r}")
    try:
        hash(key)
    except TypeError:  # a JSON object: no key of ours, and the notifier cannot hold it
        raise ValueError(f"not a reidal notification: {payload[:80]!r}") from None
    return origin, key


def _as_key(value: Any) -> Any:
    """JSON lists back to the tuples :func:`encode` sent, at every depth."""
    return tuple(_as_key(v) for v in value) if isinstance(value, list) else value


class PgNotifications:
    """Publishes ``notifier``'s bumps to, and bumps it from, the other processes on the
    database at ``url``. Opening LISTENs at once (errors raise); :meth:`close` stops the
    listener thread and closes both connections.

    ``poll_s``: how long the listener waits for a notification before checking that it
    should stop (close also wakes it at once). ``max_backoff_s``: the longest wait between
    reconnection attempts. ``send_pause_s``: after a failed send, how long sends are
    skipped. ``connect_timeout_s``: for each connection attempt.
    """

    def __init__(self, url: str, notifier: Notifier, *, poll_s: float = 1.0,
                 max_backoff_s: float = 5.0, send_pause_s: float = 1.0,
                 connect_timeout_s: int = 5) -> None:
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        self._psycopg = psycopg
        self.url = url
        self.notifier = notifier
        self.origin = uuid.uuid4().hex
        self._poll_s = poll_s
        self._max_backoff_s = max_backoff_s
        given = conninfo_to_dict(url)
        self._extra = {k: v for k, v in (("connect_timeout", str(connect_timeout_s)),
                                         ("application_name", APPLICATION_NAME), *DEAD_PEER)
                       if k not in given}
        self._send_lock = threading.Lock()
        self._send_conn: Any = None
        self._send_pause_s = send_pause_s
        self._send_paused_until = 0.0
        self._closed = False  # set by close(): a late publish must not reopen a connection
        self._stop = threading.Event()
        self._wake_channel = f"reidal_wake_{self.origin}"  # close() wakes the listener here
        self._listen_conn = self._listen()  # the first LISTEN is done when this returns
        self._thread = threading.Thread(target=self._run, name="reidal-pg-notify", daemon=True)
        self._thread.start()
        notifier.set_publisher(self.publish)

    @property
    def listener_pid(self) -> int | None:
        """The server process of the listening connection (None while reconnecting)."""
        conn = self._listen_conn
        return None if conn is None or conn.closed else conn.info.backend_pid

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _connect(self) -> Any:
        return self._psycopg.connect(self.url, autocommit=True, **self._extra)

    def _listen(self) -> Any:
        conn = self._connect()
        try:
            conn.execute(f"LISTEN {CHANNEL}")
            conn.execute(f"LISTEN {self._wake_channel}")
        except BaseException:
            conn.close()
            raise
        return conn

    # -- sending --------------------------------------------------------------------------
    def publish(self, key: Hashable) -> None:
        """Tell the other processes that ``key`` changed. Never raises for the database:
        a send that fails is logged and dropped (the others' poll finds the change), and
        for ``send_pause_s`` after a failure nothing is tried, so an unreachable database
        does not stall every caller for a connect timeout."""
        self._send(CHANNEL, encode(self.origin, key))

    def _send(self, channel: str, payload: str) -> None:
        with self._send_lock:
            if self._closed or time.monotonic() < self._send_paused_until:
                return
            while True:
                reused = self._send_conn is not None
                try:
                    if self._send_conn is None:
                        self._send_conn = self._connect()
                    self._send_conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))
                    return
                except self._psycopg.Error as exc:
                    if self._send_conn is not None:
                        self._send_conn.close()
                        self._send_conn = None
                    if not reused:  # a kept connection that died idle is replaced once
                        self._send_paused_until = time.monotonic() + self._send_pause_s
                        log_kv(log, logging.WARNING, "notify_send_failed",
                               database=redact_url(self.url), detail=str(exc).strip())
                        return

    # -- listening ------------------------------------------------------------------------
    def _run(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            conn = self._listen_conn
            if conn is None:
                if self._stop.wait(backoff):
                    break
                try:
                    conn = self._listen()
                except self._psycopg.Error as exc:
                    backoff = min(self._max_backoff_s, max(0.1, backoff * 2))
                    log_kv(log, logging.WARNING, "notify_listen_retry",
                           database=redact_url(self.url), retry_in_s=backoff,
                           detail=str(exc).strip())
                    continue
                self._listen_conn = conn
                backoff = 0.0
                log_kv(log, logging.INFO, "notify_listen_restored",
                       database=redact_url(self.url))
                # What was sent while nobody listened is lost: every watcher looks again.
                self.notifier.wake_all()
            try:
                self._receive(conn)
            except Exception as exc:  # a lost connection, mostly: the thread must go on
                log_kv(log, logging.WARNING, "notify_listen_lost",
                       database=redact_url(self.url), detail=str(exc).strip())
                self._listen_conn = None
                conn.close()
        conn = self._listen_conn
        self._listen_conn = None
        if conn is not None:
            conn.close()

    def _receive(self, conn: Any) -> None:
        """Bump the notifier for each notification of another process, until it is time
        to check for a stop."""
        for note in conn.notifies(timeout=self._poll_s):
            if note.channel != CHANNEL:  # the wake-up of close()
                return
            try:
                origin, key = decode(note.payload)
            except ValueError:
                log.debug("ignoring a foreign notification on %s", CHANNEL)
                continue
            if origin == self.origin:
                continue  # our own: this process bumped it already
            if key is None:
                self.notifier.wake_all()
            else:
                self.notifier.bump(key, publish=False)  # never sent on: no loops

    def close(self, timeout: float = 10.0) -> None:
        """Stop listening and sending (idempotent); the notifier stops publishing."""
        if self._stop.is_set():
            return
        self._stop.set()
        self.notifier.set_publisher(None)
        self._send(self._wake_channel, "")  # the listener sees the stop now
        self._thread.join(timeout)
        with self._send_lock:
            self._closed = True
            if self._send_conn is not None:
                self._send_conn.close()
                self._send_conn = None
