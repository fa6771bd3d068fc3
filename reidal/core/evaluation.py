"""Open-set re-identification evaluation and clustering quality.

The protocol follows docs/method.md, "Evaluation protocol (open set)": the test split is the
query set, a seeded share of the training identities is held out as *unknown*, and the
gallery holds a few exemplars of every remaining (*known*) identity. A query whose identity
is not in the gallery must be recognised as new, which AUC-ROC measures; a known query must
find its identity, which mAP / mINP / CMC / BAKS measure.

Every metric is returned as a fraction in [0, 1] (not a percentage); printing it as % is the
caller's job. A metric with no query to average over is ``nan``, never a made-up 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score, roc_auc_score

from reidal.core.validation import check_embeddings, check_labels

#: Split values accepted by :func:`open_set_split`. WildlifeDatasets use "train"/"test";
#: re-ID datasets with a database/query protocol (our bundled zebra set) use
#: "database"/"query": the database is what the system learns from (train), the query
#: images are what it is tested on (test).
TRAIN_SPLIT_NAMES = ("train", "database")
TEST_SPLIT_NAMES = ("test", "query")

#: Cut-offs of the cumulative matching characteristic reported as ``top{k}``.
TOP_K = (1, 3, 5, 10)

#: Upper bound on query x gallery similarities held in memory at once (float32 entries);
#: 2**22 entries = 16 MiB for the similarities plus the same again for the sort order.
SIMILARITY_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class OpenSetSplit:
    """Row indices and identity sets of one open-set evaluation split.

    ``train_idx`` holds the training images of the *known* identities only: a held-out
    identity is unseen by construction, so its training images are in no index set (they
    are neither trained on, nor gallery, nor query). ``query_idx`` is the whole test split;
    ``query_known[i]`` says whether query ``i``'s identity has exemplars in the gallery.
    """

    train_idx: np.ndarray
    query_idx: np.ndarray
    gallery_idx: np.ndarray
    known_identities: np.ndarray
    unknown_identities: np.ndarray
    query_known: np.ndarray


def _check_identities(identities: object, name: str = "identities") -> np.ndarray:
    arr = np.asarray(identities)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    return arr


def _check_fraction(value: float, name: str, *, upper_open: bool = True) -> float:
    v = float(value)
    if not np.isfinite(v) or v < 0 or (v >= 1 if upper_open else v > 1):
        bound = "[0, 1)" if upper_open else "[0, 1]"
        raise ValueError(f"{name} must be in {bound}, got {value}")
    return v


def _rank_within_groups(groups: np.ndarray, order_key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort rows by (group, order_key) and give each row its 0-based rank inside its group.

    Returns (order, rank) where ``order`` lists row indices group by group and ``rank[k]`` is
    the rank of row ``order[k]``; a vectorised replacement for a loop over groups.
    """
    order = np.lexsort((order_key, groups))
    g = groups[order]
    starts = np.r_[0, np.flatnonzero(g[1:] != g[:-1]) + 1]
    sizes = np.diff(np.r_[starts, g.size])
    rank = np.arange(g.size) - np.repeat(starts, sizes)
    return order, rank


