"""Clustering parameters chosen from the data and the answers (reidal.core.calibration).

Checked against definitions written out here (the rho rule on a dense matrix, the balanced
error of a threshold by brute force), and on generated embeddings where the answers say
where identities end: the answer-calibrated eps must cluster better than the fixed one.
"""

from __future__ import annotations

import numpy as np
import pytest

from reidal.core.calibration import (
    ClusteringCalibrator,
    answered_pairs,
    best_finch_level,
    rho_eps,
    separating_threshold,
)
from reidal.core.clustering import DBSCANJaccard, finch_partitions, first_neighbours
from reidal.core.constraints import Answer, ConstraintSet
from reidal.core.evaluation import clustering_quality
from reidal.core.neighbors import jaccard_distance
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
