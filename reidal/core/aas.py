"""Ambiguity-Aware Sampling (AAS), method.md step 1.

Two complementary clusterings (DBSCAN on k-reciprocal Jaccard distance, FINCH's first
partition) are made consistent with the answers so far; where they disagree the data is
ambiguous. AAS asks pairs from two pools: medoid pairs of nearby regions of uncertainty
(U_os, "are these two regions one individual?") and, inside each region, the closest cross
pair of two clusters that the other clustering joins (U_us, "did a clustering merge two
individuals?"). Nothing here enumerates all pairs of a region: pair-set sizes come from
contingency tables and the candidate pairs from the sparse Jaccard matrix and the kNN graph.

The public stage functions (``regions_of_uncertainty``, ``disagreement_sizes``,
``region_pairs``, ``region_medoids``, ``oversegmentation_pool``, ``undersegmentation_pool``,
``mixture_probabilities``) are what the benchmark times one by one;
``AmbiguityAwareSampler.sample_from_clusterings`` runs them on clusterings a caller already
has, ``AmbiguityAwareSampler.sample`` computes the clusterings first.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from reidal.core.sampling import (
    REASON_ALL_RESOLVED,
    QueryPair,
    SampleResult,
    batch_reason,
    check_sample_inputs,
    draw_without_replacement,
    make_rng,
    unresolved_mask,
)
from reidal.core.validation import check_labels

if TYPE_CHECKING:  # pragma: no cover - typing only
    from reidal.core.constraints import ConstraintSet

IndexKind = Literal["flat", "hnsw", "ivf"]
KnnIndexChoice = Literal["auto", "flat", "hnsw", "ivf"]

#: knn() settings the sampler passes for an approximate index, under any ``knn_options``
#: (OURS). IVF keeps neighbors.knn's nlist = 4 sqrt(n), trained on 64 points per list (a
#: smaller training sample lost more recall than it saved time); only nprobe is raised.
#: Measured on make_reid_embeddings, n = 100k, d = 256, 2 CPU cores, nprobe 16 / 32 / 64:
#: 16.5 / 19.1 / 25.7 s, recall@30 0.60 / 0.65 / 0.71, pairwise F1 against the true
#: identities of DBSCAN 0.809 / 0.827 / 0.841 and of FINCH 0.501 / 0.522 / 0.534, where
#: exact search (96 s) gives 0.856 and 0.541. HNSW keeps knn's defaults (M 32, efSearch
#: 128: 96 s there; M 16, efSearch 64 took 15 s but FINCH fell to 0.499).
APPROXIMATE_KNN_DEFAULTS: dict[str, dict[str, Any]] = {"ivf": {"nprobe": 64}, "hnsw": {}}

#: Reason of an empty batch when the two clusterings agree everywhere.
REASON_AGREE = "no disagreement left between the clusterings"

#: DBSCAN pair types of method.md step 1.5 (row index of the ``tangle`` arrays).
TYPE_NAMES = ("inlier-inlier", "inlier-outlier", "outlier-outlier")

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


# --------------------------------------------------------------------------- labels


def _compact_with_singletons(labels: np.ndarray) -> np.ndarray:
    """Labels 0..K-1 where every -1 (outlier) becomes a cluster of its own.

    method.md step 1.2: a DBSCAN outlier is its own singleton cluster for the overlap test.
    """
    lab = np.asarray(labels, dtype=np.int64).copy()
    out = lab == -1
    if out.any():
        base = lab.max() + 1 if (~out).any() else 0
        lab[out] = base + np.arange(int(out.sum()), dtype=np.int64)
    return np.unique(lab, return_inverse=True)[1].astype(np.int64).ravel()


def _contingency(a: np.ndarray, b: np.ndarray) -> sp.csr_matrix:
    """Sparse (A cluster, B cluster) -> shared member count table."""
    ka, kb = int(a.max()) + 1, int(b.max()) + 1
    ones = np.ones(a.size, dtype=np.int64)
    table = sp.coo_matrix((ones, (a, b)), shape=(ka, kb)).tocsr()
    table.sum_duplicates()
    return table


def regions_of_uncertainty(labels_a: np.ndarray, labels_b: np.ndarray) -> np.ndarray:
    """Region of uncertainty of every item (0..M-1), -1 where A and B agree on its cluster.

    Clusters a (of A) and b (of B) overlap partially when 0 < IoU(a, b) < 1, i.e. they
    share members but are not the same set. Regions are the connected components of the
    bipartite graph of partial overlaps. Every entry of a connected cluster's row in the
    contingency table is itself a partial overlap, so a region is a union of whole A
    clusters and of whole B clusters. Outliers (-1) are singleton clusters of their own.
    """
    la = np.asarray(labels_a)
    n = la.shape[0]
    la = check_labels(la, n, name="labels_a")
    lb = check_labels(labels_b, n, name="labels_b")
    if n == 0:
        return np.empty(0, dtype=np.int64)
    a = _compact_with_singletons(la)
    b = _compact_with_singletons(lb)
    table = _contingency(a, b).tocoo()
    size_a = np.bincount(a)
    size_b = np.bincount(b)
    n_ab = table.data
    partial = ~((n_ab == size_a[table.row]) & (n_ab == size_b[table.col]))
    ka, kb = size_a.size, size_b.size
    rows, cols = table.row[partial], table.col[partial] + ka
    graph = sp.coo_matrix(
        (np.ones(rows.size, dtype=np.int8), (rows, cols)), shape=(ka + kb, ka + kb)
    )
    _, comp = connected_components(graph, directed=False)
    involved = np.zeros(ka + kb, dtype=bool)
    involved[rows] = True
    # Region ids ordered by component id, so they are deterministic for given labels.
    comp_ids = np.unique(comp[involved])
    region_of_comp = np.full(comp.max() + 1, -1, dtype=np.int64)
    region_of_comp[comp_ids] = np.arange(comp_ids.size, dtype=np.int64)
    region_of_a = region_of_comp[comp[:ka]]
    region_of_a[~involved[:ka]] = -1
    return region_of_a[a]


def disagreement_sizes(
    labels_a: np.ndarray, labels_b: np.ndarray, region: np.ndarray, n_regions: int
) -> np.ndarray:
    """|I~_k| split by DBSCAN pair type: a (3, M) float64 array, rows as TYPE_NAMES.

    |I~| = |A+| + |B+| - 2 |A+ and B+|, all from counts: |A+| = sum_a C(n_a, 2) over the
    inlier clusters of A (outliers are singletons, so A+ holds inlier-inlier pairs only),
    B+ splits by type from each B cluster's inlier/outlier counts, and |A+ and B+| =
    sum_ab C(n_ab, 2) over inlier A clusters. Only items inside a region count.
    """
    la = np.asarray(labels_a, dtype=np.int64)
    region = np.asarray(region, dtype=np.int64)
    tangle = np.zeros((3, n_regions), dtype=np.float64)
    inside = region >= 0
    if n_regions == 0 or not inside.any():
        return tangle
    la_in = la[inside]
    reg_in = region[inside]
    outlier = la_in == -1
    b = _compact_with_singletons(np.asarray(labels_b, dtype=np.int64)[inside])
    a = _compact_with_singletons(la_in)

    def c2(m: np.ndarray) -> np.ndarray:
        m = m.astype(np.float64)
        return m * (m - 1.0) / 2.0

    # Region of every compact cluster (clusters never straddle regions).
    reg_a = np.zeros(a.max() + 1, dtype=np.int64)
    reg_a[a] = reg_in
    reg_b = np.zeros(b.max() + 1, dtype=np.int64)
    reg_b[b] = reg_in
    inlier_a = np.zeros(a.max() + 1, dtype=bool)
    inlier_a[a[~outlier]] = True

    size_a = np.bincount(a).astype(np.float64)
    a_plus = np.bincount(reg_a[inlier_a], weights=c2(size_a[inlier_a]), minlength=n_regions)

    n_in = np.bincount(b, weights=(~outlier).astype(np.float64), minlength=b.max() + 1)
    n_out = np.bincount(b, weights=outlier.astype(np.float64), minlength=b.max() + 1)
    b_ii = np.bincount(reg_b, weights=c2(n_in), minlength=n_regions)
    b_io = np.bincount(reg_b, weights=n_in * n_out, minlength=n_regions)
    b_oo = np.bincount(reg_b, weights=c2(n_out), minlength=n_regions)

    table = _contingency(a, b).tocoo()
    keep = inlier_a[table.row]
    both = np.bincount(
        reg_a[table.row[keep]], weights=c2(table.data[keep]), minlength=n_regions
    )
    tangle[0] = a_plus + b_ii - 2.0 * both
    tangle[1] = b_io
    tangle[2] = b_oo
    return tangle


# --------------------------------------------------------------------------- pools


def _check_distance(distance: object, n: int) -> sp.csr_matrix:
    if not sp.issparse(distance):
        raise ValueError("distance must be a scipy sparse matrix (the k-reciprocal Jaccard one)")
    D = sp.csr_matrix(distance)
    if D.shape != (n, n):
        raise ValueError(f"distance must be ({n}, {n}), got {D.shape}")
    return D


#: Stored Jaccard entries scanned per block by ``region_pairs``: bounds the temporaries
#: (a few bytes per entry) whatever the matrix holds (SpCL's k2 expansion stores thousands
#: of entries per row).
REGION_SCAN_BLOCK = 1 << 22


class RegionPairs(NamedTuple):
    """Stored Jaccard entries (i < j) whose two items lie in the same region."""

    i: np.ndarray  # int64
    j: np.ndarray  # int64
    distance: np.ndarray  # float64


def region_pairs(region: np.ndarray, distance: sp.spmatrix) -> RegionPairs:
    """Every stored Jaccard entry (i < j) inside one region, found in one blocked scan.

    Regions are small next to the matrix, so the output is small; the scan reads each
    stored entry once, with int32 temporaries bounded by REGION_SCAN_BLOCK entries. The
    medoid and U_us stages share its result instead of each walking the whole matrix.
    """
    region = np.asarray(region, dtype=np.int64)
    n = region.size
    D = _check_distance(distance, n)
    reg = region.astype(np.int32)
    indptr = D.indptr.astype(np.int64)
    bounds = [0]
    while bounds[-1] < n:
        r0 = bounds[-1]
        r1 = int(np.searchsorted(indptr, indptr[r0] + REGION_SCAN_BLOCK, side="right")) - 1
        bounds.append(min(n, max(r1, r0 + 1)))
    out_i, out_j, out_d = [], [], []
    for r0, r1 in zip(bounds[:-1], bounds[1:], strict=False):  # blocks of rows
        if not np.any(reg[r0:r1] >= 0):
            continue
        e0, e1 = indptr[r0], indptr[r1]
        cols = D.indices[e0:e1]
        row_reg = np.repeat(reg[r0:r1], np.diff(indptr[r0 : r1 + 1]))
        hit = np.flatnonzero((row_reg >= 0) & (row_reg == reg[cols]))
        if hit.size == 0:
            continue
        rows = np.searchsorted(indptr[r0 : r1 + 1], hit + e0, side="right") - 1 + r0
        cols_hit = cols[hit].astype(np.int64)
        upper = rows < cols_hit
        out_i.append(rows[upper].astype(np.int64))
        out_j.append(cols_hit[upper])
        out_d.append(D.data[e0:e1][hit][upper].astype(np.float64))
    if not out_i:
        empty = np.empty(0, dtype=np.int64)
        return RegionPairs(empty, empty.copy(), np.empty(0, dtype=np.float64))
    return RegionPairs(np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_d))


def region_medoids(
    region: np.ndarray,
    distance: sp.spmatrix,
    X: np.ndarray,
    *,
    pairs: RegionPairs | None = None,
) -> np.ndarray:
    """Medoid of each region: the member with the highest mean similarity to the others.

    Similarity is 1 - Jaccard distance; an absent Jaccard entry is similarity 0, so the
    region's row sums come from the stored entries alone (no dense region x region).
    Ties (common in small regions of outliers whose Jaccard rows are empty) go to the
    higher mean cosine similarity, which needs no pairs either: sum_j x_i.x_j = x_i . s_k
    with s_k the sum of the region's vectors.
    """
    region = np.asarray(region, dtype=np.int64)
    n = region.size
    D = _check_distance(distance, n)
    n_regions = int(region.max()) + 1 if n and region.max() >= 0 else 0
    if n_regions == 0:
        return np.empty(0, dtype=np.int64)
    rp = region_pairs(region, D) if pairs is None else pairs
    jac_sum = np.bincount(
        np.concatenate([rp.i, rp.j]), weights=np.tile(1.0 - rp.distance, 2), minlength=n
    )
    inside = np.flatnonzero(region >= 0)
    reg_in = region[inside]
    Xi = np.asarray(X, dtype=np.float64)[inside]
    member = sp.csr_matrix(
        (np.ones(inside.size), (reg_in, np.arange(inside.size))), shape=(n_regions, inside.size)
    )
    sums = np.asarray(member @ Xi)
    cos_sum = np.einsum("ij,ij->i", Xi, sums[reg_in]) - np.einsum("ij,ij->i", Xi, Xi)
    size = np.bincount(reg_in, minlength=n_regions).astype(np.float64)
    denom = np.maximum(size[reg_in] - 1.0, 1.0)
    jac_mean = jac_sum[inside] / denom
    cos_mean = cos_sum / denom
    # Round away float noise so near-ties are decided by the cosine, reproducibly.
    order = np.lexsort((inside, -np.round(cos_mean, 9), -np.round(jac_mean, 9), reg_in))
    first = np.unique(reg_in[order], return_index=True)[1]
    return inside[order[first]]


def oversegmentation_pool(
    medoids: np.ndarray, distance: sp.spmatrix, *, k_max: int = 5, s_min: float = 0.3
) -> PairPool:
    """U_os: each medoid with its ``k_max`` most similar other medoids, kept at sim >= s_min.

    A pair between two regions' medoids asks "are these two regions one individual?" (a
    clustering may have split one identity across regions). Only stored Jaccard entries
    can reach s_min > 0, so the medoid x medoid block is read sparsely.
    """
    medoids = np.asarray(medoids, dtype=np.int64)
    D = sp.csr_matrix(distance)
    if not 0.0 < s_min <= 1.0:
        raise ValueError(f"s_min must be in (0, 1] (absent entries are similarity 0), got {s_min}")
    if medoids.size < 2 or k_max <= 0:
        return PairPool.empty()
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
    region: np.ndarray, rp: RegionPairs, knn_idx: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs inside one region that may be a closest cross pair, with their distance.

    Stored Jaccard entries hold every pair closer than distance 1; kNN edges add pairs
    for clusters with no stored entry between them (all their cross pairs are at distance
    1 and the cosine tie-break decides, among kNN edges). Duplicates keep the smaller
    distance (a stored entry beats the kNN default of 1).
    """
    n = region.size
    r, c, d = rp.i, rp.j, rp.distance
    if knn_idx is not None and knn_idx.size:
        idx = np.asarray(knn_idx, dtype=np.int64)
        kr = np.repeat(np.arange(n, dtype=np.int64), idx.shape[1])
        kc = idx.ravel()
        ok = (kc >= 0) & (kc != kr)
        kr, kc = kr[ok], kc[ok]
        ok = (region[kr] >= 0) & (region[kr] == region[kc])
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
    r, c, d = _candidate_pairs(region, rp, knn_idx)
    if r.size == 0:
        return PairPool.empty()
    cos = _row_dots(np.asarray(X, dtype=np.float32), r, c)
    a = _compact_with_singletons(la)
    b = _compact_with_singletons(lb)
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
    eps: float = 0.6,
    type_weights: TypeWeights = "uniform",
    region_weights: RegionWeights = "disagreement",
    pair_weights: PairWeights = "uniform",
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


