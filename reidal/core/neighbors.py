"""Nearest neighbours (faiss) and SpCL's k-reciprocal Jaccard distance.

Every clustering and sampling step in reidal starts from the k nearest neighbours of each
embedding, so they are computed here once, with one contract: inner product on
L2-normalised vectors (= cosine similarity), rows sorted by decreasing similarity, the item
itself in column 0 (SpCL's k-reciprocal code relies on that), never a missing neighbour.

The Jaccard distance follows ``compute_jaccard_distance`` of SpCL
(``spcl/utils/faiss_rerank.py``, identical in Cluster Contrast) step for step, but on sparse
matrices instead of dense (n, n) arrays and Python loops, so it runs at n = 100k in a few
GiB. ``tests/test_neighbors.py`` checks it against a dense transcription of the original.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import faiss
import numpy as np
import scipy.sparse as sp

from reidal.core import ivf_knn
from reidal.core.params import CLUSTERING
from reidal.core.validation import check_embeddings

log = logging.getLogger(__name__)

IndexKind = Literal["flat", "hnsw", "ivf"]
IndexChoice = Literal["auto", "flat", "hnsw", "ivf"]
GpuChoice = bool | Literal["auto"]

#: Triples (row, shared column, partner) handled per block in the Jaccard overlap step;
#: bounds its transient memory to a few hundred MiB whatever n is.
JACCARD_BLOCK_TRIPLES = 1 << 21

#: OURS. The recall@k an approximate k-NN graph must reach when knn_search chooses the index
#: (``target_recall``): the fraction of each item's exact k nearest neighbours it holds,
#: averaged over items. At 0.95 DBSCAN's and FINCH's partitions are nearly those of exact
#: search (docs/benchmarks.md); 1.0 means exact search at every n.
KNN_TARGET_RECALL = 0.95

#: OURS. Below this many items ``index="auto"`` searches exactly: n^2 d multiply-adds, about
#: 2.6e10 at 10k and d = 256 (seconds on two cores), where the calibrated inverted file saves
#: little and exactness keeps small collections deterministic.
KNN_EXACT_BELOW = 10_000

#: OURS. Sample queries whose exact neighbours calibrate nprobe and measure the recall, and
#: the standard errors the sample recall must clear the target by (one-sided 95 %). 500
#: queries x k neighbours give a standard error of a few thousandths; their exact search
#: costs 500 n d, a fraction of the graph's own cost.
KNN_CALIBRATION_QUERIES = 500
KNN_CALIBRATION_Z = 1.645

#: faiss GPU indexes answer at most this many neighbours per query; larger k runs on the CPU.
GPU_MAX_K = 2048

__all__ = [
    "KNN_EXACT_BELOW",
    "KNN_TARGET_RECALL",
    "KNNIndex",
    "KNNReport",
    "approximate_recall",
    "check_knn_result",
    "gpu_available",
    "jaccard_distance",
    "jaccard_similarity",
    "knn",
    "knn_recall",
    "knn_search",
    "within_distance",
]


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return int(value)


class KNNIndex:
    """A faiss inner-product index over a collection, built once and searched many times.

    ``index``: "flat" is exact (``IndexFlatIP``); "hnsw" (``IndexHNSWFlat``) and "ivf"
    (``IndexIVFFlat``, trained on a seeded sample) are approximate, measure them with
    :func:`approximate_recall`. A query row for which an approximate index returns fewer
    than k hits is searched again exactly, so results never hold -1. Flat search is
    deterministic; faiss builds HNSW graphs with several threads, so "hnsw" may differ
    slightly between runs.

    ``use_gpu``: "auto" moves flat / ivf indexes to the GPU when faiss has GPU support and a
    GPU is present; ``True`` requires it (``ValueError`` otherwise); ``False`` never does.
    faiss has no GPU HNSW, so "hnsw" stays on the CPU under "auto" and refuses ``True``.
    """

    def __init__(
        self,
        X: object,
        *,
        index: IndexKind = "flat",
        use_gpu: GpuChoice = "auto",
        nlist: int | None = None,
        nprobe: int = 16,
        hnsw_m: int = 32,
        ef_search: int = 128,
        ef_construction: int = 40,
        seed: int = 0,
    ) -> None:
        self.X = check_embeddings(X)
        n, d = self.X.shape
        if index not in ("flat", "hnsw", "ivf"):
            raise ValueError(f"index must be 'flat', 'hnsw' or 'ivf', got {index!r}")
        if use_gpu not in (True, False, "auto"):
            raise ValueError(f"use_gpu must be True, False or 'auto', got {use_gpu!r}")
        nprobe = _check_positive_int(nprobe, "nprobe")
        hnsw_m = _check_positive_int(hnsw_m, "hnsw_m")
        ef_search = _check_positive_int(ef_search, "ef_search")
        ef_construction = _check_positive_int(ef_construction, "ef_construction")
        if use_gpu is True and not gpu_available():
            raise ValueError(
                "use_gpu=True but faiss has no GPU support here (faiss-cpu build or no GPU)"
            )
        if use_gpu is True and index == "hnsw":
            raise ValueError("use_gpu=True does not work with index='hnsw': faiss has no GPU HNSW")
        self.kind = index
        self.seed = int(seed)

        if index == "flat":
            cpu_index = faiss.IndexFlatIP(d)
        elif index == "hnsw":
            cpu_index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            cpu_index.hnsw.efConstruction = ef_construction
            cpu_index.hnsw.efSearch = ef_search
        else:
            if nlist is None:
                # ~4 sqrt(n) lists, but at least 39 training points per list (faiss's minimum).
                nlist = max(1, min(int(round(4 * np.sqrt(n))), n // 39))
            nlist = min(_check_positive_int(nlist, "nlist"), n)
            quantizer = faiss.IndexFlatIP(d)
            cpu_index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            cpu_index.cp.seed = self.seed
            cpu_index.nprobe = min(nprobe, nlist)
            rng = np.random.default_rng(self.seed)
            n_train = min(n, 64 * nlist)
            train = self.X if n_train == n else self.X[np.sort(rng.choice(n, n_train, False))]
            cpu_index.train(train)
            self._quantizer = quantizer  # the IVF index does not own it

        self.on_gpu = index != "hnsw" and use_gpu is not False and gpu_available()
        if self.on_gpu:
            self._gpu_resources = faiss.StandardGpuResources()
            self.index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, cpu_index)
        else:
            self.index = cpu_index
        self.index.add(self.X)
        self._exact: faiss.Index | None = None

    def _exact_cpu(self) -> faiss.Index:
        if self._exact is None:
            if self.kind == "flat" and not self.on_gpu:
                self._exact = self.index
            else:
                self._exact = faiss.IndexFlatIP(self.X.shape[1])
                self._exact.add(self.X)
        return self._exact

    @property
    def n(self) -> int:
        return self.X.shape[0]

    def search(self, Q: object, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of each query row: (sims float32 (m, k), idx int64 (m, k)), k clipped to n."""
        Q = check_embeddings(Q)
        if Q.shape[1] != self.X.shape[1]:
            raise ValueError(
                f"queries have {Q.shape[1]} columns, the index holds {self.X.shape[1]}"
            )
        k = min(_check_positive_int(k, "k"), self.n)
        if self.on_gpu and k > GPU_MAX_K:
            sims, idx = self._exact_cpu().search(Q, k)
        else:
            sims, idx = self.index.search(Q, k)
        missing = (idx < 0).any(axis=1)
        if missing.any():
            sims[missing], idx[missing] = self._exact_cpu().search(Q[missing], k)
        return sims.astype(np.float32, copy=False), idx.astype(np.int64, copy=False)


