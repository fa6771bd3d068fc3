"""Each epoch's pseudo-labels: DBSCAN on Jaccard, made consistent with the answers (NP3), then
SpCL's self-paced reliability filter.

SpCL clusters the memory features three times on one k-reciprocal Jaccard distance: at eps
(the labels), at eps - gap (tight) and at eps + gap (loose). For every item it measures

* R_comp = 1 - IoU(its cluster, its tight cluster): a compact cluster does not split when
  eps shrinks;
* R_indep = 1 - IoU(its cluster, its loose cluster): an independent cluster does not absorb
  neighbours when eps grows.

(Outliers count as clusters of one.) A cluster's scores are the minima over its members. A
cluster is kept when its R_indep is at most the threshold fixed at the first epoch, the
``reliability_percentile`` quantile (SpCL 0.9) of the multi-image clusters' R_indep; inside a
kept cluster, only the members whose R_comp equals the cluster's minimum stay (the
members of the tight sub-cluster that overlaps it most). Every other item becomes an
un-clustered instance, a class of its own in the hybrid memory. All of it is computed from
contingency counts (no n x n label matrices as in SpCL's code).

NP3 (OURS, where the method leaves the order open): the answers refine all three
clusterings before the reliability scores are computed, so a merge or split the annotator
asked for is not itself read as unreliability; the filtered labels are refined once more,
which puts items the filter dissolved back with the items an answer ties them to (the filter
only splits, so cannot-links stay satisfied). Every answer so far thus holds in the labels
the memory trains on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reidal.core.clustering import DBSCANJaccard
from reidal.core.constraints import ConstraintSet
from reidal.core.neighbors import jaccard_distance
from reidal.core.np3 import NP3
from reidal.core.params import CLUSTERING, ParamsMixin
from reidal.core.validation import Interval, OneOf, check_embeddings


def compact_with_singletons(labels: np.ndarray) -> np.ndarray:
    """Clusters 0..C-1 (ascending old id), then every -1 its own label C, C+1, ... in item order.

    SpCL's ``generate_pseudo_labels``: the label space of the hybrid memory.
    """
    lab = np.asarray(labels, dtype=np.int64)
    out = np.empty_like(lab)
    inl = lab >= 0
    uniq, inv = np.unique(lab[inl], return_inverse=True)
    out[inl] = inv.reshape(-1)
    out[~inl] = uniq.size + np.arange(int((~inl).sum()))
    return out


def _one_minus_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per item: 1 - IoU of its cluster in compact labelling ``a`` and in ``b``."""
    size_a = np.bincount(a)
    size_b = np.bincount(b)
    _, joint_id, joint = np.unique(a * (int(b.max()) + 1) + b, return_inverse=True,
                                   return_counts=True)
    inter = joint[joint_id.reshape(-1)].astype(np.float64)
    union = size_a[a] + size_b[b] - inter
    return 1.0 - inter / union


