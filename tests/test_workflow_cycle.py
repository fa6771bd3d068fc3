"""The sampling-cycle workflow (reidal.cycle) over a real SQLite store: no gRPC, no Triton.

Vectors come from the synthetic re-ID generator and are stored as AddVectors stores them.
What GetQueryPairs promises, checked where it is decided: one batch per cycle with its
pairs resolvable at once, an unchanged state answered with its open batch (no new cycle),
any change (an answer, an image, an exclusion, another budget) drawing a new one, a
request id that gets its first batch again, pending pairs skipped on request, UNSURE pairs
never asked again, and a cycle reproducible from its seed. Each test makes its own store.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from reidal.answers import AnswerSubmission, submit
from reidal.cycle import REASON_CODES, CycleRequest, CycleRunner, open_batch, run_cycle
from reidal.errors import FailedPrecondition, InvalidArgument
from reidal.simulation.synthetic import make_reid_embeddings
from reidal.store import ImageRecord, Store

#: Stored clustering parameters (the form a collection keeps) small enough for 48 images.
PARAMS = {"clustering": {"k1": 6, "k2": 2, "min_samples": 2}}


def fill(store: Store, cid: str = "c", seed: int = 0) -> list[str]:
    """A collection of 48 images of 8 synthetic identities, embedded; its image ids."""
    data = make_reid_embeddings(n_identities=8, dim=16, seed=seed)
    ids = [f"img{k:03d}" for k in range(data.X.shape[0])]
    store.collections.create(cid, params=PARAMS)
    store.images.add(cid, [ImageRecord(i) for i in ids])
    store.images.add_vectors(cid, "m", "1", ids, data.X.astype(np.float32))
    return ids


@pytest.fixture()
def store(tmp_path: Path):
    s = Store(tmp_path)
    yield s
    s.close()


def ask(count: int = 6, **kw) -> CycleRequest:
    return CycleRequest(budget={"count": count}, **kw)


def asked(store: Store, batch_id: str, cid: str = "c") -> list[tuple[str, str]]:
    return [(p.image_a, p.image_b) for p, _ in store.batches.pairs(cid, batch_id)]


def test_a_cycle_stores_one_batch_whose_pairs_resolve_at_once(store):
    ids = fill(store)
    batch, created = run_cycle(store, "c", ask(6))
    assert created and batch.cycle == 1 and store.collections.get("c").cycle == 1
    assert (batch.budget, batch.n_items, batch.model_name, batch.model_version) == \
        (6, len(ids), "m", "1")
    assert batch.reason in REASON_CODES
    pairs = store.batches.pairs("c", batch.batch_id)
    assert 0 < len(pairs) <= 6 and all(not answered for _, answered in pairs)
    assert all(p.image_a < p.image_b and {p.image_a, p.image_b} <= set(ids) for p, _ in pairs)
    assert len({(p.image_a, p.image_b) for p, _ in pairs}) == len(pairs)
    assert [p.pair_id for p, _ in pairs] == [f"{batch.batch_id}/{k}" for k in range(len(pairs))]
    found = store.batches.pairs_by_id("c", [pairs[0][0].pair_id])
    assert found == {pairs[0][0].pair_id: (batch.batch_id, pairs[0][0])}


def test_an_unchanged_state_gets_its_open_batch_and_any_change_a_new_cycle(store):
    ids = fill(store)
    first, _ = run_cycle(store, "c", ask(6))
    again, created = run_cycle(store, "c", ask(6))
    assert not created and again.batch_id == first.batch_id
    assert open_batch(store, "c", ask(6)).batch_id == first.batch_id
    # another budget is another request: a new cycle
    other, created = run_cycle(store, "c", ask(5))
    assert created and other.cycle == 2
    # an answer changes the state
    submit(store, "c", [AnswerSubmission("SAME", image_a=ids[0], image_b=ids[1])])
    assert open_batch(store, "c", ask(5)) is None
    answered, created = run_cycle(store, "c", ask(5))
    assert created and answered.cycle == 3
    # so do an exclusion and a new image
    store.images.exclude("c", ids[2], "blurry")
    excluded, created = run_cycle(store, "c", ask(5))
    assert created and excluded.cycle == 4 and excluded.n_items == len(ids) - 1
    assert all(ids[2] not in pair for pair in asked(store, excluded.batch_id))
    store.images.add("c", [ImageRecord("late")])
    late = np.full((1, 16), 0.25, np.float32)  # unit norm
    store.images.add_vectors("c", "m", "1", ["late"], late)
    grown, created = run_cycle(store, "c", ask(5))
    assert created and grown.cycle == 5 and grown.n_items == len(ids)


def test_a_request_id_gets_its_first_batch_again(store):
    ids = fill(store)
    first, created = run_cycle(store, "c", ask(6, request_id="r1"))
    assert created
    submit(store, "c", [AnswerSubmission("DIFFERENT", image_a=ids[0], image_b=ids[40])])
    retry, created = run_cycle(store, "c", ask(6, request_id="r1"))
    assert not created and retry.batch_id == first.batch_id
    # a request answered with an open batch gets that batch on its retry, too
    newer, created = run_cycle(store, "c", ask(6, request_id="r2"))
    assert created
    shared, created = run_cycle(store, "c", ask(6, request_id="r3"))
    assert not created and shared.batch_id == newer.batch_id
    submit(store, "c", [AnswerSubmission("SAME", image_a=ids[1], image_b=ids[2])])
    retried, created = run_cycle(store, "c", ask(6, request_id="r3"))
    assert not created and retried.batch_id == newer.batch_id
    assert store.collections.get("c").cycle == 2


def test_skip_pending_asks_beyond_the_pairs_still_out(store):
    fill(store)
    first, _ = run_cycle(store, "c", ask(6))
    beyond, created = run_cycle(store, "c", ask(6, skip_pending=True))
    assert created and beyond.cycle == 2
    out = set(asked(store, first.batch_id))
    assert out and not out & set(asked(store, beyond.batch_id))
    assert beyond.stats["pending_skipped"] == len(out)


def test_unsure_pairs_are_never_asked_again(store):
    fill(store)
    first, _ = run_cycle(store, "c", ask(6))
    unsure = asked(store, first.batch_id)
    submit(store, "c", [AnswerSubmission("UNSURE", image_a=a, image_b=b) for a, b in unsure])
    for k in range(3):  # skip_pending: each draws new pairs (none is unsure)
        batch, created = run_cycle(store, "c", ask(6, skip_pending=k > 0))
        assert created and not set(unsure) & set(asked(store, batch.batch_id))


def test_a_cycle_is_reproducible_from_its_seed(tmp_path: Path):
    drawn = []
    for k in range(2):
        s = Store(tmp_path / str(k))
        try:
            fill(s)
            batch, _ = run_cycle(s, "c", ask(6))
            drawn.append((asked(s, batch.batch_id), batch.reason))
        finally:
            s.close()
    assert drawn[0] == drawn[1]


def test_a_cycle_needs_two_embedded_images(store):
    store.collections.create("empty", params=PARAMS)
    with pytest.raises(InvalidArgument, match="only 0 image"):
        run_cycle(store, "empty", ask(2))
    ids = fill(store)
    for iid in ids[1:]:
        store.images.exclude("c", iid, "")
    with pytest.raises(InvalidArgument, match="only 1 image"):
        run_cycle(store, "c", ask(2))
    store.collections.create("raw")
    store.images.add("raw", [ImageRecord("a"), ImageRecord("b")])
    with pytest.raises(FailedPrecondition, match="no embedded image"):
        run_cycle(store, "raw", ask(1))
    assert store.batches.all("c") == [] and store.collections.get("c").cycle == 0


def test_concurrent_calls_on_one_state_share_one_cycle(store):
    fill(store)
    runner = CycleRunner()
    locks = {"c": threading.Lock()}
    got: list[str] = []

    def call(k: int) -> None:
        batch, _ = runner.run(store, "c", ask(6, request_id=f"q{k}"), locks.__getitem__)
        got.append(batch.batch_id)

    threads = [threading.Thread(target=call, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4 and len(set(got)) == 1 and store.collections.get("c").cycle == 1


def test_knn_stats_flatten_an_ivf_report_for_batch_stats():
    """The kNN report of an IVF graph (its recall measured on sample rows) becomes the
    batch's flat knn_* stats (BatchStats), every number carried over."""
    from reidal.core.neighbors import knn_search
    from reidal.cycle import knn_stats

    X = np.random.default_rng(0).normal(size=(1500, 8)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    _, _, report = knn_search(X, 5, index="ivf", nlist=12, nprobe=3, n_queries=200)
    stats = knn_stats(report.as_stats())
    assert stats["knn_index"] == "ivf" and (stats["knn_nlist"], stats["knn_nprobe"]) == (12, 3)
    assert stats["knn_k"] == 5 and stats["knn_recall_rows"] == 200
    assert 0 < stats["knn_recall"] < 1 and stats["knn_recall_se"] > 0
    assert stats["knn_recall"] == round(report.recall, 4) and knn_stats(None) == {}
