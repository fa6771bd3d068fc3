"""Baseline pair samplers AAS is compared against; same ``Sampler`` interface.

- RandomPairSampler: uniform over the unanswered pairs (the paper's "random pairs").
- UncertaintySampler: kNN-graph pairs whose Jaccard distance sits closest to DBSCAN's eps,
  the pairs DBSCAN is least sure to link (classic margin sampling).
- NISSampler: NIS-style sampling (Perez et al., ECCV 2024): vertices with a low degree in
  the similarity graph are the ones the clustering knows least about, so they are drawn
  more often, each paired with its most similar neighbours still unresolved.

None of them enumerates all n(n-1)/2 pairs (only the random sampler may, as a last resort
on a collection small enough that the pairs fit easily, when rejection keeps failing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from reidal.core.neighbors import jaccard_distance, knn
from reidal.core.params import CLUSTERING, ParamsMixin
from reidal.core.sampling import (
    REASON_ALL_RESOLVED,
    QueryPair,
    SampleResult,
    batch_reason,
    canonical_pairs,
    check_sample_inputs,
    dedupe_pairs,
    make_rng,
    pair_keys,
    sparse_lookup,
    unresolved_mask,
    weighted_order,
)
from reidal.core.validation import Interval, OneOf, total_pairs

if TYPE_CHECKING:  # pragma: no cover - typing only
    from reidal.core.constraints import ConstraintSet

#: Below this many pairs the random sampler may list all pairs when rejection stalls
#: (about 8 MB of int64 keys); above it, it returns what rejection found.
RANDOM_ENUMERATE_LIMIT = 1_000_000


def _cosine(X: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    if pairs.shape[0] == 0:
        return np.empty(0, dtype=np.float64)
    return np.einsum("ij,ij->i", X[pairs[:, 0]], X[pairs[:, 1]]).astype(np.float64)


class RandomPairSampler(ParamsMixin):
    """Uniformly random unanswered pairs, drawn by rejection of (i, j) keys.

    Each round draws ordered (i, j) with i != j uniformly (hence unordered pairs
    uniformly), drops repeats and resolved pairs, and keeps going for up to ``max_rounds``
    rounds. ``probability`` of a returned pair is 1 / (n(n-1)/2), the chance of that pair
    per draw; ``similarity`` is the cosine similarity.
    """

    _constraints = {"max_rounds": Interval(1, None, integer=True),
                    "oversample": Interval(1.0, None)}

    def __init__(self, max_rounds: int = 32, oversample: float = 2.0) -> None:
        self.max_rounds = max_rounds
        self.oversample = oversample
        self._check_params()

    def sample(
        self,
        X: np.ndarray,
        constraints: ConstraintSet | None,
        budget: int | float,
        *,
        seed: int = 0,
        exclude_pairs: np.ndarray | None = None,
    ) -> SampleResult:
        X, n_budget, excl = check_sample_inputs(X, constraints, budget, exclude_pairs)
        n = X.shape[0]
        rng = make_rng(seed)
        total = total_pairs(n)
        chosen: list[np.ndarray] = []
        chosen_keys = np.empty(0, dtype=np.int64)
        n_rejected = 0
        for _ in range(self.max_rounds):
            need = n_budget - chosen_keys.size
            if need <= 0:
                break
            m = max(64, int(np.ceil(self.oversample * need)))
            i = rng.integers(0, n, m)
            j = rng.integers(0, n - 1, m)
            j = j + (j >= i)
            pairs = canonical_pairs(i, j)
            pairs = pairs[dedupe_pairs(pairs, n)]
            pairs = pairs[~np.isin(pair_keys(pairs, n), chosen_keys)]
            ok = unresolved_mask(pairs, n, constraints, excl)
            n_rejected += int(np.sum(~ok))
            pairs = pairs[ok][:need]
            chosen.append(pairs)
            chosen_keys = np.concatenate([chosen_keys, pair_keys(pairs, n)])
        exhausted = False
        if chosen_keys.size < n_budget and total <= RANDOM_ENUMERATE_LIMIT:
            # Rejection stalls when almost every pair is resolved: list them all instead.
            iu, ju = np.triu_indices(n, k=1)
            pairs = np.stack([iu, ju], axis=1).astype(np.int64)
            pairs = pairs[~np.isin(pair_keys(pairs, n), chosen_keys)]
            pairs = pairs[unresolved_mask(pairs, n, constraints, excl)]
            pairs = pairs[rng.permutation(pairs.shape[0])][: n_budget - chosen_keys.size]
            chosen.append(pairs)
            chosen_keys = np.concatenate([chosen_keys, pair_keys(pairs, n)])
            exhausted = True
        pairs = np.concatenate(chosen) if chosen else np.empty((0, 2), dtype=np.int64)
        sims = _cosine(X, pairs)
        out = [
            QueryPair(int(a), int(b), "random", -1, 1.0 / total, float(s))
            for (a, b), s in zip(pairs, sims, strict=True)
        ]
        if len(out) == n_budget or exhausted:
            reason = batch_reason(len(out), len(out), n_budget, REASON_ALL_RESOLVED)
        else:
            reason = (
                f"rejection sampling found only {len(out)} unresolved pairs in "
                f"{self.max_rounds} rounds"
            )
        stats = {"n_items": n, "n_rejected": n_rejected, "enumerated": exhausted}
        return SampleResult(out, n_budget, reason, stats)


def _knn_edges(idx: np.ndarray) -> np.ndarray:
    """Unique undirected kNN-graph edges (self column dropped) as (m, 2) pairs, i < j."""
    n, k = idx.shape
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    cols = idx.ravel().astype(np.int64)
    ok = cols != rows
    pairs = canonical_pairs(rows[ok], cols[ok])
    return pairs[dedupe_pairs(pairs, n)]


class UncertaintySampler(ParamsMixin):
    """kNN-graph pairs whose Jaccard distance is closest to DBSCAN's ``eps``.

    Those pairs decide whether DBSCAN links two neighbourhoods; a small change in the
    embedding flips them, so their answer is the most informative for DBSCAN's output.
    The top ``budget`` by |d - eps| are returned (ties broken by the seed), so
    ``probability`` is 1.0; ``similarity`` is 1 - Jaccard distance.
    """

    _constraints = {"eps": Interval(0.0, 1.0), "k1": Interval(1, None, integer=True),
                    "k2": Interval(1, None, integer=True),
                    # self plus one neighbour at least
                    "k": (OneOf((None,)), Interval(2, None, integer=True))}

    def __init__(self, eps: float = CLUSTERING.dbscan_eps, k1: int = CLUSTERING.k1,
                 k2: int = CLUSTERING.k2, k: int | None = None) -> None:
        self.eps = eps
        self.k1 = k1
        self.k2 = k2
        self.k = k
        self._check_params()

    def sample(
        self,
        X: np.ndarray,
        constraints: ConstraintSet | None,
        budget: int | float,
        *,
        seed: int = 0,
        exclude_pairs: np.ndarray | None = None,
        graph: tuple[tuple[np.ndarray, np.ndarray], sp.csr_matrix] | None = None,
    ) -> SampleResult:
        """The top ``budget`` kNN edges by |Jaccard distance - eps|.

        ``graph``: (kNN result, uncut Jaccard matrix of this sampler's k1 / k2) already
        computed for X (AASContinuation passes its AAS's, from the cycle's cache); without
        it, or when it has fewer kNN columns than needed, exact search builds them here.
        """
        X, n_budget, excl = check_sample_inputs(X, constraints, budget, exclude_pairs)
        n = X.shape[0]
        rng = make_rng(seed)
        k = max(self.k1, self.k or 0, 2)
        if graph is not None and graph[0][1].shape[1] >= min(k, n):
            knn_result, D = graph
        else:
            knn_result = knn(X, k)
            D = jaccard_distance(X, k1=self.k1, k2=self.k2, knn_result=knn_result)
        idx = knn_result[1][:, : (self.k or self.k1)]
        pairs = _knn_edges(idx)
        pairs = pairs[unresolved_mask(pairs, n, constraints, excl)]
        d = sparse_lookup(D, pairs[:, 0], pairs[:, 1], default=1.0)
        margin = np.abs(d - self.eps)
        order = np.lexsort((rng.random(margin.size), margin))[:n_budget]
        out = [
            QueryPair(int(pairs[t, 0]), int(pairs[t, 1]), "uncertainty", -1, 1.0, 1.0 - d[t])
            for t in order
        ]
        reason = batch_reason(pairs.shape[0], len(out), n_budget, REASON_ALL_RESOLVED)
        return SampleResult(out, n_budget, reason, {"n_items": n, "n_candidates": pairs.shape[0]})


def vertex_degrees(
    sims: np.ndarray, idx: np.ndarray, *, mode: str = "similarity_sum", threshold: float = 0.5
) -> np.ndarray:
    """Degree of every vertex in the symmetrised kNN similarity graph.

    ``similarity_sum``: sum of the (non-negative) similarities of its edges;
    ``threshold``: number of edges with similarity >= ``threshold``. An edge exists when
    either end lists the other among its k neighbours (self column excluded), so a hub
    that many images point to has a high degree even though every row holds k entries.
    """
    sims = np.asarray(sims, dtype=np.float64)
    idx = np.asarray(idx, dtype=np.int64)
    n, k = idx.shape
    rows = np.repeat(np.arange(n, dtype=np.int64), k)
    cols = idx.ravel()
    w = sims.ravel()
    ok = cols != rows
    rows, cols, w = rows[ok], cols[ok], w[ok]
    if mode == "similarity_sum":
        w = np.clip(w, 0.0, None)
    elif mode == "threshold":
        w = (w >= threshold).astype(np.float64)
    else:
        raise ValueError(f"degree mode must be 'similarity_sum' or 'threshold', got {mode!r}")
    W = sp.csr_matrix((w, (rows, cols)), shape=(n, n))
    W = W.maximum(W.T)
    return np.asarray(W.sum(axis=1)).ravel()


class NISSampler(ParamsMixin):
    """NIS-style sampler (Perez et al., ECCV 2024): low-degree vertices first.

    Degrees come from the kNN similarity graph (``vertex_degrees``); a vertex is drawn
    with weight (degree + 1) ** -alpha, without replacement (Efraimidis-Spirakis order),
    and paired with its ``pairs_per_vertex`` most similar neighbours whose pair is not yet
    resolved. When the drawn vertices' first neighbours do not fill the budget, the next
    round takes their next neighbours, in the same vertex order. ``probability`` is the
    anchor vertex's normalised weight; ``similarity`` is the cosine similarity;
    ``stats["anchors"]`` names the vertex each pair was chosen for.
    """

    _constraints = {"k": Interval(1, None, integer=True),
                    "degree": OneOf(("similarity_sum", "threshold")),
                    "threshold": Interval(), "alpha": Interval(0.0, None),
                    "pairs_per_vertex": Interval(1, None, integer=True)}

    def __init__(
        self,
        k: int = 10,
        degree: str = "similarity_sum",
        threshold: float = 0.5,
        alpha: float = 1.0,
        pairs_per_vertex: int = 1,
    ) -> None:
        self.k = k
        self.degree = degree
        self.threshold = threshold
        self.alpha = alpha
        self.pairs_per_vertex = pairs_per_vertex
        self._check_params()

    def sample(
        self,
        X: np.ndarray,
        constraints: ConstraintSet | None,
        budget: int | float,
        *,
        seed: int = 0,
        exclude_pairs: np.ndarray | None = None,
    ) -> SampleResult:
        X, n_budget, excl = check_sample_inputs(X, constraints, budget, exclude_pairs)
        n = X.shape[0]
        rng = make_rng(seed)
        sims, idx = knn(X, self.k + 1)
        deg = vertex_degrees(sims, idx, mode=self.degree, threshold=self.threshold)
        weight = (deg + 1.0) ** -self.alpha
        prob = weight / weight.sum()
        order = weighted_order(weight, rng)
        position = np.empty(n, dtype=np.int64)
        position[order] = np.arange(n)

        # Candidate (anchor, neighbour) pairs in neighbour-rank order within each row.
        kk = idx.shape[1]
        anchor = np.repeat(np.arange(n, dtype=np.int64), kk)
        nbr = idx.ravel().astype(np.int64)
        col = np.tile(np.arange(kk), n)
        ok = nbr != anchor
        anchor, nbr, col = anchor[ok], nbr[ok], col[ok]
        pairs = canonical_pairs(anchor, nbr)
        ok = unresolved_mask(pairs, n, constraints, excl)
        anchor, nbr, col, pairs = anchor[ok], nbr[ok], col[ok], pairs[ok]
        # Rank among the anchor's unresolved neighbours (rows stay sorted by similarity).
        starts = np.searchsorted(anchor, anchor, side="left")
        rank = np.arange(anchor.size) - starts
        sort = np.lexsort((rank, position[anchor], rank // self.pairs_per_vertex))
        pairs, anchor = pairs[sort], anchor[sort]
        first = dedupe_pairs(pairs, n)
        pairs, anchor = pairs[first][:n_budget], anchor[first][:n_budget]
        cos = _cosine(X, pairs)
        out = [
            QueryPair(int(p[0]), int(p[1]), "nis", -1, float(prob[a]), float(s))
            for p, a, s in zip(pairs, anchor, cos, strict=True)
        ]
        reason = batch_reason(first.size, len(out), n_budget, REASON_ALL_RESOLVED)
        stats = {"n_items": n, "anchors": anchor.tolist(), "degree": deg}
        return SampleResult(out, n_budget, reason, stats)
