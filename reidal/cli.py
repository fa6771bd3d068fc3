"""The `reidal` command line: `reidal demo`, `reidal serve` (more commands to come)."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from reidal.demo import run_demo

    budget: float | int = float(args.budget) if "." in args.budget else int(args.budget)
    run_demo(args.out, cycles=args.cycles, budget_per_cycle=budget, seed=args.seed,
             n_individuals=args.individuals, dataset_csv=args.dataset)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from reidal.demo import DEMO_BUDGET_PER_CYCLE

    parser = argparse.ArgumentParser(
        prog="reidal",
        description="Active-learning server for animal re-identification (AAS + NP3).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="run the whole loop on the bundled synthetic collection",
        description="Generate the synthetic collection, start Triton on CPU, embed through "
                    "reidal's embedding service, run active-learning cycles with a simulated "
                    "annotator, and write a table (CSV) and a plot (PNG).")
    demo.add_argument("--out", default="demo-output", help="output folder (default: %(default)s)")
    demo.add_argument("--cycles", type=int, default=5, help="active-learning cycles (default: 5)")
    demo.add_argument("--budget", default=str(DEMO_BUDGET_PER_CYCLE),
                      help="pairs per cycle: a count (int) or a fraction of all pairs (float); "
                           "default %(default)s")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--individuals", type=int, default=None,
                      help="individuals in the generated collection (default: the generator's)")
    demo.add_argument("--dataset", default=None, metavar="CSV",
                      help="run on a WildlifeDatasets metadata CSV (image_id, identity, path) "
                           "instead of the generated collection")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
