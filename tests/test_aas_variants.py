"""AAS variants for small collections (OURS options, defaults = the paper's behaviour).

- ``os_similarity="cosine"``: U_os ranks region medoids by embedding cosine; checked
  against a dense brute-force reference (every medoid pair's cosine, top k_max per medoid).
(``TrainConfig.question_rounds`` is tested in test_training.py, with the trainer.)
"""

from __future__ import annotations

import numpy as np
import pytest

from reidal.core.aas import (
    AmbiguityAwareSampler,
    oversegmentation_pool,
    region_medoids,
    regions_of_uncertainty,
)
from reidal.core.clustering import DBSCANJaccard, FinchFirstPartition
from reidal.core.neighbors import jaccard_distance
from reidal.simulation.synthetic import make_reid_embeddings
from reidal.training import TrainConfig


@pytest.fixture(scope="module")
def world():
    data = make_reid_embeddings(80, dim=32, seed=3)
    X = data.X
    D = jaccard_distance(X, k1=10, k2=3, use_gpu=False)
    la = DBSCANJaccard(k1=10, k2=3, min_samples=2)(X, distance=D)
    lb = FinchFirstPartition()(X)
    medoids = region_medoids(regions_of_uncertainty(la, lb), D, X)
    return X, D, medoids


def _dense_cosine_pool(X, medoids, k_max, s_min):
    """Brute force: every ordered medoid pair's cosine, each medoid's top k_max others
    (ties: lower medoid position first), kept at >= s_min, as a set of (i, j) -> sim."""
    C = X[medoids] @ X[medoids].T
    out = {}
    for a in range(medoids.size):
        others = [b for b in range(medoids.size) if b != a]
        others.sort(key=lambda b: (-round(float(C[a, b]), 6), b))
        for b in others[:k_max]:
            if C[a, b] >= s_min:
                i, j = sorted((int(medoids[a]), int(medoids[b])))
                out[(i, j)] = float(C[a, b])
    return out


@pytest.mark.parametrize("k_max, s_min", [(2, 0.0001), (5, 0.3), (1, 0.5)])
def test_cosine_oversegmentation_pool_matches_dense_reference(world, k_max, s_min):
    X, D, medoids = world
    assert medoids.size >= 4
    pool = oversegmentation_pool(medoids, D, k_max=k_max, s_min=s_min, similarity="cosine",
                                 X=X)
    ref = _dense_cosine_pool(X, medoids, k_max, s_min)
    got = {tuple(map(int, p)): float(s) for p, s in zip(pool.pairs, pool.similarity,
                                                        strict=True)}
    assert set(got) == set(ref)
    for key, sim in ref.items():
        assert got[key] == pytest.approx(sim, abs=1e-5)
    assert np.all(pool.region == -1) and np.all(pool.kind == -1)


def test_cosine_pool_is_graded_where_jaccard_is_empty(world):
    """The small-pool failure the option addresses: medoids share no k-reciprocal
    neighbours (Jaccard U_os empty at the paper's s_min) but have graded cosines."""
    X, D, medoids = world
    assert len(oversegmentation_pool(medoids, D, s_min=0.3).pairs) == 0
    C = X[medoids] @ X[medoids].T
    expected = int(np.sum(C[np.triu_indices(medoids.size, 1)] >= 0.3) > 0)
    cos = oversegmentation_pool(medoids, D, s_min=0.3, similarity="cosine", X=X)
    assert (len(cos.pairs) > 0) == bool(expected)


def test_bad_similarity_and_missing_vectors_raise(world):
    X, D, medoids = world
    with pytest.raises(ValueError, match="similarity must be one of"):
        oversegmentation_pool(medoids, D, similarity="euclid")
    with pytest.raises(ValueError, match="needs X"):
        oversegmentation_pool(medoids, D, similarity="cosine")
    for bad in (np.float32(1.0), X[0]):  # not (n, d): a ValueError, not an IndexError
        with pytest.raises(ValueError, match="needs X"):
            oversegmentation_pool(medoids, D, similarity="cosine", X=bad)
    with pytest.raises(ValueError, match="os_similarity"):
        AmbiguityAwareSampler(os_similarity="dot")
    with pytest.raises(ValueError, match="TrainConfig.aas_os_similarity"):
        TrainConfig(aas_os_similarity="dot")


def test_sampler_cosine_option_reaches_the_pool(world):
    X, _, _ = world
    dbscan = DBSCANJaccard(k1=10, k2=3, min_samples=2)
    paper = AmbiguityAwareSampler(dbscan=dbscan).sample(X, None, 500, seed=0)
    cos = AmbiguityAwareSampler(dbscan=dbscan, os_similarity="cosine").sample(
        X, None, 500, seed=0)
    assert paper.stats["U_os"] == 0 and cos.stats["U_os"] > 0
    assert paper.stats["U_us"] == cos.stats["U_us"]
    os_pairs = {(q.i, q.j) for q in cos.pairs if q.pool == "U_os"}
    assert len(os_pairs) == cos.stats["U_os"]  # budget above the pool: all of it asked
    C = X @ X.T
    assert all(C[i, j] >= 0.3 - 1e-6 for i, j in os_pairs)
