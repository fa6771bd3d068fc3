"""The rows of the paper's Table 1, each a function of (dataset, seed) -> one row per cycle.

Methods (every trained one starts from the same pretrained backbone + seeded head, trains
only the head on the cached features, with the same :class:`BenchSchedule`; each sampler
gets the same per-cycle budget; all pseudo-labels are NP3-refined DBSCAN, as in the paper):

- ``zero-shot``: the pretrained model as it is (no training, nothing asked);
- ``supervised``: the skyline, the same head trained on the true identities of the whole
  pool (``SpCLTrainer.fit(fixed_labels=...)``: the clustering replaced by the labels);
- ``usl``: SpCL without answers;
- ``random``, ``uncertainty``, ``nis``, ``aas``: SpCL + that pair sampler (random pairs,
  Jaccard-margin uncertainty, NIS-style low-degree vertices, Ambiguity-Aware Sampling);
- ``aas-continued`` (OURS): SpCL + AAS whose unused allowance goes to the pairs closest
  to DBSCAN's eps (reidal.core.continuation);
- ``triton:MODEL@URL``: a model a user serves on Triton (e.g. a foundation model) as one
  more zero-shot row; its preprocessing comes from its config's parameters (as reidal's
  repositories write them) or from a ModelSpec file.

Models that do not change (zero-shot, Triton) give the same row in every cycle, so every
method has one row per cycle and the tables line up.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from reidal.benchmark.budget import BudgetSpec
from reidal.benchmark.datasets import BenchDataset, cached_on_disk
from reidal.core.clustering import DBSCANJaccard
from reidal.core.evaluation import clustering_quality, evaluate_open_set
from reidal.core.params import CLUSTERING, SAMPLING
from reidal.core.samplers import SAMPLERS
from reidal.core.validation import l2_normalise
from reidal.demo_params import DEMO_K1, DEMO_K2, DEMO_MIN_SAMPLES
from reidal.embedding.preprocess import preprocess
from reidal.embedding.triton_client import TritonEmbedder
from reidal.simulation.oracle import SimulatedOracle

#: Methods that ask the simulated annotator: SpCL + each sampler of the registry
#: (reidal.core.samplers), which the trainer builds from TrainConfig.sampler with the run's
#: clustering.
SAMPLER_METHODS = tuple(SAMPLERS)
#: Methods in Table 1's order (``triton:MODEL@URL`` rows go after zero-shot).
METHODS = ("zero-shot", "supervised", "usl", *SAMPLER_METHODS)
#: The method the Wilcoxon tests compare every other one against.
REFERENCE_METHOD = "aas"
TRITON_PREFIX = "triton:"

#: Retrieval metrics reported (fractions in [0, 1]; reidal.core.evaluation names).
RETRIEVAL_KEYS = ("mAP", "mINP", "top1", "top3", "top5", "top10", "BAKS", "AUC_ROC")
#: Pseudo-label quality against the true identities of the pool.
QUALITY_KEYS = ("f1", "precision", "recall", "ari")


@dataclass(frozen=True)
class BenchSchedule:
    """The benchmark's head-mode training schedule, the same for every method.

    Defaults (measured on the default synthetic set, head mode on CPU): SpCL's 400
    iterations x lr 3.5e-4 an epoch over-fit the noisy pseudo-labels of a ~150-image pool
    (every method ended below the untrained model), so an epoch is ``iters_per_epoch`` = 50
    steps at ``lr`` = 1e-4; a cycle is ``epochs_per_cycle`` = 5 epochs (the paper: 10), the
    StepLR step ``step_size`` = 10 epochs (two cycles, SpCL's 20 of 50); DBSCAN's ``k1``,
    ``k2``, ``min_samples`` are the demo's, scaled to identities of 4-16 images (SpCL's 30 /
    6 / 4 assume thousands of images). The cycle count comes from the budget spec. Not
    tuned per method. ``question_rounds`` = 1: the paper's one draw a cycle; 0 asks a
    cycle's allowance in rounds until it is spent or the sampler finds nothing
    (TrainConfig.question_rounds; measured in docs/results/question-rounds: no clear gain
    for AAS on either set). ``aas_os_similarity``: TrainConfig's (Jaccard, the paper's).
    ``mode``: "head" or "partial" (TrainConfig.mode; partial also trains the last
    ``trainable_stages`` backbone stages on ``augment_views`` cached augmented views per
    image; head stays the default: partial lifted every method's mAP on zebra-rapid but
    not the share of the gap AAS closes, at 8-15x the time, docs/results/README.md
    "Partial mode at the Done-when budgets"; ``--mode partial`` takes PARTIAL_SCHEDULE's
    steps an epoch); ``image_size``: the model's square input size in pixels (the features of every
    method, zero-shot included, are computed at it); ``pair_loss_weight``: TrainConfig's
    contrastive loss on the answers (0: SpCL's loss alone). Both defaults (224 px and
    weight 1; 128 px and 0 before 2026-12-07, see VARIANT_DEFAULTS) are what paid in
    docs/results/README.md ("Issue 13 at 224 px", zebra-rapid, 20 pairs x 5 cycles, 4
    seeds): 224 px lifts the frozen backbone itself (zero-shot mAP 58.8 -> 63.9) and AAS
    with it (59.4 -> 72.2); at 224 px the loss on the answers adds +2.4 to AAS and +4.1 to
    NIS (3 and 4 of 4 seeds). The served default model is 224 px too in new model
    repositories (reidal.embedding.spec.DEFAULT_INPUT_SIZE; an existing repository keeps
    its 128 px model: a served input size is a new model, docs/deployment.md).
    ``clustering`` (OURS): "fixed" (the parameters above) or "calibrated" (chosen per cycle
    from the data and the answers, reidal.core.calibration; ``clustering_pinned`` = the
    parameters given explicitly, which stay as given: TrainConfig.clustering).
    """

    lr: float = 1e-4
    iters_per_epoch: int = 50
    epochs_per_cycle: int = 5
    step_size: int = 10
    k1: int = DEMO_K1
    k2: int = DEMO_K2
    min_samples: int = DEMO_MIN_SAMPLES
    eps: float = CLUSTERING.dbscan_eps
    num_identities: int = 16
    num_instances: int = 4
    question_rounds: int = 1
    aas_os_similarity: str = SAMPLING.os_similarity
    mode: str = "head"
    image_size: int = 224
    trainable_stages: int = 1
    augment_views: int = 4
    pair_loss_weight: float = 1.0
    clustering: str = "fixed"
    clustering_pinned: tuple[str, ...] = ()

    def train_config(self, cycles: int, budget: BudgetSpec, seed: int, sampler: str) -> Any:
        """The TrainConfig of one run (``sampler``: "none" or a SAMPLER_METHODS name)."""
        from reidal.training import TrainConfig

        return TrainConfig(
            device="cpu", epochs=cycles * self.epochs_per_cycle,
            epochs_per_cycle=self.epochs_per_cycle, iters_per_epoch=self.iters_per_epoch,
            lr=self.lr, step_size=self.step_size, k1=self.k1, k2=self.k2,
            min_samples=self.min_samples, eps=self.eps, num_identities=self.num_identities,
            num_instances=self.num_instances, budget_per_cycle=budget.per_cycle,
            sampler=sampler, eval_every=self.epochs_per_cycle, seed=seed,
            question_rounds=self.question_rounds, aas_os_similarity=self.aas_os_similarity,
            mode=self.mode, trainable_stages=self.trainable_stages,
            augment_views=self.augment_views, pair_loss_weight=self.pair_loss_weight,
            clustering=self.clustering, clustering_pinned=tuple(self.clustering_pinned),
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields, leaving out the sampler options (VARIANT_DEFAULTS) at their defaults:
        the dict is hashed into every run's key, so runs stored before those options existed
        keep their keys."""
        out = asdict(self)
        for name, default in VARIANT_DEFAULTS.items():
            if out[name] == default:
                del out[name]
        if "clustering_pinned" in out:
            out["clustering_pinned"] = list(out["clustering_pinned"])
        return out


