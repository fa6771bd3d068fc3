"""Backbone features, computed once: what head mode trains on.

The backbone is frozen in head mode, so its pooled features of every image are the same in
every epoch; computing them once turns each epoch's "embed everything" into one small matrix
product (the head) and each training step into a few microseconds of work.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from reidal.embedding.model import EmbeddingNet
from reidal.embedding.spec import ModelSpec
from reidal.training.data import ImageDataset, ImageItem, spec_for


@torch.no_grad()
def cache_backbone_features(
    model: EmbeddingNet,
    images: Sequence[ImageItem],
    batch: int = 32,
    *,
    spec: ModelSpec | None = None,
    device: str | torch.device = "cpu",
    num_workers: int = 0,
) -> torch.Tensor:
    """Pooled backbone features (n, feature_dim), float32 on the CPU, model in eval mode.

    ``images``: PIL images or paths, preprocessed with ``spec`` (default: the model's own
    input size with the default normalisation, as served).
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    if not isinstance(model, EmbeddingNet):
        raise ValueError(f"model must be an EmbeddingNet, got {type(model).__name__}")
    ds = ImageDataset(images, spec_for(model, spec), train=False)
    if len(ds) == 0:
        return torch.empty(0, model.feature_dim)
    was_training = model.training
    model.eval()
    dev = torch.device(device)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False,
                                         num_workers=num_workers,
                                         pin_memory=dev.type == "cuda")
    backbone = model.to(dev)
    out = []
    try:
        for x, _ in loader:
            out.append(backbone.backbone_features(x.to(dev, non_blocking=True)).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)
