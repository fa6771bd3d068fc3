"""The benchmark's budget: how many pairs each active-learning cycle may ask, and how many cycles.

Written ``PER_CYCLE x CYCLES`` as on the command line (``--budget 0.5%x5``): PER_CYCLE is a
percentage of all n(n-1)/2 pairs of the training pool (``0.5%``, the paper's ``0.02%``), a
fraction of them (``0.005``) or a pair count (``100``); CYCLES (default
:data:`DEFAULT_CYCLES`) is the number of cycles. Every method gets the same per-cycle
allowance; a sampler may ask fewer (AAS does when its pools run dry), never more.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from reidal.core.validation import resolve_budget, total_pairs

#: Cycles when the spec names none (the paper: 5 cycles, one every 10 epochs).
DEFAULT_CYCLES = 5

_SPEC = re.compile(r"^\s*(?P<amount>[^xX*]+?)\s*(?:[xX*]\s*(?P<cycles>.+?))?\s*$")


@dataclass(frozen=True)
class BudgetSpec:
    """A per-cycle budget (a pair count, or a fraction of all pool pairs) and a cycle count."""

    per_cycle: int | float  # int: pairs; float in (0, 1]: fraction of all pairs
    cycles: int

    def __post_init__(self) -> None:
        b = self.per_cycle
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise ValueError(f"per_cycle must be a pair count (int) or a fraction (float), "
                             f"got {b!r}")
        if isinstance(b, int) and b < 1:
            raise ValueError(f"per_cycle must be at least 1 pair, got {b}")
        if isinstance(b, float) and not (math.isfinite(b) and 0.0 < b <= 1.0):
            raise ValueError(f"per_cycle as a fraction of all pairs must be in (0, 1], got {b}")
        if isinstance(self.cycles, bool) or not isinstance(self.cycles, int) or self.cycles < 1:
            raise ValueError(f"cycles must be an integer >= 1, got {self.cycles!r}")

    def pairs_per_cycle(self, n_items: int) -> int:
        """The allowance of one cycle on a pool of ``n_items`` images (fractions round up)."""
        return resolve_budget(self.per_cycle, n_items)

    def allotted_pct(self, n_items: int, cycle: int) -> float:
        """Cumulative allowance after ``cycle`` cycles, in % of all pairs of the pool."""
        return 100.0 * cycle * self.pairs_per_cycle(n_items) / max(total_pairs(n_items), 1)

    def __str__(self) -> str:
        b = self.per_cycle
        amount = f"{b}" if isinstance(b, int) else f"{100.0 * b:g}%"
        return f"{amount}x{self.cycles}"


def parse_budget_spec(text: str, default_cycles: int = DEFAULT_CYCLES) -> BudgetSpec:
    """``"0.5%x5"`` -> 0.5 % of all pairs a cycle for 5 cycles; ``"100x5"`` -> 100 pairs a
    cycle; ``"0.005x5"`` -> a fraction; ``"0.5%"`` -> ``default_cycles`` cycles.

    Raises ValueError naming the problem (bad number, percentage out of (0, 100], zero
    pairs, bad cycle count).
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"budget spec must be a non-empty string like '0.5%x5', got {text!r}")
    m = _SPEC.match(text)
    if m is None:
        raise ValueError(f"budget spec {text!r} is not PER_CYCLE[xCYCLES], e.g. '0.5%x5'")
    amount, cycles_text = m.group("amount").strip(), m.group("cycles")
    cycles = default_cycles
    if cycles_text is not None:
        if not re.fullmatch(r"\d+", cycles_text):
            raise ValueError(f"budget spec {text!r}: the cycle count {cycles_text!r} is not a "
                             "positive integer")
        cycles = int(cycles_text)
        if cycles < 1:
            raise ValueError(f"budget spec {text!r}: needs at least 1 cycle, got {cycles}")
    if amount.endswith("%"):
        try:
            pct = float(amount[:-1])
        except ValueError:
            raise ValueError(f"budget spec {text!r}: {amount!r} is not a percentage") from None
        if not (math.isfinite(pct) and 0.0 < pct <= 100.0):
            raise ValueError(f"budget spec {text!r}: a percentage of all pairs must be in "
                             f"(0, 100], got {pct:g}")
        return BudgetSpec(pct / 100.0, cycles)
    if re.fullmatch(r"\d+", amount):
        count = int(amount)
        if count < 1:
            raise ValueError(f"budget spec {text!r}: a cycle must allow at least 1 pair")
        return BudgetSpec(count, cycles)
    try:
        frac = float(amount)
    except ValueError:
        raise ValueError(f"budget spec {text!r}: {amount!r} is neither a percentage (0.5%), a "
                         "fraction (0.005) nor a pair count (100)") from None
    if not (math.isfinite(frac) and 0.0 < frac <= 1.0):
        raise ValueError(f"budget spec {text!r}: a fraction of all pairs must be in (0, 1], "
                         f"got {frac:g} (write a percentage as '{frac:g}%')")
    return BudgetSpec(frac, cycles)
