"""SpCL training with and without annotations: no questions vs random pairs vs AAS.

    .venv/bin/python bench/bench_training.py [--epochs-per-cycle 5] [--cycles 5]
                                             [--iters 400] [--seeds 0 1 2]
                                             [--samplers none random aas] [--threads 1]
                                             [--json out.json]

Data: the default synthetic collection (``SyntheticConfig()``: 40 individuals, 305 images,
128 px, rendered in memory), embedded once by the default model's backbone (ImageNet
EfficientNet-Lite0, pooled 1280-d features, cached). Protocol (docs/method.md, open set):
``open_set_split`` on the collection's own train/test column with the gallery chosen by
similarity under the untrained model, seed 0, the same for every run. The trainer sees only
the training images of the known identities (unlabelled); the annotator (a
``SimulatedOracle``, no errors) answers from their identities.

Training: head mode (the CPU mode: the backbone is frozen, the embedding head trains on the
cached features), SpCL defaults from TrainConfig except where the collection's scale
demands otherwise, all named below: DBSCAN k1/k2/min_samples are the demo's (identities of
4-16 images, not SpCL's hundreds), each cycle is ``--epochs-per-cycle`` epochs (paper 10;
fewer so the 9 runs fit in minutes on 2 cores) with the StepLR step at two cycles (SpCL's 20
of 50 epochs), and the budget is the demo's 0.5 % of all pairs of the pool per cycle (the
paper's 0.02 % of a pool of ~150 images would be 2 pairs). Every sampler gets the same
per-cycle budget; AAS may ask fewer when its pools run dry.

Reported per cycle (after the cycle's last epoch), mean +/- std over the seeds: pairs asked in
the cycle, cumulative budget used (% of all pairs), open-set mAP and Top-1 of the current
model, pairwise F1 of the pseudo-labels (NP3-refined DBSCAN) the cycle's last epoch trained
on. Row 0 is the untrained model and its DBSCAN clustering. The seeds change the training
draws (PK batches, sampler draws), not the collection.

The data, schedule and runs are ``reidal bench``'s (:func:`reidal.benchmark.load_dataset`,
:class:`reidal.benchmark.BenchSchedule`, :func:`reidal.benchmark.run_method`; sampler
``none`` is its ``usl`` row), with SpCL's learning rate and ``--iters`` iterations an epoch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from reidal.demo_params import DEMO_BUDGET_PER_CYCLE


def load_collection(threads: int):
    """The default model and the benchmark's ``synthetic`` dataset (features, split)."""
    from reidal.benchmark.datasets import load_dataset
    from reidal.benchmark.runner import _set_threads
    from reidal.embedding.model import build_default_model

    _set_threads(threads)
    t = time.perf_counter()
    model = build_default_model()
    data = load_dataset("synthetic", model)
    split = data.split
    print(f"collection: {len(data.identities)} images of {len(set(data.identities))} "
          f"individuals; pool (known identities' training images) {split.train_idx.size}, "
          f"{split.query_idx.size} queries, {split.gallery_idx.size} gallery "
          f"({time.perf_counter() - t:.1f} s to render and cache features)", flush=True)
    return model, data


def run_context(args, model):
    """The benchmark's head schedule with SpCL's learning rate, ``--iters`` iterations an
    epoch, the StepLR step at two cycles and the demo's budget."""
    from reidal.benchmark.budget import BudgetSpec
    from reidal.benchmark.methods import BenchSchedule, RunContext
    from reidal.training import TrainConfig

    n = args.epochs_per_cycle
    schedule = BenchSchedule(lr=TrainConfig.lr, iters_per_epoch=args.iters,
                             epochs_per_cycle=n, step_size=2 * n)
    return RunContext(model, schedule, BudgetSpec(DEMO_BUDGET_PER_CYCLE, args.cycles),
                      error_rate=0.0, progress=lambda _line: None)


def run(sampler: str, seed: int, data, ctx) -> dict:
    """One run of ``reidal bench``'s method for ``sampler`` ("none": SpCL alone, "usl")."""
    from reidal.benchmark.methods import run_method

    r = run_method("usl" if sampler == "none" else sampler, data, seed, ctx)
    rows = [{"cycle": x["cycle"], "asked": x["pairs_asked"], "budget_pct": x["budget_used_pct"],
             "mAP": x["mAP"], "top1": x["top1"], "f1": x["pl_f1"]} for x in r["rows"]]
    return {"sampler": sampler, "seed": seed, "seconds": r["seconds"], "initial": r["initial"],
            "rows": rows}


def _ms(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    m = statistics.fmean(values) * scale
    s = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{m:.{digits}f}+/-{s:.{digits}f}"


def print_table(results: list[dict], f1_0: float, cycles: int) -> None:
    init = results[0]["initial"]
    print(f"\ncycle 0 (untrained model, every sampler): mAP {100 * init['mAP']:.1f} %, "
          f"Top-1 {100 * init['top1']:.1f} %, DBSCAN pseudo-label F1 {f1_0:.3f}")
    for sampler in dict.fromkeys(r["sampler"] for r in results):
        runs = [r for r in results if r["sampler"] == sampler]
        secs = statistics.fmean(r["seconds"] for r in runs)
        print(f"\nsampler {sampler} ({len(runs)} seeds, {secs:.0f} s a run)")
        print(f"{'cycle':>5} {'asked':>12} {'budget %':>14} {'mAP %':>12} {'Top-1 %':>12} "
              f"{'F1':>14}")
        for c in range(cycles):
            col = {k: [r["rows"][c][k] for r in runs] for k in runs[0]["rows"][c]}
            print(f"{c + 1:>5} {_ms(col['asked']):>12} {_ms(col['budget_pct'], 1, 3):>14} "
                  f"{_ms(col['mAP'], 100):>12} {_ms(col['top1'], 100):>12} "
                  f"{_ms(col['f1'], 1, 3):>14}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs-per-cycle", type=int, default=5)
    p.add_argument("--cycles", type=int, default=5)
    p.add_argument("--iters", type=int, default=400)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--samplers", nargs="+", default=["none", "random", "aas"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write every run's numbers here")
    args = p.parse_args(argv)
    model, data = load_collection(args.threads)
    ctx = run_context(args, model)
    results = []
    for seed in args.seeds:
        for sampler in args.samplers:
            r = run(sampler, seed, data, ctx)
            last = r["rows"][-1]
            print(f"  {sampler:>6} seed {seed}: {r['seconds']:.0f} s, final mAP "
                  f"{100 * last['mAP']:.1f} %, Top-1 {100 * last['top1']:.1f} %, "
                  f"F1 {last['f1']:.3f}, {sum(x['asked'] for x in r['rows'])} pairs", flush=True)
            results.append(r)
    f1_0 = results[0]["initial"]["pl_f1"]  # the untrained model's DBSCAN: every run's
    print_table(results, f1_0, args.cycles)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "initial_f1": f1_0, "runs": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
