"""The benchmark's tables: results.csv (one row per dataset x method x seed x cycle) and
summary.md (means +/- std at the final cycle and per cycle, Wilcoxon tests of AAS).

Everything here works on plain row dicts (the CSV's columns), so a summary can be remade
from a results.csv alone and the code is testable on hand-made rows.

The Wilcoxon signed-rank test (scipy.stats.wilcoxon, two-sided) pairs AAS with each other
method on the same dataset and seed at the final cycle. It is exact for the small samples a
benchmark has, so its smallest possible p is 2 / 2**m for m non-zero differences: 0.125 with
4 seeds on one dataset. No 4-seed comparison can reach p < 0.05 however large the gain;
read the sign, size and consistency of the differences (wins / ties / losses) beside p.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from reidal.benchmark.methods import CLUSTERING_KEYS, METHODS, REFERENCE_METHOD, RETRIEVAL_KEYS

#: results.csv columns, in order.
CSV_COLUMNS = (
    "dataset", "method", "seed", "cycle", "budget_pairs", "allotted_pct", "budget_used_pct",
    "pairs_asked", "cumulative_pairs", *RETRIEVAL_KEYS, "pl_f1", "pl_precision", "pl_recall",
    "pl_ari", "n_clusters", "contradictions", "flipped_answers", "cycle_s", "wall_s",
    *CLUSTERING_KEYS,
)
_INT_COLUMNS = frozenset({"seed", "cycle", "budget_pairs", "pairs_asked", "cumulative_pairs",
                          "n_clusters", "contradictions", "flipped_answers", "k1",
                          "min_samples", "finch_level"})
_TEXT_COLUMNS = frozenset({"dataset", "method", "eps_source"})
#: Columns added later: runs stored before them have none (written empty, read as None).
_LATER_COLUMNS = frozenset(CLUSTERING_KEYS)
#: Metrics the Wilcoxon tests compare.
TEST_METRICS = ("mAP", "top1")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def results_csv(rows: Iterable[dict[str, Any]]) -> str:
    """The CSV text of ``rows`` (CSV_COLUMNS, in the rows' order)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        w.writerow([_fmt(r[c]) if c in r or c not in _LATER_COLUMNS else "" for c in CSV_COLUMNS])
    return buf.getvalue()


def read_results_csv(text: str) -> list[dict[str, Any]]:
    """Rows back from :func:`results_csv` text, with numbers as numbers."""
    rows = []
    for raw in csv.DictReader(io.StringIO(text)):
        row: dict[str, Any] = {}
        for k, v in raw.items():
            if k in _LATER_COLUMNS and v == "":
                row[k] = None
                continue
            row[k] = v if k in _TEXT_COLUMNS else int(v) if k in _INT_COLUMNS else float(v)
        rows.append(row)
    return rows


def method_order(methods: Iterable[str]) -> list[str]:
    """Table 1's order: zero-shot, Triton rows, then METHODS' order, unknown names last."""
    names = list(dict.fromkeys(methods))

    def key(m: str) -> tuple[int, str]:
        if m.startswith("triton:"):
            return (1, m)
        return (METHODS.index(m) * 2 if m in METHODS else 100, m)

    return sorted(names, key=key)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value) of the non-NaN values."""
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def _ms(values: Sequence[float], scale: float = 1.0, digits: int = 1) -> str:
    m, s = mean_std(values)
    if math.isnan(m):
        return "-"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def final_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each (dataset, method, seed)'s row of its last cycle."""
    last: dict[tuple[str, str, int], dict[str, Any]] = {}
    for r in rows:
        k = (r["dataset"], r["method"], r["seed"])
        if k not in last or r["cycle"] > last[k]["cycle"]:
            last[k] = r
    return list(last.values())


_FINAL_HEADER = ("method", "seeds", "mAP %", "mINP %", "Top-1 %", "Top-5 %", "BAKS %",
                 "AUC-ROC %", "pseudo-label F1", "ARI", "budget used %", "allotted %",
                 "pairs asked", "contradictions", "s / run")


def _final_line(method: str, rs: list[dict[str, Any]]) -> list[str]:
    col = {k: [float(r[k]) for r in rs] for k in CSV_COLUMNS
           if k not in _TEXT_COLUMNS and k not in _LATER_COLUMNS}
    return [f"`{method}`", str(len(rs)), _ms(col["mAP"], 100), _ms(col["mINP"], 100),
            _ms(col["top1"], 100), _ms(col["top5"], 100), _ms(col["BAKS"], 100),
            _ms(col["AUC_ROC"], 100), _ms(col["pl_f1"], 1, 3), _ms(col["pl_ari"], 1, 3),
            _ms(col["budget_used_pct"], 1, 3), _ms(col["allotted_pct"], 1, 3),
            _ms(col["cumulative_pairs"], 1, 1), _ms(col["contradictions"], 1, 1),
            _ms(col["wall_s"], 1, 0)]


