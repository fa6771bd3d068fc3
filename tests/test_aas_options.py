"""AmbiguityAwareSampler's scale options: the kNN index choice and the Jaccard cut.

The cut's claim is checked against the uncut matrix (DBSCAN and U_os for given medoids are
identical), and the index choice by what reaches the kNN search: an IVF index that probes
every list is an exhaustive search, so the sampler must ask exactly what flat search asks.
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
from reidal.core.neighbors import jaccard_distance, knn
from reidal.simulation.synthetic import make_reid_embeddings


@pytest.fixture(scope="module")
def world():
    data = make_reid_embeddings(60, dim=64, seed=1)
    return data.X, data.labels


def test_auto_index_is_flat_below_the_threshold_and_approximate_above():
    aas = AmbiguityAwareSampler()
    assert aas.resolved_knn_index(9_999) == "flat"
    assert aas.resolved_knn_index(10_000) == "ivf"
    assert AmbiguityAwareSampler(knn_auto_index="hnsw").resolved_knn_index(10**6) == "hnsw"
    assert AmbiguityAwareSampler(knn_index="hnsw").resolved_knn_index(10) == "hnsw"
    assert AmbiguityAwareSampler(knn_auto_threshold=100).resolved_knn_index(100) == "ivf"


def test_auto_cut_is_the_largest_distance_a_threshold_reads():
    assert AmbiguityAwareSampler().resolved_jaccard_max_distance() == pytest.approx(0.7)
    assert AmbiguityAwareSampler(
        s_min=0.5, dbscan=DBSCANJaccard(eps=0.65)
    ).resolved_jaccard_max_distance() == pytest.approx(0.65)
    assert AmbiguityAwareSampler(jaccard_max_distance=1.0).resolved_jaccard_max_distance() == 1.0


def test_cut_keeps_dbscan_and_the_medoid_pool(world):
    X, _ = world
    full = jaccard_distance(X, k1=20, use_gpu=False)
    dbscan = DBSCANJaccard(k1=20)
    la = dbscan(X, distance=full)
    lb = FinchFirstPartition()(X)
    medoids = region_medoids(regions_of_uncertainty(la, lb), full, X)
    assert medoids.size >= 2
    # s_min 0.1 so this small world has medoid pairs; the cut the sampler takes is 0.9.
    s_min = 0.1
    aas = AmbiguityAwareSampler(s_min=s_min, dbscan=dbscan)
    for max_distance in (aas.resolved_jaccard_max_distance(), 0.7):
        cut = jaccard_distance(X, k1=20, use_gpu=False, max_distance=max_distance)
        assert cut.nnz < full.nnz
        np.testing.assert_array_equal(dbscan(X, distance=cut), la)
    a = oversegmentation_pool(medoids, full, s_min=s_min)
    b = oversegmentation_pool(
        medoids, jaccard_distance(X, k1=20, use_gpu=False, max_distance=0.9), s_min=s_min
    )
    assert len(a.pairs) > 0
    np.testing.assert_array_equal(a.pairs, b.pairs)
    np.testing.assert_allclose(a.similarity, b.similarity)


def test_sampler_reports_and_uses_the_cut(world):
    X, _ = world
    dbscan = DBSCANJaccard(k1=20)
    auto = AmbiguityAwareSampler(dbscan=dbscan).sample(X, None, 40, seed=0)
    exact = AmbiguityAwareSampler(dbscan=dbscan, jaccard_max_distance=1.0).sample(
        X, None, 40, seed=0
    )
    assert auto.stats["jaccard_max_distance"] == pytest.approx(0.7)
    assert exact.stats["jaccard_max_distance"] == 1.0
    for key in ("n_clusters_a", "n_outliers_a", "n_regions"):
        assert auto.stats[key] == exact.stats[key]
    assert auto.stats["knn_index"] == "flat"
    for stage in ("knn", "jaccard", "knn_jaccard"):
        assert auto.stats["seconds"][stage] >= 0


def test_ivf_probing_every_list_asks_what_flat_asks(world):
    X, _ = world
    n = X.shape[0]
    dbscan = DBSCANJaccard(k1=20)
    flat = AmbiguityAwareSampler(dbscan=dbscan, knn_index="flat").sample(X, None, 50, seed=3)
    # nlist 8, nprobe 8: every list is searched.
    ivf = AmbiguityAwareSampler(
        dbscan=dbscan, knn_auto_threshold=n,
        knn_options={"nlist": 8, "nprobe": 8, "use_gpu": False},
    ).sample(X, None, 50, seed=3)
    assert ivf.stats["knn_index"] == "ivf"
    # The same pairs; similarities may differ in the last bit (another summation order).
    assert [(p.i, p.j, p.pool, p.region) for p in ivf.pairs] == [
        (p.i, p.j, p.pool, p.region) for p in flat.pairs
    ]
    for a, b in zip(ivf.pairs, flat.pairs, strict=True):
        assert a.probability == pytest.approx(b.probability, abs=1e-6)
        assert a.similarity == pytest.approx(b.similarity, abs=1e-6)
    # knn_options reach knn(): a bad value is knn's own error.
    with pytest.raises(ValueError, match="nprobe"):
        AmbiguityAwareSampler(knn_index="ivf", knn_options={"nprobe": 0}).sample(X, None, 5)


def test_probing_few_lists_changes_the_neighbours(world):
    # The converse of the test above, so it can fail: one probed list of many is not exact.
    X, _ = world
    exact = knn(X, 20, use_gpu=False)[1]
    poor = knn(X, 20, index="ivf", nlist=16, nprobe=1, use_gpu=False)[1]
    assert not np.array_equal(np.sort(exact, axis=1), np.sort(poor, axis=1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"knn_index": "lsh"}, "knn_index"),
        ({"knn_auto_index": "auto"}, "knn_auto_index"),
        ({"knn_auto_threshold": 0}, "knn_auto_threshold"),
        ({"knn_options": [("nprobe", 4)]}, "knn_options"),
        ({"knn_options": {"index": "flat"}}, "knn_index"),
        ({"jaccard_max_distance": "full"}, "jaccard_max_distance"),
        ({"jaccard_max_distance": 0.0}, "jaccard_max_distance"),
    ],
)
def test_bad_options_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AmbiguityAwareSampler(**kwargs)


def test_a_cut_below_dbscan_eps_is_refused(world):
    X, _ = world
    with pytest.raises(ValueError, match="eps"):
        AmbiguityAwareSampler(jaccard_max_distance=0.5).sample(X, None, 5)
