"""The two AAS pools and the distribution over them (method.md steps 1.3-1.5).

U_os: medoid pairs of nearby regions ("are these two regions one individual?"); U_us: per
region, the closest cross pair of two clusters that the other clustering joins ("did a
clustering merge two individuals?"); ``mixture_probabilities``: eps * P(y | U_os) +
(1 - eps) * P(y | U_us) with the pair-type, region and pair factors. Candidate pairs come
from the sparse Jaccard matrix and the kNN graph, never from all pairs of a region.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from reidal.core.aas_regions import (
    RegionPairs,
    _check_distance,
    _compact_with_singletons,
    region_pairs,
)
from reidal.core.neighbors import knn
from reidal.core.params import (  # noqa: F401 - OS_SIMILARITIES: re-exported
    OS_SIMILARITIES,
    SAMPLING,
)
from reidal.core.validation import check_labels

TypeWeights = str | Callable[[np.ndarray, np.ndarray], np.ndarray]
RegionWeights = str | Callable[[np.ndarray], np.ndarray]
PairWeights = str | Callable[[np.ndarray], np.ndarray]


class PairPool(NamedTuple):
    """Candidate pairs of one AAS pool with what the distribution needs about each."""

    pairs: np.ndarray  # int64 (m, 2), i < j
    similarity: np.ndarray  # float64 (m,), 1 - Jaccard distance
    region: np.ndarray  # int64 (m,), -1 for U_os (a pair spans two regions)
    kind: np.ndarray  # int8 (m,), DBSCAN type 0/1/2 (see TYPE_NAMES); -1 for U_os

    @classmethod
    def empty(cls) -> PairPool:
        return cls(
            np.empty((0, 2), np.int64),
            np.empty(0, np.float64),
            np.empty(0, np.int64),
            np.empty(0, np.int8),
        )

    def take(self, mask: np.ndarray) -> PairPool:
        return PairPool(self.pairs[mask], self.similarity[mask], self.region[mask], self.kind[mask])


# --------------------------------------------------------------------------- pools


def _medoid_cosine_block(medoids: np.ndarray, X: np.ndarray, k_max: int
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, col, cosine) of each medoid's ``k_max`` nearest other medoids (exact faiss
    search over the medoids only: one query per region, never all pairs of items)."""
    Xm = np.asarray(X, dtype=np.float32)[medoids]
    sims, idx = knn(Xm, min(k_max + 1, medoids.size), index="flat", use_gpu=False)
    r = np.repeat(np.arange(medoids.size, dtype=np.int64), idx.shape[1])
    return r, idx.ravel().astype(np.int64), sims.ravel().astype(np.float64)


def oversegmentation_pool(
    medoids: np.ndarray, distance: sp.spmatrix, *, k_max: int = 5, s_min: float = 0.3,
    similarity: str = "jaccard", X: np.ndarray | None = None,
) -> PairPool:
    """U_os: each medoid with its ``k_max`` most similar other medoids, kept at sim >= s_min.

    A pair between two regions' medoids asks "are these two regions one individual?" (a
    clustering may have split one identity across regions). ``similarity`` "jaccard" (the
    paper): only stored Jaccard entries can reach s_min > 0, so the medoid x medoid block is
    read sparsely. On a pool of a few hundred images two regions' medoids share no
    k-reciprocal neighbour at all (Jaccard similarity 0.00-0.03 on the synthetic set, so
    U_os was always empty); "cosine" (OURS option, needs ``X``, L2-normalised rows) ranks
    them by embedding cosine instead, which stays graded between regions. The pool's
    ``similarity`` column holds the similarity used, which P(y | U_os) is proportional to.
    """
    medoids = np.asarray(medoids, dtype=np.int64)
    D = sp.csr_matrix(distance)
    if not 0.0 < s_min <= 1.0:
        raise ValueError(f"s_min must be in (0, 1] (absent entries are similarity 0), got {s_min}")
    if similarity not in OS_SIMILARITIES:
        raise ValueError(f"similarity must be one of {OS_SIMILARITIES}, got {similarity!r}")
    if similarity == "cosine" and (X is None or np.ndim(X) != 2
                                   or np.shape(X)[0] != D.shape[0]):
        raise ValueError("similarity 'cosine' needs X (n, d) with one row per item of the "
                         "distance")
    if medoids.size < 2 or k_max <= 0:
        return PairPool.empty()
    if similarity == "cosine":
        r, c, sim = _medoid_cosine_block(medoids, X, k_max)
        keep = (c >= 0) & (r != c) & (sim >= s_min)
    else:
        sub = D[medoids][:, medoids].tocoo()
        r, c = sub.row.astype(np.int64), sub.col.astype(np.int64)
        sim = 1.0 - sub.data.astype(np.float64)
        keep = (r != c) & (sim >= s_min)
    r, c, sim = r[keep], c[keep], sim[keep]
    if r.size == 0:
        return PairPool.empty()
    # Rank each medoid's neighbours by similarity (ties: lower medoid index first).
    order = np.lexsort((c, -sim, r))
    r, c, sim = r[order], c[order], sim[order]
    starts = np.searchsorted(r, r, side="left")
    rank = np.arange(r.size) - starts
    keep = rank < k_max
    gi, gj, sim = medoids[r[keep]], medoids[c[keep]], sim[keep]
    lo, hi = np.minimum(gi, gj), np.maximum(gi, gj)
    key = lo * np.int64(D.shape[0]) + hi
    _, first = np.unique(key, return_index=True)
    pairs = np.stack([lo[first], hi[first]], axis=1)
    return PairPool(
        pairs,
        sim[first],
        np.full(first.size, -1, dtype=np.int64),
        np.full(first.size, -1, dtype=np.int8),
    )


