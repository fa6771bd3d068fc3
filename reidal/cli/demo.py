"""`reidal demo`: the whole loop on a generated collection (reidal.demo does the work)."""

from __future__ import annotations

import argparse
from typing import Any

from reidal.cli.common import CLUSTERING_MODES, SAMPLERS


def _demo(args: argparse.Namespace) -> int:
    from reidal.demo import run_demo
    from reidal_client import parse_budget

    run_demo(args.out, cycles=args.cycles, budget_per_cycle=parse_budget(args.budget),
             seed=args.seed, n_individuals=args.individuals, dataset_csv=args.dataset,
             train=not args.no_train, preset=args.preset, clustering=args.clustering,
             sampler=args.sampler, train_mode=args.train_mode)
    return 0


def add_commands(sub: Any, client: argparse.ArgumentParser) -> None:
    """Register this group's commands on ``sub`` (``client``: the shared server-connection
    options, a parent parser)."""
    from reidal.demo_params import DEMO_BUDGET_PER_CYCLE

    demo = sub.add_parser(
        "demo", help="run the whole loop on the bundled synthetic collection",
        description="Generate the synthetic collection, start the all-in-one server with "
                    "the bundled Triton on CPU, ingest the images through the client, run "
                    "active-learning cycles with a simulated annotator over gRPC, and write "
                    "a table (CSV) and a plot (PNG).")
    demo.add_argument("--out", default="demo-output", help="output folder (default: %(default)s)")
    demo.add_argument("--cycles", type=int, default=5, help="active-learning cycles (default: 5)")
    demo.add_argument("--budget", default=str(DEMO_BUDGET_PER_CYCLE),
                      help="pairs per cycle: a count (int) or a fraction of all pairs (float); "
                           "default %(default)s")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--individuals", type=int, default=None,
                      help="individuals in the generated collection (default: the generator's)")
    demo.add_argument("--preset", default="default", metavar="NAME",
                      help="which generated collection: 'default' (40 individuals) or "
                           "'hard' (reidal.data.synthetic_images.PRESETS) (80 individuals in shared scenes, near-duplicate "
                           "frames, look-alikes: weak features; ~2,400 images)")
    demo.add_argument("--dataset", default=None, metavar="CSV",
                      help="run on a WildlifeDatasets metadata CSV (image_id, identity, path) "
                           "instead of the generated collection")
    demo.add_argument("--no-train", action="store_true",
                      help="skip the last step (train on the answers, promote, re-measure)")
    demo.add_argument("--clustering", default="fixed", choices=CLUSTERING_MODES,
                      help="the collection's clustering mode: 'fixed' (default: the demo's "
                           "k1 / k2 / min_samples) or 'calibrated' (chosen every cycle by the "
                           "server from the vectors and the answers)")
    demo.add_argument("--sampler", default="aas", choices=SAMPLERS,
                      help="the collection's sampler (default: %(default)s)")
    demo.add_argument("--train-mode", default=None, choices=("head", "partial"),
                      help="the training step's mode (default: the server's, head)")
    demo.set_defaults(func=_demo)
