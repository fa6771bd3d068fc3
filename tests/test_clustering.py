"""DBSCAN on Jaccard distance and FINCH partitions on planted structure and references."""

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from sklearn.metrics import adjusted_rand_score

from reidal.core.clustering import (
    DBSCANJaccard,
    FinchFirstPartition,
    finch_partitions,
    first_neighbours,
)
from reidal.core.neighbors import jaccard_distance, knn
from reidal.core.validation import l2_normalise

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # finch warns at import that pynndescent is missing
    from finch import FINCH


def planted(seed, n_clusters=8, per=25, n_isolated=6, spread=0.1, d=64):
    """Tight clusters in the first half of the dimensions; isolated points on axes of the
    second half, orthogonal to every centre, so their neighbours are scattered over all
    clusters (what an outlier means for a rank-based distance)."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((n_clusters, d))
    centres[:, : d // 2] = l2_normalise(rng.normal(size=(n_clusters, d // 2)))
    labels = np.repeat(np.arange(n_clusters), per)
    members = centres[labels] + spread * rng.normal(size=(labels.size, d))
    isolated = np.zeros((n_isolated, d))
    isolated[np.arange(n_isolated), d // 2 + np.arange(n_isolated)] = 1.0
    X = l2_normalise(np.vstack([members, isolated]))
    return X, np.concatenate([labels, np.full(n_isolated, -1)])


def blobs(n, d, n_clusters, spread, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, d))
    labels = rng.integers(0, n_clusters, n)
    return l2_normalise(centres[labels] + spread * rng.normal(size=(n, d))), labels


def same_partition(a, b):
    """True when a and b group the items identically (up to label names)."""
    pairs = np.unique(np.column_stack([a, b]), axis=0)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


# --------------------------------------------------------------------------- DBSCAN


@pytest.mark.parametrize("seed", range(4))
def test_dbscan_finds_planted_clusters_and_isolated_points(seed):
    X, truth = planted(seed)
    labels = DBSCANJaccard()(X)
    inlier = truth >= 0
    assert labels.dtype == np.int64 and labels.shape == truth.shape
    assert adjusted_rand_score(truth[inlier], labels[inlier]) == 1.0
    assert (labels[inlier] >= 0).all()
    assert (labels[~inlier] == -1).all()
    assert set(np.unique(labels[inlier])) == set(range(8))  # compact 0..C-1


def test_dbscan_precomputed_distance_gives_the_same_labels():
    X, _ = blobs(300, 16, 10, 1.5, seed=1)  # loose: several clusters and outliers
    D = jaccard_distance(X)  # full matrix, max_distance 1
    a = DBSCANJaccard()(X, distance=D)
    b = DBSCANJaccard()(X)  # computes its own, cut at eps
    c = DBSCANJaccard()(X, knn_result=knn(X, 30))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert a.max() >= 2 and (a == -1).sum() >= 10  # a non-trivial case
    # the same as sklearn's DBSCAN on the dense matrix with absent pairs at distance 1
    from sklearn.cluster import DBSCAN

    stored = sp.csr_matrix((np.ones(D.nnz), D.indices, D.indptr), shape=D.shape).toarray() > 0
    dense = np.where(stored, D.toarray(), 1.0)
    ref = DBSCAN(eps=0.6, min_samples=4, metric="precomputed").fit(dense).labels_
    assert same_partition(ref, a)


def test_dbscan_sees_stored_zero_distances():
    # points 0-3 at distance 0 from each other, stored explicitly; point 4 far from all
    indices = np.r_[np.tile(np.arange(4), 4), 4]
    D = sp.csr_matrix((np.r_[np.zeros(16), 0.9], indices, [0, 4, 8, 12, 16, 17]), shape=(5, 5))
    assert D.nnz == 17 and D.count_nonzero() == 1
    X = l2_normalise(np.random.default_rng(0).normal(size=(5, 4)))
    labels = DBSCANJaccard(min_samples=4)(X, distance=D)
    np.testing.assert_array_equal(labels, [0, 0, 0, 0, -1])


@pytest.mark.parametrize("seed", range(20))
def test_dbscan_on_any_sparse_distance_matches_dense_dbscan(seed):
    """Random sparse distances with empty rows and stored zeros: only entries within eps
    are handed to sklearn, and the labels equal DBSCAN's on the dense matrix (absent = 1)."""
    from sklearn.cluster import DBSCAN

    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 40))
    m = n - int(rng.integers(0, 3))  # the last rows may be empty
    A = sp.random(m, m, density=rng.random() * 0.3, format="csr", random_state=seed)
    A = ((A + A.T) * 0.3).tocsr()
    A.data[rng.random(A.nnz) < 0.3] = 0.0  # stored zeros
    A.resize((n, n))
    stored = sp.csr_matrix((np.ones(A.nnz), A.indices, A.indptr), shape=A.shape).toarray() > 0
    dense = np.where(stored, A.toarray(), 1.0)
    np.fill_diagonal(dense, 0.0)
    X = l2_normalise(rng.normal(size=(n, 4)))
    ours = DBSCANJaccard(eps=0.3, min_samples=2)(X, distance=A)
    ref = DBSCAN(eps=0.3, min_samples=2, metric="precomputed").fit(dense).labels_
    np.testing.assert_array_equal(ours == -1, ref == -1)
    assert same_partition(ours, ref)