def open_set_split(
    identities: object,
    *,
    split: object | None = None,
    held_out_fraction: float = 0.2,
    gallery_per_identity: int = 5,
    test_fraction: float = 0.3,
    seed: int = 0,
    X: object | None = None,
) -> OpenSetSplit:
    """Build the open-set evaluation split (docs/method.md, "Evaluation protocol").

    1. Train/test: ``split`` (one string per image; "train"/"database" = train,
       "test"/"query" = test, any case) is used as given and ``test_fraction`` is
       ignored. Without it, each identity sends
       ``round(test_fraction * n_i)`` randomly chosen images to test, keeping at least one
       in train (so an identity with one image stays entirely in train).
    2. ``round(held_out_fraction * T)`` of the T identities with training images are drawn
       (seeded) as unknown; at least one identity stays known. Identities that occur only
       in the test split are unknown too. The held-out identities' training images are
       left out of ``train_idx`` (an unknown identity must be unseen).
    3. Gallery: up to ``gallery_per_identity`` training images per known identity. Without
       ``X`` they are drawn at random (seeded); with ``X`` (L2-normalised embeddings) they
       are the images most similar to their identity's training centroid, which is the
       paper's "by similarity" choice (ties broken by row order).
    4. Query: every test image, known or unknown.

    Deterministic for a given ``seed``; the draws of steps 1-3 come from one generator.
    """
    ids = _check_identities(identities)
    n = ids.shape[0]
    held_out_fraction = _check_fraction(held_out_fraction, "held_out_fraction")
    test_fraction = _check_fraction(test_fraction, "test_fraction")
    if isinstance(gallery_per_identity, bool) or int(gallery_per_identity) != gallery_per_identity:
        raise ValueError(f"gallery_per_identity must be an integer, got {gallery_per_identity}")
    gallery_per_identity = int(gallery_per_identity)
    if gallery_per_identity < 1:
        raise ValueError(f"gallery_per_identity must be >= 1, got {gallery_per_identity}")
    Xc = None if X is None else check_embeddings(X)
    if Xc is not None and Xc.shape[0] != n:
        raise ValueError(f"X has {Xc.shape[0]} rows but identities has {n} entries")

    rng = np.random.default_rng(seed)
    uniq, codes = np.unique(ids, return_inverse=True)
    codes = codes.reshape(-1)

    if split is not None:
        s = np.asarray(split).astype(str)
        if s.shape != (n,):
            raise ValueError(f"split must be a 1-D array of length {n}, got shape {s.shape}")
        s = np.char.lower(s)
        is_train = np.isin(s, TRAIN_SPLIT_NAMES)
        is_test = np.isin(s, TEST_SPLIT_NAMES)
        bad = ~(is_train | is_test)
        if bad.any():
            raise ValueError(
                f"split values must be one of {TRAIN_SPLIT_NAMES + TEST_SPLIT_NAMES}, "
                f"got {sorted(set(s[bad].tolist()))[:5]}"
            )
    else:
        sizes = np.bincount(codes, minlength=uniq.size)
        n_test = np.minimum(np.rint(test_fraction * sizes).astype(np.int64), sizes - 1)
        order, rank = _rank_within_groups(codes, rng.random(n))
        is_test = np.zeros(n, dtype=bool)
        is_test[order] = rank < n_test[codes[order]]
        is_train = ~is_test

    train_codes = np.unique(codes[is_train])
    if train_codes.size == 0:
        raise ValueError("the training split holds no image, so no identity can be known")
    n_held = int(np.rint(held_out_fraction * train_codes.size))
    n_held = min(n_held, train_codes.size - 1)
    held_codes = rng.choice(train_codes, size=n_held, replace=False) if n_held else train_codes[:0]
    known_mask = np.zeros(uniq.size, dtype=bool)
    known_mask[train_codes] = True
    known_mask[held_codes] = False

    train_idx = np.flatnonzero(is_train & known_mask[codes]).astype(np.int64)
    query_idx = np.flatnonzero(is_test).astype(np.int64)

    tc = codes[train_idx]
    if Xc is None:
        key = rng.random(train_idx.size)
    else:
        Xt = Xc[train_idx].astype(np.float64)
        member = sp.csr_matrix(
            (np.ones(tc.size), (tc, np.arange(tc.size))), shape=(uniq.size, tc.size)
        )
        centroids = np.asarray(member @ Xt)
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
        # Highest similarity first; lexsort is stable, so ties keep row order.
        sim = np.einsum("ij,ij->i", Xt, centroids[tc])
        key = -sim
    order, rank = _rank_within_groups(tc, key)
    gallery_idx = np.sort(train_idx[order[rank < gallery_per_identity]])

    return OpenSetSplit(
        train_idx=train_idx,
        query_idx=query_idx,
        gallery_idx=gallery_idx.astype(np.int64),
        known_identities=uniq[known_mask],
        unknown_identities=uniq[~known_mask],
        query_known=known_mask[codes[query_idx]],
    )


def _check_ids_for(ids: object, n: int, name: str) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.shape != (n,):
        raise ValueError(f"{name} must be a 1-D array of length {n}, got shape {arr.shape}")
    return arr


def _positive_ranks(
    S: np.ndarray, rows: np.ndarray, cols: np.ndarray, npos: np.ndarray
) -> np.ndarray:
    """1-based rank of each positive (rows[i], cols[i]) in its row of ``S``.

    The ranking is by decreasing similarity with ties in gallery (column) order, i.e. the
    position in ``argsort(-S, kind="stable")``; rank = 1 + #items ranked before it. No row
    is sorted: positive slot k (the k-th positive of every row, ``rows`` being row-major as
    np.nonzero gives them) is handled for all rows at once by counting the items above its
    threshold, which costs one or two passes over the chunk per slot instead of a sort
    (O(g log g) per row). Ties are rare, so the exact tie order is computed only for the
    rows that have one.
    """
    n_rows, n_g = S.shape
    starts = np.cumsum(npos) - npos
    slot = np.arange(rows.size) - starts[rows]
    rank = np.empty(rows.size, dtype=np.int64)
    for k in range(int(npos.max())):
        sel = np.flatnonzero(slot == k)
        r, c = rows[sel], cols[sel]
        s = S[r, c]
        if 4 * r.size >= n_rows:  # most rows have a k-th positive: one pass over S
            thr = np.full(n_rows, np.inf, dtype=S.dtype)
            thr[r] = s
            above = np.count_nonzero(S > thr[:, None], axis=1)[r]
            equal = np.count_nonzero(S == thr[:, None], axis=1)[r]
        else:  # few rows: pass over those rows only
            Sr = S[r]
            above = np.count_nonzero(Sr > s[:, None], axis=1)
            equal = np.count_nonzero(Sr == s[:, None], axis=1)
        ahead = above
        tied = np.flatnonzero(equal > 1)  # other items with exactly the same similarity
        if tied.size:
            St = S[r[tied]]
            before = (St == s[tied, None]) & (np.arange(n_g) < c[tied, None])
            ahead[tied] += np.count_nonzero(before, axis=1)
        rank[sel] = 1 + ahead
    return rank


