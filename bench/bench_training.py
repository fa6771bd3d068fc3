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
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from reidal.demo import DEMO_BUDGET_PER_CYCLE, DEMO_K1, DEMO_K2, DEMO_MIN_SAMPLES


def load_collection(threads: int):
    import torch

    from reidal.core.evaluation import open_set_split
    from reidal.data.synthetic_images import SyntheticConfig, iter_samples
    from reidal.embedding.model import build_default_model
    from reidal.training import cache_backbone_features

    torch.set_num_threads(threads)
    t = time.perf_counter()
    samples = list(iter_samples(SyntheticConfig()))
    model = build_default_model()
    feats = cache_backbone_features(model, [s.image for s in samples])
    identities = np.array([s.identity for s in samples])
    splits = np.array([s.split for s in samples])
    with torch.no_grad():
        X0 = model.embed_features(feats).numpy()
    split = open_set_split(identities, split=splits, X=X0, seed=0)
    print(f"collection: {len(samples)} images of {len(set(identities))} individuals; "
          f"pool (known identities' training images) {split.train_idx.size}, "
          f"{split.query_idx.size} queries, {split.gallery_idx.size} gallery "
          f"({time.perf_counter() - t:.1f} s to render and cache features)", flush=True)
    return model, feats, identities, split


def run(sampler: str, seed: int, args, model, feats, identities, split) -> dict:
    from reidal.core.oracle import SimulatedOracle
    from reidal.training import EvalSet, SpCLTrainer, TrainConfig

    pool = split.train_idx
    truth = np.unique(identities[pool], return_inverse=True)[1].reshape(-1)
    n = args.epochs_per_cycle
    config = TrainConfig(
        mode="head", device="cpu", epochs=args.cycles * n, epochs_per_cycle=n,
        iters_per_epoch=args.iters, step_size=2 * n, k1=DEMO_K1, k2=DEMO_K2,
        min_samples=DEMO_MIN_SAMPLES, budget_per_cycle=DEMO_BUDGET_PER_CYCLE, sampler=sampler,
        eval_every=n, seed=seed,
    )
    t = time.perf_counter()
    result = SpCLTrainer(config, model).fit(
        feats[pool], oracle=SimulatedOracle(truth, seed=seed), true_labels=truth,
        eval_set=EvalSet(feats, identities, split))
    rows = []
    for c in range(1, args.cycles + 1):
        last = result.reports[c * n - 1]
        cycle_reports = result.reports[(c - 1) * n:c * n]
        rows.append({
            "cycle": c,
            "asked": sum(r.pairs_asked for r in cycle_reports),
            "budget_pct": last.cumulative_budget_pct,
            "mAP": last.retrieval["mAP"],
            "top1": last.retrieval["top1"],
            "f1": last.quality["f1"],
        })
    return {"sampler": sampler, "seed": seed, "seconds": time.perf_counter() - t,
            "initial": result.initial_retrieval, "rows": rows}


def initial_f1(model, feats, identities, split) -> float:
    import torch

    from reidal.core.clustering import DBSCANJaccard
    from reidal.core.evaluation import clustering_quality

    pool = split.train_idx
    with torch.no_grad():
        X = model.embed_features(feats[pool]).numpy()
    labels = DBSCANJaccard(k1=DEMO_K1, k2=DEMO_K2, min_samples=DEMO_MIN_SAMPLES)(X)
    return float(clustering_quality(labels, identities[pool])["f1"])


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
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    model, feats, identities, split = load_collection(args.threads)
    f1_0 = initial_f1(model, feats, identities, split)
    results = []
    for seed in args.seeds:
        for sampler in args.samplers:
            r = run(sampler, seed, args, model, feats, identities, split)
            last = r["rows"][-1]
            print(f"  {sampler:>6} seed {seed}: {r['seconds']:.0f} s, final mAP "
                  f"{100 * last['mAP']:.1f} %, Top-1 {100 * last['top1']:.1f} %, "
                  f"F1 {last['f1']:.3f}, {sum(x['asked'] for x in r['rows'])} pairs", flush=True)
            results.append(r)
    print_table(results, f1_0, args.cycles)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "initial_f1": f1_0, "runs": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
