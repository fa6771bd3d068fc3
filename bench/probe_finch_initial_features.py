"""Probe: AAS with clustering B (FINCH) on fixed untrained features X_b.

Throwaway experiment (no repository change). DBSCAN (A), the Jaccard matrix, kNN candidates,
regions/pools/draw all stay on the trainer's current X (hybrid-memory features); only FINCH
runs on X_b = the untrained model's pool embeddings (L2-normalised: what the trainer's first
cycle clusters), and NP3 refines B on X_b with the answers so far.

Modes per run:
  stock    : the benchmark's run_trained("aas") untouched (reproduction check)
  current  : ProbeSampler with X_b=None (B on current X = stock AAS, instrumented)
  initial  : ProbeSampler with X_b = untrained embeddings (the hypothesis)

Usage: .venv/bin/python bench/probe_finch_initial_features.py --dataset synthetic --seeds 0-7 --modes initial --trace-seed 0 --out x.json
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
import faiss  # noqa: E402

faiss.omp_set_num_threads(1)

import reidal.benchmark.methods as M  # noqa: E402
from reidal.benchmark.budget import parse_budget_spec  # noqa: E402
from reidal.benchmark.datasets import load_dataset  # noqa: E402
from reidal.core.aas import AmbiguityAwareSampler, _has_answers, _refined_labels  # noqa: E402
from reidal.core.clustering import DBSCANJaccard  # noqa: E402
from reidal.core.constraints import Answer, ConstraintSet  # noqa: E402
from reidal.core.sampling import check_sample_inputs  # noqa: E402
from reidal.embedding.model import build_default_model  # noqa: E402


def _pairs_same(keys: np.ndarray) -> int:
    """Pairs of rows sharing the same key row."""
    if keys.shape[0] == 0:
        return 0
    _, c = np.unique(keys, axis=0, return_counts=True)
    return int(np.sum(c * (c - 1) // 2))


def wrong_merges(la: np.ndarray, truth: np.ndarray, lb: np.ndarray | None = None) -> int:
    """Pairs of different animals in one (non-outlier) cluster of la [and of lb]."""
    m = la >= 0
    cols = [la[m]] if lb is None else [la[m], lb[m]]
    together = _pairs_same(np.stack(cols, 1))
    same_id = _pairs_same(np.stack([*cols, truth[m]], 1))
    return together - same_id


class ProbeSampler(AmbiguityAwareSampler):
    """AAS whose clustering B is FINCH on a fixed X_b (None: on the current X, = stock)."""

    def __init__(self, *args, X_b: np.ndarray | None = None, truth: np.ndarray | None = None,
                 **kw) -> None:
        super().__init__(*args, **kw)
        self.X_b = None if X_b is None else np.ascontiguousarray(X_b, dtype=np.float32)
        self.truth = truth  # tracing only, never used to decide anything
        self.trace: list[dict] = []
        self._b_raw: np.ndarray | None = None
        self.first_x_maxdiff: float | None = None

    def _labels_b_raw(self, X: np.ndarray, knn_result) -> np.ndarray:
        if self.X_b is None:
            return np.asarray(self._finch()(X, knn_result=knn_result), dtype=np.int64)
        if self._b_raw is None:  # fixed features: FINCH once, with the kNN AAS would build
            knn_b, _, _ = self.neighbour_graph(self.X_b, {})
            self._b_raw = np.asarray(self._finch()(self.X_b, knn_result=knn_b), dtype=np.int64)
        return self._b_raw

    def sample(self, X, constraints, budget, *, seed=0, exclude_pairs=None):
        X, n_budget, excl = check_sample_inputs(X, constraints, budget, exclude_pairs)
        if self.X_b is not None and self.first_x_maxdiff is None:
            self.first_x_maxdiff = float(np.abs(X - self.X_b).max())
        Xb = X if self.X_b is None else self.X_b
        dbscan = self._dbscan()
        knn_result, D, _ = self.neighbour_graph(X, {})
        labels_a = np.asarray(dbscan(X, distance=D), dtype=np.int64)
        b_raw = self._labels_b_raw(X, knn_result)
        labels_b = b_raw
        if _has_answers(constraints):
            refiner = self._refiner()
            labels_a, _ = _refined_labels(refiner, labels_a, X, constraints)
            labels_b, _ = _refined_labels(refiner, labels_b, Xb, constraints)
        result = self.sample_from_clusterings(
            X, labels_a, labels_b, D, constraints, n_budget, seed=seed, exclude_pairs=excl,
            knn_idx=knn_result[1] if self.use_knn_candidates else None)
        if self.truth is not None:
            self._record(X, labels_a, labels_b, b_raw, constraints, result)
        return result

    def _record(self, X, la, lb, b_raw, constraints, result) -> None:
        t = self.truth
        pairs = result.as_array()
        same = t[pairs[:, 0]] == t[pairs[:, 1]] if len(pairs) else np.zeros(0, bool)
        wm = wrong_merges(la, t)
        # DBSCAN+NP3 with this cycle's answers added (what the next pseudo-labels start from).
        old = list(constraints.answers) if constraints is not None else []
        nid = max((a.answer_id for a in old), default=-1) + 1
        new = old + [Answer(int(i), int(j), bool(s), nid + k)
                     for k, ((i, j), s) in enumerate(zip(pairs.tolist(), same.tolist(), strict=True))]
        after = wm
        if new:
            cs = ConstraintSet.from_answers(X.shape[0], new)
            la0 = np.asarray(self._dbscan()(X, distance=self.neighbour_graph(X, {})[1]),
                             dtype=np.int64)
            after = wrong_merges(_refined_labels(self._refiner(), la0, X, cs)[0], t)
        self.trace.append({
            "regions": int(result.stats.get("n_regions", 0)),
            "U_os": int(result.stats.get("U_os", 0)), "U_us": int(result.stats.get("U_us", 0)),
            "asked": int(len(pairs)), "must_links": int(same.sum()),
            "clusters_a": int(np.unique(la[la >= 0]).size),
            "clusters_b": int(np.unique(lb).size),
            "dbscan_wrong_merges": wm, "removed_by_answers": wm - after,
            "shared_by_B_np3": wrong_merges(la, t, lb),
            "shared_by_B_raw": wrong_merges(la, t, b_raw),
            "B_wrong_merges": wrong_merges(lb, t),
        })


def untrained_pool(model, data) -> np.ndarray:
    """The trainer's first-cycle X: F.normalize(embed of the pool), as HybridMemory does."""
    feats = data.features[data.pool].float()
    with torch.no_grad():
        e = torch.cat([model.embed_features(feats[s:s + 64]) for s in range(0, len(feats), 64)])
    return torch.nn.functional.normalize(e.float(), dim=1).numpy()


