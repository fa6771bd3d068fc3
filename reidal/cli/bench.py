"""`reidal bench`: AAS against its baselines on a dataset (reidal.benchmark does the work)."""

from __future__ import annotations

import argparse
from typing import Any


def add_commands(sub: Any, client: argparse.ArgumentParser) -> None:
    """Register ``reidal bench`` (it needs no server, so ``client`` goes unused)."""
    from reidal.benchmark.runner import add_bench_arguments, bench_command

    bench = sub.add_parser(
        "bench", help="AAS against its baselines on a dataset (the paper's Table 1, Figure 3)",
        description="Train every method (zero-shot, supervised skyline, SpCL alone, SpCL + "
                    "random / uncertainty / NIS / AAS pairs) on each dataset for each seed "
                    "under one schedule and per-cycle budget, resumably; write results.csv, "
                    "summary.md (means, Wilcoxon tests) and PNG plots. No server needed.")
    add_bench_arguments(bench)
    bench.set_defaults(func=bench_command)
