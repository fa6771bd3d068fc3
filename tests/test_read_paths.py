"""Reads that do not queue behind writes, over a real store, SQLite and PostgreSQL (no gRPC): GetQueryPairs
on an unchanged state shares the open batch, GetIdentities serves its last result while a
newer one is computed."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np
import pytest

from reidal.answers import AnswerSubmission, submit
from reidal.collection_state import effective_params
from reidal.cycle import CycleRequest, CycleRunner, run_cycle
from reidal.identities import LatestIdentities
from reidal.simulation.synthetic import make_reid_embeddings
from reidal.store import ImageRecord, Store


@pytest.fixture()
def store(store_target):
    s = Store.open(store_target)
    data = make_reid_embeddings(n_identities=8, dim=16, seed=0)
    ids = [f"img{k:03d}" for k in range(data.X.shape[0])]
    s.collections.create("c", model_name="m", model_version="1",
                         params=effective_params({"k1": 6, "k2": 2, "min_samples": 2}, None))
    s.images.add("c", [ImageRecord(i) for i in ids])
    s.images.put_vectors("c", "m", "1", ids, data.X.astype(np.float32))
    yield s
    s.close()


def ids_of(store):
    return [img.image_id for img in store.images.all("c")]


def test_an_unchanged_state_shares_its_open_batch(store):
    ask = CycleRequest(budget={"count": 5}, request_id="r1")
    first, created = run_cycle(store, "c", ask)
    assert created and first.cycle == 1
    again, created = run_cycle(store, "c", CycleRequest(budget={"count": 5}, request_id="r2"))
    assert not created and again.batch_id == first.batch_id
    other_budget, created = run_cycle(store, "c", CycleRequest(budget={"count": 4}))
    assert created and other_budget.cycle == 2
    beyond, created = run_cycle(store, "c", CycleRequest(budget={"count": 4},
                                                         skip_pending=True))
    assert created and beyond.cycle == 3  # skip_pending asks for pairs beyond those out
    ids = ids_of(store)
    submit(store, "c", [AnswerSubmission("SAME", image_a=ids[0], image_b=ids[1])])
    changed, created = run_cycle(store, "c", CycleRequest(budget={"count": 5}, request_id="r3"))
    assert created and changed.cycle == 4
    # the retry of a request answered with an existing batch gets that batch again
    retried, created = run_cycle(store, "c", CycleRequest(budget={"count": 5}, request_id="r2"))
    assert not created and retried.batch_id == first.batch_id


def test_concurrent_requests_on_one_state_start_one_cycle(store):
    lock = threading.Lock()
    got: list[str] = []

    def ask(k: int) -> None:
        with lock:  # the runtime's per-collection lock, as the servicer holds it
            batch, _ = run_cycle(store, "c", CycleRequest(request_id=f"q{k}"))
        got.append(batch.batch_id)

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 1 and store.collections.get("c").cycle == 1


def test_identities_are_served_from_the_last_result_while_a_newer_one_is_computed(store):
    latest = LatestIdentities()
    plain = threading.Lock()

    @contextmanager
    def lock(_cid):
        with plain:
            yield

    first = latest.get(store, "c", lock)
    assert latest.get(store, "c", lock) is first  # unchanged state: the same result
    ids = ids_of(store)
    submit(store, "c", [AnswerSubmission("SAME", image_a=ids[0], image_b=ids[1])])

    entered, release = threading.Event(), threading.Event()

    @contextmanager
    def slow_lock(_cid):  # holds the computation of the new state until released
        entered.set()
        release.wait(30)
        yield

    newer: list = []
    worker = threading.Thread(target=lambda: newer.append(latest.get(store, "c", slow_lock)))
    worker.start()
    assert entered.wait(30)
    assert latest.get(store, "c", lock) is first  # not queued: the last computed state
    release.set()
    worker.join(30)
    assert newer[0].applied_answers == first.applied_answers + 1
    assert latest.get(store, "c", lock) is newer[0]


def test_pairs_are_served_from_the_last_batch_while_a_newer_cycle_is_computed(store):
    runner = CycleRunner()
    plain = threading.Lock()

    @contextmanager
    def lock(_cid):
        with plain:
            yield

    ask = CycleRequest(budget={"count": 5})
    first, created = runner.run(store, "c", ask, lock, serve_latest=True)
    assert created
    ids = ids_of(store)
    submit(store, "c", [AnswerSubmission("SAME", image_a=ids[0], image_b=ids[1])])

    entered, release = threading.Event(), threading.Event()

    @contextmanager
    def slow_lock(_cid):  # holds the cycle of the new state until released
        entered.set()
        release.wait(30)
        with plain:
            yield

    newer: list = []
    worker = threading.Thread(target=lambda: newer.append(runner.run(store, "c", ask, slow_lock)))
    worker.start()
    assert entered.wait(30)
    stale, created = runner.run(store, "c", CycleRequest(budget={"count": 5}, request_id="s"),
                                lock, serve_latest=True)
    assert not created and stale.batch_id == first.batch_id  # not queued: the last batch
    other, created = runner.run(store, "c", CycleRequest(budget={"count": 3}), lock,
                                serve_latest=True)
    assert created  # another budget: nothing computed for it yet, so it runs its own
    release.set()
    worker.join(30)
    batch, created = newer[0]
    assert created and batch.cycle == other.cycle + 1
    assert store.batches.by_request("c", "s").batch_id == first.batch_id
