"""Issue 13 items 2-4 in the loop: the calibrated clustering in training (chosen per cycle,
recorded, user values kept), AAS's continuation sampler, and the benchmark's annotation-cost
table and clustering columns.

The trainer runs for real on backbone features of generated images (head mode, a few
iterations); the samplers on generated embeddings with a ground truth.
"""

from __future__ import annotations

import numpy as np
import pytest
from _training_support import SMALL, small_collection

from reidal.benchmark.report import (
    CSV_COLUMNS,
    answers_to_reach,
    cost_table,
    read_results_csv,
    results_csv,
)
from reidal.core.aas import AmbiguityAwareSampler
from reidal.core.baselines import UncertaintySampler
from reidal.core.clustering import DBSCANJaccard
from reidal.core.constraints import Answer, ConstraintSet
from reidal.core.continuation import AASContinuation
from reidal.core.sampling import Sampler, pair_keys
from reidal.simulation.oracle import SimulatedOracle
from reidal.simulation.synthetic import make_reid_embeddings
from reidal.training import SpCLTrainer, TrainConfig


# --------------------------------------------------------------------------- continuation
@pytest.fixture(scope="module")
def emb():
    d = make_reid_embeddings(n_identities=30, dim=32, seed=5)
    return d.X, d.labels


def test_continuation_asks_aas_pairs_first_then_fills_the_budget(emb):
    X, truth = emb
    aas = AmbiguityAwareSampler(dbscan=DBSCANJaccard(k1=8, k2=2, min_samples=2))
    cont = AASContinuation(AmbiguityAwareSampler(dbscan=DBSCANJaccard(k1=8, k2=2,
                                                                      min_samples=2)))
    assert isinstance(cont, Sampler)
    cs = ConstraintSet(X.shape[0])
    budget = 150
    alone = aas.sample(X, cs, budget, seed=3)
    both = cont.sample(X, cs, budget, seed=3)
    assert len(alone.pairs) < budget  # the premise: AAS leaves part of the allowance
    assert both.pairs[:len(alone.pairs)] == alone.pairs  # the paper's pairs, unchanged
    assert len(both.pairs) == budget and both.stats["continuation_pairs"] == budget - len(
        alone.pairs)
    keys = pair_keys(both.as_array(), X.shape[0])
    assert len(set(keys.tolist())) == budget
    # the continuation's pairs sit closest to DBSCAN's eps among what was left
    extra = both.pairs[len(alone.pairs):]
    assert all(p.pool == "uncertainty" for p in extra)
    margins = [abs((1.0 - p.similarity) - 0.6) for p in extra]
    assert margins == sorted(margins) or max(margins) - min(margins) < 1e-9


def test_continuation_never_asks_answered_implied_or_excluded_pairs(emb):
    X, truth = emb
    cont = AASContinuation(AmbiguityAwareSampler(dbscan=DBSCANJaccard(k1=8, k2=2,
                                                                      min_samples=2)))
    n = X.shape[0]
    cs = ConstraintSet(n)
    first = cont.sample(X, cs, 80, seed=0)
    for k, p in enumerate(first.pairs):
        cs.add(Answer(p.i, p.j, same=bool(truth[p.i] == truth[p.j]), answer_id=k))
    excl = np.array([[0, 1], [2, 3]])
    second = cont.sample(X, cs, 80, seed=1, exclude_pairs=excl)
    arr = second.as_array()
    assert len(arr) > 0
    assert (np.asarray(cs.implied_many(arr)) == -1).all()
    assert not np.isin(pair_keys(arr, n), pair_keys(excl, n)).any()
    with pytest.raises(ValueError, match="constraint set is for"):
        cont.sample(X, ConstraintSet(n + 1), 5)


# --------------------------------------------------------------------------- trainer
@pytest.fixture(scope="module")
def collection():
    return small_collection(64)


