"""Shared vocabulary of every pair sampler: the pair type, the batch result, the protocol,
and the few helpers all samplers need (input checks, dropping resolved pairs, weighted draws).

Samplers differ only in which pairs they propose and with what weight; keeping the checks,
the "never re-ask" filter and the draw here means a fix to any of them reaches all samplers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import scipy.sparse as sp

from reidal.core.validation import check_embeddings, check_pairs, resolve_budget

if TYPE_CHECKING:  # pragma: no cover - typing only
    from reidal.core.constraints import ConstraintSet

#: Names a QueryPair's pool may take: the two AAS pools and one per baseline.
POOLS = ("U_os", "U_us", "random", "uncertainty", "nis")


@dataclass(frozen=True)
class QueryPair:
    """One question for the annotator: "are images i and j the same individual?".

    ``pool`` says why it was chosen (AAS: ``U_os`` over-segmentation between region
    medoids, ``U_us`` under-segmentation inside a region; baselines: their own name).
    ``region`` is the AAS region of uncertainty the pair lies in, -1 when the pair spans
    regions (``U_os``) or the sampler has no regions. ``probability`` is the pair's mass in
    the distribution it was drawn from (1.0 for deterministic top-B picks); ``similarity``
    is the similarity the sampler ranked it by (AAS: 1 - k-reciprocal Jaccard distance).
    """

    i: int
    j: int
    pool: str
    region: int
    probability: float
    similarity: float

    def __post_init__(self) -> None:
        if not self.i < self.j:
            raise ValueError(f"QueryPair needs i < j, got ({self.i}, {self.j})")
        if self.pool not in POOLS:
            raise ValueError(f"QueryPair pool must be one of {POOLS}, got {self.pool!r}")


@dataclass
class SampleResult:
    """A batch of pairs plus why it has the size it has.

    ``budget`` is the resolved pair count that was allowed; ``len(pairs) <= budget``.
    ``reason`` is a sentence a person can read (why the batch is small or empty);
    ``stats`` holds counts and per-stage timings in seconds for logs and benchmarks.
    """

    pairs: list[QueryPair]
    budget: int
    reason: str
    stats: dict[str, Any] = field(default_factory=dict)

    def as_array(self) -> np.ndarray:
        """The pairs as an int64 (m, 2) array, the form the oracle and constraints take."""
        if not self.pairs:
            return np.empty((0, 2), dtype=np.int64)
        return np.array([(p.i, p.j) for p in self.pairs], dtype=np.int64)


@runtime_checkable
class Sampler(Protocol):
    """What the sampling service needs from any pair sampler (AAS or a baseline)."""

    def sample(
        self,
        X: np.ndarray,
        constraints: ConstraintSet | None,
        budget: int | float,
        *,
        seed: int = 0,
        exclude_pairs: np.ndarray | None = None,
    ) -> SampleResult: ...


# Reasons shared by several samplers, so callers can compare against a constant.
REASON_FULL = "budget filled"
REASON_SMALL_POOL = "pool smaller than budget"
REASON_ALL_RESOLVED = "every candidate pair is already answered, implied or excluded"


def constraint_size(constraints: object) -> int:
    """Number of items a constraint set was built for (it names the attribute n_items)."""
    for name in ("n_items", "n"):
        value = getattr(constraints, name, None)
        if value is not None:
            return int(value)
    raise ValueError(
        f"constraints must be a reidal ConstraintSet with n_items, got {type(constraints).__name__}"
    )


def check_sample_inputs(
    X: object,
    constraints: object,
    budget: int | float,
    exclude_pairs: object,
    *,
    min_rows: int = 2,
) -> tuple[np.ndarray, int, np.ndarray]:
    """Validate the arguments every ``Sampler.sample`` takes.

    Returns ``(X float32, budget as a pair count, exclude_pairs as int64 (m, 2))``. The
    constraint set must describe exactly the rows of X: an off-by-some set means the ids
    of the caller and of the vectors have drifted apart, and asking on it would be wrong.
    """
    X = check_embeddings(X, min_rows=min_rows)
    n = X.shape[0]
    if constraints is not None:
        size = constraint_size(constraints)
        if size != n:
            raise ValueError(
                f"constraint set is for {size} items but the embeddings have {n} rows"
            )
    b = resolve_budget(budget, n)
    excl = check_pairs(exclude_pairs if exclude_pairs is not None else [], n, name="exclude_pairs")
    return X, b, excl


def canonical_pairs(i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Pairs as an int64 (m, 2) array with the smaller index first."""
    i = np.asarray(i, dtype=np.int64)
    j = np.asarray(j, dtype=np.int64)
    return np.stack([np.minimum(i, j), np.maximum(i, j)], axis=1)