def _self_first(X: np.ndarray, sims: np.ndarray, idx: np.ndarray) -> None:
    """Put each item in column 0 of its own row, in place.

    Exact search already does this unless duplicates tie with the item; approximate search
    may miss the item entirely, in which case it replaces the last (weakest) neighbour.
    """
    n, k = idx.shape
    rows = np.flatnonzero(idx[:, 0] != np.arange(n))
    if rows.size == 0:
        return
    i_b, s_b = idx[rows], sims[rows]
    is_self = i_b == rows[:, None]
    keep = ~is_self
    keep[~is_self.any(axis=1), k - 1] = False
    rest_i = i_b[keep].reshape(rows.size, k - 1)
    rest_s = s_b[keep].reshape(rows.size, k - 1)
    self_sim = np.einsum("ij,ij->i", X[rows], X[rows])
    # A duplicate may tie the item at similarity 1 +- rounding: keep the row sorted.
    self_sim = np.maximum(self_sim, s_b[:, 0])
    idx[rows] = np.column_stack([rows, rest_i])
    sims[rows] = np.column_stack([self_sim, rest_s])


@dataclass(frozen=True)
class KNNReport:
    """How a k-NN graph was searched and how close to exact it is.

    ``index``: "flat" (exact), "ivf" or "hnsw"; ``params``: the index's settings as used
    (nlist and nprobe for "ivf"; nprobe chosen by calibration unless given); ``recall``:
    recall@k of the returned graph on ``n_queries`` seeded sample rows against exact search
    of those rows (1.0 and 0 queries for exact search), ``recall_se`` its standard error;
    ``target_recall``: what the choice aimed at (None when the index was given);
    ``reason``: why this index, in words.
    """

    index: str
    k: int
    recall: float
    recall_se: float = 0.0
    n_queries: int = 0
    target_recall: float | None = None
    params: dict[str, Any] = field(default_factory=dict)
    reason: str = ""

    def as_stats(self) -> dict[str, Any]:
        """A JSON-ready dict (sampler stats, benchmark rows)."""
        return {
            "index": self.index, "k": self.k, "recall": round(self.recall, 4),
            "recall_se": round(self.recall_se, 4), "n_queries": self.n_queries,
            "target_recall": self.target_recall, "params": dict(self.params),
            "reason": self.reason,
        }


