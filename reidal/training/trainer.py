"""SpCL's unsupervised recipe with NP3-refined pseudo-labels and active-learning cycles.

One epoch (docs/method.md, step 3; SpCL's ``spcl_train_usl.py``):

1. at the start of every cycle (each ``epochs_per_cycle``-th epoch, the first included), the
   sampler (AAS, random or none) picks up to ``budget_per_cycle`` pairs on the current
   features and the annotator answers them (``reidal.core.questions.ask_and_record``, the same
   step the fixed-embedding loop runs);
2. pseudo-labels: DBSCAN on the k-reciprocal Jaccard distance of the features, made
   consistent with every answer so far by NP3, filtered by SpCL's self-paced reliability
   criterion (``reidal.training.pseudo_labels``);
3. ``iters_per_epoch`` steps of Adam on PK batches (P pseudo-identities x K images) with the
   hybrid-memory loss (cluster centroids + un-clustered instances, temperature 0.05), the
   memory following each batch's embeddings with momentum 0.2; StepLR after the epoch;
4. optionally the open-set retrieval of the current model on an evaluation set; a report;
   an atomic checkpoint.

The features clustered are the hybrid memory's (SpCL), initialised from the model's first
embedding of every item; ``cluster_features="model"`` re-embeds every item instead.

Three modes, one loop: ``head`` trains only the embedding head on backbone features cached
once (the CPU mode), ``partial`` also the last backbone stages, on feature maps cached below
them (CPU, reidal.training.partial), ``full`` fine-tunes the backbone on images (the GPU
mode: float16 autocast + gradient scaling on CUDA, a DataLoader with workers decoding and
augmenting, DistributedDataParallel under torchrun). They differ only in what a batch holds
and how it is embedded (:class:`_FeatureInputs`, :class:`reidal.training.partial.MapInputs`,
:class:`_ImageInputs`).

With ``pair_loss_weight`` > 0 (any mode) the answers also enter the loss directly: a
contrastive term on every answered or implied SAME / DIFFERENT pair with an item of the batch
(reidal.training.pair_loss), added to the hybrid-memory loss.

The model passed in is never modified: ``fit`` trains a deep copy and returns it.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch

from reidal.core.calibration import ClusteringCalibrator, ClusteringChoice
from reidal.core.constraints import ConstraintSet
from reidal.core.evaluation import OpenSetSplit, clustering_quality, evaluate_open_set
from reidal.core.params import CHOICE_NAMES, CLUSTERING, ClusteringParams, SamplingParams
from reidal.core.questions import Oracle, ask_and_record
from reidal.core.samplers import make_sampler
from reidal.core.validation import check_labels, resolve_budget, total_pairs
from reidal.embedding.model import EmbeddingNet
from reidal.embedding.spec import ModelSpec
from reidal.training import distributed as D
from reidal.training.checkpoint import (
    answers_to_rows,
    load_checkpoint,
    rows_to_answers,
    save_checkpoint,
)
from reidal.training.config import TrainConfig
from reidal.training.data import ImageDataset, check_image_items, spec_for
from reidal.training.features import cache_backbone_features
from reidal.training.memory import HybridMemory
from reidal.training.pair_loss import AnswerPairs
from reidal.training.partial import LowerFeatures, MapInputs, cache_lower_features, lite_backbone
from reidal.training.pk_sampler import pk_batches, shard_batch
from reidal.training.pseudo_labels import SpCLPseudoLabeler, fixed_pseudo_labels

#: Config fields a resumed job may change (they do not change what is computed).
RESUMABLE_CHANGES = ("epochs", "device", "num_workers", "embed_batch_size", "eval_every",
                     "checkpoint_dir", "checkpoint_every")


@dataclass
class EvalSet:
    """Open-set evaluation data: items (cached backbone features in head mode, images in full
    mode), one identity per item, and the split (indices into these items)."""

    items: Any
    identities: np.ndarray
    split: OpenSetSplit


@dataclass
class EpochReport:
    """What one epoch did. ``quality`` (pseudo-labels vs ground truth) needs ``true_labels``;
    ``retrieval`` (open-set metrics of the model after the epoch) an evaluation set."""

    epoch: int  # 0-based
    cycle: int  # 1-based active-learning cycle the epoch belongs to
    loss: float  # mean training loss over the epoch's iterations
    lr: float  # learning rate the epoch trained with
    iterations: int
    n_clusters: int  # training classes of 2+ items after the reliability filter
    n_unclustered: int  # training classes of one item (outliers and dissolved items)
    n_outliers: int  # DBSCAN outliers of the reported pseudo-labels
    n_np3_changed: int
    pairs_asked: int  # in this epoch (non-zero only at a cycle start)
    cumulative_pairs: int
    cumulative_budget_pct: float
    contradictions: int
    sampler_reason: str
    quality: dict[str, float] = field(default_factory=dict)
    retrieval: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    #: the clustering parameters of the epoch (eps, k1, k2, min_samples, finch_level and,
    #: calibrated, where eps / the level came from: TrainConfig.clustering)
    clustering: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EpochReport:
        return cls(**d)


@dataclass
class TrainResult:
    """The trained copy of the model (CPU, eval mode) and how training went."""

    model: EmbeddingNet
    reports: list[EpochReport]
    constraints: ConstraintSet
    labels: np.ndarray  # pseudo-labels (NP3-refined DBSCAN) of the final features
    quality: dict[str, float]  # of ``labels``, when true labels were given
    initial_retrieval: dict[str, float]  # the untrained model on the evaluation set
    memory_features: np.ndarray
    cancelled: bool
    resumed_from_epoch: int | None  # the epoch a resumed job started at
    world_size: int = 1  # processes that trained together (torchrun), 1 without


class _FeatureInputs:
    """Head mode: batches are rows of the cached backbone features."""

    def __init__(self, features: torch.Tensor, device: torch.device, batch: int) -> None:
        self.features = features.to(device)
        self.device = device
        self.batch = batch

    def __len__(self) -> int:
        return self.features.shape[0]

    def train_batches(self, batches: Iterable[np.ndarray], seed: int, config: TrainConfig):
        for idx in batches:
            t = torch.from_numpy(idx).to(self.device)
            yield self.features.index_select(0, t), t

    @staticmethod
    def forward(model: EmbeddingNet, net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.embed_features(x)

    @torch.no_grad()
    def embed_all(self, model: EmbeddingNet, ctx: D.DistContext) -> torch.Tensor:
        was = model.training
        model.eval()
        out = torch.cat([model.embed_features(self.features[s:s + self.batch])
                         for s in range(0, len(self), self.batch)])
        model.train(was)
        return out.float()


class _ImageInputs:
    """Full mode: batches are decoded, preprocessed (and augmented) images from a DataLoader."""

    def __init__(self, items: Sequence[Any], spec: ModelSpec, device: torch.device,
                 batch: int, num_workers: int, amp: bool) -> None:
        self.train_set = ImageDataset(items, spec, train=True)
        self.plain_set = ImageDataset(items, spec, train=False)
        self.device = device
        self.batch = batch
        self.num_workers = num_workers
        self.amp = amp and device.type == "cuda"

    def __len__(self) -> int:
        return len(self.train_set)

    def _loader(self, dataset: Any, batch_sampler: Any) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            dataset, batch_sampler=batch_sampler, num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if self.num_workers else None,
        )

    def train_batches(self, batches: Iterable[np.ndarray], seed: int, config: TrainConfig):
        rng = np.random.default_rng([seed, 2])
        # A generator, like ``batches``: the loader draws index lists as it goes, so an
        # epoch's batch list is never held whole (nor built before the first cancel check).
        keyed = (list(zip(b.tolist(), rng.integers(0, 2**63 - 1, b.size).tolist(),
                          strict=True)) if config.augment else b.tolist() for b in batches)
        for x, idx in self._loader(self.train_set, keyed):
            yield (x.to(self.device, non_blocking=True),
                   idx.to(self.device, non_blocking=True))

    @staticmethod
    def forward(model: EmbeddingNet, net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return net(x)

    @torch.no_grad()
    def embed_all(self, model: EmbeddingNet, ctx: D.DistContext) -> torch.Tensor:
        """Every item's embedding; under torchrun each process embeds its share, then gather."""
        was = model.training
        model.eval()
        mine = np.arange(ctx.rank, len(self), ctx.world_size)
        chunks = [mine[s:s + self.batch].tolist() for s in range(0, mine.size, self.batch)]
        embs, idxs = [], []
        for x, idx in self._loader(self.plain_set, chunks):
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
                e = model(x.to(self.device, non_blocking=True))
            embs.append(e.float())
            idxs.append(idx.to(self.device))
        model.train(was)
        dim = model.dim
        e = torch.cat(embs) if embs else torch.empty(0, dim, device=self.device)
        i = torch.cat(idxs) if idxs else torch.empty(0, dtype=torch.long, device=self.device)
        e, i = D.all_gather_rows(e, ctx), D.all_gather_rows(i, ctx)
        out = torch.empty(len(self), dim, device=self.device)
        out[i] = e
        return out


