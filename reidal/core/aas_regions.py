"""Regions of uncertainty of two clusterings and their medoids (AAS, method.md steps 1.2-1.3).

Where DBSCAN and FINCH disagree (clusters that overlap partially), the images form
regions; each region's disagreement is sized from the contingency table of the two
labellings (never by enumerating pairs), and its medoid is picked from the stored Jaccard
entries inside it. Used by :class:`reidal.core.aas.AmbiguityAwareSampler`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from reidal.core.validation import check_labels

#: DBSCAN pair types of method.md step 1.5 (row index of the ``tangle`` arrays).
TYPE_NAMES = ("inlier-inlier", "inlier-outlier", "outlier-outlier")


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


#: Rows gathered (as float64) at once by region_medoids: 128 MiB at d = 256.
MEDOID_ROW_BLOCK = 1 << 16


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
    X = np.asarray(X)
    # float64 sums, in blocks of rows: a float64 copy of X at n = 1M, d = 256 is 2 GiB.
    blocks = range(0, inside.size, MEDOID_ROW_BLOCK)
    sums = np.zeros((n_regions, X.shape[1]))
    for s in blocks:  # loop over row blocks, each one vectorised
        reg_b = reg_in[s : s + MEDOID_ROW_BLOCK]
        member = sp.csr_matrix(
            (np.ones(reg_b.size), (reg_b, np.arange(reg_b.size))), shape=(n_regions, reg_b.size)
        )
        sums += member @ X[inside[s : s + MEDOID_ROW_BLOCK]].astype(np.float64)
    cos_sum = np.empty(inside.size)
    for s in blocks:
        Xb = X[inside[s : s + MEDOID_ROW_BLOCK]].astype(np.float64)
        own = sums[reg_in[s : s + MEDOID_ROW_BLOCK]]
        cos_sum[s : s + Xb.shape[0]] = np.einsum("ij,ij->i", Xb, own) - np.einsum("ij,ij->i", Xb, Xb)
    size = np.bincount(reg_in, minlength=n_regions).astype(np.float64)
    denom = np.maximum(size[reg_in] - 1.0, 1.0)
    jac_mean = jac_sum[inside] / denom
    cos_mean = cos_sum / denom
    # Round away float noise so near-ties are decided by the cosine, reproducibly.
    order = np.lexsort((inside, -np.round(cos_mean, 9), -np.round(jac_mean, 9), reg_in))
    first = np.unique(reg_in[order], return_index=True)[1]
    return inside[order[first]]