def _candidate_pairs(
    region: np.ndarray, rp: RegionPairs, knn_idx: np.ndarray | None,
    a: np.ndarray, b: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs inside one region that may be a closest cross pair, with their distance.

    Stored Jaccard entries hold every pair closer than distance 1; kNN edges add pairs
    for clusters with no stored entry between them (all their cross pairs are at distance
    1 and the cosine tie-break decides, among kNN edges). Duplicates keep the smaller
    distance (a stored entry beats the kNN default of 1). Only pairs that cross two
    clusters of ``a`` or of ``b`` can be a closest cross pair, so the others (most kNN
    edges: an item's neighbours are mostly its own cluster's) are dropped first.
    """
    n = region.size
    cross = (a[rp.i] != a[rp.j]) | (b[rp.i] != b[rp.j])
    r, c, d = rp.i[cross], rp.j[cross], rp.distance[cross]
    if knn_idx is not None and knn_idx.size:
        idx = np.asarray(knn_idx, dtype=np.int64)
        kr = np.repeat(np.arange(n, dtype=np.int64), idx.shape[1])
        kc = idx.ravel()
        ok = (kc >= 0) & (kc != kr)
        kr, kc = kr[ok], kc[ok]
        ok = (region[kr] >= 0) & (region[kr] == region[kc])
        kr, kc = kr[ok], kc[ok]
        ok = (a[kr] != a[kc]) | (b[kr] != b[kc])
        kr, kc = kr[ok], kc[ok]
        r = np.concatenate([r, np.minimum(kr, kc)])
        c = np.concatenate([c, np.maximum(kr, kc)])
        d = np.concatenate([d, np.ones(kr.size)])
        key = r * np.int64(n) + c
        order = np.lexsort((d, key))
        _, first = np.unique(key[order], return_index=True)
        sel = order[first]
        r, c, d = r[sel], c[sel], d[sel]
    return r, c, d


#: Candidate pairs whose cosine is computed per block in ``undersegmentation_pool``: bounds
#: the two gathered (block, d) float32 copies (16 MiB each at d = 256) whatever the pool.
ROW_DOT_BLOCK = 1 << 14


def _row_dots(X: np.ndarray, r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """x_r . x_c for each pair, in blocks: at n = 100k a region's kNN edges give ~0.7M
    candidates, and gathering them at once cost 1.4 GiB and four times the time."""
    out = np.empty(r.size, dtype=np.float64)
    for s in range(0, r.size, ROW_DOT_BLOCK):  # loop over blocks of pairs, each vectorised
        e = s + ROW_DOT_BLOCK
        out[s:e] = np.einsum("ij,ij->i", X[r[s:e]], X[c[s:e]])
    return out


def undersegmentation_pool(
    labels_a: np.ndarray,
    labels_b: np.ndarray,
    region: np.ndarray,
    distance: sp.spmatrix,
    X: np.ndarray,
    *,
    knn_idx: np.ndarray | None = None,
    pairs: RegionPairs | None = None,
) -> PairPool:
    """U_us = union over regions of I~_k intersect P_cand_k (method.md step 1.4).

    P_cand_k holds, for every two distinct clusters of one clustering inside region k (A
    with A, B with B), their closest cross pair: a group-by argmin over the candidate pairs
    keyed by (min label, max label), Jaccard distance first, higher cosine similarity as
    tie-break. Membership in I~_k is a label lookup: A and B disagree on (i, j) when
    "same A label" xor "same B label", outliers never being "same" in A.
    """
    region = np.asarray(region, dtype=np.int64)
    n = region.size
    la = check_labels(labels_a, n, name="labels_a")
    lb = check_labels(labels_b, n, name="labels_b")
    D = _check_distance(distance, n)
    if n == 0 or region.max() < 0:
        return PairPool.empty()
    rp = region_pairs(region, D) if pairs is None else pairs
    a = _compact_with_singletons(la)
    b = _compact_with_singletons(lb)
    r, c, d = _candidate_pairs(region, rp, knn_idx, a, b)
    if r.size == 0:
        return PairPool.empty()
    cos = _row_dots(np.asarray(X, dtype=np.float32), r, c)
    same_a = (la[r] == la[c]) & (la[r] != -1)
    same_b = b[r] == b[c]

    chosen = []
    for lab in (a, b):
        cross = np.flatnonzero(lab[r] != lab[c])
        if cross.size == 0:
            continue
        lo = np.minimum(lab[r[cross]], lab[c[cross]])
        hi = np.maximum(lab[r[cross]], lab[c[cross]])
        key = lo * np.int64(lab.max() + 1) + hi
        order = np.lexsort((-cos[cross], d[cross], key))
        _, first = np.unique(key[order], return_index=True)
        chosen.append(cross[order[first]])
    if not chosen:
        return PairPool.empty()
    sel = np.unique(np.concatenate(chosen))
    sel = sel[same_a[sel] ^ same_b[sel]]
    ri, ci = r[sel], c[sel]
    kind = ((la[ri] == -1).astype(np.int8) + (la[ci] == -1).astype(np.int8)).astype(np.int8)
    return PairPool(np.stack([ri, ci], axis=1), 1.0 - d[sel], region[ri], kind)


# --------------------------------------------------------------------------- distribution


def _type_factor(weights: TypeWeights, present: np.ndarray, tangle: np.ndarray) -> np.ndarray:
    if callable(weights):
        w = np.asarray(weights(present.copy(), tangle.copy()), dtype=np.float64)
        if w.shape != (3,):
            raise ValueError(f"type_weights callable must return 3 weights, got {w.shape}")
    elif weights == "uniform":
        w = np.ones(3)
    elif weights == "disagreement":
        w = tangle.sum(axis=1)
    else:
        raise ValueError(
            f"type_weights must be 'uniform', 'disagreement' or a callable, got {weights!r}"
        )
    return w


def _region_factor(weights: RegionWeights, tangle: np.ndarray) -> np.ndarray:
    if callable(weights):
        w = np.asarray(weights(tangle.copy()), dtype=np.float64)
        if w.shape != tangle.shape:
            raise ValueError(
                f"region_weights callable must return shape {tangle.shape}, got {w.shape}"
            )
    elif weights == "disagreement":
        w = tangle.astype(np.float64)
    elif weights == "uniform":
        w = np.ones_like(tangle, dtype=np.float64)
    else:
        raise ValueError(
            f"region_weights must be 'disagreement', 'uniform' or a callable, got {weights!r}"
        )
    return w


def _pair_factor(weights: PairWeights, similarity: np.ndarray) -> np.ndarray:
    if callable(weights):
        w = np.asarray(weights(similarity.copy()), dtype=np.float64)
        if w.shape != similarity.shape:
            raise ValueError("pair_weights callable must return one weight per pair")
    elif weights == "uniform":
        w = np.ones_like(similarity, dtype=np.float64)
    elif weights == "similarity":
        w = np.clip(similarity, 0.0, None).astype(np.float64)
    else:
        raise ValueError(
            f"pair_weights must be 'uniform', 'similarity' or a callable, got {weights!r}"
        )
    return w


def _normalise(w: np.ndarray, what: str) -> np.ndarray:
    if np.any(~np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"{what} must be finite and non-negative")
    total = w.sum()
    if total <= 0:
        raise ValueError(f"{what} are all zero over the pairs in the pool")
    return w / total


def mixture_probabilities(
    os_similarity: np.ndarray,
    us_kind: np.ndarray,
    us_region: np.ndarray,
    tangle: np.ndarray,
    *,
    eps: float = SAMPLING.mixture_eps,
    type_weights: TypeWeights = SAMPLING.type_weights,
    region_weights: RegionWeights = SAMPLING.region_weights,
    pair_weights: PairWeights = SAMPLING.pair_weights,
    us_similarity: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """P(y) = eps P(y | U_os) + (1 - eps) P(y | U_us); returns (P over U_os, P over U_us).

    P(y | U_os) = sim(y) / sum sim. P(y | U_us) = pi_i rho_{k|i} omega_{y|ik} (OURS):
    pi over the DBSCAN types present in the pool ("uniform" or "disagreement" =
    proportional to |I~| of that type, or a callable (present (3,), tangle (3, M)) ->
    (3,)); rho_{k|i} over the regions holding type-i pool pairs ("disagreement" =
    proportional to |I~_k| of type i, "uniform", or a callable tangle -> (3, M)); omega
    within (i, k) ("uniform", "similarity", or a callable sim -> weights). Each factor is
    normalised over the cells the pool actually holds, so the total is 1. If one pool is
    empty the other gets all the mass.
    """
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must be in [0, 1], got {eps}")
    os_sim = np.asarray(os_similarity, dtype=np.float64)
    kind = np.asarray(us_kind, dtype=np.int64)
    reg = np.asarray(us_region, dtype=np.int64)
    tangle = np.asarray(tangle, dtype=np.float64)
    if kind.shape != reg.shape:
        raise ValueError("us_kind and us_region must have one entry per U_us pair")
    n_os, n_us = os_sim.size, kind.size
    if n_us and (kind.min() < 0 or kind.max() > 2):
        raise ValueError("us_kind must hold DBSCAN pair types 0, 1 or 2")
    if n_us and (reg.min() < 0 or reg.max() >= tangle.shape[1]):
        raise ValueError("us_region holds a region outside the tangle table")

    p_os = np.zeros(n_os)
    if n_os:
        w = np.clip(os_sim, 0.0, None)
        p_os = w / w.sum() if w.sum() > 0 else np.full(n_os, 1.0 / n_os)
    p_us = np.zeros(n_us)
    if n_us:
        n_regions = tangle.shape[1]
        cell = kind * n_regions + reg
        cell_count = np.bincount(cell, minlength=3 * n_regions).reshape(3, n_regions)
        present_cells = cell_count > 0
        present_types = present_cells.any(axis=1)

        pi = _type_factor(type_weights, present_types, tangle) * present_types
        pi = _normalise(pi, "type weights (pi)")
        rho = _region_factor(region_weights, tangle) * present_cells
        if np.any(~np.isfinite(rho)) or np.any(rho < 0):
            raise ValueError("region weights (rho) must be finite and non-negative")
        rho_tot = rho.sum(axis=1, keepdims=True)
        if np.any(rho_tot[present_types] <= 0):
            raise ValueError("region weights (rho) are all zero for a type present in the pool")
        rho = np.divide(rho, rho_tot, out=np.zeros_like(rho), where=rho_tot > 0)
        sim = np.zeros(n_us) if us_similarity is None else np.asarray(us_similarity, float)
        omega = _pair_factor(pair_weights, sim)
        if np.any(~np.isfinite(omega)) or np.any(omega < 0):
            raise ValueError("pair weights (omega) must be finite and non-negative")
        omega_tot = np.bincount(cell, weights=omega, minlength=3 * n_regions)
        if np.any(omega_tot[cell] <= 0):
            raise ValueError("pair weights (omega) are all zero inside a (type, region) cell")
        omega = omega / omega_tot[cell]
        p_us = pi[kind] * rho[kind, reg] * omega
    if n_os and n_us:
        return eps * p_os, (1.0 - eps) * p_us
    return p_os, p_us
