"""The two complementary clusterings of Ambiguity-Aware Sampling (method.md, step 1).

A = DBSCAN on SpCL's k-reciprocal Jaccard distance (density based, -1 = outlier);
B = FINCH's first partition on cosine distance (first-neighbour chains, no outliers).
Each is a callable class (wildlife-tools style): configure once, call on embeddings.

FINCH route: the installed ``finch-clust`` (0.2.3) computes correct partitions and
accepts a precomputed first neighbour (``initial_rank``), but only for level 0: it then
builds the whole hierarchy regardless of the level wanted, with dense (C, C) pairwise
distances up to 20k clusters and pynndescent (not installed) beyond, so at n = 100k it
raises or needs many GiB to return the level we already had; it also warns on import and
prints. FINCH's partitions are short to state, so they are implemented here on faiss
neighbours (level 0 costs one 2-NN search and one connected-components pass);
``tests/test_clustering.py`` checks every level against the package where its exact path
runs, and level 0 against the paper's adjacency.
"""

from __future__ import annotations

import threading
import weakref
from typing import Literal

import faiss
import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from sklearn.cluster import DBSCAN
from sklearn.neighbors import sort_graph_by_row_values

from reidal.core.neighbors import (
    KNN_EXACT_BELOW,
    GpuChoice,
    IndexKind,
    check_knn_result,
    jaccard_distance,
    knn,
    knn_search,
    within_distance,
)
from reidal.core.params import CLUSTERING, ParamsMixin
from reidal.core.validation import Interval, OneOf, check_embeddings

__all__ = ["DBSCANJaccard", "FinchFirstPartition", "finch_levels", "finch_partitions",
           "first_neighbours"]