def _on_gpu(use_gpu: GpuChoice) -> bool:
    if use_gpu not in (True, False, "auto"):
        raise ValueError(f"use_gpu must be True, False or 'auto', got {use_gpu!r}")
    return use_gpu is True or (use_gpu == "auto" and gpu_available())


def _sample_rows(n: int, n_queries: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, min(n_queries, n), replace=False))


def _exact_rows(X: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k of the given rows of X (no index copy of X: faiss.knn reads it in place)."""
    _, idx = faiss.knn(X[rows], X, k, metric=faiss.METRIC_INNER_PRODUCT)
    return idx.astype(np.int64, copy=False)


def _sample_recall(idx: np.ndarray, rows: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
    """Mean and standard error over the sample rows of their per-row recall."""
    per_row = _per_row_recall(idx[rows], exact)
    se = float(per_row.std(ddof=1) / np.sqrt(per_row.size)) if per_row.size > 1 else 0.0
    return float(per_row.mean()), se


def knn_search(
    X: object,
    k: int,
    *,
    index: IndexChoice = "auto",
    target_recall: float = KNN_TARGET_RECALL,
    exact_below: int = KNN_EXACT_BELOW,
    n_queries: int = KNN_CALIBRATION_QUERIES,
    use_gpu: GpuChoice = "auto",
    nlist: int | None = None,
    nprobe: int | None = None,
    hnsw_m: int = 32,
    ef_search: int = 128,
    ef_construction: int = 40,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, KNNReport]:
    """The k-NN graph of X (as :func:`knn`) and a :class:`KNNReport` of how it was found.

    ``index="auto"`` chooses by n and ``target_recall``: exact search ("flat") below
    ``exact_below`` items, for a target of 1, or when the search runs on a GPU (exact search
    of a million vectors takes seconds there); otherwise a calibrated inverted file
    (:mod:`reidal.core.ivf_knn`): default_nlist(n) spherical kmeans lists, and the smallest
    nprobe whose recall on ``n_queries`` seeded sample rows, measured against exact search
    of those rows, clears the target by ``KNN_CALIBRATION_Z`` standard errors. If no nprobe
    up to a quarter of the lists does, exact search runs instead (it then costs at most
    about four times as much). The report's recall is measured on the returned graph.

    ``index="ivf"`` on the CPU is the same inverted file with ``nprobe`` as given, or
    calibrated to ``target_recall`` when None; on a GPU it is faiss's GPU IVF (nprobe
    default 16). "hnsw" and "flat" are :class:`KNNIndex`'s; every approximate result's
    recall is measured on the sample.
    """
    X = check_embeddings(X)
    n = X.shape[0]
    k = min(_check_positive_int(k, "k"), n)
    if index not in ("auto", "flat", "hnsw", "ivf"):
        raise ValueError(f"index must be 'auto', 'flat', 'hnsw' or 'ivf', got {index!r}")
    target = float(target_recall)
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall!r}")
    exact_below = _check_positive_int(exact_below, "exact_below")
    n_queries = _check_positive_int(n_queries, "n_queries")
    if nprobe is not None:
        nprobe = _check_positive_int(nprobe, "nprobe")
    if nlist is not None:
        nlist = _check_positive_int(nlist, "nlist")
    gpu = _on_gpu(use_gpu)
    chosen = index != "auto"
    reason = "given"
    if index == "auto":
        if target >= 1.0:
            index, reason = "flat", "target recall 1"
        elif n < exact_below:
            index, reason = "flat", f"n = {n} < {exact_below}"
        elif gpu:
            index, reason = "flat", "exact search on the GPU"
        else:
            index, reason = "ivf", f"n = {n} >= {exact_below}, nprobe calibrated"

    def exact_report(why: str) -> KNNReport:
        return KNNReport("flat", k, 1.0, target_recall=None if chosen else target, reason=why)

    if index == "flat" or (index == "ivf" and not gpu and n <= 1):
        sims, idx = KNNIndex(X, index="flat", use_gpu=use_gpu).search(X, k)
        _self_first(X, sims, idx)
        return sims, idx, exact_report(reason)

    rows = _sample_rows(n, n_queries, seed)
    exact = _exact_rows(X, rows, k)
    params: dict[str, Any]
    if index == "ivf" and not gpu:
        nlist = min(nlist or ivf_knn.default_nlist(n), n)
        centroids = ivf_knn.train_centroids(X, nlist, seed)
        params = {"nlist": nlist}
        if nprobe is None:
            P = max(1, int(nlist * ivf_knn.IVF_MAX_PROBE_FRACTION))
            query_lists = ivf_knn.nearest_lists(X[rows], centroids, P)
            items, inverse = np.unique(exact, return_inverse=True)
            homes = ivf_knn.nearest_lists(X[items], centroids, 1)[:, 0]
            cal = ivf_knn.calibrate_nprobe(
                ivf_knn.recall_by_nprobe(homes[inverse.reshape(exact.shape)], query_lists),
                target, KNN_CALIBRATION_Z,
            )
            log.info("kNN n=%d: nlist %d, sample recall@%d by nprobe %s", n, nlist, k,
                     np.round(cal.curve[:16], 3).tolist())
            if cal.nprobe is None:
                return (*knn(X, k, index="flat", use_gpu=False), exact_report(
                    f"IVF reached recall {cal.recall:.3f} at nprobe {cal.max_nprobe} of "
                    f"{nlist} lists, below the target {target}: exact search"))
            nprobe = cal.nprobe
            params["calibrated"] = True
        params["nprobe"] = min(nprobe, nlist)
        sims, idx = ivf_knn.ivf_self_knn(X, k, ivf_knn.nearest_lists(X, centroids, nprobe))
        _complete_short_rows(X, sims, idx)
    else:
        options: dict[str, Any]
        if index == "ivf":
            options = {"nlist": nlist, "nprobe": nprobe or 16}
        else:
            options = {"hnsw_m": hnsw_m, "ef_search": ef_search,
                       "ef_construction": ef_construction}
        built = KNNIndex(X, index=index, use_gpu=use_gpu, seed=seed, **options)
        sims, idx = built.search(X, k)
        params = {key: val for key, val in options.items() if val is not None}
    _self_first(X, sims, idx)
    recall, se = _sample_recall(idx, rows, exact)
    report = KNNReport(index, k, recall, se, rows.size, None if chosen else target, params,
                       reason)
    log.info("kNN n=%d: %s", n, report)
    return sims, idx, report


def _complete_short_rows(X: np.ndarray, sims: np.ndarray, idx: np.ndarray) -> None:
    """Rows whose probed lists held fewer than k items are searched again exactly, in place."""
    short = np.flatnonzero((idx < 0).any(axis=1))
    if short.size:
        s, i = faiss.knn(X[short], X, idx.shape[1], metric=faiss.METRIC_INNER_PRODUCT)
        sims[short], idx[short] = s, i


def knn(
    X: object, k: int, *, index: IndexChoice = "flat", **options: Any
) -> tuple[np.ndarray, np.ndarray]:
    """k nearest neighbours of every row of X among the rows of X, by cosine similarity.

    Returns (sims float32 (n, k), idx int64 (n, k)), each row sorted by decreasing
    similarity with the item itself in column 0; k is clipped to n. Exact by default;
    ``options`` are :func:`knn_search`'s (``use_gpu``, ``nlist``, ``nprobe``,
    ``target_recall``...), which also says what ``index="auto"`` / "ivf" / "hnsw" do.
    """
    sims, idx, _ = knn_search(X, k, index=index, **options)
    return sims, idx


def _per_row_recall(a: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Per row, the fraction of the exact neighbours e (>= 0) that a holds."""
    found = np.zeros(e.shape[0])
    step = max(1, (1 << 22) // max(1, a.shape[1] * e.shape[1]))
    for s in range(0, e.shape[0], step):  # row chunks bound the (rows, ka, k) comparison
        hit = (a[s : s + step, :, None] == e[s : s + step, None, :]).any(axis=1)
        valid = e[s : s + step] >= 0
        found[s : s + step] = (hit & valid).sum(axis=1) / np.maximum(valid.sum(axis=1), 1)
    return found


def knn_recall(approx_idx: object, exact_idx: object) -> float:
    """Mean, over query rows, of the fraction of exact neighbours the approximate result holds."""
    a = np.asarray(approx_idx)
    e = np.asarray(exact_idx)
    if a.ndim != 2 or e.ndim != 2 or a.shape[0] != e.shape[0]:
        raise ValueError(
            f"approx_idx and exact_idx must be 2-D with equal row counts, got {a.shape}, {e.shape}"
        )
    if e.shape[0] == 0 or e.shape[1] == 0:
        raise ValueError("exact_idx is empty")
    return float(_per_row_recall(a, e).mean())


def approximate_recall(
    X: object,
    k: int,
    *,
    index: IndexKind = "hnsw",
    n_queries: int = 1000,
    seed: int = 0,
    **index_kwargs: object,
) -> float:
    """Recall@k of an approximate index against exact search, on a seeded sample of rows.

    This is how an approximate index's quality is reported: the mean fraction of each
    sampled query's exact k nearest neighbours that the approximate index returns.
    """
    X = check_embeddings(X)
    k = min(_check_positive_int(k, "k"), X.shape[0])
    n_queries = _check_positive_int(n_queries, "n_queries")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(X.shape[0], min(n_queries, X.shape[0]), replace=False))
    approx = KNNIndex(X, index=index, seed=seed, **index_kwargs)  # type: ignore[arg-type]
    exact = KNNIndex(X, index="flat", use_gpu=approx.on_gpu)
    _, a_idx = approx.search(X[rows], k)
    _, e_idx = exact.search(X[rows], k)
    return knn_recall(a_idx, e_idx)


