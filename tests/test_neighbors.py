"""k-NN (faiss) and the k-reciprocal Jaccard distance against dense, loop-by-loop references."""

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.neighbors import sort_graph_by_row_values

from reidal.core import neighbors
from reidal.core.neighbors import (
    KNNIndex,
    approximate_recall,
    gpu_available,
    jaccard_distance,
    jaccard_similarity,
    knn,
    knn_recall,
)
from reidal.core.validation import l2_normalise
from reidal.simulation.reference import dense_jaccard, dense_knn


def clustered(n, d, n_clusters, spread, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, d))
    labels = rng.integers(0, n_clusters, n)
    return l2_normalise(centres[labels] + spread * rng.normal(size=(n, d))), labels


# --------------------------------------------------------------------------- references


def brute_force_topk(X, k):
    return dense_knn(X, k)


def dense_jaccard_reference(X, k1, k2):
    """SpCL's compute_jaccard_distance loop for loop (reidal.simulation.reference), float64.

    Returns the (n, n) distance and whether the 2/3 expansion rule ever added an item.
    """
    return dense_jaccard(X, k1, k2, dtype=np.float64, return_expanded=True)


def stored_mask(D):
    """Boolean (n, n): which entries are stored (explicit zeros included)."""
    pattern = sp.csr_matrix((np.ones(D.nnz), D.indices, D.indptr), shape=D.shape)
    return pattern.toarray() > 0


def densify(D):
    """Absent entries mean distance 1."""
    return np.where(stored_mask(D), D.toarray(), 1.0)


# --------------------------------------------------------------------------- knn


@pytest.mark.parametrize("n, d, k", [(300, 16, 10), (50, 8, 1), (40, 4, 40)])
def test_exact_knn_matches_brute_force(n, d, k):
    X = l2_normalise(np.random.default_rng(n).normal(size=(n, d)))
    sims, idx = knn(X, k, use_gpu=False)
    ref_sims, ref_idx = brute_force_topk(X, k)
    assert sims.dtype == np.float32 and idx.dtype == np.int64 and idx.shape == (n, k)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    assert (idx[:, 0] == np.arange(n)).all()
    assert (np.diff(sims, axis=1) <= 1e-6).all()
    # the returned similarities belong to the returned indices
    recomputed = np.einsum("ij,ikj->ik", X.astype(np.float64), X[idx].astype(np.float64))
    np.testing.assert_allclose(sims, recomputed, atol=1e-5)
    # indices agree wherever the reference order is not a float32 near-tie
    gaps = np.abs(np.diff(ref_sims, axis=1))
    clear = np.ones_like(idx, dtype=bool)
    clear[:, 1:] &= gaps > 1e-5
    clear[:, :-1] &= gaps > 1e-5
    assert (idx[clear] == ref_idx[clear]).all()


def test_k_is_clipped_to_n():
    X = l2_normalise(np.random.default_rng(0).normal(size=(7, 5)))
    sims, idx = knn(X, 30)
    assert idx.shape == (7, 7)
    assert (np.sort(idx, axis=1) == np.arange(7)).all()


def test_self_is_first_even_with_duplicates():
    rng = np.random.default_rng(1)
    base = l2_normalise(rng.normal(size=(20, 8)))
    X = np.vstack([base, base, base[:5]])  # every row has an exact twin
    sims, idx = knn(X, 4)
    assert (idx[:, 0] == np.arange(X.shape[0])).all()
    assert (np.diff(sims, axis=1) <= 1e-6).all()
    assert len({tuple(sorted(r)) for r in idx[:, :2].tolist()}) <= 20 + 5


def test_index_searches_new_queries():
    rng = np.random.default_rng(2)
    X = l2_normalise(rng.normal(size=(200, 12)))
    Q = l2_normalise(rng.normal(size=(15, 12)))
    sims, idx = KNNIndex(X, use_gpu=False).search(Q, 5)
    ref = Q.astype(np.float64) @ X.astype(np.float64).T
    np.testing.assert_allclose(sims, -np.sort(-ref, axis=1)[:, :5], atol=1e-5)
    with pytest.raises(ValueError, match="columns"):
        KNNIndex(X, use_gpu=False).search(Q[:, :6] / np.linalg.norm(Q[:, :6], axis=1)[:, None], 3)


