"""The k-NN graph of a whole collection by an inverted file, with nprobe chosen by recall.

Every item of the collection is a query (a self-join), which is what makes this cheaper than
faiss's ``IndexIVFFlat.search``: instead of scanning lists query by query, each inverted list
is searched once for all the queries that probe it, as one matrix product (BLAS), so an IVF
pass runs at matrix-multiply speed (measured 3-4x faster than IndexIVFFlat on 2 cores). The
result is the same as IndexIVFFlat's with the same centroids and nprobe: each query gets the
exact top-k among the members of its nprobe nearest lists.

nprobe is not a fixed number: :func:`calibrate_nprobe` takes the exact top-k of a seeded
sample of queries (one exact search of those rows only) and, because an IVF search finds an
exact neighbour exactly when that neighbour's list is among the query's probed lists, reads
off the recall of every nprobe at once from the lists' ranks, without searching. It picks the
smallest nprobe whose sample recall, less ``z`` standard errors, reaches the target.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

#: OURS. Kmeans training points per list (faiss's minimum, 39) and iterations: the centroids
#: only route queries, and the calibration absorbs a coarser routing by probing more lists.
IVF_TRAIN_POINTS_PER_LIST = 39
IVF_KMEANS_ITERATIONS = 10

#: OURS. Lists hold at most about this many items on average (nlist >= n / 400): a list
#: larger than a dense neighbourhood (an individual and its look-alikes) makes kmeans merge
#: several into one cell and split others across cells. Measured on the bench data at 1M
#: (look-alike groups of ~490 images): sqrt(n) = 1000 lists reached recall@30 0.59 at
#: nprobe 1 and 0.94 at 250, below the 0.95 target; at 100k (316 lists for 217 groups) 0.95
#: at nprobe 1.
IVF_MAX_LIST_SIZE = 400

#: OURS. The most lists a calibrated search may probe, as a fraction of nlist: beyond a
#: quarter, an IVF pass costs about as much as exact search, which then is the better choice.
IVF_MAX_PROBE_FRACTION = 0.25

#: Score-matrix elements (queries x list members) per matrix product: bounds the transient
#: memory of the search to 64 MiB whatever the list sizes.
IVF_BLOCK_ELEMENTS = 1 << 24

__all__ = [
    "IVF_MAX_PROBE_FRACTION",
    "Calibration",
    "calibrate_nprobe",
    "default_nlist",
    "ivf_self_knn",
    "nearest_lists",
    "recall_by_nprobe",
    "train_centroids",
]


def default_nlist(n: int) -> int:
    """max(sqrt(n), n / IVF_MAX_LIST_SIZE) lists (OURS), at least 39 training points each.

    An IVF self-join costs about n d (nlist + nprobe n / nlist) multiply-adds (routing +
    scanning), smallest at nlist = sqrt(nprobe n); the calibrated nprobe is a few lists on
    clustered data, so sqrt(n) is close to the optimum without knowing nprobe in advance,
    as long as lists stay smaller than a neighbourhood (IVF_MAX_LIST_SIZE).
    """
    want = max(int(round(np.sqrt(n))), int(np.ceil(n / IVF_MAX_LIST_SIZE)))
    return max(1, min(want, n // 39))


def train_centroids(X: np.ndarray, nlist: int, seed: int = 0) -> np.ndarray:
    """nlist spherical kmeans centroids (float32, unit rows) trained on a seeded sample."""
    n, d = X.shape
    m = min(n, IVF_TRAIN_POINTS_PER_LIST * nlist)
    rng = np.random.default_rng(seed)
    train = X if m == n else X[np.sort(rng.choice(n, m, replace=False))]
    km = faiss.Kmeans(
        d, nlist, niter=IVF_KMEANS_ITERATIONS, spherical=True, seed=int(seed),
        min_points_per_centroid=1, max_points_per_centroid=IVF_TRAIN_POINTS_PER_LIST,
    )
    km.train(np.ascontiguousarray(train, dtype=np.float32))
    return km.centroids


def nearest_lists(X: np.ndarray, centroids: np.ndarray, nprobe: int) -> np.ndarray:
    """(n, nprobe) int64: each row's lists by decreasing centroid similarity (column 0 is the
    list the row is stored in)."""
    _, lists = faiss.knn(X, centroids, min(nprobe, centroids.shape[0]),
                         metric=faiss.METRIC_INNER_PRODUCT)
    return lists.astype(np.int64, copy=False)


def recall_by_nprobe(neighbour_lists: np.ndarray, query_lists: np.ndarray) -> np.ndarray:
    """(m, P) recall of each sample query at nprobe = 1..P, without searching.

    ``neighbour_lists`` (m, k): the home list of each of the queries' exact neighbours;
    ``query_lists`` (m, P): each query's P nearest lists. An IVF search with nprobe p holds
    an exact neighbour iff its home list is among the query's first p lists (the candidates'
    exact top-k then contains it), so the recall at every p is a count of ranks.
    """
    m, k = neighbour_lists.shape
    P = query_lists.shape[1]
    hit = neighbour_lists[:, :, None] == query_lists[:, None, :]  # (m, k, P); one match at most
    rank = np.where(hit.any(axis=2), hit.argmax(axis=2), P)  # P = not within P probes
    counts = np.bincount((np.arange(m)[:, None] * (P + 1) + rank).ravel(),
                         minlength=m * (P + 1)).reshape(m, P + 1)
    return np.cumsum(counts[:, :P], axis=1) / k


@dataclass(frozen=True)
class Calibration:
    """The nprobe a target recall asks for, and the sample it was read from.

    ``nprobe`` is None when no nprobe up to ``max_nprobe`` reaches the target (exact search
    is then the better choice); ``recall`` / ``recall_se``: the sample recall (mean over
    queries) and its standard error at the chosen nprobe, or at ``max_nprobe`` when None;
    ``curve``: the sample recall at nprobe = 1..max_nprobe.
    """

    nprobe: int | None
    recall: float
    recall_se: float
    max_nprobe: int
    n_queries: int
    curve: np.ndarray


def calibrate_nprobe(
    per_query: np.ndarray, target_recall: float, z: float
) -> Calibration:
    """The smallest nprobe whose sample recall minus ``z`` standard errors reaches the target.

    ``per_query`` is :func:`recall_by_nprobe`'s (m, P) matrix.
    """
    m, P = per_query.shape
    mean = per_query.mean(axis=0)
    se = per_query.std(axis=0, ddof=1) / np.sqrt(m) if m > 1 else np.zeros(P)
    ok = np.flatnonzero(mean - z * se >= target_recall)
    at = int(ok[0]) if ok.size else P - 1
    return Calibration(
        nprobe=at + 1 if ok.size else None, recall=float(mean[at]), recall_se=float(se[at]),
        max_nprobe=P, n_queries=m, curve=mean,
    )


def _top_k_columns(S: np.ndarray, k: int) -> np.ndarray:
    """(rows, k) column positions of each row's k largest values of S (any order).

    Threshold at each row's k-th largest (numpy's vectorised sort of the rows), then keep the
    entries above it and as many entries equal to it as the row still needs: faster than
    argpartition on wide rows, and exact with ties (duplicated vectors) too.
    """
    rows, width = S.shape
    if k >= width:
        return np.broadcast_to(np.arange(width), (rows, width))
    thr = np.sort(S, axis=1)[:, width - k][:, None]
    keep = S > thr
    short = k - keep.sum(axis=1)
    if (short > 0).any():
        tied = S == thr
        keep |= tied & (np.cumsum(tied, axis=1) <= short[:, None])
    return np.nonzero(keep)[1].reshape(rows, k)


def ivf_self_knn(
    X: np.ndarray, k: int, lists: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of every row of X among the members of its probed lists, by inner product.

    ``lists`` (n, nprobe): each row's probed lists, column 0 its home list (where it is
    stored; :func:`nearest_lists`). Returns (sims float32 (n, k), idx int64 (n, k)) sorted by
    decreasing similarity; a row whose lists hold fewer than k items gets -1 / -inf in its
    last columns (the caller completes those rows by exact search).

    Two passes, each one loop over lists (and blocks of their queries) where each block is
    one BLAS product of queries against a list's members. Pass 1: every list against its own
    members (the queries whose home it is) gives each row an exact top-k of its home list.
    Pass 2: the other probed lists; only entries above the row's k-th best so far can enter
    its top-k, and they are few (a row's home list holds most of its neighbours), so they are
    collected as (row, similarity, item) and merged with the pass-1 lists in one sort.
    A query probes distinct lists, so no candidate is seen twice.
    """
    n = X.shape[0]
    nprobe = lists.shape[1]
    n_lists = int(lists.max()) + 1 if n else 0
    home = lists[:, 0]
    members_order = np.argsort(home, kind="stable")
    member_start = np.searchsorted(home[members_order], np.arange(n_lists + 1))

    best_s = np.full((n, k), -np.inf, dtype=np.float32)
    best_i = np.full((n, k), -1, dtype=np.int64)
    for c in range(n_lists):  # pass 1: loop over lists, their members vectorised
        members = members_order[member_start[c] : member_start[c + 1]]
        if members.size == 0:
            continue
        Xm_t = np.ascontiguousarray(X[members].T)
        kk = min(k, members.size)
        step = max(1, IVF_BLOCK_ELEMENTS // members.size)
        for s in range(0, members.size, step):
            q = members[s : s + step]
            sims = X[q] @ Xm_t
            top = _top_k_columns(sims, kk)
            best_s[q, :kk] = np.take_along_axis(sims, top, axis=1)
            best_i[q, :kk] = members[top]

    cand_r, cand_s, cand_i = [], [], []
    if nprobe > 1:
        others = lists[:, 1:].ravel()
        probe_order = np.argsort(others, kind="stable")
        probe_start = np.searchsorted(others[probe_order], np.arange(n_lists + 1))
        probers = probe_order // (nprobe - 1)
        del others, probe_order
        floor = best_s.min(axis=1)  # each row's k-th best after pass 1 (-inf if short)
        for c in range(n_lists):  # pass 2: loop over lists, their probers vectorised
            members = members_order[member_start[c] : member_start[c + 1]]
            queries = probers[probe_start[c] : probe_start[c + 1]]
            if members.size == 0 or queries.size == 0:
                continue
            Xm_t = np.ascontiguousarray(X[members].T)
            step = max(1, IVF_BLOCK_ELEMENTS // members.size)
            for s in range(0, queries.size, step):
                q = queries[s : s + step]
                sims = X[q] @ Xm_t
                r, col = np.nonzero(sims > floor[q, None])
                cand_r.append(q[r])
                cand_s.append(sims[r, col])
                cand_i.append(members[col])
    if cand_r:
        best_s, best_i = _merge_candidates(
            best_s, best_i, np.concatenate(cand_r), np.concatenate(cand_s),
            np.concatenate(cand_i),
        )
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_s, order, axis=1), np.take_along_axis(best_i, order, axis=1)


def _merge_candidates(
    best_s: np.ndarray, best_i: np.ndarray, rows: np.ndarray, sims: np.ndarray,
    items: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's top-k of its current list plus its candidates (row, similarity, item)."""
    n, k = best_s.shape
    touched = np.unique(rows)
    if touched.size == 0:
        return best_s, best_i
    all_r = np.concatenate([np.repeat(touched, k), rows])
    all_s = np.concatenate([best_s[touched].ravel(), sims])
    all_i = np.concatenate([best_i[touched].ravel(), items])
    # Sort by row, then by decreasing similarity (-inf placeholders last); stable for ties.
    order = np.lexsort((-all_s, all_r))
    all_r, all_s, all_i = all_r[order], all_s[order], all_i[order]
    first = np.searchsorted(all_r, touched)
    rank = np.arange(all_r.size) - np.repeat(first, np.diff(np.append(first, all_r.size)))
    keep = rank < k
    best_s[touched] = all_s[keep].reshape(touched.size, k)
    best_i[touched] = all_i[keep].reshape(touched.size, k)
    return best_s, best_i
