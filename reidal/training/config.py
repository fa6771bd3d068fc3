"""Every knob of the SpCL + NP3 + active-learning trainer, named, defaulted and validated.

Defaults are SpCL's unsupervised recipe (Ge et al., NeurIPS 2020, ``spcl_train_usl.py``) and
the paper's schedule (docs/method.md, step 3): 50 epochs, an active-learning cycle every 10
epochs (5 cycles), batch 64 = 16 pseudo-identities x 4 images, Adam lr 3.5e-4, weight decay
5e-4, StepLR 20 / 0.1, 400 iterations an epoch, hybrid memory momentum 0.2 and temperature
0.05, DBSCAN eps 0.6 / min_samples 4 on the k-reciprocal Jaccard distance (k1 30, k2 6),
reliability re-clusterings at eps +/- 0.02 with the independence threshold at the 90th
percentile of the first epoch's clusters. Choices SpCL does not make are marked OURS. The
clustering and sampler defaults are read from the one defaults table, reidal.core.params.

A bad value raises ``ValueError`` naming the field when the config is built: every field's
accepted values are declared in one table, ``TrainConfig._constraints`` (the constraint
types and the validator of reidal.core.validation, as the core's estimators declare theirs;
the clustering fields reuse the DBSCAN's and the pseudo-labeler's own declarations), and the
two checks that span fields (eps_gap below eps, their sum below 1) extend
``TrainConfig._check_params`` as a ParamsMixin subclass would. The one check that needs the
data (a batch larger than the collection) happens in ``SpCLTrainer.fit``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from reidal.core.clustering import DBSCANJaccard
from reidal.core.params import (
    CHOICE_NAMES,
    CLUSTERING,
    CLUSTERING_MODES,
    OS_SIMILARITIES,
    SAMPLING,
)
from reidal.core.samplers import SAMPLERS as REGISTERED_SAMPLERS
from reidal.core.validation import Constraint, InstanceOf, Interval, OneOf, SubsetOf, check_params
from reidal.training.pseudo_labels import SpCLPseudoLabeler

MODES = ("head", "partial", "full")
DEVICES = ("cpu", "cuda", "auto")
#: The samplers of the registry (reidal.core.samplers), and "none": SpCL alone.
SAMPLERS = (*REGISTERED_SAMPLERS, "none")
CLUSTERINGS = CLUSTERING_MODES
#: Clustering parameters a calibrated run may keep at the config's values.
PINNABLE = ("eps", "k1", "k2", "min_samples")
CLUSTER_FEATURES = ("memory", "model")


#: TrainConfig field -> the ClusteringParams field (a collection's stored name) it is.
CLUSTERING_FIELDS = {name: key for key, name in CHOICE_NAMES.items() if name in PINNABLE}


_COUNT = Interval(1, None, integer=True)  # an integer >= 1
_NATURAL = Interval(0, None, integer=True)  # an integer >= 0
_BOOL = InstanceOf(bool, "a bool")
_DBSCAN, _LABELER = DBSCANJaccard._constraints, SpCLPseudoLabeler._constraints


@dataclass(frozen=True)
class TrainConfig:
    """Configuration of one training job (see the module docstring for where defaults come from).

    mode: ``"head"`` trains only the embedding head on backbone features cached once (the
    CPU default: minutes for a few hundred images); ``"partial"`` also fine-tunes the last
    ``trainable_stages`` stages of the backbone, on feature maps cached below them
    (reidal.training.partial: CPU, bounded time); ``"full"`` fine-tunes the backbone on
    images (the GPU mode; mixed precision on CUDA, a DataLoader feeding it, data-parallel
    under torchrun). One code path serves all three; only what a batch holds differs.
    trainable_stages (partial mode): how many of EfficientNet-Lite0's 7 stages train,
    counted from the last (1: its last block + the 1x1 conv head; 2: the last 5 blocks + the
    conv head; ...). The input size is the model's own (``build_default_model(input_size=)``).
    augment_views (partial mode, OURS): augmented views cached per image beside the clean
    one (0: train on the clean images only); crop_scale, color_jitter: their random resized
    crop's smallest area fraction and colour jitter strength (reidal.training.augment).
    pair_loss_weight (OURS, any mode; 0 = off, SpCL's loss alone): weight of the contrastive
    loss on the answered and implied SAME / DIFFERENT pairs (reidal.training.pair_loss)
    added to the hybrid-memory loss; pair_margin: the similarity above which a DIFFERENT pair
    is penalised.
    device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when available).

    epochs, epochs_per_cycle: the schedule. An active-learning cycle starts at every epoch
    that is a multiple of ``epochs_per_cycle`` (epoch 0 included, as in the paper: AAS every
    10 epochs, 5 cycles in 50 epochs).
    iters_per_epoch: optimiser steps per epoch (SpCL 400).
    num_identities (P), num_instances (K): a batch holds P pseudo-identities x K images
    (SpCL's RandomMultipleGallerySampler; an un-clustered image is an identity of one).
    lr, weight_decay, step_size, gamma: Adam and StepLR (stepped once per epoch).
    momentum, temperature: the hybrid memory (SpCL's --momentum, --temp).
    eps, min_samples, k1, k2: DBSCAN on the k-reciprocal Jaccard distance.
    eps_gap: the tight / loose re-clusterings of the reliability criterion use eps -/+ it.
    reliability_percentile: clusters whose independence score (1 - IoU with the loose
    clustering, minimum over the cluster's members) exceeds this quantile of the first
    epoch's multi-image clusters are dissolved into un-clustered instances (SpCL: 0.9, i.e.
    the 10 % least independent clusters; the threshold is fixed at the first epoch trained,
    as in SpCL). 1.0 keeps every cluster's independence; compactness filtering still applies
    unless ``self_paced`` is False.
    self_paced: apply SpCL's reliability filtering at all (False: train on every DBSCAN
    cluster as given, for ablations).
    budget_per_cycle: pairs asked per cycle, a count (int) or a fraction of all pairs
    (float; paper 0.0002 = 0.02 %).
    sampler: a name of the sampler registry (reidal.core.samplers), built with this
    config's (or the calibrated) clustering: ``"aas"`` (Ambiguity-Aware Sampling),
    ``"aas-continued"`` (OURS: AAS, then the allowance it leaves goes to the pairs closest to
    DBSCAN's eps; reidal.core.continuation), ``"random"`` (uniform unanswered pairs),
    ``"uncertainty"`` / ``"nis"`` (the benchmark's baselines), or ``"none"`` (SpCL alone: no
    question is asked).
    clustering (OURS, default "fixed" = the paper: eps, k1, k2, min_samples as given):
    ``"calibrated"`` chooses them at every cycle start from the data and the answers so far,
    and again after the cycle's answers (reidal.core.calibration: k1 from the collection's
    size, eps by the rho rule, then the eps that separates the SAME / DIFFERENT answers;
    AAS's FINCH level from the answers); the labeler and AAS cluster with the choice, and
    each report records it. ``clustering_pinned`` names the parameters kept at this
    config's values (a user's explicit choice wins).
    question_rounds (OURS, default 1 = the paper: one draw a cycle): a cycle's allowance is
    asked in up to this many rounds on the same features (0: no cap, until the allowance is
    spent or a round finds nothing); each round draws what is left of the allowance after
    the previous rounds' answers were recorded (NP3 applied), and a round that finds nothing
    to ask ends the cycle. This is what the server does with a person: each GetNextPairs
    after a batch of answers samples again with them. A sampler whose pool is smaller than
    the allowance (AAS, once the clusterings mostly agree) then asks about the disagreement
    the answers' splits reveal instead of letting the rest of the allowance lapse; a
    sampler that always fills it asks the same. Each round is one more sampler call (about
    a minute at 100k items), hence the default.
    aas_os_similarity (OURS, default "jaccard" = the paper): the similarity AAS's U_os ranks
    region medoids by, "jaccard" or "cosine" (``AmbiguityAwareSampler(os_similarity=...)``).
    cluster_features: what the per-epoch clustering (and the sampler) sees. ``"memory"``
    (SpCL: the momentum-updated instance features of the hybrid memory) or ``"model"``
    (OURS option: every training item re-embedded by the current model, eval mode).
    amp: mixed precision (float16 autocast + gradient scaling) in full mode on CUDA; ignored
    on CPU and in head mode.
    augment: SpCL's training augmentation in full mode (horizontal flip, 10 px pad + random
    crop, random erasing p=0.5); head mode trains on fixed cached features (no augmentation).
    num_workers: DataLoader workers in full mode (decoding + preprocessing + augmentation).
    embed_batch_size: batch size of the no-grad passes (caching, re-embedding, evaluation).
    eval_every: evaluate open-set retrieval of the current model every this many epochs (and
    after the last one) when ``fit`` is given an evaluation set; 0 = only after the last.
    seed: everything random (PK batches, samplers, oracle-independent) derives from it and
    the epoch number, so a resumed job repeats the uninterrupted one.
    checkpoint_dir: where ``last.pt`` is written atomically after every
    ``checkpoint_every`` epochs (None: no checkpoints).
    """

    mode: str = "head"
    trainable_stages: int = 1
    augment_views: int = 4
    crop_scale: float = 0.4
    color_jitter: float = 0.4
    pair_loss_weight: float = 0.0
    pair_margin: float = 0.5
    device: str = "auto"
    epochs: int = 50
    epochs_per_cycle: int = 10
    iters_per_epoch: int = 400
    num_identities: int = 16
    num_instances: int = 4
    lr: float = 3.5e-4
    weight_decay: float = 5e-4
    step_size: int = 20
    gamma: float = 0.1
    momentum: float = 0.2
    temperature: float = 0.05
    eps: float = CLUSTERING.dbscan_eps
    min_samples: int = CLUSTERING.min_samples
    k1: int = CLUSTERING.k1
    k2: int = CLUSTERING.k2
    eps_gap: float = 0.02
    reliability_percentile: float = 0.9
    self_paced: bool = True
    budget_per_cycle: int | float = SAMPLING.default_budget["fraction"]
    sampler: str = SAMPLING.sampler
    question_rounds: int = 1
    aas_os_similarity: str = SAMPLING.os_similarity
    clustering: str = "fixed"
    clustering_pinned: tuple[str, ...] = ()
    cluster_features: str = "memory"
    amp: bool = True
    augment: bool = True
    num_workers: int = 4
    embed_batch_size: int = 64
    eval_every: int = 1
    seed: int = 0
    checkpoint_dir: str | Path | None = None
    checkpoint_every: int = 1

    #: What each field accepts (reidal.core.validation: the message is "TrainConfig.<field>
    #: must be <what it accepts>, got <value>").
    _constraints: ClassVar[dict[str, Constraint | tuple[Constraint, ...]]] = {
        "mode": OneOf(MODES),
        "device": OneOf(DEVICES),
        "sampler": OneOf(SAMPLERS),
        "cluster_features": OneOf(CLUSTER_FEATURES),
        "clustering": OneOf(CLUSTERINGS),
        "clustering_pinned": SubsetOf(PINNABLE),
        "aas_os_similarity": OneOf(OS_SIMILARITIES),
        **{name: _COUNT for name in ("epochs", "epochs_per_cycle", "iters_per_epoch",
                                     "num_identities", "num_instances", "step_size",
                                     "embed_batch_size", "checkpoint_every",
                                     "trainable_stages")},
        **{name: _DBSCAN[name] for name in ("eps", "min_samples", "k1", "k2")},
        **{name: _NATURAL for name in ("num_workers", "eval_every", "seed",
                                       "question_rounds", "augment_views")},
        **{name: _BOOL for name in ("self_paced", "amp", "augment")},
        "lr": Interval(0.0, None, closed="neither"),
        "weight_decay": Interval(0.0, None),
        "gamma": Interval(0.0, 1.0, closed="right"),
        # 1 would never update the memory
        "momentum": Interval(0.0, 1.0, closed="left"),
        "temperature": Interval(0.0, None, closed="neither"),
        "eps_gap": _LABELER["eps_gap"],
        "reliability_percentile": _LABELER["reliability_percentile"],
        "crop_scale": Interval(0.0, 1.0, closed="right"),
        "color_jitter": Interval(0.0, 1.0),
        "pair_loss_weight": Interval(0.0, None),
        "pair_margin": Interval(-1.0, 1.0, closed="left"),
        # a pair count, or a fraction of all pairs
        "budget_per_cycle": (_COUNT, Interval(0.0, 1.0, closed="right")),
        "checkpoint_dir": (OneOf((None,)), InstanceOf((str, Path), "a path")),
    }

    def __post_init__(self) -> None:
        self._check_params()
        object.__setattr__(self, "clustering_pinned", tuple(self.clustering_pinned))

    def _check_params(self) -> None:
        """Every field against its declared constraint, then the checks that span fields."""
        check_params({f.name: getattr(self, f.name) for f in fields(self)},
                     self._constraints, owner="TrainConfig")
        if not self.eps_gap < self.eps:
            raise ValueError(f"TrainConfig.eps_gap must be below eps ({self.eps:g}): the "
                             f"tight re-clustering runs at eps - eps_gap, got {self.eps_gap!r}")
        if not self.eps + self.eps_gap < 1.0:
            raise ValueError(f"TrainConfig.eps plus eps_gap ({self.eps_gap:g}) must be < 1 (a "
                             f"Jaccard distance of 1 means no overlap), got {self.eps!r}")

    @property
    def batch_size(self) -> int:
        """Images per optimiser step, P x K (split across processes under torchrun)."""
        return self.num_identities * self.num_instances

    @property
    def cycles(self) -> int:
        """Number of active-learning cycles the schedule holds."""
        return -(-self.epochs // self.epochs_per_cycle)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (paths as strings), e.g. for a checkpoint or a log line."""
        out = asdict(self)
        if out["checkpoint_dir"] is not None:
            out["checkpoint_dir"] = str(out["checkpoint_dir"])
        return out