def test_knn_recall_counts_found_neighbours():
    exact = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    assert knn_recall(exact, exact) == 1.0
    assert knn_recall(exact[::-1], exact) == 0.0
    assert knn_recall(np.array([[3, 2, 9, 9], [7, 6, 5, 4]]), exact) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="row counts"):
        knn_recall(exact[:1], exact)


@pytest.mark.parametrize("index, extra", [("hnsw", {}), ("ivf", {"nlist": 40, "nprobe": 8})])
def test_approximate_indexes_report_recall(index, extra):
    X, _ = clustered(2000, 32, 50, 0.4, seed=3)
    recall = approximate_recall(X, 10, index=index, n_queries=500, use_gpu=False, **extra)
    print(f"recall@10 of {index} {extra}: {recall:.4f}")
    assert recall > 0.9
    sims, idx = knn(X, 10, index=index, use_gpu=False, **extra)
    assert (idx >= 0).all() and (idx[:, 0] == np.arange(len(X))).all()
    assert (np.diff(sims, axis=1) <= 1e-5).all()


def test_recall_measure_sees_a_poor_index():
    # unstructured data, 1 of 40 lists probed: many true neighbours sit in other lists
    X = l2_normalise(np.random.default_rng(5).normal(size=(2000, 32)))
    poor = approximate_recall(X, 10, index="ivf", nlist=40, nprobe=1, use_gpu=False)
    full = approximate_recall(X, 10, index="ivf", nlist=40, nprobe=40, use_gpu=False)
    assert poor < 0.8 and full == 1.0


def test_ivf_rows_with_too_few_hits_fall_back_to_exact():
    # 2 lists, 1 probed: a query sees only its own list, which holds fewer than k = n items
    X, _ = clustered(100, 8, 2, 0.05, seed=4)
    sims, idx = knn(X, 100, index="ivf", nlist=2, nprobe=1, use_gpu=False)
    ref_sims, _ = brute_force_topk(X, 100)
    assert (idx >= 0).all()
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)


@pytest.mark.parametrize(
    "X, kwargs, message",
    [
        (np.array([[1.0, np.nan], [0.0, 1.0]]), {"k": 1}, "NaN or inf"),
        (np.ones(4), {"k": 1}, "2-D"),
        (np.array([[2.0, 0.0], [0.0, 1.0]]), {"k": 1}, "L2-normalised"),
        (np.eye(3), {"k": 0}, "k must be > 0"),
        (np.eye(3), {"k": -2}, "k must be > 0"),
        (np.eye(3), {"k": 1.5}, "k must be an integer"),
        (np.eye(3), {"k": 2, "index": "lsh"}, "index must be"),
        (np.eye(3), {"k": 2, "use_gpu": "yes"}, "use_gpu"),
    ],
)
def test_knn_bad_inputs_name_the_problem(X, kwargs, message):
    with pytest.raises(ValueError, match=message):
        knn(X, **kwargs)


@pytest.mark.skipif(gpu_available(), reason="a GPU is present")
def test_use_gpu_true_without_gpu_raises():
    with pytest.raises(ValueError, match="GPU"):
        knn(np.eye(3), 2, use_gpu=True)


# --------------------------------------------------------------------------- Jaccard


JACCARD_CASES = [
    # (n, d, clusters, spread, k1, k2, seed, the 2/3 expansion rule fires)
    (60, 16, 5, 0.5, 30, 6, 0, True),
    (150, 16, 8, 0.6, 20, 6, 1, True),
    (200, 32, 10, 0.8, 30, 6, 2, True),
    (200, 8, 200, 0.0, 30, 6, 3, True),  # no structure: every point its own "cluster"
    (120, 16, 6, 0.4, 7, 3, 4, True),  # odd k1: int(np.around(3.5)) = 4
    (90, 16, 6, 0.5, 5, 1, 5, False),  # k2 = 1: no query expansion; around(2.5) = 2
    (20, 8, 3, 0.5, 30, 6, 6, False),  # n < k1: k1 clipped to n
]


