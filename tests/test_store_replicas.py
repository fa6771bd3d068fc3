"""Several stores on one database, as replicas on PostgreSQL or server processes on one
SQLite data directory: the writes of a collection stay serial, named locks exclude each
other, and the work of a live store is never taken for abandoned. Every store test runs
on both backends (conftest ``store_target``); the last test serves the services on
PostgreSQL across a restart.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from _services_support import Stubs, by_images, create_and_fill, pictures

from reidal.blobs import BlobStore
from reidal.errors import AlreadyExists, NotFound
from reidal.runtime import Runtime
from reidal.serve import serve
from reidal.store import AnswerIn, ImageRecord, PairRecord, Store, redact_url
from reidal.v1 import collections_pb2, constraints_pb2

C, K = collections_pb2, constraints_pb2


@pytest.fixture()
def two(store_target):
    """Two stores on one database (a collection ``c`` of six images)."""
    a, b = Store.open(store_target), Store.open(store_target)
    a.collections.create("c")
    a.images.add("c", [ImageRecord(f"i{k}") for k in range(6)])
    yield a, b
    a.close()
    b.close()


def _race(n: int, fn: Callable[[int], object]) -> list:
    """``fn(k)`` on ``n`` threads released together; the results by k (first error raised)."""
    barrier = threading.Barrier(n)
    out: list = [None] * n
    errors: list[BaseException] = []

    def run(k: int) -> None:
        barrier.wait()
        try:
            out[k] = fn(k)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return out


def _pairs(*pairs: tuple[str, str]) -> list[PairRecord]:
    return [PairRecord("", a, b, "U_us", 0, 0.5, 0.9) for a, b in pairs]


def test_writes_of_one_collection_from_two_stores_stay_serial(two):
    a, b = two
    stores = [a, b] * 4  # thread k writes through stores[k]

    def create(k: int) -> bool:
        try:
            stores[k].collections.create("new")
        except AlreadyExists:
            return False
        return True

    assert sorted(_race(8, create)) == [False] * 7 + [True]
    # One request id, eight concurrent retries: stored once, replayed seven times.
    replayed = _race(8, lambda k: stores[k].answers.submit_once(
        "c", [AnswerIn("i0", "i1", "SAME")], request_id="r")[1])
    assert sorted(replayed) == [False] + [True] * 7
    assert len(a.answers.all("c", current_only=False)) == 1
    # Eight answers on one pair: each supersedes the one before, the newest is current.
    _race(8, lambda k: stores[k].answers.submit("c", [AnswerIn("i3", "i2", "UNSURE")]))
    history = [x for x in b.answers.all("c", current_only=False) if x.image_a == "i2"]
    seqs = sorted(x.seq for x in history)
    assert {x.seq: x.superseded_by for x in history} == dict(zip(seqs, [*seqs[1:], None],
                                                                 strict=True))
    # Batches: consecutive cycles, one batch per request id.
    made = _race(8, lambda k: stores[k].batches.create(
        "c", lambda cycle: f"b{cycle}", _pairs(("i4", "i5")), budget=1, reason="",
        finished=False, model_name="m", model_version="1", request_id=f"q{k % 4}"))
    assert sorted(batch.cycle for batch, created in made if created) == [1, 2, 3, 4]
    by_request: dict[str, set[str]] = {}
    for batch, _ in made:
        by_request.setdefault(batch.request_id, set()).add(batch.batch_id)
    assert sorted(len(v) for v in by_request.values()) == [1, 1, 1, 1]
    assert a.collections.get("c").cycle == 4 and len(b.batches.all("c")) == 4
    # Image positions stay unique and dense; saved identities are one whole assignment.
    _race(8, lambda k: stores[k].images.add("c", [ImageRecord(f"t{k}-{j}") for j in range(5)]))
    assert sorted(r.seq for r in a.images.page("c")) == list(range(6 + 40))
    assignments = [{f"i{j}": f"id-{k}" for j in range(6)} for k in range(8)]
    _race(8, lambda k: stores[k].collections.save_identities(
        "c", assignments[k], counter_name="identity", counter_value=k))
    k = a.collections.counter("c", "identity")
    assert b.collections.identities("c") == assignments[k]


def test_runtime_locks_hold_across_stores(two, tmp_path):
    a, b = two
    runtimes = [Runtime(s, BlobStore(tmp_path / "blobs")) for s in (a, b)]
    try:
        count = [0, 0]

        def work(k: int) -> None:
            rt = runtimes[k % 2]
            for _ in range(3):
                with rt.lock("c"), rt.lock("c"):  # re-entrant within a thread
                    seen = count[0]
                    time.sleep(0.003)  # another holder would overwrite this increment
                    count[0] = seen + 1
                with rt.blob_lock:
                    seen = count[1]
                    time.sleep(0.003)
                    count[1] = seen + 1

        _race(6, work)
        assert count == [18, 18]
        # Another collection's lock is free meanwhile; the same one waits for its holder.
        held, release, got = threading.Event(), threading.Event(), threading.Event()

        def holder() -> None:
            with runtimes[0].lock("c"):
                held.set()
                release.wait(10)

        def waiter() -> None:
            with runtimes[1].lock("c"):
                got.set()

        threading.Thread(target=holder).start()
        assert held.wait(10)
        tic = time.perf_counter()
        with runtimes[1].lock("d"):
            assert time.perf_counter() - tic < 2
        threading.Thread(target=waiter).start()
        assert not got.wait(0.3)
        release.set()
        assert got.wait(10)
    finally:
        for rt in runtimes:
            rt.close()


def test_work_of_a_live_store_is_not_taken_for_abandoned(two, store_target):
    a, b = two
    a.operations.create("op-a", "c", "embed")
    a.operations.update("op-a", state="RUNNING")
    job = a.jobs.create("c", {"epochs": 1}, base_model_name="m", base_model_version="1")
    crash = f"""