@pytest.mark.parametrize("seed", range(20))
def test_dbscan_pruning_keeps_exactly_the_entries_within_eps(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 30))
    A = sp.random(n, n, density=rng.random() ** 2, format="csr", random_state=seed)
    A.data[rng.random(A.nnz) < 0.3] = 0.0
    P = DBSCANJaccard(eps=0.5)._within_eps(A)

    def pattern(M):
        return sp.csr_matrix((np.ones(M.nnz), M.indices, M.indptr), shape=M.shape).toarray() > 0

    want = pattern(A) & (A.toarray() <= 0.5)
    np.testing.assert_array_equal(pattern(P), want)
    np.testing.assert_array_equal(P.toarray(), np.where(want, A.toarray(), 0.0))


def test_dbscan_is_deterministic():
    X, _ = blobs(250, 16, 8, 0.7, seed=2)
    np.testing.assert_array_equal(DBSCANJaccard()(X), DBSCANJaccard()(X))


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_dbscan_tiny_inputs(n):
    X = l2_normalise(np.random.default_rng(n).normal(size=(n, 8)))
    labels = DBSCANJaccard()(X)
    assert labels.shape == (n,) and labels.dtype == np.int64
    if n < 4:
        assert (labels == -1).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"eps": 1.0}, "eps"),
        ({"eps": 0.0}, "eps"),
        ({"min_samples": 0}, "min_samples"),
        ({"k1": 0}, "k1"),
        ({"k2": 2.5}, "k2"),
    ],
)
def test_dbscan_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DBSCANJaccard(**kwargs)


def test_dbscan_bad_inputs():
    X = l2_normalise(np.random.default_rng(0).normal(size=(10, 4)))
    bad = X.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        DBSCANJaccard()(bad)
    with pytest.raises(ValueError, match="L2-normalised"):
        DBSCANJaccard()(X * 2)
    with pytest.raises(ValueError, match="2-D"):
        DBSCANJaccard()(X[0])
    with pytest.raises(ValueError, match="shape"):
        DBSCANJaccard()(X, distance=sp.eye(9, format="csr"))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        DBSCANJaccard()(X, distance=2 * sp.eye(10, format="csr"))


# --------------------------------------------------------------------------- FINCH


@pytest.mark.parametrize("seed", range(4))
def test_finch_first_partition_never_mixes_planted_clusters(seed):
    X, truth = planted(seed, n_isolated=0)
    labels = FinchFirstPartition()(X)
    assert labels.dtype == np.int64 and (labels >= 0).all()
    assert set(np.unique(labels)) == set(range(labels.max() + 1))
    for part in np.unique(labels):
        assert len(np.unique(truth[labels == part])) == 1  # pure
    for cluster in np.unique(truth):
        assert len(np.unique(labels[truth == cluster])) >= 1