#: BenchSchedule fields added after results were stored, with the values that reproduce them
#: (the paper's one draw a cycle and Jaccard U_os; 128 px and no loss on the answers, the
#: defaults until 2026-12-07); see BenchSchedule.to_dict.
VARIANT_DEFAULTS: dict[str, Any] = {"question_rounds": 1, "aas_os_similarity": "jaccard",
                                    "mode": "head", "image_size": 128, "trainable_stages": 1,
                                    "augment_views": 4, "pair_loss_weight": 0.0,
                                    "clustering": "fixed", "clustering_pinned": ()}


#: ``--quick``'s schedule: the same recipe, short (CI checks that the pipeline works; its
#: numbers mean nothing).
QUICK_SCHEDULE = BenchSchedule(iters_per_epoch=10, epochs_per_cycle=2, step_size=4,
                               num_identities=8)


def check_method(method: str) -> str:
    """``method`` if it names a method (or a well-formed ``triton:MODEL@URL``), else ValueError."""
    if method in METHODS:
        return method
    if method.startswith(TRITON_PREFIX):
        parse_triton_method(method)
        return method
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)} or "
                     "triton:MODEL@HOST:PORT")


def parse_triton_method(method: str) -> tuple[str, str]:
    """``"triton:MODEL@HOST:PORT"`` -> (MODEL, HOST:PORT)."""
    body = method.removeprefix(TRITON_PREFIX)
    model, sep, url = body.partition("@")
    if not sep or not model or not url:
        raise ValueError(f"a Triton method is 'triton:MODEL@HOST:PORT', got {method!r}")
    return model, url