import os, signal
from reidal.store import Store
s = Store.open({store_target!r})
s.operations.create("op-killed", "c", "embed")
os.kill(os.getpid(), signal.SIGKILL)
"""
    assert subprocess.run([sys.executable, "-c", crash], capture_output=True).returncode == -9
    # a's work goes on (a is open); the killed process's operation is nobody's any more
    # (once the server has seen its connection close: a moment on PostgreSQL).
    deadline = time.monotonic() + 10
    while (aborted := b.operations.fail_unfinished("restarted")) == 0:
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert aborted == 1
    assert b.jobs.fail_interrupted("restarted") == 0
    assert [a.operations.get(o).state for o in ("op-a", "op-killed")] == ["RUNNING", "FAILED"]
    a.close()  # a stopped: now its work is abandoned too
    assert b.operations.fail_unfinished("restarted") == 1
    assert b.jobs.fail_interrupted("restarted") == 1
    op_a = b.operations.get("op-a")
    assert (op_a.state, op_a.error_code) == ("FAILED", "ABORTED")
    assert b.jobs.get(job.job_id).state == "FAILED"
    if "://" not in store_target:  # SQLite: only the open store's owner file is left
        assert [p.name for p in Path(store_target, "locks").glob("owner-*")] == [
            f"owner-{b.owner}.lock"]


def test_a_cancel_request_recorded_by_one_store_reaches_the_runner_in_another(two):
    """CancelJob on replica B for a job replica A runs: B records the request, A's job sees
    it at its next store read (rate-limited, or at once when the job's key moves)."""
    from reidal.runtime import Notifier
    from reidal.training_jobs import CancelSignal, job_key

    a, b = two
    running = a.jobs.create("c", {"epochs": 9}, base_model_name="m",
                            base_model_version="1")
    assert a.jobs.update(running.job_id, state="RUNNING")
    notifier = Notifier()
    signal = CancelSignal(a, running.job_id, notifier, check_s=3600.0)
    assert not signal.is_set()  # the first check reads the store: nothing asked
    asked = b.jobs.request_cancel(running.job_id)
    # a's store is open, so a runs it: still RUNNING, flagged, until a's runner stops it
    assert (asked.state, asked.cancel_requested) == ("RUNNING", True)
    assert a.jobs.get(running.job_id).cancel_requested
    assert not signal.is_set()  # no store read before check_s...
    notifier.bump(job_key(running.job_id))  # ...unless the job's key moved (NOTIFY from b)
    assert signal.is_set()
    assert CancelSignal(a, running.job_id, Notifier()).is_set()  # a fresh one reads at once
    # the runner's own final update still lands, as a local cancel's does
    assert a.jobs.update(running.job_id, state="CANCELLED")
    done = b.jobs.get(running.job_id)
    assert (done.state, done.cancel_requested) == ("CANCELLED", True)
    # a final job is left as it was
    assert b.jobs.request_cancel(running.job_id) == done
    assert not a.jobs.update(running.job_id, state="RUNNING")

    # a queued job is cancelled at once, wherever the request lands
    queued = a.jobs.create("c", {"epochs": 1}, base_model_name="m",
                           base_model_version="1")
    now = b.jobs.request_cancel(queued.job_id)
    assert (now.state, now.cancel_requested) == ("CANCELLED", True)
    assert not a.jobs.update(queued.job_id, state="RUNNING")  # its runner never starts
    untouched = a.jobs.create("c", {"epochs": 1}, base_model_name="m",
                              base_model_version="1")
    assert not b.jobs.get(untouched.job_id).cancel_requested

    # a running job whose owner is gone is nobody's: cancelled at once too
    orphan = a.jobs.create("c", {"epochs": 9}, base_model_name="m",
                           base_model_version="1")
    a.jobs.update(orphan.job_id, state="RUNNING")
    a.close()
    deadline = time.monotonic() + 10  # PostgreSQL drops the owner mark a moment later
    while (got := b.jobs.request_cancel(orphan.job_id)).state == "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert got.state == "CANCELLED"
    with pytest.raises(NotFound):
        b.jobs.request_cancel("nope")


def test_text_compares_bytewise_whatever_the_database_locale(store_target):
    """Pairs are stored sorted as Python sorts them; PostgreSQL test databases use ICU
    en-US order ('a' < 'B' there), so the schema must compare bytes ('B' < 'a')."""
    s = Store.open(store_target)
    try:
        assert s.backend == ("postgresql" if "://" in store_target else "sqlite")
        s.collections.create("t")
        s.images.add("t", [ImageRecord(i) for i in ("a", "B", "ä", "Z10", "z9")])
        s.answers.submit("t", [AnswerIn("a", "B", "SAME"), AnswerIn("ä", "a", "DIFFERENT"),
                               AnswerIn("z9", "Z10", "UNSURE")])
        assert [(x.image_a, x.image_b) for x in s.answers.all("t")] == [
            ("B", "a"), ("a", "ä"), ("Z10", "z9")]
        s.batches.create("t", lambda cycle: f"b{cycle}", _pairs(("B", "z9")), budget=1,
                         reason="", finished=False, model_name="m", model_version="1")
        assert s.batches.pending_pairs("t") == [("B", "z9")]
        s.collections.create("T")
        assert [c.id for c in s.collections.all()] == ["t", "T"]  # by creation time
    finally:
        s.close()


def test_open_picks_the_backend(tmp_path):
    s = Store.open(tmp_path)
    assert (s.backend, s.path, s.database_url) == ("sqlite", tmp_path / "reidal.sqlite3", None)
    s.close()
    s.close()  # idempotent
    with pytest.raises(ValueError, match="postgresql://"):
        Store.open("mysql://u@h/db")
    with pytest.raises(ValueError, match="data directory"):
        Store()
    with pytest.raises(ValueError, match="data directory"):
        Store(tmp_path, database_url="postgresql://h/db")
    assert redact_url("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there
    with pytest.raises(RuntimeError, match=r"cannot connect to PostgreSQL at postgresql://u:\*\*\*@"):
        Store.open(f"postgresql://u:secret@127.0.0.1:{port}/db")


def test_services_on_postgresql_keep_everything_across_a_restart(triton, postgres_url,
                                                                 tmp_path):
    data = tmp_path / "data"
    pics = pictures()[:8]
    ids = [p.image_id for p in pics]
    kwargs = dict(data_dir=data, database_url=postgres_url, triton_url=triton.grpc_url,
                  health_interval_s=60)
    answers = [by_images(ids[0], ids[1], True), by_images(ids[2], ids[3], False),
               by_images(ids[3], ids[2], None)]

    def snapshot(s: Stubs) -> tuple:
        col = s.collections.GetCollection(C.GetCollectionRequest(collection_id="kept"))
        listed = s.constraints.ListConstraints(K.ListConstraintsRequest(
            collection_id="kept", include_history=True, page_size=100))
        ident = s.constraints.GetIdentities(K.GetIdentitiesRequest(collection_id="kept"))
        return ((col.image_count, col.embedded_image_count, col.answer_count), listed,
                {x.identity_id: list(x.image_ids) for x in ident.identities})

    first = serve(["collections", "constraints"], **kwargs)
    try:
        s = Stubs.connect(first.address)
        create_and_fill(s, "kept", pics)
        out = s.constraints.SubmitConstraints(K.SubmitConstraintsRequest(
            collection_id="kept", answers=answers, request_id="r1"))
        assert out.stored_count == 3
        before = snapshot(s)
        s.close()
    finally:
        first.stop(grace=1)
    assert before[0] == (8, 8, 2)
    assert not list(data.glob("*.sqlite3*"))  # the store was PostgreSQL, not a file here

    second = serve(["collections", "constraints"], **kwargs)
    try:
        s = Stubs.connect(second.address)
        assert snapshot(s) == before
        replay = s.constraints.SubmitConstraints(K.SubmitConstraintsRequest(
            collection_id="kept", answers=answers, request_id="r1"))
        assert (replay.stored_count, replay.replayed_count) == (0, 3)
        s.close()
    finally:
        second.stop(grace=1)


def test_cli_serve_takes_the_database_url_from_the_environment(monkeypatch):
    from reidal.cli import build_parser
    from reidal.serve_config import DATABASE_URL_ENV

    assert build_parser().parse_args(["serve"]).database_url == ""
    monkeypatch.setenv(DATABASE_URL_ENV, "postgresql://r@db:5432/reidal")
    assert build_parser().parse_args(["serve"]).database_url == "postgresql://r@db:5432/reidal"
    args = build_parser().parse_args(["serve", "--database-url", "postgresql://other/x"])
    assert args.database_url == "postgresql://other/x"


def test_a_store_outlives_a_database_restart(postgres, postgres_url):
    a, b = Store.open(postgres_url), Store.open(postgres_url)
    try:
        a.collections.create("c")
        a.images.add("c", [ImageRecord("x"), ImageRecord("y")])
        a.operations.create("op-a", "c", "embed")
        postgres.restart()  # every session ends, the owner marks with them
        assert a.collections.counts("c")["images"] == 2  # pooled connections that died are replaced
        assert a.answers.submit("c", [AnswerIn("x", "y", "SAME")]) == [1]
        assert a.ping()  # the readiness probe takes the owner mark again
        assert b.operations.fail_unfinished("restarted") == 0
        assert a.operations.get("op-a").state == "PENDING"
    finally:
        a.close()
        b.close()


def test_restart_with_many_pooled_connections_and_locks(postgres, postgres_url):
    """Every idle connection died with the server: each is dropped in turn, calls and the
    cross-process lock work at once (they used to fail INTERNAL after the first retry)."""
    a = Store.open(postgres_url)
    try:
        a.collections.create("c")
        a.images.add("c", [ImageRecord("x"), ImageRecord("y")])
        conns = [a.db.engine._pool.get()[0] for _ in range(4)]  # four idle connections
        for c in conns:
            a.db.engine._pool.put(c)
        postgres.restart()
        assert [a.collections.counts("c")["images"] for _ in range(3)] == [2, 2, 2]
        with a.exclusive("z"):
            pass
    finally:
        a.close()


def test_a_failed_statement_inside_a_transaction_is_not_reported_committed(postgres_url):
    """PostgreSQL turns the COMMIT of an aborted transaction into a ROLLBACK: the store
    must raise instead of returning as if the writes were saved."""
    a = Store.open(postgres_url)
    try:
        a.collections.create("c")
        with pytest.raises(Exception):  # noqa: B017 - the backend's own error type
            with a.db.tx("c") as db:
                db.execute("INSERT INTO meta (key, value) VALUES ('k', 'v')")
                try:
                    db.execute("SELECT * FROM no_such_table")
                except Exception:  # a caller that swallows the error
                    pass
        assert a.db.query("SELECT value FROM meta WHERE key = 'k'") == []
    finally:
        a.close()


def test_bad_text_is_invalid_argument_not_internal(postgres_url):
    from reidal.errors import InvalidArgument, NotFound

    a = Store.open(postgres_url)
    try:
        with pytest.raises(InvalidArgument):
            a.collections.create("a\x00b")  # valid protobuf, refused by PostgreSQL's text
        with pytest.raises((InvalidArgument, NotFound)):
            a.collections.get("a\x00b")
        assert a.collections.all() == []
    finally:
        a.close()