def _first_occurrence_labels(labels: np.ndarray) -> np.ndarray:
    """Relabel so clusters are numbered 0..C-1 in order of their first member (-1 kept)."""
    out = np.full(labels.shape, -1, dtype=np.int64)
    inliers = labels >= 0
    if inliers.any():
        uniq, first, inverse = np.unique(
            labels[inliers], return_index=True, return_inverse=True
        )
        rank = np.empty(uniq.size, dtype=np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(uniq.size)
        out[inliers] = rank[inverse]
    return out


class DBSCANJaccard(ParamsMixin):
    """DBSCAN (``metric="precomputed"``) on the sparse k-reciprocal Jaccard distance.

    Defaults are SpCL's (eps 0.6, min_samples 4, k1 30, k2 6: reidal.core.params). eps must
    be < 1: absent entries of the sparse matrix mean distance 1, which DBSCAN then never
    sees as neighbours, exactly as SpCL's dense matrix with eps < 1. When the distance is
    computed here it keeps only pairs within eps (``max_distance=eps``), which changes
    nothing for DBSCAN and saves most of the memory.
    """

    _constraints = {
        "eps": Interval(0.0, 1.0, closed="neither"),
        "min_samples": Interval(1, None, integer=True),
        "k1": Interval(1, None, integer=True),
        "k2": Interval(1, None, integer=True),
        "index": OneOf(("flat", "hnsw", "ivf")),
        "use_gpu": OneOf(("auto", True, False)),
    }

    def __init__(
        self,
        eps: float = CLUSTERING.dbscan_eps,
        min_samples: int = CLUSTERING.min_samples,
        k1: int = CLUSTERING.k1,
        k2: int = CLUSTERING.k2,
        index: IndexKind = "flat",
        use_gpu: GpuChoice = "auto",
    ) -> None:
        self.eps = eps
        self.min_samples = min_samples
        self.k1 = k1
        self.k2 = k2
        self.index = index
        self.use_gpu = use_gpu
        self._check_params()

    def __call__(
        self,
        X: object,
        *,
        distance: sp.spmatrix | np.ndarray | None = None,
        knn_result: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Labels int64 (n,), clusters numbered 0..C-1, -1 for outliers.

        ``distance``: a precomputed Jaccard matrix (from :func:`jaccard_distance`, with
        ``max_distance >= eps``) to skip recomputing it; ``knn_result`` feeds the
        computation otherwise.
        """
        X = check_embeddings(X)
        n = X.shape[0]
        if distance is None:
            D = jaccard_distance(
                X, k1=self.k1, k2=self.k2, knn_result=knn_result, index=self.index,
                use_gpu=self.use_gpu, max_distance=self.eps,
            )
        else:
            D = self._check_distance(distance, n)
        if sp.issparse(D):
            D = self._within_eps(D.tocsr())
            D = sort_graph_by_row_values(D, copy=False, warn_when_not_sorted=False)
        labels = DBSCAN(eps=self.eps, min_samples=self.min_samples, metric="precomputed").fit(
            D
        ).labels_
        return _first_occurrence_labels(np.asarray(labels))

    def _within_eps(self, D: sp.csr_matrix) -> sp.csr_matrix:
        """Drop the entries DBSCAN can never use (distance > eps), keeping stored zeros.

        sklearn copies, sorts and expands the whole matrix: at n = 100k a full Jaccard
        matrix (~4000 entries a row) costs it some 20 GiB, the pruned one well under 1.
        """
        return within_distance(D, self.eps)

    @staticmethod
    def _check_distance(D: object, n: int) -> sp.spmatrix | np.ndarray:
        if not sp.issparse(D):
            D = np.asarray(D, dtype=np.float64)
        if D.ndim != 2 or D.shape != (n, n):
            raise ValueError(f"distance must have shape ({n}, {n}), got {D.shape}")
        values = D.data if sp.issparse(D) else D
        if values.size:
            if not np.isfinite(values).all():
                raise ValueError("distance contains NaN or inf")
            if values.min() < 0 or values.max() > 1:
                raise ValueError(
                    f"distance values must lie in [0, 1], got [{values.min()}, {values.max()}]"
                )
        return D


# --------------------------------------------------------------------------- FINCH


def first_neighbours(
    X: np.ndarray,
    *,
    knn_result: tuple[np.ndarray, np.ndarray] | None = None,
    index: IndexKind = "flat",
    use_gpu: GpuChoice = "auto",
) -> np.ndarray:
    """Each row's nearest other row (FINCH's kappa); a lone item points to itself."""
    n = X.shape[0]
    if knn_result is None:
        _, idx = knn(X, 2, index=index, use_gpu=use_gpu)
    else:
        _, idx = check_knn_result(knn_result, n, min(2, n))
    return _first_other(idx)


def _first_other(idx: np.ndarray) -> np.ndarray:
    """Per row of a k-NN result, the first neighbour that is not the row itself (nor a
    missing -1); the row itself when there is none."""
    rows = np.arange(idx.shape[0])
    other = (idx != rows[:, None]) & (idx >= 0)
    first = idx[rows, np.argmax(other, axis=1)]
    return np.where(other.any(axis=1), first, rows)


def _link_components(kappa: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """Components of the graph i -> kappa_i. Weak connectivity of these edges is FINCH's
    adjacency (j = kappa_i, i = kappa_j or kappa_i = kappa_j) closed transitively."""
    n = kappa.size
    rows = np.arange(n)
    if keep is not None:
        rows, kappa = rows[keep], kappa[keep]
    graph = sp.csr_matrix((np.ones(rows.size, dtype=np.int8), (rows, kappa)), shape=(n, n))
    _, labels = connected_components(graph, directed=True, connection="weak")
    return _first_occurrence_labels(labels)


def _pair_distance(a: np.ndarray, b: np.ndarray, distance: str) -> np.ndarray:
    if distance == "cosine":
        na = np.linalg.norm(a, axis=1)
        nb = np.linalg.norm(b, axis=1)
        cos = np.einsum("ij,ij->i", a, b) / np.maximum(na * nb, 1e-30)
        return 1.0 - cos
    return np.linalg.norm(a - b, axis=1)


def _means_first_neighbours(means: np.ndarray, distance: str) -> np.ndarray:
    """1-NN among cluster means (cosine: inner product of normalised means).

    Exact, except for cosine from KNN_EXACT_BELOW means on, where exact search would cost
    C^2 d (level 1 of a million images has some 300k means): there the collection's own
    k-NN search (:func:`reidal.core.neighbors.knn_search`, an inverted file calibrated to
    KNN_TARGET_RECALL) finds them, so no FINCH level is quadratic in n.
    """
    c = means.shape[0]
    if distance == "cosine":
        norms = np.linalg.norm(means, axis=1, keepdims=True)
        vecs = (means / np.maximum(norms, 1e-30)).astype(np.float32)
        if c >= KNN_EXACT_BELOW and (norms > 1e-6).all():
            return _first_other(knn_search(vecs, 2, index="auto")[1])
        flat = faiss.IndexFlatIP(means.shape[1])
    else:
        vecs = np.ascontiguousarray(means, dtype=np.float32)
        flat = faiss.IndexFlatL2(means.shape[1])
    flat.add(vecs)
    return _first_other(flat.search(vecs, min(2, c))[1])


def finch_partitions(
    X: np.ndarray,
    kappa: np.ndarray,
    *,
    distance: Literal["cosine", "euclidean"] = "cosine",
    ensure_early_exit: bool = False,
    max_level: int | None = None,
) -> list[np.ndarray]:
    """FINCH's partitions (Sarfraz et al. CVPR 2019), finest first, up to ``max_level``.

    Level 0 links each item to its first neighbour ``kappa``; each further level does the
    same on the previous level's cluster means (of the original vectors). As in the
    reference code, a level that leaves one cluster or merges fewer than two clusters ends
    the hierarchy. ``ensure_early_exit`` cuts links between means farther apart than the
    longest level-0 link, which is what the reference code means to do; there it is a no-op
    (it zeroes the links in a CSR matrix, and csgraph counts stored zeros as edges), so the
    default False reproduces the reference's partitions.
    """
    n = X.shape[0]
    labels = _link_components(kappa)
    levels = [labels]
    min_sim = None
    if ensure_early_exit:
        min_sim = float(_pair_distance(X, X[kappa], distance).max()) if n > 1 else 0.0
    count = int(labels.max()) + 1
    while max_level is None or len(levels) <= max_level:
        if count <= 1:
            break
        member = sp.csr_matrix(
            (np.ones(n, dtype=np.float64), (labels, np.arange(n))), shape=(count, n)
        )
        means = (member @ X.astype(np.float64)) / np.bincount(labels, minlength=count)[:, None]
        link = _means_first_neighbours(means, distance)
        keep = None
        if min_sim is not None:
            keep = _pair_distance(means, means[link], distance) <= min_sim
        merged = _link_components(link, keep)
        new_count = int(merged.max()) + 1
        if new_count == 1 or count - new_count <= 1:
            break
        labels = merged[labels]
        levels.append(labels)
        count = new_count
    return levels


class FinchFirstPartition(ParamsMixin):
    """FINCH clustering, one partition of its hierarchy (default 0, the finest: method.md).

    ``distance``: "cosine" (default) or "euclidean"; on L2-normalised embeddings both give
    the same level 0, they differ on the unnormalised cluster means of later levels.
    ``partition``: which level; a data set with fewer levels gets its coarsest one.
    ``ensure_early_exit``: see :func:`finch_partitions` (level 0 never depends on it).
    Every item gets a cluster (FINCH has no outliers); labels 0..C-1 in order of first member.
    """

    _constraints = {
        "distance": OneOf(("cosine", "euclidean")),
        "partition": Interval(0, None, integer=True),
        "ensure_early_exit": OneOf((True, False)),
        "index": OneOf(("flat", "hnsw", "ivf")),
        "use_gpu": OneOf(("auto", True, False)),
    }

    def __init__(
        self,
        distance: Literal["cosine", "euclidean"] = "cosine",
        partition: int = CLUSTERING.finch_level,
        ensure_early_exit: bool = False,
        index: IndexKind = "flat",
        use_gpu: GpuChoice = "auto",
    ) -> None:
        self.distance = distance
        self.partition = partition
        self.ensure_early_exit = ensure_early_exit
        self.index = index
        self.use_gpu = use_gpu
        self._check_params()

    def __call__(
        self, X: object, *, knn_result: tuple[np.ndarray, np.ndarray] | None = None
    ) -> np.ndarray:
        """Labels int64 (n,), never -1. ``knn_result`` (from :func:`knn`, k >= 2) reuses
        neighbours already computed, e.g. those of the Jaccard distance."""
        X = check_embeddings(X)
        levels = finch_levels(X, knn_result=knn_result, max_level=int(self.partition),
                              distance=self.distance, ensure_early_exit=self.ensure_early_exit,
                              index=self.index, use_gpu=self.use_gpu)
        return levels[min(int(self.partition), len(levels) - 1)]


#: The last FINCH hierarchy computed from a shared kNN graph (read-only arrays, as the
#: neighbour-graph cache hands out): (weak reference to its idx, X's shape, distance,
#: ensure_early_exit, the max_level it was computed to, the levels).
_LAST_HIERARCHY: list[tuple] = []
_HIERARCHY_LOCK = threading.Lock()


def finch_levels(
    X: np.ndarray,
    *,
    knn_result: tuple[np.ndarray, np.ndarray] | None = None,
    max_level: int,
    distance: Literal["cosine", "euclidean"] = "cosine",
    ensure_early_exit: bool = False,
    index: IndexKind = "flat",
    use_gpu: GpuChoice = "auto",
) -> list[np.ndarray]:
    """:func:`finch_partitions` of X from its first neighbours (those of ``knn_result``
    when given), levels 0..max_level (fewer where the hierarchy ends); copies.

    On a read-only ``knn_result`` (the cycle's shared graph) the last hierarchy is kept:
    a calibrated cycle's level choice (reidal.core.calibration) computes the levels once
    and the sampler's FINCH at the chosen level reads them (from level 1 on they cost a
    search among the cluster means). A graph's arrays are X's kNN result by contract,
    and read-only ones cannot change, so the graph identifies the hierarchy.
    """
    idx = knn_result[1] if knn_result is not None else None
    shared = isinstance(idx, np.ndarray) and not idx.flags.writeable
    key = (X.shape, distance, bool(ensure_early_exit))
    if shared:
        with _HIERARCHY_LOCK:
            for ref, k, depth, levels in _LAST_HIERARCHY:
                # a hierarchy that ended before its max_level holds every level there is
                if ref() is idx and k == key and (max_level <= depth or len(levels) <= depth):
                    return [lv.copy() for lv in levels[: max_level + 1]]
    kappa = first_neighbours(X, knn_result=knn_result, index=index, use_gpu=use_gpu)
    levels = finch_partitions(X, kappa, distance=distance,
                              ensure_early_exit=ensure_early_exit, max_level=max_level)
    if shared:
        with _HIERARCHY_LOCK:
            _LAST_HIERARCHY[:] = [(weakref.ref(idx, _forget_hierarchy), key, max_level,
                                   [lv.copy() for lv in levels])]
    return levels


def _forget_hierarchy(ref: weakref.ref) -> None:
    """Drop the kept hierarchy once its graph is gone (the cache evicted it)."""
    _LAST_HIERARCHY[:] = [entry for entry in _LAST_HIERARCHY if entry[0] is not ref]
