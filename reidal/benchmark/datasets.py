"""What the benchmark runs on: a bundled synthetic set or a WildlifeDatasets CSV, split once.

A dataset is loaded once per benchmark: images rendered (synthetic) or listed (CSV), the
default model's backbone features cached once (head mode trains on them; every method
shares them), and the open-set split made (``bench/bench_training.py`` loads the same):
:func:`reidal.core.evaluation.open_set_split` on the dataset's own train/test column when
every image has one, with the gallery chosen by similarity under the untrained model, split
seed :data:`SPLIT_SEED` for every method and run seed. The training pool is the training images
of the known identities, unlabelled; the simulated annotator answers from their identities.

The *fingerprint* says what was loaded without loading it (the synthetic config, or the
SHA-256 of the CSV's bytes), so a resumed benchmark knows whether its stored runs still
describe this data before spending any time on it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: The open-set split's seed: one split per dataset, shared by every method and run seed.
SPLIT_SEED = 0
#: Bundled names: ``synthetic`` is the default generated set (``SyntheticConfig()``: 40
#: individuals, 4-16 images each, 128 px); ``synthetic-small`` a 20-individual 64 px set for
#: ``--quick`` (about 120 images, a pool of about 60).
BUNDLED = {
    "synthetic": {},
    "synthetic-small": {"n_individuals": 20, "images_per_individual": (4, 8), "image_size": 64,
                        "n_species": 4},
}


@dataclass
class BenchDataset:
    """One loaded dataset: every image's cached backbone features and identity, the split.

    ``images``: the images themselves (PIL images for a synthetic set, paths for a CSV),
    kept only for rows that must re-embed them (a Triton model).
    """

    name: str
    fingerprint: str
    images: list[Any]
    features: Any  # torch.Tensor (n, feature_dim) of the default model's backbone
    identities: np.ndarray
    split: Any  # reidal.core.evaluation.OpenSetSplit

    @property
    def pool(self) -> np.ndarray:
        """Indices of the training pool (known identities' training images)."""
        return self.split.train_idx

    @property
    def pool_truth(self) -> np.ndarray:
        """Identity codes of the pool: what the simulated annotator answers from."""
        return np.unique(self.identities[self.pool], return_inverse=True)[1].reshape(-1)


def dataset_name(spec: str) -> str:
    """The short name a dataset is reported under: a bundled name, or the CSV's folder name
    (its file stem when the folder name is empty)."""
    if spec in BUNDLED:
        return spec
    p = Path(spec)
    return p.resolve().parent.name or p.stem


def _synthetic_config(spec: str) -> Any:
    from reidal.data.synthetic_images import SyntheticConfig

    return SyntheticConfig(**BUNDLED[spec])


def dataset_fingerprint(spec: str) -> str:
    """A short hash of what ``spec`` names (synthetic config or CSV bytes), without loading it.

    Raises ValueError for an unknown name or a CSV that does not exist.
    """
    if spec in BUNDLED:
        payload = json.dumps(_synthetic_config(spec).to_json_dict(), sort_keys=True).encode()
    else:
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"dataset {spec!r} is neither a bundled name "
                             f"({', '.join(BUNDLED)}) nor an existing CSV file")
        payload = path.read_bytes()
    return hashlib.sha256(payload).hexdigest()[:16]


def load_dataset(spec: str, model: Any, *, batch: int = 32) -> BenchDataset:
    """Load ``spec`` (a bundled name or a WildlifeDatasets CSV), cache ``model``'s backbone
    features of every image and make the open-set split.

    CSV images without an identity cannot be evaluated or answered, so they are left out.
    """
    import torch

    from reidal.core.evaluation import open_set_split
    from reidal.training import cache_backbone_features
    from reidal.training.launch import csv_items, synthetic_items

    fingerprint = dataset_fingerprint(spec)
    images: list[Any]
    splits: np.ndarray | None
    if spec in BUNDLED:
        images, identities, splits = synthetic_items(_synthetic_config(spec))
    else:
        images, ids, splits = csv_items(spec, labelled_only=True)
        if not images:
            raise ValueError(f"dataset {spec!r} has no image with an identity")
        identities = ids.astype(str)
    features = cache_backbone_features(model, images, batch)
    with torch.no_grad():
        X0 = model.embed_features(features).numpy()
    split = open_set_split(identities, split=splits, X=X0, seed=SPLIT_SEED)
    return BenchDataset(dataset_name(spec), fingerprint, images, features, identities, split)
