"""What a training batch holds: cached backbone features (head mode) or images (full mode).

Images are decoded and preprocessed by the serving path's own function
(:func:`reidal.embedding.preprocess.preprocess`), so the model trains on the tensors it will be
served. Full mode's augmentation is SpCL's: horizontal flip (p 0.5), 10-pixel padding and a
random crop back to size, random erasing (p 0.5, filled with the mean colour, i.e. 0 after
normalisation). Each sample's augmentation is drawn from a generator seeded by the sample's
own seed, which the batch sampler passes with its index, so batches are the same whatever
the number of DataLoader workers and after a resume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from reidal.embedding.images import decode_image
from reidal.embedding.preprocess import preprocess
from reidal.embedding.spec import ModelSpec, default_spec

#: SpCL's padding before the random crop, in pixels (at its 256x128 input).
PAD = 10
#: SpCL's random erasing: probability, area fraction range, aspect-ratio range.
ERASE_P = 0.5
ERASE_AREA = (0.02, 0.4)
ERASE_RATIO = 0.3

ImageItem = Image.Image | str | Path


def spec_for(model: torch.nn.Module, spec: ModelSpec | None = None) -> ModelSpec:
    """The preprocessing spec of ``model``: given, or the default one at the model's input size."""
    if spec is not None:
        return spec
    size = getattr(model, "arch", {}).get("input_size")
    base = default_spec()
    return replace(base, input_size=(int(size[0]), int(size[1]))) if size else base


def load_image(item: ImageItem) -> Image.Image:
    """A PIL image as given, or decoded from a path (EXIF-upright RGB)."""
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, (str, Path)):
        return decode_image(None, str(item), item_id=str(item))
    raise ValueError(f"an image item must be a PIL image or a path, got {type(item).__name__}")


def check_image_items(items: object) -> Sequence[ImageItem]:
    """Images as a sequence of PIL images / paths, or raise ValueError naming the problem."""
    if isinstance(items, (Image.Image, str, Path)) or not isinstance(items, Sequence):
        raise ValueError("images must be a sequence of PIL images or paths")
    for k, it in enumerate(items):
        if not isinstance(it, (Image.Image, str, Path)):
            raise ValueError(f"images[{k}] is a {type(it).__name__}, not a PIL image or a path")
    return items


def augment(x: torch.Tensor, spec: ModelSpec, rng: np.random.Generator) -> torch.Tensor:
    """SpCL's flip + pad/crop + random erasing on one normalised (3, H, W) tensor."""
    _, h, w = x.shape
    if rng.random() < 0.5:
        x = x.flip(2)
    pad = max(1, round(PAD * h / 256))  # SpCL pads 10 px at height 256
    black = torch.tensor([-m / s for m, s in zip(spec.mean, spec.std, strict=True)],
                         dtype=x.dtype).view(3, 1, 1)
    padded = black.expand(3, h + 2 * pad, w + 2 * pad).clone()
    padded[:, pad:pad + h, pad:pad + w] = x
    top, left = int(rng.integers(0, 2 * pad + 1)), int(rng.integers(0, 2 * pad + 1))
    x = padded[:, top:top + h, left:left + w].contiguous()
    if rng.random() < ERASE_P:
        for _ in range(100):  # torchvision-style: retry until the box fits
            area = h * w * rng.uniform(*ERASE_AREA)
            ratio = rng.uniform(ERASE_RATIO, 1.0 / ERASE_RATIO)
            eh, ew = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if 0 < eh < h and 0 < ew < w:
                y0, x0 = int(rng.integers(0, h - eh + 1)), int(rng.integers(0, w - ew + 1))
                x[:, y0:y0 + eh, x0:x0 + ew] = 0.0
                break
    return x


class ImageDataset(torch.utils.data.Dataset):
    """Items -> preprocessed float32 (3, H, W) tensors; keys are ``(index, seed)`` or ``index``.

    With ``train`` and a seed in the key the sample is augmented from that seed; a plain
    index gives the clean preprocessed image (embedding, evaluation).
    """

    def __init__(self, items: Sequence[ImageItem], spec: ModelSpec, *, train: bool) -> None:
        if spec.layout != "NCHW":
            raise ValueError(f"training needs an NCHW spec, got {spec.layout}")
        self.items = check_image_items(items)
        self.spec = replace(spec, dtype="FP32")
        self.train = train

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        x = torch.from_numpy(preprocess([load_image(self.items[index])], self.spec)[0])
        if self.train and seed is not None:
            x = augment(x, self.spec, np.random.default_rng(seed))
        return x, index


def preprocess_all(items: Sequence[ImageItem], spec: ModelSpec) -> torch.Tensor:
    """Every item preprocessed into one float32 (n, 3, H, W) tensor (small collections)."""
    ds = ImageDataset(items, spec, train=False)
    return torch.stack([ds[i][0] for i in range(len(ds))]) if len(ds) else torch.empty(0)
