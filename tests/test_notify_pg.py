"""Replicas on one PostgreSQL database wake each other's watch streams (LISTEN/NOTIFY,
reidal/notify_pg.py) instead of waiting for their poll: a notifier on another process
wakes at once, nothing loops, a killed listener connection comes back, and a stopped
server leaves no listener behind. Every wait here is 30 s; the tests require seconds.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Hashable

import grpc
import numpy as np
import psycopg
import pytest

from reidal.notify_pg import APPLICATION_NAME, MAX_PAYLOAD, PgNotifications, decode, encode
from reidal.runtime import Notifier, queue_key
from reidal.serve import serve
from reidal.services.sampling import SamplingServicer
from reidal.store import ImageRecord, Store
from reidal.v1 import sampling_pb2, sampling_pb2_grpc

LONG = 30.0  # every watch's poll: a wake-up within PROMPT seconds came from a notification
PROMPT = 5.0


def _count(n: Notifier, key: Hashable) -> int:
    """Bumps of ``key`` alone (a wake_all moves every key's version, so subtract it)."""
    return n.version(key) - n.version(("never bumped",))


def _wait_count(n: Notifier, key: Hashable, target: int, within: float = PROMPT) -> float:
    """Seconds until ``key`` has ``target`` bumps here (fails after ``within``)."""
    tic = time.monotonic()
    while _count(n, key) < target:
        left = within - (time.monotonic() - tic)
        assert left > 0, f"{key} reached {_count(n, key)} bumps, not {target}, in {within} s"
        n.wait(key, n.version(key), min(left, LONG))
    return time.monotonic() - tic


def _sessions(url: str, where: str = "") -> list[int]:
    with psycopg.connect(url, autocommit=True) as conn:
        return [r[0] for r in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            f" AND application_name = %s {where}", (APPLICATION_NAME,)).fetchall()]


def _eventually(check: Callable[[], bool], within: float = PROMPT) -> bool:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture()
def replicas(postgres_url):
    """Two processes' worth of notifiers on one database: (notifier, notifications) x 2."""
    made = []
    try:
        for _ in range(2):
            n = Notifier()
            made.append((n, PgNotifications(postgres_url, n, max_backoff_s=0.5)))
        yield made
    finally:
        for _, p in made:
            p.close()


def test_payloads_round_trip_and_stay_under_the_limit():
    assert decode(encode("me", ("queue", "c/ü"))) == ("me", ("queue", "c/ü"))
    assert decode(encode("me", "plain")) == ("me", "plain")
    for odd in (("queue", "x" * 9000), ("queue", object())):  # too long, not JSON
        payload = encode("me", odd)
        assert len(payload.encode()) <= MAX_PAYLOAD and decode(payload) == ("me", None)
    with pytest.raises(ValueError, match="not a reidal notification"):
        decode("hello")
    # A nested tuple comes back as the same (hashable) key; a JSON object is not a key.
    assert decode(encode("me", ("queue", ("a", 1)))) == ("me", ("queue", ("a", 1)))
    with pytest.raises(ValueError, match="not a reidal notification"):
        decode('{"o":"me","k":{"a":1}}')


def test_an_odd_payload_neither_drops_the_listener_nor_stops_the_others(replicas,
                                                                         postgres_url):
    """A payload that decodes to no hashable key (another version, someone's NOTIFY by
    hand) is skipped or bumped: it must not cost a reconnection (and a wake_all of every
    watcher) each time."""
    (a, _), (b, pb) = replicas
    old = pb.listener_pid
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        for payload in ('{"o":"x","k":["queue",["nested"]]}', '{"o":"x","k":{"a":1}}'):
            conn.execute("SELECT pg_notify('reidal_changes', %s)", (payload,))
    _wait_count(b, ("queue", ("nested",)), 1)
    a.bump(("operation", "after"))
    _wait_count(b, ("operation", "after"), 1)
    assert pb.listener_pid == old and pb.running


def _tcp(conn: psycopg.Connection) -> socket.socket:
    """The connection's own TCP socket (a duplicate descriptor: its options are shared)."""
    return socket.socket(fileno=os.dup(conn.pgconn.socket))


def test_a_peer_that_vanished_is_noticed_within_seconds(replicas):
    """A database host that vanishes (node lost, failover, a NAT forgetting the flow) sends
    no FIN: the idle listener would wait on a dead socket for the kernel's default 2 h of
    keepalive idle, and a send on it would hold the send lock (every bump of the process
    behind it) for the ~15 min of TCP retransmissions. Both connections bound that."""
    (a, pa), _ = replicas
    a.bump(("warm", "up"))  # opens the sending connection
    for conn in (pa._listen_conn, pa._send_conn):
        with _tcp(conn) as s:
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            idle = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
            interval = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL)
            count = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)
            assert idle + interval * count <= 60
            assert 0 < s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) <= 30_000