def retrieval_metrics(
    query_X: object, query_ids: object, gallery_X: object, gallery_ids: object
) -> dict[str, float]:
    """Open-set retrieval metrics, as fractions in [0, 1].

    Each query ranks the whole gallery by cosine similarity (inner product of L2-normalised
    rows; ties keep gallery order). A query is *known* when its identity has at least one
    gallery item. Returned keys:

    - ``mAP``: mean over known queries of AP = mean of precision@rank at each positive rank.
    - ``mINP``: mean over known queries of INP = (#positives) / (rank of the last positive).
    - ``top1``, ``top3``, ``top5``, ``top10``: CMC, the share of known queries with a
      positive within the first k.
    - ``BAKS``: balanced accuracy on known samples: top-1 correctness averaged per query
      identity, then averaged over identities (so a common individual cannot dominate).
    - ``AUC_ROC``: known-vs-unknown query detection, score = max similarity to the gallery
      (known = positive class); ``nan`` unless both classes occur.
    - ``n_queries``, ``n_known_queries``, ``n_unknown_queries``, ``n_gallery``: counts.

    The query x gallery similarity matrix is computed in chunks of queries (see
    SIMILARITY_CHUNK_ELEMENTS). No row is sorted: each positive's rank is the count of
    gallery items ranked before it (vectorised over all positives of a chunk), so the cost
    is O(q * g * (1 + positives per query)) and memory stays bounded by the chunk size.
    """
    Q = check_embeddings(query_X)
    G = check_embeddings(gallery_X)
    if Q.shape[1] != G.shape[1]:
        raise ValueError(f"query and gallery dimensions differ: {Q.shape[1]} vs {G.shape[1]}")
    qids = _check_ids_for(query_ids, Q.shape[0], "query_ids")
    gids = _check_ids_for(gallery_ids, G.shape[0], "gallery_ids")
    # One shared integer code per identity value, so comparisons are cheap integer tests.
    _, codes = np.unique(np.concatenate([qids, gids]), return_inverse=True)
    codes = codes.reshape(-1)
    qc, gc = codes[: Q.shape[0]], codes[Q.shape[0] :]
    n_q, n_g = Q.shape[0], G.shape[0]

    ap = np.zeros(n_q)
    first_rank = np.zeros(n_q, dtype=np.int64)  # 1-based rank of the first positive
    last_rank = np.ones(n_q, dtype=np.int64)  # 1-based rank of the last positive
    max_sim = np.zeros(n_q)
    n_pos = np.zeros(n_q, dtype=np.int64)
    chunk = max(1, SIMILARITY_CHUNK_ELEMENTS // n_g)
    for start in range(0, n_q, chunk):
        stop = min(start + chunk, n_q)
        S = Q[start:stop] @ G.T
        max_sim[start:stop] = S.max(axis=1)
        rows, cols = np.nonzero(gc[None, :] == qc[start:stop, None])
        npos = np.bincount(rows, minlength=stop - start)
        n_pos[start:stop] = npos
        if rows.size == 0:
            continue
        rank = _positive_ranks(S, rows, cols, npos)
        order, k = _rank_within_groups(rows, rank)
        rows_o, rank_o = rows[order], rank[order]
        # AP = mean over the query's positives of precision at their ranks: (k+1) / rank.
        ap[start:stop] = np.bincount(
            rows_o, weights=(k + 1) / rank_o, minlength=stop - start
        ) / np.maximum(npos, 1)
        firsts = np.flatnonzero(k == 0)
        lasts = np.r_[firsts[1:], rows_o.size] - 1
        first_rank[start + rows_o[firsts]] = rank_o[firsts]
        last_rank[start + rows_o[lasts]] = rank_o[lasts]
    inp = n_pos / last_rank

    known = n_pos > 0
    n_known = int(known.sum())
    out: dict[str, float] = {}
    nan = float("nan")
    out["mAP"] = float(ap[known].mean()) if n_known else nan
    out["mINP"] = float(inp[known].mean()) if n_known else nan
    for k in TOP_K:
        out[f"top{k}"] = float((first_rank[known] <= k).mean()) if n_known else nan
    if n_known:
        correct = (first_rank[known] == 1).astype(np.float64)
        _, kid = np.unique(qc[known], return_inverse=True)
        kid = kid.reshape(-1)
        per_id = np.bincount(kid, weights=correct) / np.bincount(kid)
        out["BAKS"] = float(per_id.mean())
    else:
        out["BAKS"] = nan
    if 0 < n_known < n_q:
        out["AUC_ROC"] = float(roc_auc_score(known.astype(np.int64), max_sim))
    else:
        out["AUC_ROC"] = nan
    out["n_queries"] = float(n_q)
    out["n_known_queries"] = float(n_known)
    out["n_unknown_queries"] = float(n_q - n_known)
    out["n_gallery"] = float(n_g)
    return out


def evaluate_open_set(X: object, identities: object, split: OpenSetSplit) -> dict[str, float]:
    """:func:`retrieval_metrics` of ``split``'s queries against its gallery."""
    Xc = check_embeddings(X)
    ids = _check_identities(identities)
    if ids.shape[0] != Xc.shape[0]:
        raise ValueError(f"X has {Xc.shape[0]} rows but identities has {ids.shape[0]} entries")
    if split.query_idx.size == 0:
        raise ValueError("the split has no query image")
    if split.gallery_idx.size == 0:
        raise ValueError("the split has an empty gallery")
    for name in ("query_idx", "gallery_idx"):
        idx = getattr(split, name)
        if idx.min() < 0 or idx.max() >= Xc.shape[0]:
            raise ValueError(f"split.{name} holds indices outside [0, {Xc.shape[0]})")
    q, g = split.query_idx, split.gallery_idx
    return retrieval_metrics(Xc[q], ids[q], Xc[g], ids[g])


def _singletons_for_outliers(pred: np.ndarray) -> np.ndarray:
    """Give every -1 (outlier) a fresh label of its own, above all real labels."""
    out = pred.copy()
    neg = out == -1
    if neg.any():
        base = int(out.max()) + 1 if (~neg).any() else 0
        out[neg] = base + np.arange(int(neg.sum()))
    return out


def _pair_count(counts: np.ndarray) -> int:
    c = counts.astype(np.int64)
    return int((c * (c - 1) // 2).sum())


def pairwise_scores(pred_labels: object, true_labels: object) -> dict[str, float]:
    """Pairwise precision / recall / F1 of a clustering against the true identities.

    A pair is predicted positive when both images share a predicted cluster (label -1 is an
    outlier, a cluster of its own) and truly positive when they share an identity. The
    counts come from the contingency table (sum of C(n_ij, 2) etc.), never from pairs.
    Conventions for empty denominators: precision is 1 when no pair is predicted together
    (nothing claimed, nothing wrong), recall is 1 when no two images share an identity, so
    all-singletons against all-singletons scores F1 = 1 and against real identities F1 = 0.
    """
    t = _check_identities(true_labels, "true_labels")
    p = check_labels(pred_labels, t.shape[0], name="pred_labels")
    _, tc = np.unique(t, return_inverse=True)
    tc = tc.reshape(-1).astype(np.int64)
    _, pc = np.unique(_singletons_for_outliers(p), return_inverse=True)
    pc = pc.reshape(-1).astype(np.int64)
    pred_pairs = _pair_count(np.bincount(pc))
    true_pairs = _pair_count(np.bincount(tc))
    _, joint = np.unique(pc * (int(tc.max()) + 1) + tc, return_counts=True)
    both = _pair_count(joint)
    precision = both / pred_pairs if pred_pairs else 1.0
    recall = both / true_pairs if true_pairs else 1.0
    denom = precision + recall
    f1 = 2 * precision * recall / denom if denom else 0.0
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1)}


def clustering_quality(pred_labels: object, true_labels: object) -> dict[str, float | int]:
    """ARI and pairwise scores of a clustering; outliers (-1) count as singletons in both.

    ``n_clusters`` counts distinct non-outlier labels, ``n_outliers`` the -1 entries.
    """
    t = _check_identities(true_labels, "true_labels")
    p = check_labels(pred_labels, t.shape[0], name="pred_labels")
    _, tc = np.unique(t, return_inverse=True)
    out: dict[str, float | int] = {
        "ari": float(adjusted_rand_score(tc.reshape(-1), _singletons_for_outliers(p)))
    }
    out.update(pairwise_scores(p, t))
    out["n_clusters"] = int(np.unique(p[p >= 0]).size)
    out["n_outliers"] = int((p == -1).sum())
    return out
