"""Clustering parameters chosen from the data and the answers (reidal.core.calibration).

Checked against definitions written out here (the rho rule on a dense matrix, the balanced
error of a threshold by brute force), and on generated embeddings where the answers say
where identities end: the answer-calibrated eps must cluster better than the fixed one.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest

from reidal.core import clustering
from reidal.core.aas import AmbiguityAwareSampler
from reidal.core.calibration import (
    ClusteringCalibrator,
    answered_pairs,
    best_finch_level,
    rho_eps,
    separating_threshold,
)
from reidal.core.clustering import (
    DBSCANJaccard,
    FinchFirstPartition,
    finch_levels,
    finch_partitions,
    first_neighbours,
)
from reidal.core.constraints import Answer, ConstraintSet
from reidal.core.evaluation import clustering_quality
from reidal.core.neighbors import KNN_EXACT_BELOW, jaccard_distance
from reidal.core.neighbour_cache import NeighbourGraphCache
from reidal.core.sampling import sparse_lookup
from reidal.simulation.synthetic import make_reid_embeddings


@pytest.fixture(scope="module")
def data():
    d = make_reid_embeddings(n_identities=40, dim=32, seed=3)
    return d.X, d.labels


def _answers(truth: np.ndarray, n_pairs: int, seed: int) -> ConstraintSet:
    """Half SAME pairs, half random (mostly DIFFERENT), answered from the truth."""
    rng = np.random.default_rng(seed)
    n = truth.size
    cs = ConstraintSet(n)
    k = 0
    while k < n_pairs:
        i = int(rng.integers(n))
        mates = np.flatnonzero((truth == truth[i]) & (np.arange(n) != i))
        j = int(rng.choice(mates)) if k % 2 and mates.size else int(rng.integers(n))
        if i != j:
            cs.add(Answer(min(i, j), max(i, j), same=bool(truth[i] == truth[j]), answer_id=k))
            k += 1
    return cs


def test_rho_eps_is_the_mean_of_the_smallest_fraction(data):
    X, _ = data
    D = jaccard_distance(X, k1=8, k2=2)
    dense = np.ones(D.shape)
    coo = D.tocoo()
    dense[coo.row, coo.col] = coo.data
    iu = np.triu_indices(X.shape[0], 1)
    flat = np.sort(dense[iu][dense[iu] > 0])
    for rho in (1.6e-3, 0.01, 0.2):
        take = max(1, round(rho * flat.size))
        assert rho_eps(D, rho) == pytest.approx(flat[:take].mean(), rel=1e-6)


def test_separating_threshold_has_the_lowest_balanced_error():
    rng = np.random.default_rng(0)
    d = np.concatenate([rng.uniform(0.1, 0.6, 40), rng.uniform(0.45, 1.0, 90)])
    same = np.arange(130) < 40
    t = separating_threshold(d, same)

    def err(th: float) -> float:
        return 0.5 * (np.mean(d[same] > th) + np.mean(d[~same] <= th))

    grid = np.concatenate([[0.0], np.unique(d)])
    assert err(t) == pytest.approx(min(err(g) for g in grid))
    assert separating_threshold(np.array([0.2, 0.3, 0.7, 0.9]),
                                np.array([True, True, False, False])) == pytest.approx(0.5)


def test_sizes_follow_the_collection_and_keep_user_values():
    cal = ClusteringCalibrator()
    small, large = cal.sizes(100), cal.sizes(100_000)
    assert small == (5, 2, 2) and large[0] == 30 and large[2] == 4
    assert cal.sizes(1600)[0] == 10
    fixed = ClusteringCalibrator(fixed={"k1": 17, "min_samples": 3})
    assert fixed.sizes(100) == (17, 3, 3)
    with pytest.raises(ValueError, match="unknown clustering parameter"):
        ClusteringCalibrator(fixed={"epsilon": 0.5})


def test_without_answers_the_rho_rule_and_level_zero(data):
    X, _ = data
    c = ClusteringCalibrator().choose(X)
    assert (c.eps_source, c.finch_source, c.finch_level) == ("rho", "default", 0)
    D = jaccard_distance(X, k1=c.k1, k2=c.k2)
    assert c.eps == pytest.approx(np.clip(rho_eps(D, 1.6e-3), 0.2, 0.9))


def test_answers_recalibrate_eps_and_cluster_better(data):
    X, truth = data
    cs = _answers(truth, 120, seed=1)
    cal = ClusteringCalibrator()
    c = cal.choose(X, cs)
    assert c.eps_source == "answers" and c.finch_source == "answers"
    assert c.n_same + c.n_different == 120 and c.n_same >= 10
    chosen = DBSCANJaccard(eps=c.eps, min_samples=c.min_samples, k1=c.k1, k2=c.k2)(X)
    rho = cal.choose(X)
    by_rho = DBSCANJaccard(eps=rho.eps, min_samples=rho.min_samples, k1=rho.k1, k2=rho.k2)(X)
    assert clustering_quality(chosen, truth)["f1"] > clustering_quality(by_rho, truth)["f1"]
    # too few answers of one kind: back to the rho rule
    few = ConstraintSet(X.shape[0])
    few.add(Answer(0, 1, same=bool(truth[0] == truth[1]), answer_id=0))
    assert cal.choose(X, few).eps_source == "rho"
    # a user's eps and level win over the answers
    pinned = ClusteringCalibrator(fixed={"eps": 0.55, "finch_level": 1}).choose(X, cs)
    assert (pinned.eps, pinned.eps_source, pinned.finch_level, pinned.finch_source) == (
        0.55, "user", 1, "user")


def test_finch_level_is_the_one_the_answers_agree_with(data):
    X, truth = data
    pairs, same = answered_pairs(_answers(truth, 200, seed=2))
    level = best_finch_level(X, pairs, same)
    levels = finch_partitions(X, first_neighbours(X), max_level=4)

    def agreement(labels: np.ndarray) -> float:
        t = labels[pairs[:, 0]] == labels[pairs[:, 1]]
        return 0.5 * (t[same].mean() + (~t[~same]).mean())

    assert agreement(levels[level]) == max(agreement(x) for x in levels)


def _choice_on_the_full_matrix(cal: ClusteringCalibrator, X: np.ndarray,
                               cs: ConstraintSet | None) -> tuple:
    """The calibration as it was before it shared the sampler's graph, written out: its own
    exact kNN search and uncut Jaccard matrix, exact first neighbours for FINCH."""
    k1, k2, min_samples = cal.sizes(X.shape[0])
    D = jaccard_distance(X, k1=k1, k2=k2)
    pairs, same = answered_pairs(cs)
    if same.sum() >= cal.min_answers and (~same).sum() >= cal.min_answers:
        eps = separating_threshold(sparse_lookup(D, pairs[:, 0], pairs[:, 1], default=1.0), same)
        level = best_finch_level(X, pairs, same)
    else:
        eps, level = rho_eps(D, cal.rho), 0
    return float(np.clip(eps, cal.eps_min, cal.eps_max)), k1, k2, min_samples, level


@pytest.mark.parametrize("n_answers", [0, 200])
@pytest.mark.parametrize("full_below", [KNN_EXACT_BELOW, 0])
def test_the_sampler_graph_gives_the_full_matrix_choice(data, n_answers, full_below):
    """Below KNN_EXACT_BELOW the graph is exact and uncut: the same choice as before. With
    the cut (full_jaccard_below 0) it is still the same on this set, whose matrix within
    the cut holds the rho fraction of pairs."""
    X, truth = data
    cs = _answers(truth, n_answers, seed=4) if n_answers else None
    cal = ClusteringCalibrator(full_jaccard_below=full_below)
    c = cal.choose(X, cs)
    assert (c.eps, c.k1, c.k2, c.min_samples, c.finch_level) == \
        _choice_on_the_full_matrix(cal, X, cs)
    assert c.eps_source == ("answers" if n_answers else "rho")
    assert cal.jaccard_cut(X.shape[0], AmbiguityAwareSampler()) == (1.0 if full_below else 0.9)


@pytest.mark.parametrize("knn_auto_threshold", [KNN_EXACT_BELOW, 300])
def test_one_neighbour_graph_per_calibrated_cycle(knn_auto_threshold):
    """The calibration builds the cycle's graph; the sampler clustering with its choice
    finds it in the cache (nothing recomputed), also where the graph is an inverted file
    and the calibration reads the matrix cut at eps_max."""
    d = make_reid_embeddings(n_identities=60, dim=24, seed=17 + knn_auto_threshold % 7)
    X, truth = d.X, d.labels
    cs = _answers(truth, 100, seed=5)
    # a given nprobe: an inverted file whatever recall it reaches on this small set
    knn = {"knn_auto_threshold": knn_auto_threshold, "knn_options": {"nprobe": 8}}
    graph = AmbiguityAwareSampler(**knn)
    c = ClusteringCalibrator(full_jaccard_below=knn_auto_threshold).choose(X, cs, graph=graph)
    sampler = AmbiguityAwareSampler(
        dbscan=DBSCANJaccard(eps=c.eps, min_samples=c.min_samples, k1=c.k1, k2=c.k2),
        finch=FinchFirstPartition(partition=c.finch_level), **knn)
    res = sampler.sample(X, cs, 30, seed=0)
    assert res.stats["neighbour_graph_cached"] is True
    assert res.stats["seconds"]["knn"] == res.stats["seconds"]["jaccard"] == 0.0
    assert res.stats["knn"]["index"] == ("flat" if X.shape[0] < knn_auto_threshold else "ivf")


def test_the_cache_serves_a_narrower_cut_exactly(data):
    """One matrix at the widest cut asked serves every narrower one, entry for entry as
    if computed at that cut; a wider cut recomputes the Jaccard from the stored kNN."""
    X, _ = data
    cache = NeighbourGraphCache()
    opts = {"index": "flat", "options": {}, "k1": 8, "k2": 2}
    knn_a, wide, cached, _ = cache.get_or_build(X, max_distance=0.9, timings={}, **opts)
    knn_b, narrow, cached_b, _ = cache.get_or_build(X, max_distance=0.6, timings={}, **opts)
    assert not cached and cached_b and knn_b is knn_a
    direct = jaccard_distance(X, k1=8, k2=2, knn_result=knn_a, max_distance=0.6)
    for name in ("data", "indices", "indptr"):
        assert np.array_equal(getattr(narrow, name), getattr(direct, name))
    timings: dict[str, float] = {}
    knn_c, full, cached_c, _ = cache.get_or_build(X, max_distance=1.0, timings=timings, **opts)
    assert not cached_c and knn_c is knn_a and timings["knn"] == 0.0
    assert full.nnz > wide.nnz > narrow.nnz


def test_finch_levels_on_the_shared_graph_are_computed_ones(data):
    """The sampler's FINCH reads the hierarchy the level choice computed on the cycle's
    graph: the same partitions as computing them, at any level, and callers get copies."""
    X, _ = data
    knn_result, _, _ = AmbiguityAwareSampler().neighbour_graph(X)
    direct = finch_partitions(X, first_neighbours(X, knn_result=knn_result), max_level=4)
    top = len(direct) - 1

    def level(p: int) -> np.ndarray:
        return FinchFirstPartition(partition=p)(X, knn_result=knn_result)

    assert [lv.tolist() for lv in finch_levels(X, knn_result=knn_result, max_level=1)] == \
        [lv.tolist() for lv in direct[:2]]
    for p in (1, 0, 4, 2):  # kept, kept, deeper than kept (computed again), kept
        assert level(p).tolist() == direct[min(p, top)].tolist()
    level(1)[:] = -5
    assert level(1).tolist() == direct[1].tolist()


def test_the_kept_finch_hierarchy_goes_with_its_graph(data):
    X, _ = data
    idx = np.array(AmbiguityAwareSampler().neighbour_graph(X)[0][1])  # a graph of our own
    idx.flags.writeable = False
    sims = np.ones(idx.shape, dtype=np.float32)
    finch_levels(X, knn_result=(sims, idx), max_level=1)
    assert any(entry[0]() is idx for entry in clustering._LAST_HIERARCHY)
    del idx
    gc.collect()
    assert clustering._LAST_HIERARCHY == []
