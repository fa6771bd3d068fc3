"""Clustering parameters chosen from the data and re-chosen from the answers (OURS, issue 13).

SpCL's DBSCAN eps 0.6 / k1 30 / min_samples 4 were set for person re-ID sets of ~13k
images whose features already separate identities; on a new species the same numbers
split or merge everything (the k-reciprocal Jaccard distances of weak features sit in
another range). Here the parameters follow the embedding they are given:

- ``k1`` grows with the collection: ``round(k1_scale * sqrt(n))`` clipped to
  [``k1_min``, ``k1_max``] (SpCL's 30 is reached at n ~ 14k with the default scale 0.25);
  ``k2 = max(2, round(k1 / 5))`` (SpCL's 30 / 6); ``min_samples = max(2, round(k1 / 7))``
  (SpCL's 4 at k1 30, 2 for small collections where an identity may have few images).
- ``eps`` by the rho rule of MMT / SSG (Ge et al. ICLR 2020, Fu et al. ICCV 2019): the mean
  of the smallest ``rho`` fraction of all pairwise (re-ranked) distances, rho = 1.6e-3.
- Once the annotator has given at least ``min_answers`` SAME and ``min_answers``
  DIFFERENT answers, every answer is a labelled distance: eps is the threshold on the
  Jaccard distance that best separates SAME from DIFFERENT pairs (the lowest balanced
  error, "same" when d <= eps; ties: the middle of the best interval), clipped to
  [``eps_min``, ``eps_max``].
- FINCH's level: the level whose partition agrees best with the answers (balanced: SAME
  pairs together and DIFFERENT pairs apart); level 0 (the paper) before enough answers.

An explicit value for any parameter wins (``fixed``): a user's override is never replaced.
The chosen values and where each came from are returned, so every cycle can record them.
Vectorised: one sparse Jaccard matrix, sorted once; no per-pair Python loop.

The neighbour graph (kNN search and k-reciprocal Jaccard matrix) is the cycle's sampler's,
not a second one: :meth:`ClusteringCalibrator.choose` asks the sampler
(:meth:`reidal.core.aas.AmbiguityAwareSampler.neighbour_graph`) for the graph of the k1 / k2
it chooses, through the process-wide cache, so the sampler that then clusters with the
choice reuses it: one kNN search and one Jaccard computation per cycle, exact below
KNN_EXACT_BELOW items and a recall-calibrated inverted file above (nothing quadratic in
n). The calibration reads the Jaccard matrix up to ``jaccard_cut`` (see the class).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from reidal.core.aas import AmbiguityAwareSampler
from reidal.core.clustering import finch_levels
from reidal.core.neighbors import KNN_EXACT_BELOW
from reidal.core.params import MAX_FINCH_LEVEL, ParamsMixin
from reidal.core.sampling import sparse_lookup
from reidal.core.validation import InstanceOf, Interval, check_embeddings

#: Parameters a calibration chooses (and a user may fix).
PARAMETERS = ("eps", "k1", "k2", "min_samples", "finch_level")


@dataclass(frozen=True)
class ClusteringChoice:
    """The parameters one cycle clusters with, and where each came from.

    ``eps_source``: "user" (fixed), "rho" (the rho rule) or "answers" (separates the
    answered pairs); ``finch_source``: "user", "default" (level 0) or "answers".
    ``n_same`` / ``n_different``: the answered pairs the choice saw.
    """

    eps: float
    k1: int
    k2: int
    min_samples: int
    finch_level: int
    eps_source: str
    finch_source: str
    n_same: int = 0
    n_different: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ClusteringCalibrator(ParamsMixin):
    """Chooses DBSCAN's eps / k1 / k2 / min_samples and FINCH's level (module docstring).

    OURS parameters (docs/method.md): ``rho`` (1.6e-3, MMT/SSG), ``k1_scale`` (0.25),
    ``k1_min`` (5), ``k1_max`` (30), ``min_answers`` (10 of each kind), ``eps_min`` (0.2),
    ``eps_max`` (0.9: DBSCAN on a Jaccard distance needs eps < 1, and the reliability
    filter's loose clustering eps + gap too). ``fixed``: parameter -> value, kept as given.

    ``full_jaccard_below`` (OURS, KNN_EXACT_BELOW = 10k, where the sampler's kNN graph is
    exact too): below this many items the calibration reads every overlapping pair of the
    Jaccard matrix (cut 1.0), so its choice is exactly the full matrix's; the sampler's
    narrower cut is taken from that matrix. From there on it reads the matrix cut at
    max(eps_max, 1 - s_min, a fixed eps), the widest distance the cycle compares against
    anything (the full matrix holds thousands of entries a row at 100k, nearly all above
    0.9: GiBs). Beyond the cut a pair counts as distance 1, as pairs that share no
    encoding always do: an answered pair there reads 1 (it is farther than any eps the
    calibration may choose either way), and the rho rule is exact as long as the cut
    holds the rho fraction of pairs, else it over-estimates by at most 1 - cut per pair
    it lacks (at 100k the rho fraction is 8e6 pairs, and most of them are at 1 anyway).
    """

    _constraints = {"rho": Interval(0.0, 1.0, closed="neither"),
                    "k1_scale": Interval(0.0, None, closed="neither"),
                    "k1_min": Interval(1, None, integer=True),
                    "k1_max": Interval(1, None, integer=True),
                    "min_answers": Interval(1, None, integer=True),
                    "eps_min": Interval(0.0, 1.0, closed="neither"),
                    "eps_max": Interval(0.0, 1.0, closed="neither"),
                    "full_jaccard_below": Interval(0, None, integer=True),
                    "fixed": InstanceOf(dict, "a dict")}

    rho: float = 1.6e-3
    k1_scale: float = 0.25
    k1_min: int = 5
    k1_max: int = 30
    min_answers: int = 10
    eps_min: float = 0.2
    eps_max: float = 0.9
    full_jaccard_below: int = KNN_EXACT_BELOW
    fixed: dict[str, float | int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_params()

    def _check_params(self) -> None:
        super()._check_params()
        if not self.k1_min <= self.k1_max:
            raise ValueError(f"need 1 <= k1_min <= k1_max, got {self.k1_min}, {self.k1_max}")
        if not self.eps_min <= self.eps_max:
            raise ValueError(f"need 0 < eps_min <= eps_max < 1, got {self.eps_min}, "
                             f"{self.eps_max}")
        unknown = set(self.fixed) - set(PARAMETERS)
        if unknown:
            raise ValueError(f"unknown clustering parameter(s) to fix: {sorted(unknown)}; "
                             f"known: {', '.join(PARAMETERS)}")

    def sizes(self, n: int) -> tuple[int, int, int]:
        """(k1, k2, min_samples) for a collection of ``n`` items, fixed values kept."""
        f = self.fixed
        k1 = int(f.get("k1", min(self.k1_max, max(self.k1_min,
                                                  round(self.k1_scale * math.sqrt(n))))))
        k2 = int(f.get("k2", max(2, round(k1 / 5))))
        min_samples = int(f.get("min_samples", max(2, round(k1 / 7))))
        return k1, k2, min_samples

    def jaccard_cut(self, n: int, graph: AmbiguityAwareSampler) -> float:
        """The widest Jaccard distance the calibration reads at n items (the class
        docstring): 1.0 below ``full_jaccard_below``, else max(eps_max, 1 - the sampler's
        s_min, a fixed eps), never narrower than the cycle's sampler will cut."""
        if n < self.full_jaccard_below:
            return 1.0
        return min(1.0, max(self.eps_max, 1.0 - float(graph.s_min),
                            float(self.fixed.get("eps", 0.0))))

    def choose(self, X: object, constraints: Any = None,
               graph: AmbiguityAwareSampler | None = None,
               timings: dict[str, float] | None = None) -> ClusteringChoice:
        """The parameters for clustering ``X`` (rows = items) given the answers so far
        (a :class:`reidal.core.constraints.ConstraintSet` or None).

        ``graph``: the sampler whose neighbour graph (kNN settings) the cycle uses (a
        collection's AAS, whatever its clustering parameters); default the sampler's
        defaults, which every sampler a collection or the trainer builds has. The graph
        comes from the process-wide cache, where that sampler finds it again.
        ``timings``, when given, receives the seconds of the graph's "knn" and "jaccard"
        (0 when cached) and of the "finch_levels" the level choice computed.
        """
        timings = timings if timings is not None else {}
        X = check_embeddings(X, min_rows=2)
        n = X.shape[0]
        k1, k2, min_samples = self.sizes(n)
        pairs, same = answered_pairs(constraints)
        n_same, n_diff = int(same.sum()), int((~same).sum())
        enough = n_same >= self.min_answers and n_diff >= self.min_answers
        f = self.fixed
        knn_result = D = None
        if "eps" not in f or ("finch_level" not in f and enough):
            graph = graph if graph is not None else AmbiguityAwareSampler()
            knn_result, D, _ = graph.neighbour_graph(
                X, timings, k1=k1, k2=k2, max_distance=self.jaccard_cut(n, graph))
        if "eps" in f:
            eps, eps_source = float(f["eps"]), "user"
        else:
            if enough:
                d = sparse_lookup(D, pairs[:, 0], pairs[:, 1], default=1.0)
                eps, eps_source = separating_threshold(d, same), "answers"
            else:
                eps, eps_source = rho_eps(D, self.rho), "rho"
            eps = float(np.clip(eps, self.eps_min, self.eps_max))
        if "finch_level" in f:
            level, finch_source = int(f["finch_level"]), "user"
        elif enough:
            t = time.perf_counter()
            level = best_finch_level(X, pairs, same, knn_result=knn_result)
            finch_source = "answers"
            timings["finch_levels"] = time.perf_counter() - t
        else:
            level, finch_source = 0, "default"
        return ClusteringChoice(eps=eps, k1=k1, k2=k2, min_samples=min_samples,
                                finch_level=level, eps_source=eps_source,
                                finch_source=finch_source, n_same=n_same, n_different=n_diff)


def answered_pairs(constraints: Any) -> tuple[np.ndarray, np.ndarray]:
    """The applied answers as ((m, 2) int64 pairs, (m,) bool SAME); empty without answers."""
    if constraints is None or len(constraints) == 0:
        return np.empty((0, 2), dtype=np.int64), np.empty(0, dtype=bool)
    ml, cl = constraints.ml_pairs(), constraints.cl_pairs()
    pairs = np.concatenate([ml, cl]).astype(np.int64).reshape(-1, 2)
    same = np.concatenate([np.ones(len(ml), dtype=bool), np.zeros(len(cl), dtype=bool)])
    return pairs, same


def rho_eps(D: sp.spmatrix, rho: float) -> float:
    """MMT / SSG's eps: the mean of the smallest ``rho`` fraction of the n(n-1)/2 pairwise
    distances (absent entries of the sparse Jaccard matrix are distance 1; as in their
    code, zero distances are left out and at least one distance is taken)."""
    n = D.shape[0]
    upper = sp.triu(D, k=1).tocsr()
    stored = upper.data[upper.data > 0]
    total = n * (n - 1) // 2 - int(np.sum(upper.data == 0))
    take = max(1, int(round(rho * total)))
    smallest = np.sort(stored)[:take]
    pad = take - smallest.size  # fewer stored pairs than wanted: the rest are at 1
    return float((smallest.sum() + pad * 1.0) / take)


def separating_threshold(d: np.ndarray, same: np.ndarray) -> float:
    """The threshold t ("same" when d <= t) with the lowest balanced error on labelled
    distances ``d``; ties go to the middle of the best interval between distinct values."""
    d = np.asarray(d, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    values = np.unique(d)
    # candidate t: below every value, then each distinct value (t = values[k] admits it)
    same_le = np.searchsorted(np.sort(d[same]), values, side="right")
    diff_le = np.searchsorted(np.sort(d[~same]), values, side="right")
    n_s, n_d = max(int(same.sum()), 1), max(int((~same).sum()), 1)
    err = np.concatenate([[0.5],  # t below everything: every SAME missed
                          0.5 * ((n_s - same_le) / n_s + diff_le / n_d)])
    best = np.flatnonzero(err <= err.min() + 1e-12)
    k = int(best[len(best) // 2])
    lo = values[k - 1] if k >= 1 else 0.0
    hi = values[k] if k < values.size else 1.0
    return float((lo + hi) / 2)


def best_finch_level(X: np.ndarray, pairs: np.ndarray, same: np.ndarray,
                     max_level: int = MAX_FINCH_LEVEL,
                     knn_result: tuple[np.ndarray, np.ndarray] | None = None) -> int:
    """The FINCH level (0..max_level) whose partition agrees best with the answers
    (balanced: the mean of the SAME pairs kept together and the DIFFERENT pairs kept
    apart); the finest among equals. ``knn_result``: the cycle's kNN graph, whose first
    neighbours the sampler's FINCH uses too (exact search of X otherwise); on that shared
    graph the sampler's FINCH then reads these levels instead of computing them again."""
    levels = finch_levels(X, knn_result=knn_result, max_level=max_level)
    scores = []
    for labels in levels:
        together = labels[pairs[:, 0]] == labels[pairs[:, 1]]
        scores.append(0.5 * (together[same].mean() + (~together[~same]).mean()))
    return int(np.argmax(scores))
