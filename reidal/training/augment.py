"""Image-level augmentation that breaks scene shortcuts: random resized crop, flip, colour jitter.

Partial mode (``TrainConfig.mode == "partial"``) trains on a few fixed augmented *views* of
every image, cached below the trainable stages (:mod:`reidal.training.partial`). The views
are drawn here, on the decoded picture, before the serving path's own resize and
normalisation (:func:`reidal.embedding.preprocess.preprocess`), with Pillow and numpy only.

Why these (OURS, docs/method.md): on photos from camera traps and video several animals
share a background, a camera's colour cast and a framing, and ImageNet features match those
before they match coat marks (issue 13: on a cow-face set nearest neighbours were mostly
other animals of the same scene). A random resized crop moves and rescales the animal
against its background; colour jitter (brightness, contrast, saturation, hue) removes the
camera's colour cast as a cue; the horizontal flip is SpCL's. ``crop_scale`` is the smallest
fraction of the image's area a crop keeps (the aspect ratio of the crop is drawn in
[3/4, 4/3], torchvision's RandomResizedCrop convention) and ``jitter`` the strength of the
colour jitter: brightness, contrast and saturation factors drawn in [1 - jitter, 1 + jitter],
a hue shift in [-jitter / 4, jitter / 4] of the colour circle.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageEnhance

#: Aspect ratios (width / height) a random resized crop draws from (log-uniform).
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
#: Probability of a horizontal flip (SpCL's).
FLIP_P = 0.5


def random_resized_crop(img: Image.Image, rng: np.random.Generator, scale_min: float
                        ) -> Image.Image:
    """A crop covering ``[scale_min, 1]`` of the area at an aspect ratio in CROP_RATIO (the
    whole image when ten draws do not fit); the caller resizes it."""
    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(scale_min, 1.0)
        ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return img.crop((x0, y0, x0 + cw, y0 + ch))
    return img


def color_jitter(img: Image.Image, rng: np.random.Generator, strength: float) -> Image.Image:
    """Brightness, contrast, saturation (factors in [1 - s, 1 + s]) and hue (shift in
    [-s/4, s/4] of the circle), applied in a random order."""
    if strength <= 0:
        return img
    ops = rng.permutation(4)
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    for op in ops:
        if op == 0:
            img = ImageEnhance.Brightness(img).enhance(rng.uniform(lo, hi))
        elif op == 1:
            img = ImageEnhance.Contrast(img).enhance(rng.uniform(lo, hi))
        elif op == 2:
            img = ImageEnhance.Color(img).enhance(rng.uniform(lo, hi))
        else:
            shift = int(round(rng.uniform(-strength / 4, strength / 4) * 256)) % 256
            if shift:
                hsv = np.array(img.convert("HSV"))
                hsv[..., 0] = (hsv[..., 0].astype(np.int16) + shift).astype(np.uint8)
                img = Image.fromarray(hsv, "HSV").convert("RGB")
    return img


def scene_augment(img: Image.Image, rng: np.random.Generator, *, crop_scale: float,
                  jitter: float) -> Image.Image:
    """One augmented view of ``img`` (RGB): random resized crop, flip, colour jitter."""
    img = img if img.mode == "RGB" else img.convert("RGB")
    img = random_resized_crop(img, rng, crop_scale)
    if rng.random() < FLIP_P:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return color_jitter(img, rng, jitter)
