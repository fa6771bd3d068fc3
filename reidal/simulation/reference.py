"""Naive dense reference implementations: ground truth for tests and the ratio baseline of
benchmarks, never used by the product.

Each function materialises (n, n) arrays and follows the original algorithm as literally
as it can (SpCL's ``compute_jaccard_distance`` loop for loop, FINCH's ``clust_rank`` on a
dense distance matrix, scikit-learn's DBSCAN on a dense precomputed matrix), so that a
disagreement with the sparse, vectorised product code points at the product code, and so
that ``bench/bench_sampling.py`` can report how much the product code gains over the
obvious implementation. Memory is O(n^2): one float32 (n, n) matrix is 0.4 GB at n = 10k
and 40 GB at n = 100k (see :func:`dense_bytes`), which is why nothing here may be used by
the service.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from sklearn.cluster import DBSCAN

from reidal.core.validation import check_embeddings

__all__ = [
    "dense_bytes",
    "dense_dbscan",
    "dense_finch_first_partition",
    "dense_jaccard",
    "dense_knn",
    "dense_similarity",
]


def dense_bytes(n: int, dtype: type = np.float32) -> int:
    """Bytes of one dense (n, n) matrix of ``dtype``: what each reference needs at least."""
    return int(n) * int(n) * np.dtype(dtype).itemsize


def dense_similarity(X: object, *, dtype: type = np.float64) -> np.ndarray:
    """All inner products X X^T as a dense (n, n) array (cosine on L2-normalised rows)."""
    X = check_embeddings(X).astype(dtype, copy=False)
    return X @ X.T


def dense_knn(
    X: object, k: int, *, dtype: type = np.float64
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of every row of the dense similarity matrix: (sims (n, k), idx int64 (n, k)).

    Rows are sorted by decreasing similarity, ties broken by the lower column index (the
    order of a stable argsort), the item itself included like any other column. k is
    clipped to n. Uses argpartition; the rare rows with a tie straddling the k-th value
    (duplicate rows) are redone with a stable argsort so the tie rule always holds.
    """
    S = dense_similarity(X, dtype=dtype)
    n = S.shape[0]
    k = min(int(k), n)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    neg = -S
    top = np.argpartition(neg, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (n, 1))
    vals = np.take_along_axis(neg, top, axis=1)
    order = np.lexsort((top, vals), axis=1)
    idx = np.take_along_axis(top, order, axis=1)
    kth = np.take_along_axis(neg, idx[:, -1:], axis=1)
    straddle = np.flatnonzero(np.sum(neg <= kth, axis=1) > k)
    for r in straddle:  # a loop over rows with ties at the cut, not over pairs
        idx[r] = np.argsort(neg[r], kind="stable")[:k]
    return np.take_along_axis(S, idx, axis=1), idx.astype(np.int64)


def _k_reciprocal_neigh(initial_rank: np.ndarray, i: int, k1: int) -> np.ndarray:
    # spcl/utils/faiss_rerank.py, verbatim logic
    forward = initial_rank[i, : k1 + 1]
    backward = initial_rank[forward, : k1 + 1]
    fi = np.where(backward == i)[0]
    return forward[fi]


