"""The benchmark's figures (matplotlib, Agg backend, no display): per dataset,

- mAP against the budget used (the paper's Figure 3): each asking method's mean curve over
  the seeds with a +/- std band, starting at the untrained model (budget 0); dotted
  verticals at the cumulative allowance of each cycle; methods that ask nothing (zero-shot,
  SpCL alone, the supervised skyline, Triton rows) as horizontal lines at their final mAP;
- pairs asked per cycle: mean bars with std error bars per asking method, the per-cycle
  allowance as a line (AAS may stay below it).

PNG bytes are returned, not written, so the caller writes a file only when it changed.
"""

from __future__ import annotations

import io
import statistics
from typing import Any

from reidal.benchmark.methods import SAMPLER_METHODS
from reidal.benchmark.report import final_rows, mean_std, method_order

_COLOURS = {"aas": "tab:red", "random": "tab:blue", "uncertainty": "tab:green",
            "nis": "tab:purple", "usl": "tab:orange", "zero-shot": "tab:gray",
            "supervised": "black"}


def _colour(method: str, k: int) -> str:
    return _COLOURS.get(method, f"C{k % 10}")


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _figure() -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(7.5, 4.8))


def map_vs_budget_png(rows: list[dict[str, Any]], dataset: str,
                      initial: dict[str, float] | None = None) -> bytes:
    """Figure 3 for one dataset. ``initial``: the untrained model's mAP (the curves' start)."""
    rs = [r for r in rows if r["dataset"] == dataset]
    fig, ax = _figure()
    methods = method_order(r["method"] for r in rs)
    cycles = sorted({r["cycle"] for r in rs})
    allotted = [statistics.fmean(r["allotted_pct"] for r in rs if r["cycle"] == c
                                 and r["method"] in SAMPLER_METHODS) for c in cycles
                if any(r["method"] in SAMPLER_METHODS and r["cycle"] == c for r in rs)]
    for k, x in enumerate(allotted):
        ax.axvline(x, color="0.8", linestyle=":", linewidth=1,
                   label="allotted budget per cycle" if k == 0 else None)
    fin = final_rows(rs)
    for k, m in enumerate(methods):
        col = _colour(m, k)
        if m in SAMPLER_METHODS:
            xs, ys, sd = [], [], []
            if initial is not None:
                xs, ys, sd = [0.0], [100 * initial["mAP"]], [0.0]
            for c in cycles:
                sel = [r for r in rs if r["method"] == m and r["cycle"] == c]
                if not sel:
                    continue
                xs.append(mean_std([r["budget_used_pct"] for r in sel])[0])
                mu, s = mean_std([100 * r["mAP"] for r in sel])
                ys.append(mu)
                sd.append(s)
            ax.plot(xs, ys, marker="o", color=col, label=m, linewidth=1.8)
            ax.fill_between(xs, [y - s for y, s in zip(ys, sd, strict=True)],
                            [y + s for y, s in zip(ys, sd, strict=True)], color=col, alpha=0.15)
        else:
            mu = mean_std([100 * r["mAP"] for r in fin if r["method"] == m])[0]
            what = "every label" if m == "supervised" else "no pairs"
            ax.axhline(mu, color=col, linestyle="--", linewidth=1.2, label=f"{m} ({what})")
    ax.set_xlabel("budget used (% of all pairs of the training pool, cumulative)")
    ax.set_ylabel("open-set mAP (%)")
    ax.set_title(f"{dataset}: mAP against budget used (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _png(fig)


def pairs_per_cycle_png(rows: list[dict[str, Any]], dataset: str) -> bytes:
    """Pairs asked in each cycle (mean ± std over seeds) against the per-cycle allowance."""
    import numpy as np

    rs = [r for r in rows if r["dataset"] == dataset and r["method"] in SAMPLER_METHODS]
    fig, ax = _figure()
    methods = method_order(r["method"] for r in rs)
    cycles = sorted({r["cycle"] for r in rs})
    width = 0.8 / max(len(methods), 1)
    for k, m in enumerate(methods):
        mu, sd = [], []
        for c in cycles:
            sel = [float(r["pairs_asked"]) for r in rs if r["method"] == m and r["cycle"] == c]
            a, b = mean_std(sel) if sel else (0.0, 0.0)
            mu.append(a)
            sd.append(b)
        x = np.arange(len(cycles)) + (k - (len(methods) - 1) / 2) * width
        ax.bar(x, mu, width, yerr=sd, capsize=2, color=_colour(m, k), label=m)
    if rs:
        allowance = statistics.fmean(r["budget_pairs"] for r in rs)
        ax.axhline(allowance, color="black", linestyle=":", linewidth=1,
                   label=f"allowance ({allowance:g} pairs)")
    ax.set_xticks(np.arange(len(cycles)), [str(c) for c in cycles])
    ax.set_xlabel("active-learning cycle")
    ax.set_ylabel("pairs asked in the cycle")
    ax.set_title(f"{dataset}: pairs asked per cycle (mean ± std over seeds)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)