def test_finch_level0_is_the_paper_adjacency():
    """Level 0 = components of A(i,j) = 1 iff j = k_i or i = k_j or k_i = k_j (paper eq. 1),
    built densely here from a brute-force first neighbour."""
    X, _ = blobs(200, 16, 12, 0.8, seed=3)
    sims = X.astype(np.float64) @ X.T.astype(np.float64)
    np.fill_diagonal(sims, -np.inf)
    kappa = sims.argmax(axis=1)
    n = len(X)
    A = np.zeros((n, n), dtype=bool)
    A[np.arange(n), kappa] = True
    A |= A.T
    A |= kappa[:, None] == kappa[None, :]
    _, ref = connected_components(sp.csr_matrix(A), directed=False)
    np.testing.assert_array_equal(first_neighbours(X), kappa)
    assert same_partition(FinchFirstPartition()(X), ref)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_finch_levels_match_the_finch_package(seed, distance):
    X, _ = blobs(400, 32, 12, [0.3, 0.6, 1.0][seed], seed)
    c, num_clust, _ = FINCH(X, distance=distance, verbose=False)
    ours = finch_partitions(X, first_neighbours(X), distance=distance)
    assert [int(level.max()) + 1 for level in ours] == list(num_clust)
    for p, level in enumerate(ours):
        assert same_partition(level, c[:, p])
        got = FinchFirstPartition(distance=distance, partition=p)(X)
        np.testing.assert_array_equal(got, level)


def test_finch_partition_beyond_the_hierarchy_gives_the_coarsest():
    X, _ = blobs(300, 16, 6, 0.5, seed=4)
    levels = finch_partitions(X, first_neighbours(X))
    np.testing.assert_array_equal(FinchFirstPartition(partition=50)(X), levels[-1])


def test_finch_early_exit_only_removes_merges():
    X, _ = blobs(400, 32, 12, 0.3, seed=0)
    plain = finch_partitions(X, first_neighbours(X))
    early = finch_partitions(X, first_neighbours(X), ensure_early_exit=True)
    np.testing.assert_array_equal(plain[0], early[0])
    for p in range(1, min(len(plain), len(early))):
        assert early[p].max() >= plain[p].max()


def test_finch_reuses_a_knn_result_and_is_deterministic():
    X, _ = blobs(300, 16, 10, 0.7, seed=5)
    a = FinchFirstPartition()(X)
    b = FinchFirstPartition()(X, knn_result=knn(X, 30))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, FinchFirstPartition()(X))


@pytest.mark.parametrize("n, expected", [(1, [0]), (2, [0, 0]), (3, None)])
def test_finch_tiny_inputs(n, expected):
    X = l2_normalise(np.random.default_rng(n).normal(size=(n, 8)))
    labels = FinchFirstPartition()(X)
    assert labels.shape == (n,) and (labels >= 0).all()
    if expected is not None:
        assert labels.tolist() == expected
    assert FinchFirstPartition(partition=3)(X).shape == (n,)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"distance": "manhattan"}, "distance"), ({"partition": -1}, "partition"),
     ({"partition": 0.5}, "partition")],
)
def test_finch_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FinchFirstPartition(**kwargs)


def test_finch_bad_inputs():
    X = l2_normalise(np.random.default_rng(0).normal(size=(10, 4)))
    with pytest.raises(ValueError, match="NaN"):
        FinchFirstPartition()(np.where(np.eye(10, 4) > 0, np.inf, X))
    with pytest.raises(ValueError, match="L2-normalised"):
        FinchFirstPartition()(X + 1)
    with pytest.raises(ValueError, match="knn_result"):
        FinchFirstPartition()(X, knn_result=(np.zeros((9, 2)), np.zeros((9, 2), dtype=int)))