def dense_jaccard(
    X: object,
    k1: int = 30,
    k2: int = 6,
    *,
    dtype: type = np.float64,
    initial_rank: np.ndarray | None = None,
    return_expanded: bool = False,
) -> np.ndarray | tuple[np.ndarray, bool]:
    """SpCL's ``compute_jaccard_distance`` transcribed loop for loop, on dense (n, n) arrays.

    The initial rank is :func:`dense_knn` with k1 columns (SpCL takes it from a faiss top-k
    search; k1 is clipped to n), or ``initial_rank`` when given (an (n, >= k1) index array,
    e.g. a kNN result a benchmark has already timed). ``dtype``: float64 for tests (tight
    tolerances), float32 as in SpCL for benchmarks. With ``return_expanded`` also says
    whether the 2/3 expansion rule ever added an item, so a test can show it exercised it.
    """
    X64 = check_embeddings(X).astype(dtype, copy=False)
    N = X64.shape[0]
    k1 = min(int(k1), N)
    if initial_rank is None:
        _, initial_rank = dense_knn(X64, k1, dtype=dtype)
    else:
        initial_rank = np.asarray(initial_rank)
        if initial_rank.ndim != 2 or initial_rank.shape[0] != N or initial_rank.shape[1] < k1:
            raise ValueError(f"initial_rank must be ({N}, >= {k1}), got {initial_rank.shape}")
        initial_rank = initial_rank[:, :k1]
    nn_k1 = [_k_reciprocal_neigh(initial_rank, i, k1) for i in range(N)]
    nn_k1_half = [_k_reciprocal_neigh(initial_rank, i, int(np.around(k1 / 2))) for i in range(N)]
    V = np.zeros((N, N), dtype=dtype)
    expanded = False
    for i in range(N):
        k_reciprocal_index = nn_k1[i]
        k_reciprocal_expansion_index = k_reciprocal_index
        for candidate in k_reciprocal_index:
            candidate_k_reciprocal_index = nn_k1_half[candidate]
            if len(np.intersect1d(candidate_k_reciprocal_index, k_reciprocal_index)) > 2 / 3 * len(
                candidate_k_reciprocal_index
            ):
                k_reciprocal_expansion_index = np.append(
                    k_reciprocal_expansion_index, candidate_k_reciprocal_index
                )
        k_reciprocal_expansion_index = np.unique(k_reciprocal_expansion_index)
        expanded |= k_reciprocal_expansion_index.size > np.unique(k_reciprocal_index).size
        dist = 2 - 2 * (X64[i] @ X64[k_reciprocal_expansion_index].T)
        weight = np.exp(-dist)
        V[i, k_reciprocal_expansion_index] = weight / weight.sum()
    if k2 != 1:
        V_qe = np.zeros_like(V)
        for i in range(N):
            V_qe[i, :] = np.mean(V[initial_rank[i, :k2], :], axis=0)
        V = V_qe
        del V_qe
    invIndex = [np.where(V[:, i] != 0)[0] for i in range(N)]
    jaccard_dist = np.zeros((N, N), dtype=dtype)
    for i in range(N):
        temp_min = np.zeros(N, dtype=dtype)
        indNonZero = np.where(V[i, :] != 0)[0]
        indImages = [invIndex[ind] for ind in indNonZero]
        for j in range(len(indNonZero)):
            col = indNonZero[j]
            temp_min[indImages[j]] += np.minimum(V[i, col], V[indImages[j], col])
        jaccard_dist[i] = 1 - temp_min / (2 - temp_min)
    jaccard_dist[jaccard_dist < 0] = 0.0
    if return_expanded:
        return jaccard_dist, bool(expanded)
    return jaccard_dist


def dense_dbscan(D: object, eps: float = 0.6, min_samples: int = 4) -> np.ndarray:
    """scikit-learn DBSCAN on a dense precomputed (n, n) distance matrix; -1 = outlier.

    Labels are sklearn's own numbering; compare partitions, not label values.
    """
    D = np.asarray(D)
    if D.ndim != 2 or D.shape[0] != D.shape[1]:
        raise ValueError(f"D must be a square dense distance matrix, got shape {D.shape}")
    model = DBSCAN(eps=float(eps), min_samples=int(min_samples), metric="precomputed")
    return np.asarray(model.fit(D).labels_, dtype=np.int64)


def dense_finch_first_partition(X: object, *, dtype: type = np.float64) -> np.ndarray:
    """FINCH's first partition as the reference code computes it (``clust_rank``).

    Dense cosine distances, diagonal excluded, first neighbour = row argmin; A = kappa
    adjacency plus identity, so A A^T links i and j when j = kappa_i, i = kappa_j or
    kappa_i = kappa_j, and the weak components of A A^T are the clusters. Labels are
    component ids.
    """
    S = dense_similarity(X, dtype=dtype)
    s = S.shape[0]
    dist = 1.0 - S
    np.fill_diagonal(dist, np.inf if s > 1 else 0.0)
    initial_rank = np.argmin(dist, axis=1)
    A = sp.csr_matrix(
        (np.ones(s, dtype=np.float32), (np.arange(s), initial_rank)), shape=(s, s)
    )
    A = A + sp.eye(s, dtype=np.float32, format="csr")
    A = A @ A.T
    _, labels = connected_components(A, directed=True, connection="weak")
    return labels.astype(np.int64)