@pytest.mark.parametrize("n, d, c, spread, k1, k2, seed, expands", JACCARD_CASES)
def test_jaccard_matches_dense_reference(n, d, c, spread, k1, k2, seed, expands):
    X, _ = clustered(n, d, c, spread, seed)
    D = jaccard_distance(X, k1=k1, k2=k2, use_gpu=False)
    ref, expanded = dense_jaccard_reference(X, min(k1, n), k2)
    assert expanded or not expands  # the case really exercises the k-reciprocal expansion
    assert isinstance(D, sp.csr_matrix) and D.shape == (n, n) and D.dtype == np.float32
    np.testing.assert_allclose(densify(D), ref, atol=1e-5)
    # stored = overlapping pairs (reference < 1) plus the diagonal
    np.testing.assert_array_equal(stored_mask(D), (ref < 1) | np.eye(n, dtype=bool))


def test_jaccard_structure_symmetric_explicit_zero_diagonal_in_range():
    X, _ = clustered(300, 16, 10, 0.5, seed=7)
    D = jaccard_distance(X)
    assert (abs(D - D.T)).max() == 0
    np.testing.assert_array_equal(stored_mask(D), stored_mask(D).T)
    assert D.data.min() >= 0 and D.data.max() < 1
    rows = np.repeat(np.arange(300), np.diff(D.indptr))
    on_diag = rows == D.indices
    assert on_diag.sum() == 300 and (D.data[on_diag] == 0).all()
    assert D.has_sorted_indices
    # the explicit zeros survive what DBSCAN does to a precomputed sparse graph
    S = sort_graph_by_row_values(D.copy(), copy=True, warn_when_not_sorted=False)
    S.setdiag(S.diagonal())
    assert S.nnz == D.nnz


def test_jaccard_blocks_do_not_change_the_result(monkeypatch):
    X, _ = clustered(150, 16, 6, 0.6, seed=8)
    whole = jaccard_distance(X)
    monkeypatch.setattr(neighbors, "JACCARD_BLOCK_TRIPLES", 500)
    blocked = jaccard_distance(X)
    assert (whole != blocked).nnz == 0
    np.testing.assert_array_equal(stored_mask(whole), stored_mask(blocked))


def test_jaccard_max_distance_keeps_exactly_the_near_pairs():
    X, _ = clustered(200, 16, 8, 0.6, seed=9)
    full = densify(jaccard_distance(X))
    cut = jaccard_distance(X, max_distance=0.7)
    np.testing.assert_array_equal(stored_mask(cut), (full <= 0.7))
    np.testing.assert_allclose(densify(cut)[full <= 0.7], full[full <= 0.7])


def test_jaccard_reuses_a_knn_result():
    X, _ = clustered(120, 16, 6, 0.5, seed=10)
    result = knn(X, 40)
    a = jaccard_distance(X, k1=30, knn_result=result)
    b = jaccard_distance(X, k1=30)
    assert (a != b).nnz == 0
    with pytest.raises(ValueError, match="columns"):
        jaccard_distance(X, k1=30, knn_result=knn(X, 10))
    with pytest.raises(ValueError, match="knn_result"):
        jaccard_distance(X, knn_result=(result[0][:5], result[1][:5]))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_jaccard_tiny_inputs(n):
    X = l2_normalise(np.random.default_rng(n).normal(size=(n, 4)))
    D = jaccard_distance(X)
    assert D.shape == (n, n) and (D.diagonal() == 0).all()
    np.testing.assert_allclose(densify(D), dense_jaccard_reference(X, n, 6)[0], atol=1e-5)


def test_jaccard_approximate_index_close_to_exact():
    X, _ = clustered(400, 16, 10, 0.5, seed=11)
    exact = densify(jaccard_distance(X))
    approx = densify(jaccard_distance(X, index="hnsw"))
    assert np.abs(exact - approx).mean() < 0.01


@pytest.mark.parametrize(
    "kwargs, message",
    [({"k1": 0}, "k1"), ({"k2": 0}, "k2"), ({"max_distance": 1.5}, "max_distance")],
)
def test_jaccard_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        jaccard_distance(np.eye(4), **kwargs)


def test_jaccard_similarity_is_one_minus_distance_on_stored_entries():
    X, _ = clustered(100, 16, 5, 0.5, seed=12)
    D = jaccard_distance(X)
    S = jaccard_similarity(D)
    np.testing.assert_array_equal(stored_mask(S), stored_mask(D))
    np.testing.assert_allclose(S.toarray(), np.where(stored_mask(D), 1 - D.toarray(), 0.0))
    assert (S.diagonal() == 1).all()
    with pytest.raises(ValueError, match="square sparse"):
        jaccard_similarity(np.eye(3))