def _group_min(values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    out = np.full(n_groups, np.inf)
    np.minimum.at(out, groups, values)
    return out


@dataclass(frozen=True)
class Reliability:
    """What the self-paced filter kept: labels (-1 = un-clustered) and the scores."""

    labels: np.ndarray  # filtered labels, -1 for every dissolved or un-clustered item
    r_comp: np.ndarray  # per item
    r_indep: np.ndarray  # per item
    indep_threshold: float | None  # None: no multi-image cluster yet to set one from


def reliability_filter(labels: np.ndarray, tight: np.ndarray, loose: np.ndarray, *,
                       indep_threshold: float | None, percentile: float) -> Reliability:
    """SpCL's independence + compactness criterion (see the module docstring).

    ``indep_threshold`` None: set it from these clusters (SpCL does so at epoch 0 only).
    """
    lab = compact_with_singletons(labels)
    r_comp = _one_minus_iou(lab, compact_with_singletons(tight))
    r_indep = _one_minus_iou(lab, compact_with_singletons(loose))
    n_lab = int(lab.max()) + 1
    c_comp = _group_min(r_comp, lab, n_lab)
    c_indep = _group_min(r_indep, lab, n_lab)
    multi = np.bincount(lab, minlength=n_lab) > 1
    if indep_threshold is None and multi.any():
        ref = np.sort(c_indep[multi])
        indep_threshold = float(ref[min(ref.size - 1, int(np.round(ref.size * percentile)))])
    keep = np.asarray(labels) >= 0
    if indep_threshold is not None:
        keep &= c_indep[lab] <= indep_threshold
    keep &= r_comp <= c_comp[lab]
    out = np.where(keep, np.asarray(labels, dtype=np.int64), -1)
    return Reliability(out, r_comp, r_indep, indep_threshold)


@dataclass(frozen=True)
class PseudoLabels:
    """One epoch's pseudo-labels."""

    clustered: np.ndarray  # DBSCAN at eps refined by NP3 (-1 = outlier): the reported labels
    train: np.ndarray  # compact labels the memory trains on (0..L-1, singletons included)
    n_clusters: int  # training classes of two or more items
    n_unclustered: int  # training classes of one item
    n_np3_changed: int  # labels NP3 changed in the eps clustering
    indep_threshold: float | None


class SpCLPseudoLabeler(ParamsMixin):
    """DBSCAN x 3 on one Jaccard matrix -> NP3 -> reliability filter -> NP3 -> compact labels.

    eps, min_samples, k1, k2: the DBSCAN (defaults: reidal.core.params); eps_gap: the tight
    and loose re-clusterings use eps -/+ it; reliability_percentile, self_paced: SpCL's
    reliability filter (see TrainConfig); refiner: the constraint refinement (NP3()).
    """

    _constraints = {"eps_gap": Interval(0.0, None),
                    "reliability_percentile": Interval(0.0, 1.0),
                    "self_paced": OneOf((True, False))}

    def __init__(self, *, eps: float = CLUSTERING.dbscan_eps, eps_gap: float = 0.02,
                 min_samples: int = CLUSTERING.min_samples, k1: int = CLUSTERING.k1,
                 k2: int = CLUSTERING.k2, reliability_percentile: float = 0.9,
                 self_paced: bool = True, refiner: NP3 | None = None) -> None:
        self.eps = eps
        self.eps_gap = eps_gap
        self.min_samples = min_samples
        self.k1 = k1
        self.k2 = k2
        self.reliability_percentile = reliability_percentile
        self.self_paced = self_paced
        self.refiner = refiner
        self._check_params()

    def _check_params(self) -> None:
        super()._check_params()
        eps, gap = self.eps, self.eps_gap
        if not 0.0 <= gap < eps < 1.0 or eps + gap >= 1.0:
            raise ValueError(f"need 0 <= eps_gap < eps and eps + eps_gap < 1, got eps={eps}, "
                             f"eps_gap={gap}")
        self._dbscan(0.0)  # DBSCANJaccard checks min_samples, k1, k2

    def _dbscan(self, shift: float) -> DBSCANJaccard:
        return DBSCANJaccard(eps=self.eps + shift, min_samples=self.min_samples, k1=self.k1,
                             k2=self.k2)

    @property
    def dbscan(self) -> DBSCANJaccard:
        """The clustering at eps (the one the labels come from)."""
        return self._dbscan(0.0)

    def refinement(self) -> NP3:
        """The constraint refinement: ``refiner``, NP3() when None (built once)."""
        if self.refiner is None:
            self.refiner = NP3()
        return self.refiner

    def __call__(self, X: np.ndarray, constraints: ConstraintSet | None,
                 indep_threshold: float | None = None) -> PseudoLabels:
        X = check_embeddings(X, min_rows=2)
        eps, gap = float(self.eps), float(self.eps_gap)
        D = jaccard_distance(X, k1=int(self.k1), k2=int(self.k2), max_distance=eps + gap)
        has_answers = constraints is not None and len(constraints) > 0
        refiner = self.refinement()

        def cluster(dbscan: DBSCANJaccard) -> tuple[np.ndarray, int]:
            labels = dbscan(X, distance=D)
            if not has_answers:
                return labels, 0
            res = refiner(labels, X, constraints)
            return res.labels, res.n_changed

        labels, changed = cluster(self.dbscan)
        train = labels
        if self.self_paced:
            tight = cluster(self._dbscan(-gap))[0] if gap > 0 else labels
            loose = cluster(self._dbscan(gap))[0]
            rel = reliability_filter(labels, tight, loose, indep_threshold=indep_threshold,
                                     percentile=float(self.reliability_percentile))
            train, indep_threshold = rel.labels, rel.indep_threshold
            if has_answers:
                train = refiner(train, X, constraints).labels
        compact = compact_with_singletons(train)
        sizes = np.bincount(compact)
        return PseudoLabels(
            clustered=labels,
            train=compact,
            n_clusters=int(np.sum(sizes > 1)),
            n_unclustered=int(np.sum(sizes == 1)),
            n_np3_changed=int(changed),
            indep_threshold=indep_threshold,
        )


def fixed_pseudo_labels(labels: np.ndarray) -> PseudoLabels:
    """Given labels as one epoch's pseudo-labels (-1 = an instance of its own): what the
    supervised skyline trains on in place of the clustering."""
    lab = np.asarray(labels, dtype=np.int64)
    compact = compact_with_singletons(lab)
    sizes = np.bincount(compact)
    return PseudoLabels(clustered=lab, train=compact, n_clusters=int(np.sum(sizes > 1)),
                        n_unclustered=int(np.sum(sizes == 1)), n_np3_changed=0,
                        indep_threshold=None)
