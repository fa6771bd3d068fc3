"""A simulated annotator for experiments: answers "same individual?" from ground truth.

Real annotators make mistakes, so the oracle can flip each answer independently with
probability ``error_rate``; that lets benchmarks measure how robust AAS + NP3 are to noisy
constraints. It never answers "unsure".
"""

from __future__ import annotations

import numpy as np

from reidal.core.validation import check_pairs

#: Above 0.5 a "noisy" oracle is an inverted oracle, which no experiment means to model.
MAX_ERROR_RATE = 0.5


class SimulatedOracle:
    """Answers pair questions from ``true_labels`` (any identity values, one per image).

    ``oracle(pairs)`` returns a bool per pair (True = same individual, a must-link). Each
    answer is flipped with probability ``error_rate`` using a generator seeded by ``seed``,
    so the same sequence of calls yields the same answers. ``n_asked`` and ``n_flipped``
    count every pair asked and every answer flipped over the oracle's life.
    """

    def __init__(self, true_labels: object, error_rate: float = 0.0, seed: int = 0) -> None:
        labels = np.asarray(true_labels)
        if labels.ndim != 1 or labels.size == 0:
            raise ValueError(f"true_labels must be a non-empty 1-D array, got shape {labels.shape}")
        rate = float(error_rate)
        if not np.isfinite(rate) or not 0.0 <= rate <= MAX_ERROR_RATE:
            raise ValueError(f"error_rate must be in [0, {MAX_ERROR_RATE}], got {error_rate}")
        _, codes = np.unique(labels, return_inverse=True)
        self._codes = codes.reshape(-1).astype(np.int64)
        self.error_rate = rate
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self.n_asked = 0
        self.n_flipped = 0

    @property
    def n(self) -> int:
        """Number of images the oracle knows."""
        return int(self._codes.size)

    def truth(self, pairs: object) -> np.ndarray:
        """The noise-free answers (for measuring how many wrong answers a run received)."""
        p = check_pairs(pairs, self.n)
        return self._codes[p[:, 0]] == self._codes[p[:, 1]]

    def __call__(self, pairs: object) -> np.ndarray:
        p = check_pairs(pairs, self.n)
        answers = self._codes[p[:, 0]] == self._codes[p[:, 1]]
        # Draw even at error_rate 0 so the stream of draws depends only on the call sequence.
        flips = self._rng.random(p.shape[0]) < self.error_rate
        self.n_asked += int(p.shape[0])
        self.n_flipped += int(flips.sum())
        return answers ^ flips