def test_a_bump_wakes_the_other_replica_at_once_and_nothing_loops(replicas):
    (a, _), (b, _) = replicas
    key = queue_key("c")
    seen = b.version(key)
    tic = time.monotonic()
    a.bump(key)
    assert b.wait(key, seen, LONG) == seen + 1
    assert time.monotonic() - tic < PROMPT
    for _ in range(3):
        b.bump(("operation", "op-1"))
    _wait_count(a, ("operation", "op-1"), 3)
    # Keys that cannot travel wake every watcher over there instead of being dropped.
    seen_other = a.version(("training_job", "j"))
    b.bump(("queue", "x" * 9000))
    assert a.wait(("training_job", "j"), seen_other, LONG) != seen_other
    time.sleep(0.3)  # an echo (a replica sending on what it received) would arrive by now
    assert (_count(a, key), _count(b, key)) == (1, 1)
    assert (_count(a, ("operation", "op-1")), _count(b, ("operation", "op-1"))) == (3, 3)


def test_a_killed_listener_reconnects_and_nothing_is_missed(replicas, postgres_url):
    (a, pa), (b, pb) = replicas
    a.bump(("warm", "up"))  # a's sending connection is open now
    _wait_count(b, ("warm", "up"), 1)
    old = pb.listener_pid
    everyone = _sessions(postgres_url)
    assert old in everyone and pa.listener_pid in everyone and len(everyone) == 3
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        for pid in everyone:  # both listeners and a's sending connection
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    # Sent while b may not listen: b still wakes promptly (notification or reconnect).
    seen = b.version(queue_key("c"))
    tic = time.monotonic()
    a.bump(queue_key("c"))
    assert b.wait(queue_key("c"), seen, LONG) != seen and time.monotonic() - tic < PROMPT
    assert _eventually(lambda: pb.listener_pid not in (None, old)
                       and pa.listener_pid is not None)
    assert pb.running and pa.running
    # Listening again: single keys arrive as notifications (a's sender was replaced too).
    before = _count(b, ("operation", "op-2"))
    a.bump(("operation", "op-2"))
    _wait_count(b, ("operation", "op-2"), before + 1)


def test_closing_stops_the_listener_and_its_connections(postgres_url):
    n = Notifier()
    p = PgNotifications(postgres_url, n)
    n.bump(("queue", "c"))  # opens the sending connection
    assert len(_sessions(postgres_url)) == 2
    tic = time.monotonic()
    p.close()
    assert time.monotonic() - tic < 1.0  # close wakes the listener; no waiting for its poll
    assert not p.running
    assert _eventually(lambda: _sessions(postgres_url) == [])
    n.bump(("queue", "c"))  # no publisher any more: a local bump only
    assert _sessions(postgres_url) == []
    # A bump that took the publisher just before close() sends after it: nothing reopens.
    p.publish(("queue", "c"))
    assert _sessions(postgres_url) == []
    p.close()  # idempotent


def test_watch_queue_on_one_server_sees_a_batch_stored_by_another(postgres_url, tmp_path):
    store = Store.open(postgres_url)
    try:
        store.collections.create("c", model_name="m", model_version="1")
        ids = [f"i{k:02d}" for k in range(12)]
        store.images.add("c", [ImageRecord(i) for i in ids])
        rng = np.random.default_rng(0)
        centres = rng.normal(size=(3, 8))
        x = centres[np.arange(12) % 3] + 0.2 * rng.normal(size=(12, 8))
        store.images.put_vectors("c", "m", "1", ids, x / np.linalg.norm(x, axis=1, keepdims=True))
    finally:
        store.close()
    kwargs = dict(data_dir=tmp_path / "data", database_url=postgres_url, start_triton=False,
                  health_interval_s=60)
    first, second = serve(["sampling"], **kwargs), serve(["sampling"], **kwargs)
    try:
        for b in second.running.bindings:
            if isinstance(b.servicer, SamplingServicer):
                b.servicer.watch_poll_s = LONG
        events: queue.Queue = queue.Queue()
        with grpc.insecure_channel(first.address) as ch_a, \
                grpc.insecure_channel(second.address) as ch_b:
            stream = sampling_pb2_grpc.SamplingServiceStub(ch_b).WatchQueue(
                sampling_pb2.WatchQueueRequest(collection_id="c", after_cycle=0))

            def consume() -> None:
                try:
                    for event in stream:
                        events.put(event)
                except grpc.RpcError as exc:
                    events.put(exc)

            reader = threading.Thread(target=consume, daemon=True)
            reader.start()
            time.sleep(0.5)  # the second server's stream is waiting on its notifier now
            batch = sampling_pb2_grpc.SamplingServiceStub(ch_a).GetQueryPairs(
                sampling_pb2.GetQueryPairsRequest(collection_id="c"))
            tic = time.monotonic()
            event = events.get(timeout=PROMPT)
            assert time.monotonic() - tic < PROMPT
            assert event.kind == sampling_pb2.QUEUE_EVENT_KIND_BATCH_READY
            assert event.batch.batch_id == batch.batch_id and event.batch.cycle == 1
            stream.cancel()
            reader.join(PROMPT)
    finally:
        first.stop(grace=1)
        second.stop(grace=1)
    for server in (first, second):
        assert not server.runtime.notifications.running
    assert _eventually(lambda: _sessions(postgres_url) == [])


def test_a_server_on_sqlite_keeps_its_poll_alone(tmp_path):
    with serve(["sampling"], data_dir=tmp_path, start_triton=False,
               health_interval_s=60) as server:
        assert server.runtime.notifications is None