def _md_table(header: Sequence[str], lines: Iterable[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return out


def final_table(rows: list[dict[str, Any]], dataset: str) -> list[str]:
    """Markdown lines: Table 1 of one dataset (final cycle, mean ± std over seeds)."""
    fin = [r for r in final_rows(rows) if r["dataset"] == dataset]
    methods = method_order(r["method"] for r in fin)
    return _md_table(_FINAL_HEADER, (_final_line(m, [r for r in fin if r["method"] == m])
                                     for m in methods))


#: Pseudo-label pairwise F1 levels of the annotation-cost curve.
COST_LEVELS = (0.5, 0.8, 0.9)


def answers_to_reach(rows: list[dict[str, Any]], level: float) -> int | None:
    """Answers one run (its rows, any order) had given when its pseudo-label F1 first
    reached ``level`` at the end of a cycle; None when it never did."""
    for r in sorted(rows, key=lambda r: r["cycle"]):
        if float(r["pl_f1"]) >= level:
            return int(r["cumulative_pairs"])
    return None


def cost_table(rows: list[dict[str, Any]], dataset: str,
               levels: Sequence[float] = COST_LEVELS) -> list[str]:
    """Markdown lines: the annotation-cost curve of one dataset, beside mAP. Per method and
    F1 level: the median answers needed over the seeds that reached it (measured at cycle
    ends, so an upper bound within one cycle's allowance) and how many seeds did.
    ``supervised`` knows every label: reached with all labels, not with answers."""
    rs = [r for r in rows if r["dataset"] == dataset]
    fin = {(r["method"], r["seed"]): r for r in final_rows(rs)}
    header = ("method", "final mAP %", "final pseudo-label F1",
              *(f"answers to F1 {x:g}" for x in levels))
    lines = []
    for m in method_order(r["method"] for r in rs):
        seeds = sorted({r["seed"] for r in rs if r["method"] == m})
        runs = [[r for r in rs if r["method"] == m and r["seed"] == s] for s in seeds]
        cells = []
        for level in levels:
            got = [answers_to_reach(run, level) for run in runs]
            hit = [g for g in got if g is not None]
            if m == "supervised":
                cells.append("all labels")
            elif not hit:
                cells.append(f"not reached (0 / {len(got)})")
            else:
                cells.append(f"{statistics.median(hit):g} ({len(hit)} / {len(got)})")
        lines.append([f"`{m}`", _ms([float(fin[(m, s)]["mAP"]) for s in seeds], 100),
                      _ms([float(fin[(m, s)]["pl_f1"]) for s in seeds], 1, 3), *cells])
    return _md_table(header, lines) + [
        "", "Answers needed for the pseudo-labels (NP3-refined DBSCAN on the training pool) "
        "to reach a pairwise F1 against the true identities: the median over the seeds that "
        "reached it, (seeds that reached it / seeds), measured at the end of each cycle."]


def cycle_table(rows: list[dict[str, Any]], dataset: str) -> list[str]:
    """Markdown lines: every cycle of every method on one dataset (mean ± std over seeds)."""
    rs = [r for r in rows if r["dataset"] == dataset]
    header = ("method", "cycle", "pairs asked", "allowance", "budget used %", "allotted %",
              "mAP %", "Top-1 %", "pseudo-label F1", "contradictions")
    lines = []
    for m in method_order(r["method"] for r in rs):
        for c in sorted({r["cycle"] for r in rs if r["method"] == m}):
            sel = [r for r in rs if r["method"] == m and r["cycle"] == c]

            def v(k: str, sel: list[dict[str, Any]] = sel) -> list[float]:
                return [float(r[k]) for r in sel]

            lines.append([f"`{m}`", str(c), _ms(v("pairs_asked")),
                          _ms(v("budget_pairs"), 1, 0), _ms(v("budget_used_pct"), 1, 3),
                          _ms(v("allotted_pct"), 1, 3), _ms(v("mAP"), 100),
                          _ms(v("top1"), 100), _ms(v("pl_f1"), 1, 3),
                          _ms(v("contradictions"))])
    return _md_table(header, lines)


def wilcoxon_tests(rows: list[dict[str, Any]], reference: str = REFERENCE_METHOD,
                   metrics: Sequence[str] = TEST_METRICS) -> list[dict[str, Any]]:
    """Two-sided Wilcoxon signed-rank tests of ``reference`` vs every other method, paired
    on (dataset, seed) at the final cycle, one result per (method, metric).

    Each result: method, metric, n (pairs), n_nonzero, wins / ties / losses of the
    reference, mean_diff (reference - other), statistic and p (None when every difference
    is zero or there is no pair), min_p (the smallest p the exact test can give with
    n_nonzero differences, 2 / 2**n_nonzero).
    """
    from scipy.stats import wilcoxon

    fin = {(r["dataset"], r["method"], r["seed"]): r for r in final_rows(rows)}
    others = [m for m in method_order(k[1] for k in fin) if m != reference]
    out = []
    for m in others:
        keys = sorted((d, s) for d, mm, s in fin if mm == m and (d, reference, s) in fin)
        for metric in metrics:
            a = [float(fin[(d, reference, s)][metric]) for d, s in keys]
            b = [float(fin[(d, m, s)][metric]) for d, s in keys]
            diffs = [x - y for x, y in zip(a, b, strict=True)
                     if not (math.isnan(x) or math.isnan(y))]
            nz = [x for x in diffs if x != 0]
            res: dict[str, Any] = {
                "method": m, "metric": metric, "n": len(diffs), "n_nonzero": len(nz),
                "wins": sum(x > 0 for x in nz), "ties": len(diffs) - len(nz),
                "losses": sum(x < 0 for x in nz),
                "mean_diff": statistics.fmean(diffs) if diffs else float("nan"),
                "statistic": None, "p": None,
                "min_p": min(1.0, 2.0 / 2 ** len(nz)) if nz else None,
            }
            if nz:
                t = wilcoxon(diffs)
                res["statistic"], res["p"] = float(t.statistic), float(t.pvalue)
            out.append(res)
    return out


def wilcoxon_lines(tests: list[dict[str, Any]], reference: str = REFERENCE_METHOD) -> list[str]:
    """Markdown lines for :func:`wilcoxon_tests` results."""
    if not tests:
        return [f"No Wilcoxon test: `{reference}` and at least one other method must both "
                "have finished runs on the same dataset and seed."]
    header = ("comparison", "metric", "n", "wins / ties / losses", "mean difference (pts)",
              "W", "p (two-sided)", "smallest possible p")
    lines = []
    for t in tests:
        p = "-" if t["p"] is None else f"{t['p']:.3g}"
        w = "-" if t["statistic"] is None else f"{t['statistic']:g}"
        mp = "-" if t["min_p"] is None else f"{t['min_p']:.3g}"
        diff = "-" if math.isnan(t["mean_diff"]) else f"{100 * t['mean_diff']:+.2f}"
        lines.append([f"`{reference}` vs `{t['method']}`", t["metric"], str(t["n"]),
                      f"{t['wins']} / {t['ties']} / {t['losses']}", diff, w, p, mp])
    out = _md_table(header, lines)
    out += ["", "Two-sided Wilcoxon signed-rank test (scipy.stats.wilcoxon, exact for small n) "
            "of the final-cycle metric, paired on (dataset, seed); the difference is "
            f"`{reference}` minus the other method, in percentage points. With n non-zero "
            "differences the smallest attainable p is 2 / 2^n: with 4 seeds the smallest "
            "two-sided p is 0.125, so 4 seeds cannot reach p < 0.05; wins / ties / losses and "
            "the mean difference say more. p is '-' when every difference is zero."]
    return out


def summary_markdown(rows: list[dict[str, Any]], *, title: str, settings: Sequence[str],
                     command: str) -> str:
    """summary.md: settings, per dataset the final-cycle table and the per-cycle table,
    the mean over datasets when there are several, and the Wilcoxon tests."""
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    out = [f"# {title}", "", "Reproduce:", "", "```", command, "```", ""]
    out += [f"- {s}" for s in settings] + [""]
    for d in datasets:
        out += [f"## {d}: final cycle (Table 1), mean ± std over seeds", ""]
        out += final_table(rows, d) + [""]
        out += [f"### {d}: annotation cost (answers to reach a pseudo-label F1)", ""]
        out += cost_table(rows, d) + [""]
        out += [f"### {d}: every cycle", ""] + cycle_table(rows, d) + [""]
    if len(datasets) > 1:
        out += ["## Mean over datasets (final cycle; each dataset's seed mean, then averaged)",
                ""]
        fin = final_rows(rows)
        per_ds = []
        for d in datasets:
            for m in method_order(r["method"] for r in fin if r["dataset"] == d):
                sel = [r for r in fin if r["dataset"] == d and r["method"] == m]
                per_ds.append({"dataset": d, "method": m, "seed": 0, "cycle": 0, **{
                    k: mean_std([float(r[k]) for r in sel])[0]
                    for k in CSV_COLUMNS if k not in ("dataset", "method", "seed", "cycle")
                    and k not in _TEXT_COLUMNS and k not in _LATER_COLUMNS}})
        header = ("method", "datasets", "mAP %", "Top-1 %", "AUC-ROC %", "budget used %")
        lines = []
        for m in method_order(r["method"] for r in per_ds):
            sel = [r for r in per_ds if r["method"] == m]
            lines.append([f"`{m}`", str(len(sel)), _ms([r["mAP"] for r in sel], 100),
                          _ms([r["top1"] for r in sel], 100),
                          _ms([r["AUC_ROC"] for r in sel], 100),
                          _ms([r["budget_used_pct"] for r in sel], 1, 3)])
        out += _md_table(header, lines) + [""]
    out += [f"## Wilcoxon signed-rank tests: `{REFERENCE_METHOD}` against each method", ""]
    out += wilcoxon_lines(wilcoxon_tests(rows)) + [""]
    return "\n".join(out)