# --------------------------------------------------------------------------- sampler


def _refined_labels(refiner: Any, labels: np.ndarray, X: np.ndarray, constraints: Any) -> tuple:
    result = refiner(labels, X, constraints)
    refined = getattr(result, "labels", result)
    changed = int(getattr(result, "n_changed", int(np.sum(np.asarray(refined) != labels))))
    return np.asarray(refined, dtype=np.int64), changed


def _has_answers(constraints: Any) -> bool:
    if constraints is None:
        return False
    return bool(len(constraints.ml_pairs()) or len(constraints.cl_pairs()))


class NeighbourGraphCache:
    """The last few (kNN result, Jaccard matrix) pairs, keyed by the vectors' content.

    Both depend only on the embeddings and a few parameters, and the embeddings do not
    change between the cycles of one collection (until a new model re-embeds it): reusing
    them makes every cycle after the first skip the two costliest stages (at n = 100k about
    35 of 37 s). Keyed by a BLAKE2 digest of the vectors, so a changed vector is a miss;
    bounded to ``maxsize`` entries (about 60 MB each at n = 100k) and thread-safe.
    """

    def __init__(self, maxsize: int = 2) -> None:
        self.maxsize = int(maxsize)
        self._entries: OrderedDict[tuple, tuple[tuple[np.ndarray, np.ndarray], sp.csr_matrix]]
        self._entries = OrderedDict()
        self._lock = threading.Lock()

    def get_or_build(
        self,
        X: np.ndarray,
        *,
        k1: int,
        k2: int,
        index: str,
        options: dict[str, Any],
        max_distance: float,
        timings: dict[str, float],
    ) -> tuple[tuple[np.ndarray, np.ndarray], sp.csr_matrix, bool]:
        """(knn_result, D, was_cached); fills ``timings['knn']`` and ``timings['jaccard']``."""
        from reidal.core.neighbors import jaccard_distance, knn

        digest = hashlib.blake2b(np.ascontiguousarray(X).data, digest_size=16).hexdigest()
        key = (digest, X.shape, k1, k2, index, tuple(sorted(options.items())), max_distance)
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
        if hit is not None:
            timings["knn"] = timings["jaccard"] = 0.0
            return hit[0], hit[1], True
        t = time.perf_counter()
        knn_result = knn(X, max(k1, 2), index=index, **options)
        timings["knn"] = time.perf_counter() - t
        t = time.perf_counter()
        D = jaccard_distance(X, k1=k1, k2=k2, knn_result=knn_result, max_distance=max_distance)
        timings["jaccard"] = time.perf_counter() - t
        # Shared between calls: freeze them, so a stage that wrote into them would fail loudly.
        for arr in (*knn_result, D.data, D.indices, D.indptr):
            arr.flags.writeable = False
        with self._lock:
            self._entries[key] = (knn_result, D)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        return knn_result, D, False