def _resolve_device(config: TrainConfig, ctx: D.DistContext | None = None) -> torch.device:
    kind = config.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("TrainConfig.device is 'cuda' but no CUDA device is available")
        if ctx is not None and ctx.world_size > 1:
            torch.cuda.set_device(ctx.local_rank)
            return torch.device("cuda", ctx.local_rank)
        return torch.device("cuda")
    return torch.device("cpu")


def _is_feature_matrix(data: object) -> bool:
    return isinstance(data, (torch.Tensor, np.ndarray))


def _as_features(data: object, feature_dim: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(data) if isinstance(data, np.ndarray) else data)
    if t.ndim != 2 or t.shape[1] != feature_dim:
        raise ValueError(f"{name} must be a (n, {feature_dim}) matrix of backbone features, "
                         f"got shape {tuple(t.shape)}")
    if not torch.is_floating_point(t) or not torch.isfinite(t).all():
        raise ValueError(f"{name} must hold finite floating-point values")
    return t.float()


class SpCLTrainer:
    """SpCL + NP3 + active learning on one ``EmbeddingNet`` (see the module docstring).

    ``spec``: how images are preprocessed (default: the model's input size with the served
    default normalisation). ``sampler``: override the sampler the config names (any object
    with the ``reidal.core.sampling.Sampler`` interface).
    """

    def __init__(self, config: TrainConfig, model: EmbeddingNet, *,
                 spec: ModelSpec | None = None, sampler: Any = None) -> None:
        if not isinstance(config, TrainConfig):
            raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
        if not isinstance(model, EmbeddingNet):
            raise ValueError(f"model must be an EmbeddingNet, got {type(model).__name__}")
        self.config = config
        self.model = model
        self.spec = spec
        self._sampler = sampler

    # ------------------------------------------------------------------ pieces
    def make_sampler(self, choice: Any = None) -> Any:
        """The configured pair sampler (None for ``sampler="none"``); ``choice``: a
        :class:`reidal.core.calibration.ClusteringChoice` AAS clusters with instead of the
        config's parameters."""
        if self._sampler is not None:
            return self._sampler
        c = self.config
        if c.sampler == "none":
            return None
        p = _clustering(c, choice)
        clustering = ClusteringParams(**{key: p[name] for key, name in CHOICE_NAMES.items()})
        return make_sampler(clustering, SamplingParams(sampler=c.sampler,
                                                       os_similarity=c.aas_os_similarity))

    def make_calibrator(self) -> Any:
        """The per-cycle clustering calibrator (None unless ``clustering="calibrated"``),
        keeping the pinned parameters at the config's values."""
        c = self.config
        if c.clustering != "calibrated":
            return None
        values = {"eps": c.eps, "k1": c.k1, "k2": c.k2, "min_samples": c.min_samples}
        return ClusteringCalibrator(fixed={k: values[k] for k in c.clustering_pinned})

    def _ask_rounds(self, sampler: Any, X: np.ndarray, constraints: ConstraintSet,
                    budget: int, oracle: Oracle, cycle: int) -> tuple[int, str]:
        """One cycle's questions, in up to ``question_rounds`` rounds (see TrainConfig):
        returns (pairs asked, the last round's reason). Round 0's seed is the one-draw
        schedule's, so ``question_rounds=1`` asks exactly what it always did."""
        c = self.config
        asked, reason = 0, "no question this epoch"
        # Each round asks at least one pair or ends the cycle, so "no cap" is at most
        # ``budget`` rounds.
        for r in range(c.question_rounds or max(budget, 1)):
            seed = c.seed + cycle if r == 0 else (c.seed + cycle) * 1_000 + r
            batch, pairs = ask_and_record(sampler, X, constraints, budget - asked, oracle,
                                          seed=seed)
            asked, reason = asked + len(pairs), batch.reason
            if len(pairs) == 0 or asked >= budget:
                break
        return asked, reason

    def make_labeler(self, choice: Any = None) -> SpCLPseudoLabeler:
        c = self.config
        p = _clustering(c, choice)
        return SpCLPseudoLabeler(eps=p["eps"], eps_gap=c.eps_gap, min_samples=p["min_samples"],
                                 k1=p["k1"], k2=p["k2"],
                                 reliability_percentile=c.reliability_percentile,
                                 self_paced=c.self_paced)

    def _inputs(self, data: object, model: EmbeddingNet, device: torch.device,
                name: str, *, train: bool = True) -> _FeatureInputs | MapInputs | _ImageInputs:
        c = self.config
        if c.mode == "partial":
            first = lite_backbone(model).first_trainable_block(c.trainable_stages)
            if isinstance(data, LowerFeatures):
                if data.first_block != first:
                    raise ValueError(f"{name} caches the input of block {data.first_block}, "
                                     f"but trainable_stages {c.trainable_stages} splits at "
                                     f"block {first}")
                feats = data
            elif _is_feature_matrix(data):
                raise ValueError(f"partial mode trains backbone stages, so {name} must be "
                                 "images (PIL images or paths) or LowerFeatures")
            else:
                feats = cache_lower_features(
                    model, check_image_items(data), first,
                    views=c.augment_views if train else 0, seed=c.seed,
                    crop_scale=c.crop_scale, jitter=c.color_jitter,
                    spec=spec_for(model, self.spec), batch=c.embed_batch_size, device=device)
            return MapInputs(feats, device, c.embed_batch_size)
        if c.mode == "head":
            if _is_feature_matrix(data):
                feats = _as_features(data, model.feature_dim, name)
            else:
                feats = cache_backbone_features(model, check_image_items(data),
                                                c.embed_batch_size, spec=spec_for(model, self.spec),
                                                device=device)
            return _FeatureInputs(feats, device, c.embed_batch_size)
        if _is_feature_matrix(data):
            raise ValueError(f"full mode trains the backbone, so {name} must be images (PIL "
                             "images or paths), not a feature matrix")
        return _ImageInputs(check_image_items(data), spec_for(model, self.spec), device,
                            c.embed_batch_size, c.num_workers, c.amp)

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        data: object,
        *,
        oracle: Oracle | None = None,
        constraints: ConstraintSet | None = None,
        true_labels: object | None = None,
        eval_set: EvalSet | None = None,
        on_epoch: Callable[[EpochReport], None] | None = None,
        cancel: threading.Event | None = None,
        resume: bool = False,
        fixed_labels: object | None = None,
    ) -> TrainResult:
        """Train a copy of the model on ``data`` (the unlabelled training items).

        ``data``: head mode, a (n, feature_dim) matrix of backbone features or the images
        (their features are cached first); full mode, the images (PIL images or paths).
        ``oracle``: answers pairs (bool per pair), required unless the sampler is "none".
        ``constraints``: answers given before this run (e.g. a collection's stored answers);
        they refine the pseudo-labels from the first epoch and are never asked again. The
        caller's set is copied, not changed.
        ``true_labels``: only to measure pseudo-label quality in the reports, never to train.
        ``cancel``: checked before every iteration; when set, training stops there and the
        result (``cancelled=True``) holds the copy as it was; the last checkpoint stays that
        of the last whole epoch. ``resume``: continue from ``checkpoint_dir``'s checkpoint
        when there is one.
        ``fixed_labels``: one int label per item (-1 = no label: an instance of its own) that
        replaces the per-epoch clustering (DBSCAN, NP3, reliability filter) in every epoch,
        i.e. supervised training with the same memory, loss and schedule: the fully
        supervised skyline of the benchmark. Nothing is asked (needs sampler "none" and no
        constraints); the reports' quality compares these labels with ``true_labels``.
        """
        c = self.config
        n_data = (int(data.shape[0]) if _is_feature_matrix(data) else len(data))
        if n_data < c.batch_size:
            raise ValueError(
                f"a batch of {c.num_identities} identities x {c.num_instances} images = "
                f"{c.batch_size} images is larger than the collection of {n_data} items"
            )
        sampler = self.make_sampler()
        fixed = None
        if fixed_labels is not None:
            fixed = check_labels(fixed_labels, n_data, name="fixed_labels")
            if sampler is not None or constraints is not None:
                raise ValueError("fixed_labels replace the clustering, so answers would be "
                                 "ignored: use sampler='none' and no constraints with them")
        if sampler is not None and oracle is None:
            raise ValueError(f"sampler {c.sampler!r} asks questions, so fit needs an oracle "
                             "(or use sampler='none')")
        truth = None if true_labels is None else np.asarray(true_labels)
        if truth is not None and (truth.ndim != 1 or truth.shape[0] != n_data):
            raise ValueError(f"true_labels must be a 1-D array of length {n_data}, got shape "
                             f"{truth.shape}")
        if constraints is not None and constraints.n_items != n_data:
            raise ValueError(f"constraints are for {constraints.n_items} items but the data "
                             f"has {n_data}")
        if resume and c.checkpoint_dir is None:
            raise ValueError("resume needs TrainConfig.checkpoint_dir")
        if eval_set is not None and not isinstance(eval_set, EvalSet):
            raise ValueError(f"eval_set must be an EvalSet, got {type(eval_set).__name__}")

        ctx = D.setup("cuda" if _resolve_device(c).type == "cuda" else "cpu")
        try:
            if ctx.world_size > 1 and c.mode != "full":
                raise ValueError(f"{c.mode} mode runs in one process; launch full mode under "
                                 "torchrun for data parallelism")
            if ctx.world_size > 1 and c.batch_size % ctx.world_size:
                raise ValueError(f"batch of {c.batch_size} images does not split evenly over "
                                 f"{ctx.world_size} processes")
            return self._fit(data, n_data, sampler, oracle, constraints, truth, eval_set,
                             on_epoch, cancel, resume, ctx, fixed)
        finally:
            D.teardown(ctx)

    def _fit(self, data: object, n: int, sampler: Any, oracle: Oracle | None,
             given: ConstraintSet | None, truth: np.ndarray | None, eval_set: EvalSet | None,
             on_epoch: Callable[[EpochReport], None] | None, cancel: threading.Event | None,
             resume: bool, ctx: D.DistContext, fixed: np.ndarray | None = None
             ) -> TrainResult:
        c = self.config
        device = _resolve_device(c, ctx)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(c.seed)
        model = copy.deepcopy(self.model).to(device)
        head_only = c.mode == "head"
        if head_only:
            for p in model.backbone.parameters():
                p.requires_grad_(False)
        inputs = self._inputs(data, model, device, "data")
        eval_inputs = None if eval_set is None else self._inputs(eval_set.items, model, device,
                                                                 "eval_set.items", train=False)
        if eval_inputs is not None and len(eval_inputs) != len(eval_set.identities):
            raise ValueError(f"eval_set has {len(eval_inputs)} items but "
                             f"{len(eval_set.identities)} identities")

        net: torch.nn.Module = model
        if ctx.active and not head_only:
            from torch.nn.parallel import DistributedDataParallel as DDP

            net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        params = (inputs.trainable(model) if isinstance(inputs, MapInputs) else
                  [p for p in (model.head if head_only else model).parameters()
                   if p.requires_grad])
        optimizer = torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=c.step_size,
                                                    gamma=c.gamma)
        use_amp = c.amp and c.mode == "full" and device.type == "cuda"
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        memory = HybridMemory(model.dim, n, temp=c.temperature, momentum=c.momentum).to(device)
        calibrator = self.make_calibrator()
        choice = None
        labeler = self.make_labeler()
        constraints = (ConstraintSet.from_answers(n, given.answers) if given is not None
                       else ConstraintSet(n))
        budget = resolve_budget(c.budget_per_cycle, n)

        def evaluate() -> dict[str, float]:
            if eval_inputs is None:
                return {}
            X = eval_inputs.embed_all(model, ctx).cpu().numpy()
            return evaluate_open_set(X, eval_set.identities, eval_set.split)

        reports: list[EpochReport] = []
        start_epoch, indep_threshold, resumed_from = 0, None, None
        initial_retrieval: dict[str, float] = {}
        state = load_checkpoint(c.checkpoint_dir) if resume else None
        if state is not None:
            self._check_resumable(state, n)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            memory.load_state_dict(state["memory"])
            constraints = ConstraintSet.from_answers(n, rows_to_answers(state["answers"]))
            start_epoch = resumed_from = int(state["next_epoch"])
            indep_threshold = state["indep_threshold"]
            reports = [EpochReport.from_dict(r) for r in state["reports"]]
            if calibrator is not None and state.get("clustering_choice"):
                choice = ClusteringChoice(**state["clustering_choice"])
                labeler = self.make_labeler(choice)
                sampler = self.make_sampler(choice) if sampler is not None else None
            initial_retrieval = dict(state["initial_retrieval"])
        else:
            memory.init_features(inputs.embed_all(model, ctx))
            initial_retrieval = evaluate()

        cancelled = False
        asked_total = reports[-1].cumulative_pairs if reports else 0
        for epoch in range(start_epoch, c.epochs):
            if D.any_flag(cancel is not None and cancel.is_set(), device, ctx):
                cancelled = True
                break
            times: dict[str, float] = {}
            t = time.perf_counter()
            X = (memory.features if c.cluster_features == "memory"
                 else inputs.embed_all(model, ctx)).cpu().numpy()
            cycle = epoch // c.epochs_per_cycle + 1
            asked, reason = 0, "no question this epoch"
            if epoch % c.epochs_per_cycle == 0:
                if calibrator is not None:  # the questions come from the calibrated space
                    choice = calibrator.choose(X, constraints)
                    labeler = self.make_labeler(choice)
                    sampler = self.make_sampler(choice) if sampler is not None else None
                if sampler is None:
                    reason = "no sampler"
                else:
                    rows = None
                    if ctx.is_main:
                        asked, reason = self._ask_rounds(sampler, X, constraints, budget,
                                                         oracle, cycle)
                        rows = (answers_to_rows(constraints.answers), asked, reason)
                    rows = D.broadcast_object(rows, ctx)
                    if not ctx.is_main:
                        constraints = ConstraintSet.from_answers(n, rows_to_answers(rows[0]))
                        asked, reason = rows[1], rows[2]
            if calibrator is not None and asked:  # the cycle's answers re-calibrate
                choice = calibrator.choose(X, constraints)
                labeler = self.make_labeler(choice)
            asked_total += asked
            times["ask"] = time.perf_counter() - t

            t = time.perf_counter()
            pl = (labeler(X, constraints, indep_threshold) if fixed is None
                  else fixed_pseudo_labels(fixed))
            indep_threshold = pl.indep_threshold
            memory.set_labels(torch.from_numpy(pl.train))
            pairs = (AnswerPairs(constraints, device) if c.pair_loss_weight > 0 and
                     len(constraints) else None)
            times["pseudo_labels"] = time.perf_counter() - t

            t = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            loss_sum, iters = self._train_epoch(epoch, pl.train, inputs, model, net, memory,
                                                optimizer, scaler, use_amp, device, cancel,
                                                ctx, pairs)
            times["train"] = time.perf_counter() - t
            if iters < c.iters_per_epoch:
                cancelled = True
                break
            scheduler.step()

            t = time.perf_counter()
            due = c.eval_every and (epoch + 1) % c.eval_every == 0
            retrieval = evaluate() if due or epoch == c.epochs - 1 else {}
            times["eval"] = time.perf_counter() - t
            report = EpochReport(
                epoch=epoch, cycle=cycle, loss=loss_sum / max(iters, 1), lr=lr,
                iterations=iters, n_clusters=pl.n_clusters, n_unclustered=pl.n_unclustered,
                n_outliers=int(np.sum(pl.clustered < 0)), n_np3_changed=pl.n_np3_changed,
                pairs_asked=asked, cumulative_pairs=asked_total,
                cumulative_budget_pct=100.0 * asked_total / max(total_pairs(n), 1),
                contradictions=len(constraints.contradictions), sampler_reason=reason,
                quality=_quality(pl.clustered, truth), retrieval=retrieval, seconds=times,
                clustering=_clustering(c, choice, with_sources=True),
            )
            reports.append(report)
            if ctx.is_main and c.checkpoint_dir is not None and (
                    (epoch + 1) % c.checkpoint_every == 0 or epoch == c.epochs - 1):
                save_checkpoint(c.checkpoint_dir, {
                    "config": c.to_dict(), "n_items": n, "next_epoch": epoch + 1,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                    "memory": memory.state_dict(), "indep_threshold": indep_threshold,
                    "answers": answers_to_rows(constraints.answers),
                    "reports": [r.to_dict() for r in reports],
                    "initial_retrieval": initial_retrieval,
                    "clustering_choice": None if choice is None else choice.to_dict(),
                })
            if on_epoch is not None and ctx.is_main:
                on_epoch(report)

        X_final = (memory.features if c.cluster_features == "memory"
                   else inputs.embed_all(model, ctx)).cpu().numpy()
        final = labeler.dbscan(X_final) if fixed is None else fixed
        if len(constraints):
            final = labeler.refinement()(final, X_final, constraints).labels
        model = model.cpu().eval()
        for p in model.parameters():
            p.requires_grad_(True)
        return TrainResult(model=model, reports=reports, constraints=constraints, labels=final,
                           quality=_quality(final, truth), initial_retrieval=initial_retrieval,
                           memory_features=memory.features.cpu().numpy(), cancelled=cancelled,
                           resumed_from_epoch=resumed_from, world_size=ctx.world_size)

    def _train_epoch(self, epoch: int, labels: np.ndarray, inputs: Any, model: EmbeddingNet,
                     net: torch.nn.Module, memory: HybridMemory,
                     optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                     use_amp: bool, device: torch.device, cancel: threading.Event | None,
                     ctx: D.DistContext, pairs: AnswerPairs | None = None
                     ) -> tuple[float, int]:
        """``iters_per_epoch`` steps; returns (loss sum, steps done: fewer when cancelled)."""
        c = self.config
        # Everything random in the epoch derives from (seed, epoch): a resumed job repeats it.
        torch.manual_seed(c.seed * 1_000_003 + epoch)
        rng = np.random.default_rng([c.seed, epoch, 1])
        # Drawn lazily, one batch per step: building the epoch's whole list first took
        # memory and time in proportion to iters_per_epoch before the first cancel check.
        batches = (shard_batch(b, ctx.rank, ctx.world_size)
                   for b in pk_batches(labels, c.num_instances, c.batch_size, c.iters_per_epoch,
                                       rng))
        if c.mode == "head":
            model.head.train()
        elif isinstance(inputs, MapInputs):
            inputs.set_train_mode(model)
        else:
            model.train()
        loss_sum = torch.zeros((), device=device)
        done = 0
        for x, idx in inputs.train_batches(batches, c.seed * 1_000_003 + epoch, c):
            if D.any_flag(cancel is not None and cancel.is_set(), device, ctx):
                break
            with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
                emb = inputs.forward(model, net, x)
            loss = memory(emb.float(), idx)
            if pairs is not None:
                loss = loss + c.pair_loss_weight * pairs.loss(emb.float(), idx, memory.features,
                                                              c.pair_margin)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            memory.update(D.all_gather_rows(emb.detach().float(), ctx),
                          D.all_gather_rows(idx, ctx))
            loss_sum += loss.detach()
            done += 1
        model.eval()
        return float(loss_sum), done

    def _check_resumable(self, state: dict[str, Any], n: int) -> None:
        if int(state["n_items"]) != n:
            raise ValueError(f"the checkpoint is for {state['n_items']} items, this job has {n}")
        # A field the checkpoint lacks was added later, at the default that keeps the old
        # behaviour (e.g. question_rounds 1): the checkpoint was made with that default.
        defaults = {f.name: f.default for f in fields(TrainConfig)}
        saved = {**defaults, **dict(state["config"])}
        now = self.config.to_dict()
        changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k])
        if changed:
            raise ValueError(f"cannot resume: the checkpoint was made with different {changed}")


def _clustering(c: TrainConfig, choice: Any, *, with_sources: bool = False) -> dict[str, Any]:
    """The clustering parameters in force: the calibrated ``choice`` or the config's."""
    if choice is None:
        out: dict[str, Any] = {"eps": c.eps, "k1": c.k1, "k2": c.k2,
                               "min_samples": c.min_samples,
                               "finch_level": CLUSTERING.finch_level}
        if with_sources:
            out.update(eps_source="config", finch_source="default")
        return out
    d = choice.to_dict()
    keys = ("eps", "k1", "k2", "min_samples", "finch_level")
    if with_sources:
        keys += ("eps_source", "finch_source", "n_same", "n_different")
    return {k: d[k] for k in keys}


def _quality(labels: np.ndarray, truth: np.ndarray | None) -> dict[str, float]:
    if truth is None:
        return {}
    q = clustering_quality(labels, truth)
    return {k: float(v) for k, v in q.items() if not (isinstance(v, float) and math.isnan(v))}