#: The schedule of head mode on small collections (a few hundred images), used by server
#: training jobs and the benchmark suite instead of SpCL's 400 iterations x lr 3.5e-4 (which
#: were set for ~13k-image person re-ID sets). Measured on the default synthetic collection
#: (143 training images, bench/bench_training.py): with SpCL's schedule every method, with
#: answers or without, ended 2-7 mAP points *below* the untrained model (the head memorises
#: noisy pseudo-labels); with this one training without answers stays near the untrained
#: model and answers add to it. Same schedule for every method and sampler.
#: ``pair_loss_weight`` 1 (OURS; 0 before 2026-12-07): the answers also enter the loss
#: directly (reidal.training.pair_loss); with reidal bench on zebra-rapid at 20 pairs x 5
#: cycles, 4 seeds, it added +2.4 mAP to AAS and +4.1 to NIS (docs/results/README.md,
#: "Issue 13 at 224 px"; BenchSchedule's default too). Without answers it changes nothing.
HEAD_SCHEDULE: dict[str, Any] = {
    "lr": 1e-4,
    "iters_per_epoch": 50,
    "epochs": 25,
    "epochs_per_cycle": 5,
    "step_size": 10,
    "pair_loss_weight": 1.0,
}

#: The schedule of partial mode on small collections (OURS; reidal.training.partial): the
#: head schedule with 10 steps an epoch instead of 50 (a step runs the last backbone stage
#: as well as the head, and the pool is a few hundred images: 250 steps of 64 are ~80
#: passes over a 200-image pool), the loss on the answers at weight 1 (as in head mode) and
#: 4 cached augmented views per image. Used by server jobs in partial mode and by
#: ``reidal bench --mode partial`` (which takes its own --iters).
PARTIAL_SCHEDULE: dict[str, Any] = {**HEAD_SCHEDULE, "iters_per_epoch": 10,
                                    "augment_views": 4, "trainable_stages": 1}


def mode_schedule(mode: str) -> dict[str, Any]:
    """The small-collection schedule of a CPU mode (head or partial)."""
    return PARTIAL_SCHEDULE if mode == "partial" else HEAD_SCHEDULE