def pair_keys(pairs: np.ndarray, n: int) -> np.ndarray:
    """One int64 key per unordered pair (min * n + max), for set operations with np.isin."""
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    lo = np.minimum(pairs[:, 0], pairs[:, 1])
    hi = np.maximum(pairs[:, 0], pairs[:, 1])
    return lo * np.int64(n) + hi


def unresolved_mask(
    pairs: np.ndarray,
    n: int,
    constraints: ConstraintSet | None,
    exclude_pairs: np.ndarray | None = None,
) -> np.ndarray:
    """True for each pair that may still be asked.

    A pair may not be asked when it was answered, when its answer follows from the answers
    (``constraints.implied_many`` knows ML closure and CL between ML groups), or when the
    caller excluded it (e.g. answered "unsure"). One vectorised pass, no Python loop.
    """
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    keep = np.ones(pairs.shape[0], dtype=bool)
    if pairs.shape[0] == 0:
        return keep
    if exclude_pairs is not None and len(exclude_pairs):
        keep &= ~np.isin(pair_keys(pairs, n), pair_keys(exclude_pairs, n))
    if constraints is not None and keep.any():
        idx = np.flatnonzero(keep)
        status = np.asarray(constraints.implied_many(pairs[idx]))
        keep[idx[status != -1]] = False
    return keep


def weighted_order(weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random order of the items in which heavier items come earlier.

    Efraimidis-Spirakis: key_i = log(u_i) / w_i, sorted descending. The first B items of
    the order are a weighted sample of B without replacement. Zero-weight items go last
    (in uniform random order) so they are only reached once everything else is taken.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.size == 0:
        return np.empty(0, dtype=np.int64)
    if np.any(~np.isfinite(w)) or np.any(w < 0):
        raise ValueError("sampling weights must be finite and non-negative")
    u = rng.random(w.size)
    logu = np.log(np.maximum(u, np.finfo(np.float64).tiny))
    pos = w > 0
    keys = np.empty(w.size, dtype=np.float64)
    keys[pos] = logu[pos] / w[pos]
    # Zero-weight items: below every positive key, ordered by their own uniform draw.
    keys[~pos] = -np.inf
    order = np.lexsort((-u, -keys))
    return order.astype(np.int64)


def draw_without_replacement(
    weights: np.ndarray, budget: int, rng: np.random.Generator
) -> np.ndarray:
    """Indices of ``budget`` items drawn without replacement, all of them if fewer exist."""
    w = np.asarray(weights, dtype=np.float64)
    if w.size <= budget:
        return weighted_order(w, rng)
    return weighted_order(w, rng)[:budget]


def dedupe_pairs(pairs: np.ndarray, n: int) -> np.ndarray:
    """Index of the first occurrence of each unordered pair, in original order."""
    if len(pairs) == 0:
        return np.empty(0, dtype=np.int64)
    _, first = np.unique(pair_keys(pairs, n), return_index=True)
    return np.sort(first)


def make_rng(seed: int | np.random.Generator) -> np.random.Generator:
    """A numpy Generator from an int seed (or the Generator itself)."""
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int, got {type(seed).__name__}")
    return np.random.default_rng(int(seed))


def batch_reason(n_pool: int, n_asked: int, budget: int, empty_reason: str) -> str:
    """The sentence explaining a batch's size."""
    if n_pool == 0:
        return empty_reason
    if n_asked < budget:
        return REASON_SMALL_POOL
    return REASON_FULL


def sparse_lookup(
    matrix: object, rows: np.ndarray, cols: np.ndarray, *, default: float
) -> np.ndarray:
    """Values of a sparse matrix at (rows, cols), ``default`` where nothing is stored.

    scipy's fancy indexing returns 0 for an absent entry, which for a Jaccard distance
    matrix (absent = 1, stored zeros = identical neighbourhoods) would be wrong. Here the
    stored entries are found by binary search on sorted (row, col) keys instead.
    """
    M = sp.csr_matrix(matrix, copy=True)
    M.sort_indices()
    n_cols = np.int64(M.shape[1])
    stored_rows = np.repeat(np.arange(M.shape[0], dtype=np.int64), np.diff(M.indptr))
    keys = stored_rows * n_cols + M.indices.astype(np.int64)
    want = np.asarray(rows, dtype=np.int64) * n_cols + np.asarray(cols, dtype=np.int64)
    out = np.full(want.shape, float(default), dtype=np.float64)
    if keys.size == 0 or want.size == 0:
        return out
    pos = np.minimum(np.searchsorted(keys, want), keys.size - 1)
    hit = keys[pos] == want
    out[hit] = M.data[pos[hit]]
    return out
