"""Ambiguity-Aware Sampling (AAS), method.md step 1.

Two complementary clusterings (DBSCAN on k-reciprocal Jaccard distance, FINCH's first
partition) are made consistent with the answers so far; where they disagree the data is
ambiguous. AAS asks pairs from two pools: medoid pairs of nearby regions of uncertainty
(U_os, "are these two regions one individual?") and, inside each region, the closest cross
pair of two clusters that the other clustering joins (U_us, "did a clustering merge two
individuals?"). Nothing here enumerates all pairs of a region: pair-set sizes come from
contingency tables and the candidate pairs from the sparse Jaccard matrix and the kNN graph.

The stages live in :mod:`reidal.core.aas_regions` (``regions_of_uncertainty``,
``disagreement_sizes``, ``region_pairs``, ``region_medoids``) and
:mod:`reidal.core.aas_pools` (``oversegmentation_pool``, ``undersegmentation_pool``,
``mixture_probabilities``), re-exported here; the benchmark times them one by one;
``AmbiguityAwareSampler.sample_from_clusterings`` runs them on clusterings a caller already
has, ``AmbiguityAwareSampler.sample`` computes the clusterings first.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import scipy.sparse as sp

from reidal.core.aas_pools import (
    OS_SIMILARITIES,
    PairPool,
    PairWeights,
    RegionWeights,
    TypeWeights,
    mixture_probabilities,
    oversegmentation_pool,
    undersegmentation_pool,
)
from reidal.core.aas_regions import (
    TYPE_NAMES,
    RegionPairs,
    _check_distance,
    disagreement_sizes,
    region_medoids,
    region_pairs,
    regions_of_uncertainty,
)
from reidal.core.neighbors import KNN_EXACT_BELOW, KNN_TARGET_RECALL
from reidal.core.neighbour_cache import _NEIGHBOUR_GRAPHS, NeighbourGraphCache
from reidal.core.params import CLUSTERING, SAMPLING, ParamsMixin
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
from reidal.core.validation import InstanceOf, Interval, OneOf, check_labels

if TYPE_CHECKING:  # pragma: no cover - typing only
    from reidal.core.constraints import ConstraintSet

IndexKind = Literal["flat", "hnsw", "ivf"]
KnnIndexChoice = Literal["auto", "flat", "hnsw", "ivf"]

#: Reason of an empty batch when the two clusterings agree everywhere.
REASON_AGREE = "no disagreement left between the clusterings"


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




class AmbiguityAwareSampler(ParamsMixin):
    """Ambiguity-Aware Sampling (Sani et al., AAAI-26), method.md step 1.

    Parameters (paper values as defaults, from reidal.core.params.SAMPLING):
    eps: mass of U_os in the mixture (0.6). k_max, s_min: medoid neighbours per medoid and
    their minimum similarity (5, 0.3). dbscan / finch / refiner: the clusterings and the
    constraint refinement (default DBSCANJaccard(), FinchFirstPartition(), NP3()); any
    callables with the same call signatures plug in. type_weights / region_weights /
    pair_weights: the factors pi, rho, omega of P(y | U_us) (see mixture_probabilities).
    use_knn_candidates: add kNN edges to the stored Jaccard entries as U_us candidates.

    knn_index (OURS, default "auto"): the index of the one kNN search that feeds the
    Jaccard distance, FINCH and the U_us candidates (reidal.core.neighbors.knn_search).
    "flat" is exact; "ivf" and "hnsw" are approximate; "auto" is exact below
    ``knn_auto_threshold`` items (OURS, 10_000; exact search costs n^2 d, at n = 100k and
    d = 256 100-150 s on two CPU cores) and from there on ``knn_auto_index``: "ivf" (OURS)
    is an inverted file whose nprobe is calibrated on a sample of queries against exact
    search until ``knn_target_recall`` is met (exact search when it cannot be), "hnsw" is
    faiss's HNSW with knn_options. The graph's recall@k1, measured on that sample, is in
    ``stats["knn"]`` of every batch.
    knn_target_recall (OURS, 0.95 = neighbors.KNN_TARGET_RECALL): the recall@k1 the
    approximate graph must reach; 1.0 means exact search at every n.
    knn_options: extra keyword arguments for reidal.core.neighbors.knn_search (nprobe,
    nlist, hnsw_m, ef_search, ef_construction, use_gpu, seed, n_queries); an nprobe given
    here is used as is instead of calibrated.

    os_similarity (OURS, default "jaccard" = the paper's sim): what U_os ranks and keeps
    medoid pairs by, "jaccard" (1 - k-reciprocal Jaccard distance) or "cosine" of the
    embeddings; see oversegmentation_pool. With s_min 0.3, Jaccard keeps only medoids that
    share most of their k-reciprocal neighbours, which on collections of a few hundred
    images never happens between regions (measured: U_os empty in every cycle).

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

    _constraints = {
        "eps": Interval(0.0, 1.0),
        "k_max": Interval(0, None, integer=True),
        "s_min": Interval(0.0, 1.0, closed="right"),
        "type_weights": OneOf(("uniform", "disagreement"), callables=True),
        "region_weights": OneOf(("disagreement", "uniform"), callables=True),
        "pair_weights": OneOf(("uniform", "similarity"), callables=True),
        "use_knn_candidates": OneOf((True, False)),
        "jaccard_max_distance": (OneOf(("auto",)), Interval(0.0, 1.0, closed="right")),
        "knn_index": OneOf(("auto", "flat", "hnsw", "ivf")),
        "knn_options": (OneOf((None,)), InstanceOf(dict, "a dict")),
        "knn_auto_threshold": Interval(1, None, integer=True),
        "knn_auto_index": OneOf(("flat", "hnsw", "ivf")),
        "os_similarity": OneOf(OS_SIMILARITIES),
        "knn_target_recall": Interval(0.0, 1.0, closed="right"),
    }

    def __init__(
        self,
        eps: float = SAMPLING.mixture_eps,
        k_max: int = SAMPLING.k_max,
        s_min: float = SAMPLING.s_min,
        dbscan: Any = None,
        finch: Any = None,
        refiner: Any = None,
        type_weights: TypeWeights = SAMPLING.type_weights,
        region_weights: RegionWeights = SAMPLING.region_weights,
        pair_weights: PairWeights = SAMPLING.pair_weights,
        use_knn_candidates: bool = True,
        jaccard_max_distance: float | Literal["auto"] = "auto",
        knn_index: KnnIndexChoice = "auto",
        knn_options: dict[str, Any] | None = None,
        knn_auto_threshold: int = KNN_EXACT_BELOW,
        knn_auto_index: IndexKind = "ivf",
        os_similarity: str = SAMPLING.os_similarity,
        knn_target_recall: float = KNN_TARGET_RECALL,
    ) -> None:
        self.eps = eps
        self.k_max = k_max
        self.s_min = s_min
        self.dbscan = dbscan
        self.finch = finch
        self.refiner = refiner
        self.type_weights = type_weights
        self.region_weights = region_weights
        self.pair_weights = pair_weights
        self.use_knn_candidates = use_knn_candidates
        self.jaccard_max_distance = jaccard_max_distance
        self.knn_index = knn_index
        self.knn_options = knn_options
        self.knn_auto_threshold = knn_auto_threshold
        self.knn_auto_index = knn_auto_index
        self.os_similarity = os_similarity
        self.knn_target_recall = knn_target_recall
        self._check_params()

    def _check_params(self) -> None:
        super()._check_params()
        reserved = {"index", "k", "X", "target_recall", "exact_below"} & set(
            self.knn_options or {})
        if reserved:
            raise ValueError(f"knn_options must not set {sorted(reserved)}: use knn_index")

    def resolved_knn_index(self, n: int) -> IndexKind:
        """The index ``knn_index`` means for a collection of n items."""
        if self.knn_index != "auto":
            return self.knn_index
        return "flat" if n < self.knn_auto_threshold else self.knn_auto_index

    def _knn_request(self, n: int) -> tuple[str, dict[str, Any]]:
        """The index and options the neighbour graph's kNN search is asked for at n items."""
        options = {"target_recall": float(self.knn_target_recall),
                   "exact_below": int(self.knn_auto_threshold), **(self.knn_options or {})}
        if self.knn_index == "auto" and self.knn_auto_index == "ivf":
            return "auto", options
        return self.resolved_knn_index(n), options

    def resolved_jaccard_max_distance(self) -> float:
        """The Jaccard cut ``jaccard_max_distance`` means (see the class docstring)."""
        if self.jaccard_max_distance != "auto":
            return float(self.jaccard_max_distance)
        db_eps = float(getattr(self._dbscan(), "eps", 0.0))
        return min(1.0, max(db_eps, 1.0 - float(self.s_min)))

    def neighbour_graph(
        self, X: np.ndarray, timings: dict[str, float] | None = None,
        reports: dict[str, Any] | None = None, *, k1: int | None = None,
        k2: int | None = None, max_distance: float | None = None,
    ) -> tuple[tuple[np.ndarray, np.ndarray], sp.csr_matrix, bool]:
        """(kNN result, Jaccard matrix, was cached) of ``X`` as this sampler builds them.

        ``reports``, when given, receives the kNN search's KNNReport under "knn" (the index
        used and the recall measured).

        One kNN search (self in column 0, k clipped to n) serves Jaccard, FINCH and U_us;
        both come from the process-wide cache, so whatever else clusters the same vectors
        with the same parameters (the identities of a collection) reuses this cycle's work
        and sees exactly the clusters the sampler saw.

        ``k1`` / ``k2`` / ``max_distance`` default to this sampler's (its DBSCAN's k1 and
        k2, :meth:`resolved_jaccard_max_distance`); the clustering calibration
        (reidal.core.calibration) asks for the graph of the k1 / k2 it is about to choose,
        at its own wider cut, before this cycle's sampler exists: same kNN settings, so
        the sampler then gets that very graph (the cache serves a narrower cut from it).
        """
        dbscan = self._dbscan()
        if max_distance is None:
            db_eps = float(getattr(dbscan, "eps", 0.0))
            max_distance = self.resolved_jaccard_max_distance()
            if max_distance < db_eps:
                raise ValueError(
                    f"jaccard_max_distance {max_distance} is below DBSCAN's eps "
                    f"{db_eps}: DBSCAN would lose neighbours"
                )
        index, options = self._knn_request(X.shape[0])
        knn_result, D, cached, report = _NEIGHBOUR_GRAPHS.get_or_build(
            X, k1=int(k1 if k1 is not None else getattr(dbscan, "k1", CLUSTERING.k1)),
            k2=int(k2 if k2 is not None else getattr(dbscan, "k2", CLUSTERING.k2)),
            index=index, options=options, max_distance=max_distance,
            timings=timings if timings is not None else {},
        )
        if reports is not None:
            reports["knn"] = report
        return knn_result, D, cached

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
        reports: dict[str, Any] = {}
        knn_result, D, cached = self.neighbour_graph(X, timings, reports)
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
        result.stats["knn_index"] = reports["knn"].index
        result.stats["knn"] = reports["knn"].as_stats()
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
        pool_os = oversegmentation_pool(medoids, D, k_max=int(self.k_max),
                                        s_min=float(self.s_min),
                                        similarity=self.os_similarity, X=X)
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
            eps=float(self.eps),
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


__all__ = [
    "REASON_AGREE", "TYPE_NAMES", "AmbiguityAwareSampler", "NeighbourGraphCache", "PairPool",
    "PairWeights", "RegionPairs", "RegionWeights", "TypeWeights", "disagreement_sizes",
    "mixture_probabilities", "oversegmentation_pool", "region_medoids", "region_pairs",
    "regions_of_uncertainty", "undersegmentation_pool",
]