def run_one(mode: str, data, seed: int, ctx, trace: bool) -> dict:
    s = ctx.schedule
    probe = None
    original = M.sampler_override
    if mode != "stock":
        X_b = untrained_pool(ctx.model, data) if mode == "initial" else None
        probe = ProbeSampler(
            dbscan=DBSCANJaccard(eps=s.eps, min_samples=s.min_samples, k1=s.k1, k2=s.k2),
            os_similarity=s.aas_os_similarity, X_b=X_b,
            truth=data.pool_truth if trace else None)
        M.sampler_override = lambda method, schedule: probe if method == "aas" else original(
            method, schedule)
    try:
        res = M.run_trained("aas", data, seed, ctx)
    finally:
        M.sampler_override = original
    rows = res["rows"]
    return {
        "mode": mode, "seed": seed, "mAP": rows[-1]["mAP"], "pl_f1": rows[-1]["pl_f1"],
        "pairs": [r["pairs_asked"] for r in rows], "mAP_cycles": [r["mAP"] for r in rows],
        "pl_f1_cycles": [r["pl_f1"] for r in rows], "seconds": res["seconds"],
        "trace": probe.trace if probe is not None else None,
        "first_x_maxdiff": None if probe is None else probe.first_x_maxdiff,
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--seeds", default="0-7")
    p.add_argument("--modes", nargs="+", default=["initial"])
    p.add_argument("--trace-seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    lo, _, hi = a.seeds.partition("-")
    seeds = list(range(int(lo), int(hi or lo) + 1))
    model = build_default_model()
    t = time.perf_counter()
    data = load_dataset(a.dataset, model)
    print(f"loaded {a.dataset}: pool {data.pool.size} ({time.perf_counter() - t:.0f} s)",
          flush=True)
    ctx = M.RunContext(model, M.BenchSchedule(), parse_budget_spec("0.5%x5"), 0.0,
                       progress=lambda line: None)
    out = []
    for seed in seeds:
        for mode in a.modes:
            r = run_one(mode, data, seed, ctx, trace=seed == a.trace_seed)
            out.append(r)
            print(f"{mode} seed {seed}: mAP {100 * r['mAP']:.4f} F1 {r['pl_f1']:.4f} "
                  f"pairs {r['pairs']} xdiff {r['first_x_maxdiff']} ({r['seconds']:.0f} s)",
                  flush=True)
            with open(a.out, "w") as f:
                json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