@dataclass
class RunContext:
    """What every run of one benchmark shares."""

    model: Any  # the pretrained EmbeddingNet (never modified: the trainer trains a copy)
    schedule: BenchSchedule
    budget: BudgetSpec
    error_rate: float
    triton_spec: Any = None  # ModelSpec for Triton rows; None = from the model's config
    progress: Callable[[str], None] = print


def _metrics(retrieval: dict[str, float], quality: dict[str, float]) -> dict[str, float]:
    out = {k: float(retrieval.get(k, float("nan"))) for k in RETRIEVAL_KEYS}
    out.update({f"pl_{k}": float(quality.get(k, float("nan"))) for k in QUALITY_KEYS})
    return out


def _cluster_quality(X_pool: np.ndarray, truth: np.ndarray, s: BenchSchedule) -> dict[str, float]:
    """Quality of the benchmark's DBSCAN (the trainer's first clustering) on fixed vectors,
    with its cluster count."""
    labels = DBSCANJaccard(eps=s.eps, min_samples=s.min_samples, k1=s.k1, k2=s.k2)(X_pool)
    q = clustering_quality(labels, truth)
    return {k: float(q[k]) for k in (*QUALITY_KEYS, "n_clusters")}


#: The clustering parameters each row records (results.csv), with where eps came from.
CLUSTERING_KEYS = ("eps", "k1", "min_samples", "finch_level", "eps_source")


def _clustering_of(used: dict[str, Any], s: BenchSchedule) -> dict[str, Any]:
    """A row's clustering columns: the trainer's record of an epoch, or the schedule's."""
    base = {"eps": s.eps, "k1": s.k1, "min_samples": s.min_samples, "finch_level": 0,
            "eps_source": "config"}
    return {k: used.get(k, base[k]) for k in CLUSTERING_KEYS}


def _fixed_model_rows(X: np.ndarray, data: BenchDataset, ctx: RunContext, t0: float
                      ) -> dict[str, Any]:
    """The same row for every cycle: a model that nothing trains."""
    X = l2_normalise(np.asarray(X, dtype=np.float32))
    retrieval = evaluate_open_set(X, data.identities, data.split)
    quality = _cluster_quality(X[data.pool], data.pool_truth, ctx.schedule)
    seconds = time.perf_counter() - t0
    rows = [{"cycle": c, "budget_pairs": 0, "allotted_pct": 0.0, "budget_used_pct": 0.0,
             "pairs_asked": 0, "cumulative_pairs": 0, **_metrics(retrieval, quality),
             "n_clusters": int(quality["n_clusters"]), "contradictions": 0, "flipped_answers": 0,
             "cycle_s": seconds if c == 1 else 0.0, "wall_s": seconds,
             **_clustering_of({}, ctx.schedule)}
            for c in range(1, ctx.budget.cycles + 1)]
    return {"rows": rows, "initial": _metrics(retrieval, quality), "seconds": seconds}


def run_zero_shot(data: BenchDataset, seed: int, ctx: RunContext) -> dict[str, Any]:
    import torch

    t0 = time.perf_counter()
    with torch.no_grad():
        X = ctx.model.embed_features(data.features).numpy()
    return _fixed_model_rows(X, data, ctx, t0)


def run_triton(method: str, data: BenchDataset, seed: int, ctx: RunContext) -> dict[str, Any]:
    """Embed every image with a Triton model and evaluate it like the zero-shot row."""
    from reidal.training.data import load_image  # torch: only when a run needs it

    name, url = parse_triton_method(method)
    t0 = time.perf_counter()
    with TritonEmbedder(url) as emb:
        spec = ctx.triton_spec if ctx.triton_spec is not None else emb.spec_from_triton(name)
        parts = []
        for s in range(0, len(data.images), 32):
            batch = preprocess([load_image(im) for im in data.images[s:s + 32]], spec)
            parts.append(emb.embed(batch, model=name).vectors)
    return _fixed_model_rows(np.concatenate(parts), data, ctx, t0)