def check_knn_result(knn_result: object, n: int, min_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (sims, idx) pair as returned by :func:`knn` for n items, >= min_k columns."""
    if not isinstance(knn_result, tuple | list) or len(knn_result) != 2:
        raise ValueError("knn_result must be a (sims, idx) pair as returned by knn()")
    sims = np.asarray(knn_result[0], dtype=np.float32)
    idx = np.asarray(knn_result[1])
    if idx.ndim != 2 or idx.shape[0] != n or sims.shape != idx.shape:
        raise ValueError(
            f"knn_result must hold two ({n}, k) arrays, got {sims.shape} and {idx.shape}"
        )
    if idx.shape[1] < min_k:
        raise ValueError(f"knn_result has k={idx.shape[1]} columns, {min_k} are needed")
    if not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"knn_result indices must be integers, got dtype {idx.dtype}")
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"knn_result indices must lie in [0, {n})")
    return sims, idx.astype(np.int64, copy=False)


# --------------------------------------------------------------------------- Jaccard


def _indicator(idx: np.ndarray, n: int) -> sp.csr_matrix:
    """Row i has a 1 at each column idx[i, :] (a k-NN graph as a sparse 0/1 matrix)."""
    rows = np.repeat(np.arange(n, dtype=np.int64), idx.shape[1])
    data = np.ones(idx.size, dtype=np.float32)
    out = sp.csr_matrix((data, (rows, idx.ravel())), shape=(n, n))
    out.data[:] = 1.0  # duplicates within a row would have been summed
    return out


def _reciprocal(idx: np.ndarray, k: int) -> sp.csr_matrix:
    """SpCL's ``k_reciprocal_neigh`` for every row: j in R(i) iff each is in the other's
    first k+1 neighbours (columns of the initial rank, clipped to those available)."""
    n = idx.shape[0]
    fwd = _indicator(idx[:, : k + 1], n)
    out = fwd.multiply(fwd.T).tocsr()
    out.sort_indices()
    return out


def _row_ids(m: sp.csr_matrix) -> np.ndarray:
    return np.repeat(np.arange(m.shape[0], dtype=np.int64), np.diff(m.indptr))


def _encodings(
    X: np.ndarray, knn_sims: np.ndarray, idx: np.ndarray, k1: int, k2: int
) -> sp.csr_matrix:
    """The k-reciprocal encodings V (one sparse row per item, each row sums to 1)."""
    n = X.shape[0]
    r1 = _reciprocal(idx, k1)
    rh = _reciprocal(idx, int(np.around(k1 / 2)))
    h_size = np.diff(rh.indptr).astype(np.float64)

    # A candidate c in R1(i) brings its half-size set Rh(c) into i's expansion when
    # |Rh(c) & R1(i)| > 2/3 |Rh(c)|. Rh is symmetric, so R1 @ Rh counts the overlap.
    overlap = (r1 @ rh).multiply(r1).tocsr()
    overlap.sort_indices()
    cand = overlap.indices
    accepted = overlap.data > (2 / 3) * h_size[cand]
    acc = sp.csr_matrix(
        (np.ones(int(accepted.sum()), dtype=np.float32),
         (_row_ids(overlap)[accepted], cand[accepted])),
        shape=(n, n),
    )
    expansion = (r1 + acc @ rh).tocsr()
    expansion.sum_duplicates()
    expansion.sort_indices()

    # V[i, E(i)] = softmax(-(2 - 2 x_i.x_j)) over the expansion set. Most of E(i) lies in
    # i's k-NN list, whose similarities faiss already gave; only the rest is recomputed.
    rows = _row_ids(expansion)
    cols = expansion.indices.astype(np.int64)
    row_starts = np.arange(0, idx.size + 1, idx.shape[1])
    known = sp.csr_matrix(
        (knn_sims.ravel().astype(np.float64), idx.ravel(), row_starts), shape=(n, n)
    )
    known.sort_indices()
    known_keys = _row_ids(known) * n + known.indices
    keys = rows * n + cols
    at = np.minimum(np.searchsorted(known_keys, keys), known_keys.size - 1)
    found = known_keys[at] == keys
    sim = np.where(found, known.data[at], 0.0)
    todo = np.flatnonzero(~found)
    step = max(1, (1 << 24) // X.shape[1])
    for s in range(0, todo.size, step):  # chunks bound the gathered (chunk, d) copies
        t = todo[s : s + step]
        sim[t] = np.einsum("ij,ij->i", X[rows[t]], X[cols[t]])
    weight = np.exp(2.0 * sim - 2.0)
    row_sum = np.bincount(rows, weights=weight, minlength=n)
    weight /= row_sum[rows]
    V = sp.csr_matrix((weight, expansion.indices, expansion.indptr), shape=(n, n))

    if k2 != 1:
        # Local query expansion: average the encodings of the k2 nearest (self included).
        kq = min(k2, idx.shape[1])
        Q = sp.csr_matrix(
            (np.full(n * kq, 1.0 / kq), (np.repeat(np.arange(n), kq), idx[:, :kq].ravel())),
            shape=(n, n),
        )
        V = (Q @ V).tocsr()
    V.sum_duplicates()
    V.sort_indices()
    V.eliminate_zeros()
    return V


def _lower_blocks(V: sp.csr_matrix, max_distance: float) -> list[tuple[int, sp.csr_matrix]]:
    """Jaccard distances of the pairs j > i whose encodings share a column, in blocks of
    consecutive i: (b0, B) with B[j, i - b0] = d(i, j), kept where d <= max_distance.

    m_ij = sum_c min(V[i, c], V[j, c]); rows of V sum to 1, so sum_c max = 2 - m and the
    distance is 1 - m / (2 - m). For each stored V[i, c], the partners are the rows j > i
    of column c (a suffix of the sorted CSC column), so each pair and shared column is
    visited once. Each block's triples (i, c, j) are reduced by a (j, i) counting sort
    (coo -> csr), linear because the triples arrive sorted by i.
    """
    n = V.shape[0]
    Vc = V.tocsc()
    Vc.sort_indices()
    col_ptr = Vc.indptr.astype(np.int64)
    col_rows = Vc.indices
    col_vals = Vc.data
    e_rows = _row_ids(V)
    e_cols = V.indices.astype(np.int64)
    # Start of the partners j > i inside column c: search (c, i) among (column, row) keys.
    csc_keys = np.repeat(np.arange(n, dtype=np.int64), np.diff(col_ptr)) * n + col_rows
    start = np.searchsorted(csc_keys, e_cols * n + e_rows, side="right")
    del csc_keys
    lengths = col_ptr[e_cols + 1] - start
    per_row = np.bincount(e_rows, weights=lengths, minlength=n)
    cum = np.concatenate([[0.0], np.cumsum(per_row)])
    bounds = [0]
    while bounds[-1] < n:  # block boundaries: each block holds <= JACCARD_BLOCK_TRIPLES
        b0 = bounds[-1]
        b1 = int(np.searchsorted(cum, cum[b0] + JACCARD_BLOCK_TRIPLES, side="right")) - 1
        bounds.append(min(n, max(b1, b0 + 1)))
    blocks = []
    for b0, b1 in zip(bounds[:-1], bounds[1:], strict=False):  # loop over row blocks
        e0, e1 = V.indptr[b0], V.indptr[b1]
        length = lengths[e0:e1]
        total = int(length.sum())
        if total == 0:
            continue
        pos = np.arange(total, dtype=np.int64)
        pos += np.repeat(start[e0:e1] - (np.cumsum(length) - length), length)
        m = np.minimum(np.repeat(V.data[e0:e1], length), col_vals[pos])
        partner = col_rows[pos]
        del pos
        owner = np.repeat((e_rows[e0:e1] - b0).astype(np.int32), length)
        block = sp.coo_matrix((m, (partner, owner)), shape=(n, b1 - b0)).tocsr()
        del m, partner, owner
        m = block.data
        dist = np.maximum(1.0 - m / (2.0 - m), 0.0).astype(np.float32)
        keep = dist <= max_distance
        indices, indptr = block.indices, block.indptr
        if not keep.all():
            dist, indices = dist[keep], indices[keep]
            kept_per_row = np.bincount(_row_ids(block)[keep], minlength=n)
            indptr = np.concatenate([[0], np.cumsum(kept_per_row)])
        blocks.append((b0, sp.csr_matrix((dist, indices, indptr), shape=block.shape)))
    return blocks


def _assemble_symmetric(blocks: list[tuple[int, sp.csr_matrix]], n: int) -> sp.csr_matrix:
    """The full symmetric CSR matrix with an explicit zero diagonal, spliced row by row:
    row r = [d(i, r) for i < r, from the blocks in order] + [0 at r] + [d(r, j) for j > r,
    from the transposed block holding r]. Columns come out sorted and, with no arithmetic
    on the values, stored zeros stay stored. Peak memory is about 1.5x the result."""
    counts = np.ones(n, dtype=np.int64)  # the diagonal
    for b0, block in blocks:
        counts += np.diff(block.indptr)
        owners = np.bincount(block.indices, minlength=block.shape[1])
        counts[b0 : b0 + block.shape[1]] += owners
    indptr = np.concatenate([[0], np.cumsum(counts)])
    nnz = int(indptr[-1])
    index_dtype = np.int32 if nnz < np.iinfo(np.int32).max else np.int64
    indices = np.empty(nnz, dtype=index_dtype)
    data = np.empty(nnz, dtype=np.float32)
    cursor = indptr[:-1].copy()
    for b0, block in blocks:  # loop over blocks, in order (sorted columns); rows vectorised
        lens = np.diff(block.indptr)
        dest = np.repeat(cursor - block.indptr[:-1], lens) + np.arange(block.nnz)
        indices[dest] = block.indices + b0
        data[dest] = block.data
        cursor += lens
    indices[cursor] = np.arange(n)
    data[cursor] = 0.0
    cursor += 1
    while blocks:  # the upper parts, transposing one block at a time and freeing it
        b0, block = blocks.pop(0)
        upper = block.T.tocsr()  # rows i - b0, columns j > i
        del block
        upper.sort_indices()
        lens = np.diff(upper.indptr)
        starts = cursor[b0 : b0 + upper.shape[0]] - upper.indptr[:-1]
        dest = np.repeat(starts, lens) + np.arange(upper.nnz)
        indices[dest] = upper.indices
        data[dest] = upper.data
    return sp.csr_matrix((data, indices, indptr.astype(index_dtype)), shape=(n, n))


def jaccard_distance(
    X: object,
    *,
    k1: int = CLUSTERING.k1,
    k2: int = CLUSTERING.k2,
    knn_result: tuple[np.ndarray, np.ndarray] | None = None,
    index: IndexKind = "flat",
    use_gpu: GpuChoice = "auto",
    max_distance: float = 1.0,
) -> sp.csr_matrix:
    """SpCL's k-reciprocal encoding Jaccard distance as a sparse symmetric (n, n) matrix.

    Stored entries are the pairs whose encodings overlap (distance < 1) and the whole
    diagonal as explicit zeros; an absent entry means distance 1. Feed it to DBSCAN with
    ``metric="precomputed"``, which only sees stored entries. ``knn_result`` reuses a
    :func:`knn` result with at least min(k1, n) columns (its similarities are used as given,
    so they must be X's inner products); X is still needed for the other weights. Values
    are float32 like the original; k1 is clipped to n.

    ``max_distance`` (OURS, default 1.0 = keep every overlapping pair) drops the pairs
    farther apart than it. Most overlapping pairs share only a sliver of their encodings
    (distance > 0.99), so a cut at the largest distance a caller uses (DBSCAN's eps, the
    sampler's 1 - s_min) gives the same answers from a far smaller matrix.
    """
    X = check_embeddings(X)
    n = X.shape[0]
    k1 = _check_positive_int(k1, "k1")
    k2 = _check_positive_int(k2, "k2")
    max_distance = float(max_distance)
    if not 0.0 <= max_distance <= 1.0:
        raise ValueError(f"max_distance must be in [0, 1], got {max_distance}")
    kk = min(k1, n)
    if knn_result is None:
        sims, idx = knn(X, kk, index=index, use_gpu=use_gpu)
    else:
        sims, idx = check_knn_result(knn_result, n, kk)
    sims = np.ascontiguousarray(sims[:, :kk])
    idx = np.ascontiguousarray(idx[:, :kk])

    V = _encodings(X, sims, idx, k1, k2)
    return _assemble_symmetric(_lower_blocks(V, max_distance), n)


def within_distance(D: sp.csr_matrix, max_distance: float) -> sp.csr_matrix:
    """The entries of a sparse distance matrix at most ``max_distance``, stored zeros kept.

    On a :func:`jaccard_distance` matrix cut at some c >= ``max_distance`` this is exactly
    the matrix cut at ``max_distance`` (the same float32 comparison), so one matrix at the
    widest cut a cycle needs serves every narrower one. Built from index arrays (no
    arithmetic, no eliminate_zeros) and without a copy of D.
    """
    kept = np.flatnonzero(D.data <= max_distance)
    rows = np.searchsorted(D.indptr, kept, side="right") - 1
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=D.shape[0]))])
    return sp.csr_matrix((D.data[kept], D.indices[kept], indptr), shape=D.shape)


def jaccard_similarity(D: sp.spmatrix) -> sp.csr_matrix:
    """1 - Jaccard distance on the stored entries (diagonal 1); absent entries mean 0."""
    if not sp.issparse(D) or D.ndim != 2 or D.shape[0] != D.shape[1]:
        raise ValueError(f"D must be a square sparse matrix, got {type(D).__name__}")
    D = D.tocsr()
    S = sp.csr_matrix((1.0 - D.data, D.indices.copy(), D.indptr.copy()), shape=D.shape)
    return S
