"""Decoded pictures -> the float tensor a Triton embedding model takes, as its ModelSpec says.

Pillow + numpy only (no torchvision), so the client side stays light. The resize is a direct
resize to ``spec.input_size`` with Pillow's bilinear filter: no centre crop (re-ID crops are
already tight around the animal, and a crop would cut off flanks carrying the marks), and the
aspect ratio is not kept (padding would waste input pixels on a small 128x128 input).
Pillow's bilinear filter widens its support when it shrinks, so it antialiases (unlike
``torch.nn.functional.interpolate``): training must call this same function so that the
vectors it learns from match the ones served.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from reidal.embedding.spec import ModelSpec


def preprocess(images: Sequence[Image.Image], spec: ModelSpec) -> np.ndarray:
    """Return a C-contiguous float32 batch, (B, 3, H, W) for NCHW or (B, H, W, 3) for NHWC.

    Each image is converted to RGB (greyscale, palette and RGBA inputs are accepted; alpha is
    dropped), resized to ``spec.input_size`` and normalised with ``spec.mean``/``spec.std``.
    FP16 models get a float16 batch.
    """
    if isinstance(images, Image.Image):
        raise ValueError("preprocess takes a sequence of images; wrap a single image in a list")
    h, w = spec.input_size
    out = np.empty((len(images), h, w, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        if not isinstance(img, Image.Image):
            raise ValueError(f"images[{i}] is a {type(img).__name__}, not a PIL image")
        if img.width < 1 or img.height < 1:
            raise ValueError(f"images[{i}] is empty ({img.width}x{img.height} pixels)")
        rgb = img if img.mode == "RGB" else img.convert("RGB")
        if rgb.size != (w, h):
            rgb = rgb.resize((w, h), Image.Resampling.BILINEAR)
        out[i] = np.asarray(rgb)
    # One vectorised normalisation for the whole batch: scale and shift folded together.
    scale = (1.0 / (255.0 * np.asarray(spec.std, dtype=np.float32))).astype(np.float32)
    shift = (np.asarray(spec.mean, dtype=np.float32) / np.asarray(spec.std, dtype=np.float32))
    batch = out.astype(np.float32) * scale - shift.astype(np.float32)
    if spec.layout == "NCHW":
        batch = batch.transpose(0, 3, 1, 2)
    dtype = np.float16 if spec.dtype == "FP16" else np.float32
    return np.ascontiguousarray(batch, dtype=dtype)
