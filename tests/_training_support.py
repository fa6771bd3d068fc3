"""Shared by the trainer tests: a small procedural collection and its clustering settings."""

from __future__ import annotations

from typing import Any

import numpy as np

#: Collection-scale clustering (identities of 6-10 images), as the demo uses.
SMALL = dict(k1=10, k2=3, min_samples=2, num_identities=8, num_instances=4, device="cpu")


def small_collection(image_size: int) -> tuple[Any, np.ndarray, np.ndarray]:
    """12 procedural individuals of 6-10 images at ``image_size`` px: the default model (at
    the tests' input size, _model_support.TEST_INPUT_SIZE), their backbone features and
    their identities (0..11)."""
    from _model_support import TEST_INPUT_SIZE

    from reidal.data.synthetic_images import SyntheticConfig, iter_samples
    from reidal.embedding.model import build_default_model
    from reidal.training import cache_backbone_features

    samples = list(iter_samples(SyntheticConfig(n_individuals=12, image_size=image_size,
                                                images_per_individual=(6, 10), seed=0)))
    model = build_default_model(input_size=TEST_INPUT_SIZE)
    feats = cache_backbone_features(model, [s.image for s in samples])
    truth = np.unique([s.identity for s in samples], return_inverse=True)[1].reshape(-1)
    return model, feats, truth
