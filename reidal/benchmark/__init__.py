"""The benchmark suite behind `reidal bench`: the paper's Table 1 and Figure 3 on any dataset.

Transport-free: no gRPC, no server. ``run_benchmark(BenchConfig(datasets=("synthetic",)),
"out")`` trains every method (zero-shot, supervised skyline, SpCL alone, SpCL + random /
uncertainty / NIS / AAS pairs) on each dataset for each seed under one schedule and budget,
resumably, and writes results.csv, summary.md (means +/- std, Wilcoxon tests) and the plots.
"""

from reidal.benchmark.budget import DEFAULT_CYCLES, BudgetSpec, parse_budget_spec
from reidal.benchmark.datasets import BUNDLED, BenchDataset, dataset_fingerprint, load_dataset
from reidal.benchmark.methods import (
    METHODS,
    QUICK_SCHEDULE,
    SAMPLER_METHODS,
    BenchSchedule,
    RunContext,
    run_method,
)
from reidal.benchmark.report import (
    CSV_COLUMNS,
    read_results_csv,
    results_csv,
    summary_markdown,
    wilcoxon_tests,
)
from reidal.benchmark.runner import (
    DEFAULT_BUDGET,
    BenchConfig,
    BenchResult,
    add_bench_arguments,
    bench_command,
    config_from_args,
    run_benchmark,
)

__all__ = [
    "BUNDLED",
    "CSV_COLUMNS",
    "DEFAULT_BUDGET",
    "DEFAULT_CYCLES",
    "METHODS",
    "QUICK_SCHEDULE",
    "SAMPLER_METHODS",
    "BenchConfig",
    "BenchDataset",
    "BenchResult",
    "BenchSchedule",
    "BudgetSpec",
    "RunContext",
    "add_bench_arguments",
    "bench_command",
    "config_from_args",
    "dataset_fingerprint",
    "load_dataset",
    "parse_budget_spec",
    "read_results_csv",
    "results_csv",
    "run_benchmark",
    "run_method",
    "summary_markdown",
    "wilcoxon_tests",
]