def test_calibrated_training_records_its_choice_each_cycle(collection):
    model, feats, truth = collection
    config = TrainConfig(**SMALL, epochs=4, epochs_per_cycle=2, iters_per_epoch=3,
                         budget_per_cycle=60, sampler="aas-continued", seed=0,
                         clustering="calibrated", clustering_pinned=("min_samples",))
    result = SpCLTrainer(config, model).fit(feats, oracle=SimulatedOracle(truth),
                                            true_labels=truth)
    used = [r.clustering for r in result.reports]
    assert all(u["min_samples"] == 2 for u in used)  # pinned: the user's value
    assert all(u["k1"] == 5 for u in used)  # calibrated from the collection's size
    assert all(0.2 <= u["eps"] <= 0.9 for u in used)
    # the first cycle's answers are enough to move eps off the rho rule
    assert used[0]["n_same"] + used[0]["n_different"] == result.reports[0].pairs_asked
    assert result.reports[0].pairs_asked == 60  # the continuation spent the allowance
    assert {u["eps_source"] for u in used} <= {"rho", "answers"}
    assert used[-1]["eps_source"] == "answers"

    fixed = TrainConfig(**SMALL, epochs=2, epochs_per_cycle=2, iters_per_epoch=2,
                        budget_per_cycle=10, sampler="aas", seed=0)
    rep = SpCLTrainer(fixed, model).fit(feats, oracle=SimulatedOracle(truth)).reports[0]
    assert rep.clustering == {"eps": 0.6, "k1": 10, "k2": 3, "min_samples": 2,
                              "finch_level": 0, "eps_source": "config",
                              "finch_source": "default"}
    with pytest.raises(ValueError, match="clustering_pinned"):
        TrainConfig(clustering="calibrated", clustering_pinned=("rho",))
    with pytest.raises(ValueError, match="TrainConfig.clustering "):
        TrainConfig(clustering="auto")


# --------------------------------------------------------------------------- report
def _row(method: str, seed: int, cycle: int, pairs: int, f1: float, **extra) -> dict:
    row = {c: 0.0 for c in CSV_COLUMNS}
    row.update(dataset="toy", method=method, seed=seed, cycle=cycle, cumulative_pairs=pairs,
               pl_f1=f1, mAP=0.1 * cycle, pairs_asked=0, budget_pairs=0, n_clusters=1,
               contradictions=0, flipped_answers=0, k1=5, min_samples=2, finch_level=0,
               eps=0.5, eps_source="rho", **extra)
    return row


def test_cost_table_counts_answers_to_each_f1_level():
    rows = []
    for seed, f1s in enumerate([(0.3, 0.55, 0.85), (0.6, 0.7, 0.95), (0.1, 0.2, 0.3)]):
        for c, f in enumerate(f1s, 1):
            rows.append(_row("aas", seed, c, 20 * c, f))
    run0 = [r for r in rows if r["seed"] == 0]
    assert answers_to_reach(run0, 0.5) == 40 and answers_to_reach(run0, 0.9) is None
    rows += [_row("supervised", 0, c, 0, 1.0) for c in (1, 2, 3)]
    md = "\n".join(cost_table(rows, "toy"))
    # F1 0.5: seeds 0 (40) and 1 (20) -> median 30; 0.8: both at cycle 3 (60); 0.9: seed 1
    assert "| `aas` | 30.0 ± 0.0 |" in md
    assert "| 30 (2 / 3) | 60 (2 / 3) | 60 (1 / 3) |" in md
    assert "| `supervised` |" in md and "all labels" in md


def test_results_csv_keeps_rows_stored_before_the_clustering_columns():
    new = _row("aas", 0, 1, 10, 0.5)
    old = {k: v for k, v in _row("usl", 0, 1, 0, 0.4).items()
           if k not in ("eps", "k1", "min_samples", "finch_level", "eps_source")}
    back = read_results_csv(results_csv([new, old]))
    assert back[0]["k1"] == 5 and back[0]["eps_source"] == "rho" and back[0]["eps"] == 0.5
    assert back[1]["k1"] is None and back[1]["eps"] is None


def test_the_continuation_on_the_aas_graph_asks_what_it_asks_alone(emb):
    """Given AAS's (exact, uncut) graph, the boundary sampler picks the very pairs it picks
    from its own kNN search and Jaccard matrix; with too few kNN columns it searches again."""
    X, _ = emb
    aas = AmbiguityAwareSampler(dbscan=DBSCANJaccard(k1=8, k2=2, min_samples=2))
    graph = aas.neighbour_graph(X, max_distance=1.0)[:2]
    for k in (None, 12):
        unc = UncertaintySampler(eps=0.6, k1=8, k2=2, k=k)
        alone = unc.sample(X, None, 60, seed=2)
        assert unc.sample(X, None, 60, seed=2, graph=graph).pairs == alone.pairs
