"""Baseline samplers: budget, never re-asking, determinism, and what each one favours."""

from __future__ import annotations

import numpy as np
import pytest

from reidal.core.baselines import (
    NISSampler,
    RandomPairSampler,
    UncertaintySampler,
    vertex_degrees,
)
from reidal.core.constraints import ConstraintSet
from reidal.core.neighbors import jaccard_distance
from reidal.core.sampling import (
    REASON_ALL_RESOLVED,
    REASON_FULL,
    REASON_SMALL_POOL,
    Sampler,
    sparse_lookup,
)
from reidal.core.validation import l2_normalise


def _blobs(n_clusters: int, size: int, dim: int = 16, spread: float = 0.5, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = l2_normalise(rng.standard_normal((n_clusters, dim)))
    labels = np.repeat(np.arange(n_clusters), size)
    X = centres[labels] + spread * rng.standard_normal((labels.size, dim)) / np.sqrt(dim)
    return l2_normalise(X), labels


@pytest.fixture(scope="module")
def world():
    X, labels = _blobs(20, 10, seed=1)
    n = X.shape[0]
    rng = np.random.default_rng(0)
    ml = np.array([(i, i + 1) for i in range(0, n - 1, 2) if labels[i] == labels[i + 1]])
    cl = rng.integers(0, n, size=(60, 2))
    cl = cl[(cl[:, 0] != cl[:, 1]) & (labels[cl[:, 0]] != labels[cl[:, 1]])]
    return X, labels, ConstraintSet.from_pairs(n, ml, cl)


SAMPLERS = [
    RandomPairSampler(),
    UncertaintySampler(k1=10, k2=3),
    NISSampler(k=8),
]


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: type(s).__name__)
def test_budget_no_resolved_pairs_and_determinism(sampler, world):
    X, labels, cs = world
    n = X.shape[0]
    assert isinstance(sampler, Sampler)
    excluded = np.array([[0, 2], [5, 9], [3, 4]])
    res = sampler.sample(X, cs, 40, seed=2, exclude_pairs=excluded)
    got = res.as_array()
    assert res.budget == 40 and len(got) == 40 and res.reason == REASON_FULL
    assert np.all(got[:, 0] < got[:, 1])
    assert len({tuple(p) for p in got.tolist()}) == 40
    assert np.all(cs.implied_many(got) == -1)
    assert not ({tuple(p) for p in got.tolist()} & {tuple(p) for p in excluded.tolist()})
    again = sampler.sample(X, cs, 40, seed=2, exclude_pairs=excluded)
    assert again.pairs == res.pairs
    # Fraction budget: 0.2 % of 19900 pairs = 39.8, rounded up to 40.
    frac = sampler.sample(X, cs, 0.002, seed=2)
    assert frac.budget == 40 and len(frac.pairs) == 40
    assert all(p.pool == {"RandomPairSampler": "random", "UncertaintySampler": "uncertainty",
                          "NISSampler": "nis"}[type(sampler).__name__] for p in res.pairs)
    assert n == len(labels)


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: type(s).__name__)
def test_bad_inputs(sampler, world):
    X, _, _ = world
    with pytest.raises(ValueError, match="budget"):
        sampler.sample(X, None, 0)
    bad = X.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        sampler.sample(bad, None, 5)
    with pytest.raises(ValueError, match="constraint set is for 3 items"):
        sampler.sample(X, ConstraintSet(3), 5)


def test_random_is_uniform_over_pairs():
    X, _ = _blobs(2, 4, seed=0)  # n = 8: 28 pairs
    counts = np.zeros((8, 8))
    sampler = RandomPairSampler()
    for seed in range(300):
        for p in sampler.sample(X, None, 3, seed=seed).pairs:
            counts[p.i, p.j] += 1
    observed = counts[np.triu_indices(8, 1)]
    expected = 900 / 28
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 60  # chi-square, 27 dof: p ~ 3e-4 at 60


def test_random_with_almost_everything_answered_returns_the_rest():
    X, labels = _blobs(2, 5, seed=3)
    n = X.shape[0]
    iu, ju = np.triu_indices(n, 1)
    pairs = np.stack([iu, ju], axis=1)
    open_rows = [4, 17, 30]
    # CL answers only: no ML groups, so each CL implies nothing beyond its own pair.
    cs = ConstraintSet.from_pairs(n, np.empty((0, 2), int), np.delete(pairs, open_rows, axis=0))
    res = RandomPairSampler(max_rounds=2).sample(X, cs, 10, seed=0)
    assert {tuple(p) for p in res.as_array().tolist()} == {
        tuple(p) for p in pairs[open_rows].tolist()
    }
    assert res.reason == REASON_SMALL_POOL
    same = labels[iu] == labels[ju]
    everything = ConstraintSet.from_pairs(n, pairs[same], pairs[~same])
    res = RandomPairSampler().sample(X, everything, 5)
    assert res.pairs == [] and res.reason == REASON_ALL_RESOLVED


