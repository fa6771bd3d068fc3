"""AAS with a continuation (OURS, issue 13): the allowance AAS leaves unused goes to the most
ambiguous remaining pairs.

The paper's AAS asks only about pairs where its two clusterings disagree; once they agree
(after a cycle or two, or at once on weak features where both make the same mistakes) its
pools run dry and the rest of the cycle's allowance lapses. A person who set aside time
for N questions gets fewer, and the clustering keeps the mistakes both clusterings share.

:class:`AASContinuation` first asks exactly what AAS asks (the same sampler object, same
seed: the paper's pairs, unchanged), then, when AAS returned fewer pairs than the budget,
fills the rest with the kNN-graph pairs whose k-reciprocal Jaccard distance lies closest to
DBSCAN's eps (:class:`reidal.core.baselines.UncertaintySampler` on AAS's own DBSCAN
parameters, so with a calibrated eps, reidal.core.calibration, the boundary moves with the
answers): the pairs whose answer decides whether DBSCAN links two neighbourhoods, where
either answer changes the clustering. Pairs already answered, implied by the answers,
excluded or in AAS's part are never asked. The continuation reads AAS's neighbour graph (the
cycle's one kNN search: exact below 10k items, the recall-calibrated IVF above), with the
Jaccard matrix uncut, since it ranks every kNN edge by its distance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from reidal.core.aas import AmbiguityAwareSampler
from reidal.core.baselines import UncertaintySampler
from reidal.core.params import ParamsMixin
from reidal.core.sampling import (
    SampleResult,
    batch_reason,
    check_sample_inputs,
)
from reidal.core.validation import Interval, OneOf

if TYPE_CHECKING:  # pragma: no cover - typing only
    from reidal.core.constraints import ConstraintSet

class AASContinuation(ParamsMixin):
    """AAS, then the most ambiguous remaining pairs up to the budget (module docstring).

    ``aas``: the AmbiguityAwareSampler whose pairs come first (its DBSCAN's eps, k1, k2
    define the boundary the continuation asks about). ``k``: kNN edges per item the
    continuation considers (default: the DBSCAN's k1, UncertaintySampler's default).
    """

    _constraints = {"k": (OneOf((None,)), Interval(2, None, integer=True))}

    def __init__(self, aas: AmbiguityAwareSampler | None = None, k: int | None = None) -> None:
        self.aas = aas
        self.k = k
        self._check_params()

    def _aas(self) -> AmbiguityAwareSampler:
        if self.aas is None:  # built lazily, as AmbiguityAwareSampler builds its clusterings
            self.aas = AmbiguityAwareSampler()
        return self.aas

    def continuation(self) -> UncertaintySampler:
        """The boundary sampler on AAS's DBSCAN parameters."""
        db: Any = self._aas()._dbscan()
        return UncertaintySampler(eps=float(db.eps), k1=int(db.k1), k2=int(db.k2), k=self.k)

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
        first = self._aas().sample(X, constraints, n_budget, seed=seed, exclude_pairs=excl)
        rest = n_budget - len(first.pairs)
        stats = dict(first.stats)
        stats["aas_pairs"] = len(first.pairs)
        stats["aas_reason"] = first.reason
        if rest <= 0:
            stats["continuation_pairs"] = 0
            return SampleResult(first.pairs, n_budget, first.reason, stats)
        taken = first.as_array()
        # AAS's graph (same k1 / k2), uncut: the margins |d - eps| of every kNN edge as the
        # continuation alone would compute them, but from the cycle's one kNN search (the
        # cache recomputes only the Jaccard when it held a narrower cut).
        knn_result, D, _ = self._aas().neighbour_graph(X, max_distance=1.0)
        more = self.continuation().sample(
            X, constraints, rest, seed=seed,
            exclude_pairs=np.concatenate([excl, taken]) if len(taken) else excl,
            graph=(knn_result, D))
        pairs = first.pairs + more.pairs
        stats["continuation_pairs"] = len(more.pairs)
        stats["continuation_candidates"] = more.stats.get("n_candidates", 0)
        # AAS's own reason while the continuation adds nothing (every reason code stays
        # one the callers know); stats say how the batch was made.
        reason = batch_reason(len(pairs), len(pairs), n_budget, first.reason) if more.pairs \
            else first.reason
        return SampleResult(pairs, n_budget, reason, stats)
