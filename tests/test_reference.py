"""The dense references against the product code and against plain NumPy/SciPy definitions.

The references are ground truth elsewhere (test_neighbors) and the benchmark's baseline, so
they are checked here too: the kNN against a stable argsort, and DBSCAN / FINCH against the
sparse product code on the same inputs (two independent routes to the same partition).
"""

from __future__ import annotations

import numpy as np
import pytest

from reidal.core.clustering import DBSCANJaccard, FinchFirstPartition
from reidal.core.neighbors import jaccard_distance, knn
from reidal.core.validation import l2_normalise
from reidal.simulation.reference import (
    dense_bytes,
    dense_dbscan,
    dense_finch_first_partition,
    dense_jaccard,
    dense_knn,
    dense_similarity,
)
from reidal.simulation.synthetic import make_reid_embeddings


@pytest.fixture(scope="module")
def reid():
    data = make_reid_embeddings(40, dim=32, seed=3)
    return data.X, data.labels


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == np.unique(a).size == np.unique(b).size


def _densify(D) -> np.ndarray:
    coo = D.tocoo()
    out = np.ones(D.shape)
    out[coo.row, coo.col] = coo.data
    return out


@pytest.mark.parametrize("k", [1, 5, 17, 60])
def test_dense_knn_is_a_stable_argsort_even_with_ties(k):
    rng = np.random.default_rng(k)
    base = l2_normalise(rng.normal(size=(20, 6)))
    X = np.vstack([base, base[:10], base[:5]])  # exact duplicates: ties at the cut
    sims, idx = dense_knn(X, k)
    S = X.astype(np.float64) @ X.T.astype(np.float64)
    order = np.argsort(-S, axis=1, kind="stable")[:, : min(k, len(X))]
    np.testing.assert_array_equal(idx, order)
    np.testing.assert_allclose(sims, np.take_along_axis(S, order, axis=1))
    assert idx.dtype == np.int64


def test_dense_knn_agrees_with_faiss(reid):
    X, _ = reid
    _, idx = knn(X, 10, use_gpu=False)
    _, ref = dense_knn(X, 10, dtype=np.float32)
    assert (idx == ref).mean() > 0.99  # float32 near-ties may swap neighbours


def test_dense_jaccard_takes_a_given_initial_rank(reid):
    X, _ = reid
    own = dense_jaccard(X, 20, 4)
    _, rank = dense_knn(X, 25)
    np.testing.assert_array_equal(dense_jaccard(X, 20, 4, initial_rank=rank), own)
    with pytest.raises(ValueError, match="initial_rank"):
        dense_jaccard(X, 20, 4, initial_rank=rank[:, :10])


def test_dense_dbscan_matches_the_sparse_product(reid):
    X, _ = reid
    D = jaccard_distance(X, k1=20, k2=4, use_gpu=False)
    ours = DBSCANJaccard(k1=20, k2=4)(X, distance=D)
    ref = dense_dbscan(dense_jaccard(X, 20, 4), eps=0.6, min_samples=4)
    assert _same_partition(ours, ref)
    assert (ref >= 0).any() and (ref == -1).any()  # real clusters and real outliers
    assert np.array_equal(ours == -1, ref == -1)
    np.testing.assert_allclose(_densify(D), dense_jaccard(X, 20, 4), atol=1e-5)
    with pytest.raises(ValueError, match="square"):
        dense_dbscan(np.ones((3, 4)))


def test_dense_finch_matches_the_product(reid):
    X, _ = reid
    ref = dense_finch_first_partition(X)
    assert _same_partition(FinchFirstPartition()(X), ref)
    assert 1 < np.unique(ref).size < len(X)


def test_dense_similarity_and_bytes():
    X = l2_normalise(np.random.default_rng(0).normal(size=(5, 3)))
    np.testing.assert_allclose(dense_similarity(X), X.astype(np.float64) @ X.T)
    assert dense_bytes(100_000) == 40_000_000_000
    assert dense_bytes(10, np.float64) == 800