#: Shared by every sampler in the process (the sampling service builds one per cycle).
_NEIGHBOUR_GRAPHS = NeighbourGraphCache()


class AmbiguityAwareSampler:
    """Ambiguity-Aware Sampling (Sani et al., AAAI-26), method.md step 1.

    Parameters (paper values as defaults):
    eps: mass of U_os in the mixture (0.6). k_max, s_min: medoid neighbours per medoid and
    their minimum similarity (5, 0.3). dbscan / finch / refiner: the clusterings and the
    constraint refinement (default DBSCANJaccard(), FinchFirstPartition(), NP3()); any
    callables with the same call signatures plug in. type_weights / region_weights /
    pair_weights: the factors pi, rho, omega of P(y | U_us) (see mixture_probabilities).
    use_knn_candidates: add kNN edges to the stored Jaccard entries as U_us candidates.

    knn_index (OURS, default "auto"): the faiss index of the one kNN search that feeds the
    Jaccard distance, FINCH and the U_us candidates. "flat" is exact (IndexFlatIP); "hnsw"
    and "ivf" are approximate (see reidal.core.neighbors.KNNIndex and approximate_recall);
    "auto" is "flat" below ``knn_auto_threshold`` items and ``knn_auto_index`` from there
    on. Exact search costs n^2 d: at n = 100k, d = 256 it took 100-150 s on two CPU
    cores, beyond a one-minute cycle; at the 50k threshold it is a quarter of that.
    knn_options: extra keyword arguments for reidal.core.neighbors.knn (nprobe, nlist,
    hnsw_m, ef_search, ef_construction, use_gpu, seed), e.g. {"nprobe": 32}; they override
    APPROXIMATE_KNN_DEFAULTS (OURS: IVF nprobe 64, chosen by measured recall and F1).
    knn_auto_threshold (OURS, 50_000) and knn_auto_index (OURS, "ivf"): see knn_index.

    jaccard_max_distance (OURS, default "auto"): Jaccard entries farther apart than this are
    dropped while the matrix is computed (reidal.core.neighbors.jaccard_distance's
    ``max_distance``) and then read as absent, i.e. similarity 0. "auto" is max(DBSCAN eps,
    1 - s_min), 0.7 with the defaults: the largest distance a decision of AAS compares
    against a threshold (DBSCAN needs distance <= eps, U_os needs similarity >= s_min), so
    DBSCAN, and U_os for given medoids, are exactly as with the full matrix. Two readers
    also look beyond the cut and may shift a little: a region's medoid (its mean similarity
    counts the cut pairs as 0) and the U_us closest cross pair of two clusters whose
    closest pair is farther than the cut (then the cosine tie-break among kNN edges picks
    it). Those pairs share less than half of their k-reciprocal encodings. The cut matters
    for scale: SpCL's k2 expansion stores thousands of entries per row, nearly all above
    0.9; at n = 100k the full matrix took some 6 GiB and 45 s, the 0.7 cut 7 s (see
    docs/benchmarks.md). 1.0 keeps every overlapping pair (method.md's sim exactly); a
    number must be >= DBSCAN's eps (checked).
    """

    def __init__(
        self,
        eps: float = 0.6,
        k_max: int = 5,
        s_min: float = 0.3,
        dbscan: Any = None,
        finch: Any = None,
        refiner: Any = None,
        type_weights: TypeWeights = "uniform",
        region_weights: RegionWeights = "disagreement",
        pair_weights: PairWeights = "uniform",
        use_knn_candidates: bool = True,
        jaccard_max_distance: float | Literal["auto"] = "auto",
        knn_index: KnnIndexChoice = "auto",
        knn_options: dict[str, Any] | None = None,
        knn_auto_threshold: int = 50_000,
        knn_auto_index: IndexKind = "ivf",
    ) -> None:
        if not 0.0 <= float(eps) <= 1.0:
            raise ValueError(f"eps must be in [0, 1], got {eps}")
        if int(k_max) < 0:
            raise ValueError(f"k_max must be >= 0, got {k_max}")
        if not 0.0 < float(s_min) <= 1.0:
            raise ValueError(
                f"s_min must be in (0, 1] (similarity 0 means no shared neighbours), got {s_min}"
            )
        for name, value, options in (
            ("type_weights", type_weights, ("uniform", "disagreement")),
            ("region_weights", region_weights, ("disagreement", "uniform")),
            ("pair_weights", pair_weights, ("uniform", "similarity")),
        ):
            if not callable(value) and value not in options:
                raise ValueError(f"{name} must be one of {options} or a callable, got {value!r}")
        self.eps = float(eps)
        self.k_max = int(k_max)
        self.s_min = float(s_min)
        self.dbscan = dbscan
        self.finch = finch
        self.refiner = refiner
        self.type_weights = type_weights
        self.region_weights = region_weights
        self.pair_weights = pair_weights
        self.use_knn_candidates = bool(use_knn_candidates)
        if jaccard_max_distance != "auto":
            cut = jaccard_max_distance
            if isinstance(cut, str) or not 0.0 < float(cut) <= 1.0:
                raise ValueError(f"jaccard_max_distance must be 'auto' or in (0, 1], got {cut!r}")
            jaccard_max_distance = float(cut)
        self.jaccard_max_distance = jaccard_max_distance
        if knn_index not in ("auto", "flat", "hnsw", "ivf"):
            raise ValueError(
                f"knn_index must be 'auto', 'flat', 'hnsw' or 'ivf', got {knn_index!r}"
            )
        if knn_auto_index not in ("flat", "hnsw", "ivf"):
            raise ValueError(
                f"knn_auto_index must be 'flat', 'hnsw' or 'ivf', got {knn_auto_index!r}"
            )
        if isinstance(knn_auto_threshold, bool) or int(knn_auto_threshold) < 1:
            raise ValueError(
                f"knn_auto_threshold must be an integer >= 1, got {knn_auto_threshold}"
            )
        if knn_options is not None and not isinstance(knn_options, dict):
            raise ValueError(
                f"knn_options must be a dict or None, got {type(knn_options).__name__}"
            )
        reserved = {"index", "k", "X"} & set(knn_options or {})
        if reserved:
            raise ValueError(f"knn_options must not set {sorted(reserved)}: use knn_index")
        self.knn_index = knn_index
        self.knn_options = dict(knn_options or {})
        self.knn_auto_threshold = int(knn_auto_threshold)
        self.knn_auto_index = knn_auto_index

    def resolved_knn_index(self, n: int) -> IndexKind:
        """The index ``knn_index`` means for a collection of n items."""
        if self.knn_index != "auto":
            return self.knn_index
        return "flat" if n < self.knn_auto_threshold else self.knn_auto_index

    def resolved_jaccard_max_distance(self) -> float:
        """The Jaccard cut ``jaccard_max_distance`` means (see the class docstring)."""
        if self.jaccard_max_distance != "auto":
            return float(self.jaccard_max_distance)
        db_eps = float(getattr(self._dbscan(), "eps", 0.0))
        return min(1.0, max(db_eps, 1.0 - self.s_min))

    def neighbour_graph(self, X: np.ndarray, timings: dict[str, float] | None = None
                        ) -> tuple[tuple[np.ndarray, np.ndarray], sp.csr_matrix, bool]:
        """(kNN result, Jaccard matrix, was cached) of ``X`` as this sampler builds them.

        One kNN search (self in column 0, k clipped to n) serves Jaccard, FINCH and U_us;
        both come from the process-wide cache, so whatever else clusters the same vectors
        with the same parameters (the identities of a collection) reuses this cycle's work
        and sees exactly the clusters the sampler saw.
        """
        dbscan = self._dbscan()
        db_eps = float(getattr(dbscan, "eps", 0.0))
        max_distance = self.resolved_jaccard_max_distance()
        if max_distance < db_eps:
            raise ValueError(
                f"jaccard_max_distance {max_distance} is below DBSCAN's eps "
                f"{db_eps}: DBSCAN would lose neighbours"
            )
        index = self.resolved_knn_index(X.shape[0])
        options = {**APPROXIMATE_KNN_DEFAULTS.get(index, {}), **self.knn_options}
        return _NEIGHBOUR_GRAPHS.get_or_build(
            X, k1=int(getattr(dbscan, "k1", 30)), k2=int(getattr(dbscan, "k2", 6)),
            index=index, options=options, max_distance=max_distance,
            timings=timings if timings is not None else {},
        )

    # Defaults are built lazily so importing this module does not need every dependency.
    def _dbscan(self) -> Any:
        if self.dbscan is None:
            from reidal.core.clustering import DBSCANJaccard

            self.dbscan = DBSCANJaccard()
        return self.dbscan

    def _finch(self) -> Any:
        if self.finch is None:
            from reidal.core.clustering import FinchFirstPartition

            self.finch = FinchFirstPartition()
        return self.finch

    def _refiner(self) -> Any:
        if self.refiner is None:
            from reidal.core.np3 import NP3

            self.refiner = NP3()
        return self.refiner

    def sample(
        self,
        X: np.ndarray,
        constraints: ConstraintSet | None,
        budget: int | float,
        *,
        seed: int = 0,
        exclude_pairs: np.ndarray | None = None,
    ) -> SampleResult:
        """Draw up to ``budget`` pairs on which the two clusterings disagree."""
        X, n_budget, excl = check_sample_inputs(X, constraints, budget, exclude_pairs)
        timings: dict[str, float] = {}
        dbscan = self._dbscan()
        knn_result, D, cached = self.neighbour_graph(X, timings)
        index = self.resolved_knn_index(X.shape[0])
        max_distance = self.resolved_jaccard_max_distance()
        timings["knn_jaccard"] = timings["knn"] + timings["jaccard"]

        t = time.perf_counter()
        # DBSCANJaccard keeps only the entries within its eps itself (see _within_eps).
        labels_a = np.asarray(dbscan(X, distance=D), dtype=np.int64)
        timings["dbscan"] = time.perf_counter() - t
        t = time.perf_counter()
        labels_b = np.asarray(self._finch()(X, knn_result=knn_result), dtype=np.int64)
        timings["finch"] = time.perf_counter() - t

        t = time.perf_counter()
        changed_a = changed_b = 0
        if _has_answers(constraints):
            refiner = self._refiner()
            labels_a, changed_a = _refined_labels(refiner, labels_a, X, constraints)
            labels_b, changed_b = _refined_labels(refiner, labels_b, X, constraints)
        timings["np3"] = time.perf_counter() - t

        result = self.sample_from_clusterings(
            X,
            labels_a,
            labels_b,
            D,
            constraints,
            n_budget,
            seed=seed,
            exclude_pairs=excl,
            knn_idx=knn_result[1] if self.use_knn_candidates else None,
        )
        result.stats["seconds"] = {**timings, **result.stats["seconds"]}
        result.stats["neighbour_graph_cached"] = cached
        result.stats["np3_changed_a"] = changed_a
        result.stats["np3_changed_b"] = changed_b
        result.stats["knn_index"] = index
        result.stats["jaccard_max_distance"] = max_distance
        return result

    def sample_from_clusterings(
        self,
        X: np.ndarray,
        labels_a: np.ndarray,
        labels_b: np.ndarray,
        distance: sp.spmatrix,
        constraints: ConstraintSet | None,
        budget: int | float,
        *,
        seed: int = 0,
        exclude_pairs: np.ndarray | None = None,
        knn_idx: np.ndarray | None = None,
    ) -> SampleResult:
        """Steps 1.2-1.6 on clusterings the caller already has (already constraint-consistent).

        ``labels_a`` is the density clustering (-1 = outlier), ``labels_b`` the second one,
        ``distance`` the sparse Jaccard distance, ``knn_idx`` optional extra candidate edges.
        """
        X, n_budget, excl = check_sample_inputs(X, constraints, budget, exclude_pairs)
        n = X.shape[0]
        la = check_labels(labels_a, n, name="labels_a")
        lb = check_labels(labels_b, n, name="labels_b")
        D = _check_distance(distance, n)
        rng = make_rng(seed)
        timings: dict[str, float] = {}
        stats: dict[str, Any] = {
            "n_items": n,
            "n_clusters_a": int(np.unique(la[la >= 0]).size),
            "n_outliers_a": int(np.sum(la == -1)),
            "n_clusters_b": int(np.unique(lb[lb >= 0]).size),
            "seconds": timings,
        }

        t = time.perf_counter()
        region = regions_of_uncertainty(la, lb)
        n_regions = int(region.max()) + 1 if n and region.max() >= 0 else 0
        tangle = disagreement_sizes(la, lb, region, n_regions)
        timings["regions"] = time.perf_counter() - t
        stats["n_regions"] = n_regions
        stats["n_items_in_regions"] = int(np.sum(region >= 0))
        stats["disagreement_by_type"] = dict(zip(TYPE_NAMES, tangle.sum(axis=1).tolist(), strict=True))
        if n_regions == 0:
            stats.update({"U_os": 0, "U_us": 0, "U_os_resolved": 0, "U_us_resolved": 0})
            timings["pools"] = timings["draw"] = 0.0
            return SampleResult([], n_budget, REASON_AGREE, stats)

        t = time.perf_counter()
        rp = region_pairs(region, D)
        medoids = region_medoids(region, D, X, pairs=rp)
        pool_os = oversegmentation_pool(medoids, D, k_max=self.k_max, s_min=self.s_min)
        pool_us = undersegmentation_pool(la, lb, region, D, X, knn_idx=knn_idx, pairs=rp)
        keep_os = unresolved_mask(pool_os.pairs, n, constraints, excl)
        keep_us = unresolved_mask(pool_us.pairs, n, constraints, excl)
        stats["U_os_resolved"] = int(np.sum(~keep_os))
        stats["U_us_resolved"] = int(np.sum(~keep_us))
        pool_os, pool_us = pool_os.take(keep_os), pool_us.take(keep_us)
        stats["U_os"] = int(pool_os.pairs.shape[0])
        stats["U_us"] = int(pool_us.pairs.shape[0])
        timings["pools"] = time.perf_counter() - t

        t = time.perf_counter()
        p_os, p_us = mixture_probabilities(
            pool_os.similarity,
            pool_us.kind,
            pool_us.region,
            tangle,
            eps=self.eps,
            type_weights=self.type_weights,
            region_weights=self.region_weights,
            pair_weights=self.pair_weights,
            us_similarity=pool_us.similarity,
        )
        pairs = np.concatenate([pool_os.pairs, pool_us.pairs])
        prob = np.concatenate([p_os, p_us])
        sim = np.concatenate([pool_os.similarity, pool_us.similarity])
        reg = np.concatenate([pool_os.region, pool_us.region])
        names = np.array(["U_os"] * pool_os.pairs.shape[0] + ["U_us"] * pool_us.pairs.shape[0])
        picked = draw_without_replacement(prob, n_budget, rng)
        timings["draw"] = time.perf_counter() - t

        out = [
            QueryPair(
                int(pairs[k, 0]),
                int(pairs[k, 1]),
                str(names[k]),
                int(reg[k]),
                float(prob[k]),
                float(sim[k]),
            )
            for k in picked
        ]
        n_pool = pairs.shape[0]
        empty = REASON_ALL_RESOLVED if stats["U_os_resolved"] + stats["U_us_resolved"] else (
            "the regions of uncertainty hold no candidate pair"
        )
        stats["medoids"] = medoids.tolist()
        return SampleResult(out, n_budget, batch_reason(n_pool, len(out), n_budget, empty), stats)
