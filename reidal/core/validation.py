"""Input checks shared by every core algorithm.

The core follows scikit-learn's habit: validate at the public boundary, raise a
``ValueError`` whose message names the problem, never return a silently wrong answer.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

#: How far from unit length a row may be before we refuse it. Vectors from float32 models
#: are normalised to about 1e-6; 1e-3 leaves room for fp16 round trips.
NORM_TOLERANCE = 1e-3


def check_embeddings(X: object, *, normalised: bool = True, min_rows: int = 1) -> np.ndarray:
    """Return ``X`` as a C-contiguous float32 (n, d) array, or raise ``ValueError``.

    Checks: 2-D, at least ``min_rows`` rows and one column, every value finite, and (when
    ``normalised``) every row of unit L2 norm, because the inner product is used as cosine
    similarity everywhere in reidal.
    """
    arr = np.asarray(X)
    if arr.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D (n, d) array, got shape {arr.shape}")
    n, d = arr.shape
    if n < min_rows:
        raise ValueError(f"embeddings need at least {min_rows} row(s), got {n}")
    if d < 1:
        raise ValueError("embeddings have zero columns")
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"embeddings must be numeric, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(
            f"embeddings contain NaN or inf in {rows.size} row(s), first rows: {rows[:5].tolist()}"
        )
    if normalised:
        norms = np.linalg.norm(arr, axis=1)
        off = np.abs(norms - 1.0) > NORM_TOLERANCE
        if off.any():
            rows = np.flatnonzero(off)
            raise ValueError(
                f"embeddings must be L2-normalised: {rows.size} row(s) are not "
                f"(first rows {rows[:5].tolist()}, norms {np.round(norms[rows[:5]], 4).tolist()}); "
                "call reidal.core.validation.l2_normalise first"
            )
    return arr


def l2_normalise(X: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation (float32); zero rows stay zero rather than becoming NaN."""
    arr = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    return (arr / np.maximum(norms, eps)).astype(np.float32, copy=False)


def check_labels(labels: object, n: int, *, name: str = "labels") -> np.ndarray:
    """Return an int64 label vector of length ``n`` (-1 allowed for outliers), or raise."""
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must be a 1-D array of length {n}, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < -1:
        raise ValueError(f"{name} must be >= -1 (-1 marks an outlier), got {int(arr.min())}")
    return arr


def check_pairs(pairs: object, n: int, *, name: str = "pairs") -> np.ndarray:
    """Return an int64 (m, 2) array of index pairs in [0, n) with i != j, or raise."""
    arr = np.asarray(pairs)
    if arr.size == 0:
        return np.empty((0, 2), dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name} must have shape (m, 2), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    out = (arr < 0) | (arr >= n)
    if out.any():
        row = int(np.flatnonzero(out.any(axis=1))[0])
        raise ValueError(
            f"{name} index out of range [0, {n}): row {row} is {arr[row].tolist()}"
        )
    self_pairs = arr[:, 0] == arr[:, 1]
    if self_pairs.any():
        row = int(np.flatnonzero(self_pairs)[0])
        raise ValueError(f"{name} row {row} pairs an item with itself: {arr[row].tolist()}")
    return arr


def total_pairs(n: int) -> int:
    """Number of unordered pairs n(n-1)/2: the denominator of every budget fraction."""
    return n * (n - 1) // 2


def resolve_budget(budget: float | int, n: int) -> int:
    """Turn a budget into a pair count.

    An ``int`` is a count of pairs; a ``float`` in (0, 1] is a fraction of all n(n-1)/2
    pairs (0.0002 = 0.02 %), rounded up so a positive fraction never asks zero pairs.
    """
    if isinstance(budget, bool):
        raise ValueError("budget must be a pair count (int) or a fraction (float), not a bool")
    if isinstance(budget, (int, np.integer)):
        if budget <= 0:
            raise ValueError(f"budget must be > 0 pairs, got {budget}")
        return int(budget)
    b = float(budget)
    if not np.isfinite(b) or b <= 0 or b > 1:
        raise ValueError(f"a fractional budget must be in (0, 1], got {budget}")
    return max(1, int(np.ceil(b * total_pairs(n))))


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Interval:
    """A number between ``low`` and ``high`` (None: unbounded), ends closed or open.

    ``integer``: only whole numbers of an integer type (``5.0`` is refused, as a float where
    a count is meant is usually a mistake). Booleans are never numbers here.
    """

    low: float | None = None
    high: float | None = None
    closed: Literal["both", "left", "right", "neither"] = "both"
    integer: bool = False

    def accepts(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(
                value, numbers.Integral if self.integer else numbers.Real):
            return False
        v = float(value)  # type: ignore[arg-type]
        if not math.isfinite(v):
            return False
        if self.low is not None and (v < self.low or (v == self.low and self.closed in
                                                      ("right", "neither"))):
            return False
        return not (self.high is not None and (v > self.high or (
            v == self.high and self.closed in ("left", "neither"))))

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            left = "[" if self.closed in ("both", "left") else "("
            right = "]" if self.closed in ("both", "right") else ")"
            return f"{kind} in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"{kind} {'>=' if self.closed in ('both', 'left') else '>'} {self.low:g}"
        if self.high is not None:
            return f"{kind} {'<=' if self.closed in ('both', 'right') else '<'} {self.high:g}"
        return kind


@dataclass(frozen=True)
class OneOf:
    """One of a few given values (compared with ==), or any callable when ``callables``."""

    options: tuple[Any, ...]
    callables: bool = False

    def accepts(self, value: object) -> bool:
        if self.callables and callable(value):
            return True
        return any(value is o or (not isinstance(value, bool) and value == o)
                   for o in self.options)

    def describe(self) -> str:
        text = "one of " + ", ".join(repr(o) for o in self.options)
        return text + (" or a callable" if self.callables else "")


@dataclass(frozen=True)
class InstanceOf:
    """Any value of the given type(s) (e.g. a dict of options, or None)."""

    types: type | tuple[type, ...]
    name: str

    def accepts(self, value: object) -> bool:
        return isinstance(value, self.types)

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class SubsetOf:
    """A list or tuple of some of the given values (possibly none)."""

    options: tuple[Any, ...]

    def accepts(self, value: object) -> bool:
        return isinstance(value, list | tuple) and all(OneOf(self.options).accepts(v)
                                                       for v in value)

    def describe(self) -> str:
        return "a list of some of " + ", ".join(repr(o) for o in self.options)


#: One constraint on a parameter, or several of which any one may hold.
Constraint = Interval | OneOf | InstanceOf | SubsetOf


def check_params(values: Mapping[str, Any],
                 constraints: Mapping[str, Constraint | tuple[Constraint, ...]],
                 owner: str = "") -> None:
    """Raise ``ValueError`` naming the first parameter in ``values`` that none of its declared
    constraints accept: "k1 must be an integer >= 1, got 0" (with ``owner`` "TrainConfig":
    "TrainConfig.k1 must be ..."). Parameters without a declared constraint are not checked
    (objects such as a clustering are checked by their own class).
    """
    for name, allowed in constraints.items():
        if name not in values:
            continue
        options = allowed if isinstance(allowed, tuple) else (allowed,)
        if not any(c.accepts(values[name]) for c in options):
            wanted = " or ".join(c.describe() for c in options)
            where = f"{owner}.{name}" if owner else name
            raise ValueError(f"{where} must be {wanted}, got {values[name]!r}")
