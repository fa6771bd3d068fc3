"""Training: SpCL-style self-paced contrastive learning on NP3-refined pseudo-labels (no gRPC).

``SpCLTrainer(TrainConfig(...), model).fit(images_or_features, oracle=...)`` trains a copy of
an :class:`~reidal.embedding.model.EmbeddingNet` with SpCL's hybrid memory on pseudo-labels
from DBSCAN + NP3, asking pairs with AAS (or a baseline) at the start of every cycle.
"""

from reidal.training.checkpoint import load_checkpoint, save_checkpoint
from reidal.training.config import TrainConfig
from reidal.training.features import cache_backbone_features
from reidal.training.memory import HybridMemory
from reidal.training.pk_sampler import pk_batches, pk_pass
from reidal.training.pseudo_labels import SpCLPseudoLabeler, reliability_filter
from reidal.training.trainer import EpochReport, EvalSet, SpCLTrainer, TrainResult

__all__ = [
    "EpochReport",
    "EvalSet",
    "HybridMemory",
    "SpCLPseudoLabeler",
    "SpCLTrainer",
    "TrainConfig",
    "TrainResult",
    "cache_backbone_features",
    "load_checkpoint",
    "pk_batches",
    "pk_pass",
    "reliability_filter",
    "save_checkpoint",
]
