"""Partial mode: the last backbone stages train on CPU, on feature maps cached below them.

EfficientNet-Lite0 spends most of its compute in its early, high-resolution stages, and
those are the ones a new species needs least changed. Partial mode freezes the backbone up
to the first block of its last ``trainable_stages`` stages
(:meth:`reidal.embedding.model.LiteFeatures.first_trainable_block`), computes the frozen
part once per image and view, and trains the rest (those stages, the 1x1 conv head and the
embedding head) on the cached maps: a training step runs only the small, low-resolution
upper part.

Exactness (OURS, docs/method.md). The frozen lower part runs in eval mode (BatchNorm with
its ImageNet statistics, no drop-connect), so its output for a given input image is a fixed
function of that image: caching it is exact, and the cached map equals what the whole
network computes below the split when it serves that image. Random image augmentation
(crops, colour jitter) happens *before* the frozen part, so an augmentation drawn afresh at
every step could not be cached. The choice here: ``augment_views`` augmented views of every
image are drawn once (:func:`reidal.training.augment.scene_augment`, seeded by the job's
seed, the image's index and the view's number) and cached beside the clean image; a
training sample picks one of the ``1 + augment_views`` maps at random. The augmentation
distribution is thus sampled at a few fixed points per image instead of continuously (the
price of exactness and of a bounded CPU cost: caching costs ``1 + augment_views``
forward passes of the lower part per image, once). The clean map (view 0) is what the
hybrid memory is initialised from and what evaluation embeds, as served.

Memory: ``n x (1 + augment_views)`` maps of the split block's input, float32; at 224 px
and ``trainable_stages`` 1 (EfficientNet-Lite0's last block, a 192 x 7 x 7 input) 37 KB a
map, i.e. 190 KB an image with 4 views; ``trainable_stages`` 2 (112 x 14 x 14) 88 KB a map.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from reidal.embedding.model import EmbeddingNet, LiteFeatures
from reidal.embedding.preprocess import preprocess
from reidal.embedding.spec import ModelSpec
from reidal.training import distributed as D
from reidal.training.augment import scene_augment
from reidal.training.data import ImageItem, check_image_items, load_image, spec_for


@dataclass(frozen=True)
class LowerFeatures:
    """Cached inputs of block ``first_block``: ``clean`` (n, C, h, w), the served images'; and
    ``views`` (n, V, C, h, w), V augmented views of each (None when V is 0)."""

    first_block: int
    clean: torch.Tensor
    views: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    @property
    def n_views(self) -> int:
        return 0 if self.views is None else int(self.views.shape[1])

    @staticmethod
    def concat(parts: Sequence[LowerFeatures]) -> LowerFeatures:
        """Rows of several caches of the same split, in order (e.g. cached batch by batch)."""
        if not parts or len({p.first_block for p in parts}) != 1 or len(
                {p.n_views for p in parts}) != 1:
            raise ValueError("concat needs caches of one split block and view count")
        views = None if parts[0].views is None else torch.cat([p.views for p in parts])
        return LowerFeatures(parts[0].first_block, torch.cat([p.clean for p in parts]), views)

    def subset(self, idx: np.ndarray) -> LowerFeatures:
        """The rows ``idx`` (e.g. a benchmark's training pool)."""
        t = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        return LowerFeatures(self.first_block, self.clean.index_select(0, t),
                             None if self.views is None else self.views.index_select(0, t))


def lite_backbone(model: EmbeddingNet) -> LiteFeatures:
    """The model's EfficientNet-Lite backbone, or ValueError (partial mode splits only it)."""
    if not isinstance(model.backbone, LiteFeatures):
        raise ValueError("partial mode splits reidal's EfficientNet-Lite backbone; this model's "
                         f"backbone is a {type(model.backbone).__name__} (use head or full mode)")
    return model.backbone


def view_seed(seed: int, index: int, view: int) -> list[int]:
    """The generator seed of one augmented view (the same whatever the batching)."""
    return [int(seed), int(index), int(view), 4]


@torch.no_grad()
def cache_lower_features(
    model: EmbeddingNet,
    images: Sequence[ImageItem],
    first_block: int,
    *,
    views: int = 0,
    seed: int = 0,
    crop_scale: float = 0.4,
    jitter: float = 0.4,
    spec: ModelSpec | None = None,
    batch: int = 32,
    device: str | torch.device = "cpu",
    indices: Sequence[int] | None = None,
) -> LowerFeatures:
    """The input of block ``first_block`` for every image (eval mode), clean and in ``views``
    augmented views. ``indices``: the images' numbers in the seeding of their views (default
    0..n-1), so that a subset cached on its own gets the views the whole set would."""
    images = check_image_items(images)
    backbone = lite_backbone(model)
    if not 0 <= first_block <= backbone.n_blocks:
        raise ValueError(f"first_block must be in 0..{backbone.n_blocks}, got {first_block}")
    if isinstance(views, bool) or not isinstance(views, int) or views < 0:
        raise ValueError(f"views must be an integer >= 0, got {views!r}")
    spec = spec_for(model, spec)
    if spec.layout != "NCHW":
        raise ValueError(f"training needs an NCHW spec, got {spec.layout}")
    numbers = list(range(len(images))) if indices is None else [int(i) for i in indices]
    if len(numbers) != len(images):
        raise ValueError(f"indices has {len(numbers)} entries for {len(images)} images")
    dev = torch.device(device)
    was = model.training
    model.eval().to(dev)
    per_image = 1 + views
    step = max(1, batch // per_image)
    chunks = []
    try:
        for s in range(0, len(images), step):
            pics = []
            for k in range(s, min(s + step, len(images))):
                img = load_image(images[k])
                img = img if img.mode == "RGB" else img.convert("RGB")
                pics.append(img)
                pics.extend(scene_augment(img, np.random.default_rng(view_seed(seed,
                                                                               numbers[k], v)),
                                          crop_scale=crop_scale, jitter=jitter)
                            for v in range(1, views + 1))
            x = torch.from_numpy(preprocess(pics, spec)).to(dev).float()
            chunks.append(backbone.lower(x, first_block).float().cpu())
    finally:
        model.train(was)
    if not chunks:
        raise ValueError("no image to cache")
    maps = torch.cat(chunks)
    maps = maps.view(len(images), per_image, *maps.shape[1:])
    return LowerFeatures(first_block, maps[:, 0].contiguous(),
                         maps[:, 1:].contiguous() if views else None)


class MapInputs:
    """What the trainer's loop needs in partial mode (the counterpart of head mode's cached
    features and full mode's images): batches of cached maps, the trainable upper part."""

    def __init__(self, features: LowerFeatures, device: torch.device, batch: int) -> None:
        self.features = features
        self.first = features.first_block
        self.device = device
        self.batch = batch

    def __len__(self) -> int:
        return len(self.features)

    def train_batches(self, batches: list[np.ndarray], seed: int, config: object
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Each sample's map: the clean one or one of its views, uniformly at random."""
        rng = np.random.default_rng([seed, 3])
        f = self.features
        for idx in batches:
            t = torch.from_numpy(idx)
            x = f.clean.index_select(0, t)
            if f.views is not None:
                pick = torch.from_numpy(rng.integers(0, f.n_views + 1, idx.size))
                aug = pick > 0
                if bool(aug.any()):
                    x[aug] = f.views[t[aug], pick[aug] - 1]
            yield x.to(self.device), t.to(self.device)

    def forward(self, model: EmbeddingNet, net: torch.nn.Module, x: torch.Tensor
                ) -> torch.Tensor:
        return model.embed_features(model.pooled(model.backbone.upper(x, self.first)))

    @torch.no_grad()
    def embed_all(self, model: EmbeddingNet, ctx: D.DistContext) -> torch.Tensor:
        was = model.training
        model.eval()
        clean = self.features.clean
        out = torch.cat([self.forward(model, model, clean[s:s + self.batch].to(self.device))
                         for s in range(0, len(self), self.batch)])
        model.train(was)
        return out.float()

    def set_train_mode(self, model: EmbeddingNet) -> None:
        """The frozen lower part stays in eval mode (its cached maps assume it); the upper
        part and the head train."""
        model.eval()
        for m in lite_backbone(model).upper_modules(self.first):
            m.train()
        model.head.train()

    def trainable(self, model: EmbeddingNet) -> list[torch.nn.Parameter]:
        """Freeze the backbone below the split; the parameters that train."""
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        params = [p for m in lite_backbone(model).upper_modules(self.first)
                  for p in m.parameters()]
        for p in params:
            p.requires_grad_(True)
        return [*params, *model.head.parameters()]
