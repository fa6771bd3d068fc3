"""One question round: draw a batch with a sampler, ask an annotator, record the answers.

The step every active-learning loop repeats, whoever answers: the simulation package's loop
on fixed embeddings (a simulated oracle) and the trainer (whose embeddings move between
cycles) both call :func:`ask_and_record`, so sampling, asking and recording exist once and
outside the simulation helpers that production code must not depend on.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from reidal.core.constraints import Answer, ConstraintSet
from reidal.core.sampling import Sampler, SampleResult

Oracle = Callable[[np.ndarray], np.ndarray]


def next_answer_id(constraints: ConstraintSet) -> int:
    """The id the next answer gets: one above every answer so far (ids order answers in time)."""
    return max((a.answer_id for a in constraints.answers), default=-1) + 1


def ask_and_record(
    sampler: Sampler,
    X: np.ndarray,
    constraints: ConstraintSet,
    budget: int,
    oracle: Oracle,
    *,
    seed: int,
) -> tuple[SampleResult, np.ndarray]:
    """One question round: draw a batch with ``sampler``, ask ``oracle``, add the answers.

    Answers get increasing ids after every answer already in ``constraints``, in the order
    the batch lists them. The sampler never proposes a pair already answered or implied, so
    nothing is asked twice. Returns the batch and its pairs as an int64 (m, 2) array. Shared
    by :class:`reidal.simulation.loop.ActiveLearningLoop` (fixed embeddings) and the trainer
    (embeddings that move between cycles), so the sample-ask-record step exists once.
    """
    batch = sampler.sample(X, constraints, budget, seed=seed)
    pairs = batch.as_array()
    if len(pairs):
        same = np.asarray(oracle(pairs), dtype=bool).reshape(-1)
        if same.shape[0] != len(pairs):
            raise ValueError(
                f"the oracle returned {same.shape[0]} answers for {len(pairs)} pairs"
            )
        next_id = next_answer_id(constraints)
        for k, ((i, j), s) in enumerate(zip(pairs.tolist(), same.tolist(), strict=True)):
            constraints.add(Answer(i, j, bool(s), next_id + k))
    return batch, pairs