def test_uncertainty_picks_pairs_nearest_the_boundary(world):
    X, _, cs = world
    n = X.shape[0]
    sampler = UncertaintySampler(eps=0.6, k1=10, k2=3)
    res = sampler.sample(X, cs, 25, seed=0)
    D = jaccard_distance(X, k1=10, k2=3)
    # Reference: every kNN-graph edge (k1 neighbours), by dense search.
    S = X @ X.T
    nbrs = np.argsort(-S, axis=1, kind="stable")[:, :10]
    edges = {(min(i, j), max(i, j)) for i in range(n) for j in nbrs[i] if i != j}
    edges = np.array(sorted(edges))
    edges = edges[cs.implied_many(edges) == -1]
    dense = np.ones((n, n))
    coo = D.tocoo()
    dense[coo.row, coo.col] = coo.data
    margin = np.abs(dense[edges[:, 0], edges[:, 1]] - 0.6)
    got = res.as_array()
    got_margin = np.abs(dense[got[:, 0], got[:, 1]] - 0.6)
    assert got_margin.max() <= np.sort(margin)[24] + 1e-6
    for p in res.pairs:
        assert p.similarity == pytest.approx(1.0 - dense[p.i, p.j], abs=1e-6)


def test_sparse_lookup_tells_absent_from_stored_zero():
    import scipy.sparse as sp

    M = sp.csr_matrix((np.array([0.0, 0.5, 0.0]), (np.array([0, 1, 2]), np.array([0, 2, 1]))),
                      shape=(3, 3))
    got = sparse_lookup(M, np.array([0, 1, 2, 0, 1]), np.array([0, 2, 1, 1, 1]), default=1.0)
    np.testing.assert_allclose(got, [0.0, 0.5, 0.0, 1.0, 1.0])


def test_vertex_degrees_match_dense_reference():
    X, _ = _blobs(5, 12, seed=2)
    from reidal.core.neighbors import knn

    sims, idx = knn(X, 6)
    n = X.shape[0]
    W = np.zeros((n, n))
    for i in range(n):
        for s, j in zip(sims[i], idx[i], strict=True):
            if j != i:
                W[i, j] = W[j, i] = max(W[i, j], max(float(s), 0.0))
    np.testing.assert_allclose(vertex_degrees(sims, idx), W.sum(axis=1), rtol=1e-5)
    T = (W >= 0.5).astype(float)
    np.testing.assert_allclose(vertex_degrees(sims, idx, mode="threshold"), T.sum(axis=1))


def test_nis_prefers_low_degree_vertices():
    rng = np.random.default_rng(0)
    dim = 16
    # 150 images in 5 tight, crowded clusters (hubs) + 150 loose, scattered images.
    dense, _ = _blobs(5, 30, dim=dim, spread=0.2, seed=5)
    loose = l2_normalise(rng.standard_normal((150, dim)))
    X = np.concatenate([dense, loose])
    sampler = NISSampler(k=8)
    sims_deg = None
    anchors = []
    for seed in range(5):
        res = sampler.sample(X, None, 40, seed=seed)
        anchors.extend(res.stats["anchors"])
        sims_deg = res.stats["degree"]
    # Independent degree: dense cosine, 8 nearest others, symmetrised, similarity sum.
    S = X @ X.T
    np.fill_diagonal(S, -np.inf)
    nbrs = np.argsort(-S, axis=1)[:, :8]
    W = np.zeros_like(S)
    rows = np.repeat(np.arange(X.shape[0]), 8)
    W[rows, nbrs.ravel()] = np.clip(S[rows, nbrs.ravel()], 0, None)
    W = np.maximum(W, W.T)
    degree = W.sum(axis=1)
    np.testing.assert_allclose(sims_deg, degree, rtol=1e-4)
    low = degree <= np.median(degree)
    share_low = float(np.mean(low[np.array(anchors)]))
    assert np.mean(degree[anchors]) < np.mean(degree)

    def share(alpha: float) -> float:
        picked = []
        for seed in range(5):
            res = NISSampler(k=8, alpha=alpha).sample(X, None, 40, seed=seed)
            picked.extend(res.stats["anchors"])
        return float(np.mean(low[np.array(picked)]))

    # 200 anchors: a fair coin gives 0.5 +- 0.035, so 0.58 is more than 2 sd above it.
    assert share_low > 0.58
    assert 0.4 < share(0.0) < 0.6  # no degree preference: about one half
    assert share(2.0) > share_low + 0.05  # a stronger preference picks even fewer hubs