def run_trained(method: str, data: BenchDataset, seed: int, ctx: RunContext) -> dict[str, Any]:
    """SpCL (+ a sampler, or on the true labels for ``supervised``) under the schedule."""
    from reidal.training import EvalSet, SpCLTrainer  # torch: only when a run needs it

    s, budget = ctx.schedule, ctx.budget
    cycles, per = budget.cycles, s.epochs_per_cycle
    asks = method in SAMPLER_METHODS
    config = s.train_config(cycles, budget, seed, method if asks else "none")
    truth = data.pool_truth
    oracle = SimulatedOracle(truth, error_rate=ctx.error_rate, seed=seed) if asks else None
    n = data.pool.size
    pairs_per_cycle = budget.pairs_per_cycle(n) if asks else 0
    t0 = time.perf_counter()
    ends: dict[int, tuple[float, int]] = {}

    def on_epoch(r: Any) -> None:
        if (r.epoch + 1) % per == 0 or r.epoch + 1 == cycles * per:
            ends[r.cycle] = (time.perf_counter() - t0, 0 if oracle is None else oracle.n_flipped)
            q = r.quality
            ctx.progress(f"    cycle {r.cycle}/{cycles}: {r.cumulative_pairs} pairs "
                         f"({r.cumulative_budget_pct:.3f} % of all), mAP "
                         f"{100 * r.retrieval.get('mAP', float('nan')):.1f} %, pseudo-label "
                         f"F1 {q.get('f1', float('nan')):.3f}, {r.contradictions} "
                         f"contradiction(s), {ends[r.cycle][0]:.0f} s")

    trainer = SpCLTrainer(config, ctx.model)
    train_items, eval_items = _training_inputs(data, ctx, config)
    result = trainer.fit(
        train_items, oracle=oracle, true_labels=truth,
        eval_set=EvalSet(eval_items, data.identities, data.split), on_epoch=on_epoch,
        fixed_labels=truth if method == "supervised" else None)
    rows, prev = [], 0.0
    for c in range(1, cycles + 1):
        reps = result.reports[(c - 1) * per:c * per]
        last = reps[-1]
        wall, flipped = ends[c]
        rows.append({
            "cycle": c, "budget_pairs": pairs_per_cycle,
            "allotted_pct": budget.allotted_pct(n, c) if asks else 0.0,
            # The skyline knows every label: all pairs of the pool, as the paper's 100 %.
            "budget_used_pct": 100.0 if method == "supervised" else last.cumulative_budget_pct,
            "pairs_asked": sum(r.pairs_asked for r in reps),
            "cumulative_pairs": last.cumulative_pairs,
            **_metrics(last.retrieval, last.quality),
            "n_clusters": last.n_clusters, "contradictions": last.contradictions,
            "flipped_answers": flipped, "cycle_s": wall - prev, "wall_s": wall,
            **_clustering_of(last.clustering, s),
        })
        prev = wall
    initial = _metrics(result.initial_retrieval,
                       _cluster_quality(_initial_pool_vectors(ctx.model, data), truth, s))
    return {"rows": rows, "initial": initial, "seconds": time.perf_counter() - t0}


#: The seed of partial mode's augmented views in the benchmark: one set of views per dataset,
#: cached once and shared by every method and run seed (as the split is), so methods differ
#: only in what they train with.
VIEW_SEED = 0


