"""The active-learning loop on fixed embeddings: sample, ask, refine, measure.

One cycle = draw a batch of pairs with a sampler, get the answers (a simulated oracle or a
person), add them to the constraint set, and refine the density clustering with NP3. The
demo and the closed-loop tests run this one loop; the trainer (which also changes the
embeddings between cycles) shares its question round, :func:`reidal.core.questions.ask_and_record`,
which lives in the core because production code runs it too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from reidal.core.clustering import DBSCANJaccard
from reidal.core.constraints import ConstraintSet
from reidal.core.evaluation import clustering_quality
from reidal.core.np3 import NP3
from reidal.core.params import SAMPLING
from reidal.core.questions import Oracle, ask_and_record, next_answer_id
from reidal.core.sampling import Sampler
from reidal.core.validation import check_embeddings, check_labels, resolve_budget, total_pairs

__all__ = ["ActiveLearningLoop", "CycleReport", "LoopResult", "Oracle", "ask_and_record",
           "next_answer_id"]


@dataclass
class CycleReport:
    """What one active-learning cycle did, in the units a person reads."""

    cycle: int
    pairs_asked: int
    budget: int  # pairs allowed this cycle
    cumulative_pairs: int
    cumulative_budget_pct: float  # cumulative pairs asked, in % of all n(n-1)/2 pairs
    contradictions: int  # answers not applied so far because they contradict newer ones
    reason: str  # why the batch had the size it had
    n_clusters: int
    n_changed_by_np3: int
    seconds: float
    quality: dict[str, float] = field(default_factory=dict)  # vs ground truth, when known
    stats: dict[str, Any] = field(default_factory=dict)  # the sampler's own counts
    pairs: np.ndarray = field(default_factory=lambda: np.empty((0, 2), np.int64))  # asked


@dataclass
class LoopResult:
    """Every cycle's report, plus the state the loop ends in and the state it started from."""

    reports: list[CycleReport]
    constraints: ConstraintSet
    labels: np.ndarray  # NP3-refined pseudo-labels after the last cycle
    initial_labels: np.ndarray  # the clustering before any answer of this run
    initial_quality: dict[str, float]  # its quality vs ground truth, when known


class ActiveLearningLoop:
    """Run ``cycles`` rounds of sampling + answering + NP3 refinement on embeddings ``X``.

    ``clustering`` gives the pseudo-labels to refine (DBSCAN on Jaccard distance by default,
    as in SpCL); ``refiner`` is NP3 by default. ``budget_per_cycle`` is a pair count or a
    fraction of all pairs (paper: 0.0002 = 0.02 % per cycle, 5 cycles).
    """

    def __init__(
        self,
        sampler: Sampler,
        *,
        clustering: Callable[[np.ndarray], np.ndarray] | None = None,
        refiner: Any = None,
        budget_per_cycle: int | float = SAMPLING.default_budget["fraction"],
        cycles: int = 5,
        seed: int = 0,
    ) -> None:
        if int(cycles) < 1:
            raise ValueError(f"cycles must be >= 1, got {cycles}")
        self.sampler = sampler
        self.clustering = clustering
        self.refiner = refiner
        self.budget_per_cycle = budget_per_cycle
        self.cycles = int(cycles)
        self.seed = int(seed)

    def _defaults(self) -> tuple[Callable[[np.ndarray], np.ndarray], Any]:
        return self.clustering or DBSCANJaccard(), self.refiner or NP3()

    def run(
        self,
        X: np.ndarray,
        oracle: Oracle,
        *,
        true_labels: np.ndarray | None = None,
        constraints: ConstraintSet | None = None,
        on_start: Callable[[dict[str, float]], None] | None = None,
        on_cycle: Callable[[CycleReport], None] | None = None,
    ) -> LoopResult:
        """Run every cycle. ``on_start`` sees the initial clustering's quality (empty without
        ground truth) before the first cycle; ``on_cycle`` each report as its cycle ends."""
        X = check_embeddings(X, min_rows=2)
        n = X.shape[0]
        truth = None if true_labels is None else check_labels(true_labels, n, name="true_labels")
        budget = resolve_budget(self.budget_per_cycle, n)
        clustering, refiner = self._defaults()
        cs = constraints if constraints is not None else ConstraintSet(n)
        base_labels = np.asarray(clustering(X), dtype=np.int64)
        labels = base_labels
        initial_quality = clustering_quality(base_labels, truth) if truth is not None else {}
        if on_start is not None:
            on_start(initial_quality)
        reports: list[CycleReport] = []
        asked = 0
        for cycle in range(1, self.cycles + 1):
            t0 = time.perf_counter()
            batch, pairs = ask_and_record(self.sampler, X, cs, budget, oracle,
                                          seed=self.seed + cycle)
            asked += len(pairs)
            refined = refiner(base_labels, X, cs)
            labels = refined.labels
            report = CycleReport(
                cycle=cycle,
                pairs_asked=len(pairs),
                budget=budget,
                cumulative_pairs=asked,
                cumulative_budget_pct=100.0 * asked / max(total_pairs(n), 1),
                contradictions=len(cs.contradictions),
                reason=batch.reason,
                n_clusters=int(np.unique(labels[labels >= 0]).size),
                n_changed_by_np3=int(refined.n_changed),
                seconds=time.perf_counter() - t0,
                quality=clustering_quality(labels, truth) if truth is not None else {},
                stats=batch.stats,
                pairs=pairs,
            )
            reports.append(report)
            if on_cycle is not None:
                on_cycle(report)
        return LoopResult(reports, cs, labels, base_labels, initial_quality)