def _training_inputs(data: BenchDataset, ctx: RunContext, config: Any) -> tuple[Any, Any]:
    """What the trainer trains on and evaluates: the cached pooled features (head mode), or
    the cached lower-stage maps (partial mode: computed on first use, kept on ``data`` and,
    with a feature cache folder, on disk between invocations: the maps are a fixed function
    of the images, the backbone's weights, the split block and the views' parameters and
    seed, all in the key, so a stored cache is exactly what would be computed)."""
    if config.mode != "partial":
        return data.features[data.pool], data.features
    from reidal.training.partial import LowerFeatures, lite_backbone

    first = lite_backbone(ctx.model).first_trainable_block(config.trainable_stages)
    params = (first, config.augment_views, config.crop_scale, config.color_jitter, VIEW_SEED)
    key = ("lower", *params)
    if key not in data.cache:
        disk_key = hashlib.sha256(json.dumps(
            {"features": data.feature_key, "lower": list(params),
             "pool": data.pool.tolist()}).encode()).hexdigest()[:24]
        n, views = len(data.images), config.augment_views
        maps = cached_on_disk(
            data.cache_dir, f"lower-{disk_key}", lambda: _lower_maps(data, ctx, config, first),
            lambda m: (isinstance(m, dict) and {"pool_clean", "clean"} <= set(m)
                       and m["clean"].shape[0] == n
                       and m["pool_clean"].shape[0] == data.pool.size
                       and (m.get("pool_views") is None if not views
                            else tuple(m["pool_views"].shape[:2]) == (data.pool.size, views))),
            what=f"the input maps of backbone block {first}", progress=ctx.progress)
        pool = LowerFeatures(first, maps["pool_clean"], maps.get("pool_views"))
        data.cache[key] = (pool, LowerFeatures(first, maps["clean"]))
    return data.cache[key]


def _lower_maps(data: BenchDataset, ctx: RunContext, config: Any, first: int
                ) -> dict[str, Any]:
    """Partial mode's maps of one dataset: the pool's clean maps and views, every image's
    clean map (the pool's included, for evaluation)."""
    import torch

    t = time.perf_counter()
    views = config.augment_views
    rest = np.setdiff1d(np.arange(len(data.images)), data.pool)
    total = data.pool.size * (1 + views) + rest.size
    ctx.progress(f"    caching the input of backbone block {first} (once per dataset): "
                 f"{data.pool.size} pool images x {1 + views} views, {rest.size} others x 1")
    done = [0]
    pool = _lower_in_chunks(data, ctx, config, first, data.pool, views, done, total, t)
    clean = torch.empty((len(data.images), *pool.clean.shape[1:]))
    clean[torch.from_numpy(data.pool)] = pool.clean
    if rest.size:
        clean[torch.from_numpy(rest)] = _lower_in_chunks(data, ctx, config, first, rest, 0,
                                                         done, total, t).clean
    ctx.progress(f"    cached in {time.perf_counter() - t:.0f} s")
    out = {"pool_clean": pool.clean, "clean": clean}
    if pool.views is not None:
        out["pool_views"] = pool.views
    return out


#: Images a forward pass of the lower-stage cache holds, views included
#: (cache_lower_features' ``batch``).
LOWER_CACHE_BATCH = 32


def _lower_in_chunks(data: BenchDataset, ctx: RunContext, config: Any, first: int,
                     idx: np.ndarray, views: int, done: list[int], total: int, t0: float
                     ) -> Any:
    """cache_lower_features over ``idx`` in chunks of about FEATURE_CHUNK images, a progress
    line each (thousands of images take tens of minutes on a busy CPU). Each chunk is a whole
    number of the forward batches one call would make, and the views are seeded by the
    images' numbers, so the maps are those of one call."""
    from reidal.benchmark.datasets import FEATURE_CHUNK
    from reidal.training.partial import LowerFeatures, cache_lower_features

    step = max(1, LOWER_CACHE_BATCH // (1 + views))
    chunk = step * max(1, FEATURE_CHUNK // step)
    parts = []
    for s in range(0, idx.size, chunk):
        sub = idx[s:s + chunk]
        parts.append(cache_lower_features(
            ctx.model, [data.images[i] for i in sub], first, views=views, seed=VIEW_SEED,
            crop_scale=config.crop_scale, jitter=config.color_jitter, indices=sub,
            batch=LOWER_CACHE_BATCH))
        done[0] += sub.size * (1 + views)
        rate = done[0] / max(time.perf_counter() - t0, 1e-9)
        ctx.progress(f"    block {first} inputs: {done[0]}/{total} maps ({rate:.1f}/s)")
    return LowerFeatures.concat(parts)


def _initial_pool_vectors(model: Any, data: BenchDataset) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model.embed_features(data.features[data.pool]).numpy()


def run_method(method: str, data: BenchDataset, seed: int, ctx: RunContext) -> dict[str, Any]:
    """One (method, seed) run on ``data``: ``{"rows": [one dict per cycle], "initial":
    metrics of the untrained model, "seconds": wall time}``."""
    check_method(method)
    if method == "zero-shot":
        return run_zero_shot(data, seed, ctx)
    if method.startswith(TRITON_PREFIX):
        return run_triton(method, data, seed, ctx)
    return run_trained(method, data, seed, ctx)
