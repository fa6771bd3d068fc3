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
describe this data before spending any time on it. The backbone features are kept on disk
between invocations (:func:`backbone_features`), keyed by the fingerprint, the backbone's
weights and the preprocessing (a CSV's key covers its bytes, not the image files it names:
a changed image under an unchanged CSV needs ``--feature-cache none`` or a new folder).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from reidal.core.evaluation import open_set_split
from reidal.data.synthetic_images import HARD_PRESET, SyntheticConfig

#: The open-set split's seed: one split per dataset, shared by every method and run seed.
SPLIT_SEED = 0
#: Bundled names: ``synthetic`` is the default generated set (``SyntheticConfig()``: 40
#: individuals, 4-16 images each, 128 px); ``synthetic-small`` a 20-individual 64 px set for
#: ``--quick`` (about 120 images, a pool of about 60); ``synthetic-hard`` the hard preset
#: (:data:`reidal.data.synthetic_images.HARD_PRESET`: weak features, shared scenes,
#: near-duplicate frames, look-alikes; about 2,400 images of 80 individuals).
BUNDLED = {
    "synthetic": {},
    "synthetic-small": {"n_individuals": 20, "images_per_individual": (4, 8), "image_size": 64,
                        "n_species": 4},
    "synthetic-hard": HARD_PRESET,
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
    #: what methods compute once and share (e.g. partial mode's cached lower-stage maps)
    cache: dict[Any, Any] = field(default_factory=dict)
    #: the on-disk cache folder (None: nothing kept between invocations) and the key of the
    #: backbone features there, which keys derived caches too (:func:`cached_on_disk`)
    cache_dir: str | Path | None = None
    feature_key: str = ""

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


#: Images embedded between two progress lines while backbone features are computed.
FEATURE_CHUNK = 256
#: Environment variable naming the feature cache's folder (``--feature-cache`` wins).
CACHE_ENV = "REIDAL_CACHE_DIR"


def default_feature_cache() -> Path:
    """Where backbone features are kept between invocations: ``$REIDAL_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/reidal`` (``~/.cache/reidal``), with ``bench-features`` below it."""
    import os

    root = os.environ.get(CACHE_ENV) or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "reidal"
    return Path(root) / "bench-features"


def feature_cache_key(fingerprint: str, model: Any) -> str:
    """What decides a dataset's backbone features: the dataset's content (fingerprint), the
    backbone's name and weights (hashed) and the preprocessing (input size, normalisation)."""
    from reidal.training.data import spec_for

    spec = spec_for(model)
    h = hashlib.sha256()
    h.update(json.dumps({"dataset": fingerprint, "arch": model.arch.get("backbone"),
                         "input_size": list(spec.input_size), "mean": list(spec.mean),
                         "std": list(spec.std)}, sort_keys=True).encode())
    for name, t in sorted(model.backbone.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def backbone_features(images: list[Any], model: Any, key: str, *,
                      cache_dir: str | Path | None,
                      progress: Callable[[str], None] | None = None,
                      batch: int = 32) -> Any:
    """The backbone features of ``images``: read from ``cache_dir/<key>.pt`` when there,
    else computed in chunks of :data:`FEATURE_CHUNK` images with a progress line each
    (minutes on thousands of images on a busy CPU) and stored there (atomically).
    ``cache_dir`` None: computed, not stored."""
    import time

    import torch

    from reidal.training import cache_backbone_features

    say = progress or (lambda line: None)

    def compute() -> Any:
        parts, t = [], time.perf_counter()
        for s in range(0, len(images), FEATURE_CHUNK):
            parts.append(cache_backbone_features(model, images[s:s + FEATURE_CHUNK], batch))
            done = min(s + FEATURE_CHUNK, len(images))
            rate = done / max(time.perf_counter() - t, 1e-9)
            say(f"  backbone features {done}/{len(images)} images ({rate:.1f}/s)")
        return torch.cat(parts) if parts else cache_backbone_features(model, images, batch)

    return cached_on_disk(cache_dir, key, compute,
                          lambda f: isinstance(f, torch.Tensor) and f.shape[0] == len(images),
                          what="backbone features", progress=say)


def cached_on_disk(cache_dir: str | Path | None, key: str, compute: Callable[[], Any],
                   valid: Callable[[Any], bool], *, what: str,
                   progress: Callable[[str], None] | None = None) -> Any:
    """``compute()``, kept in ``cache_dir/<key>.pt`` between invocations: read from there when
    the file holds something ``valid`` accepts (tensors only, ``weights_only``), else computed
    and stored atomically (a truncated or unreadable file is recomputed and overwritten).
    ``cache_dir`` None: computed, not stored. One place for every cache of the benchmark (the
    backbone features; partial mode's lower-stage maps)."""
    import os
    import pickle

    import torch

    say = progress or (lambda line: None)
    path = None if cache_dir is None else Path(cache_dir) / f"{key}.pt"
    if path is not None and path.is_file():
        try:
            value = torch.load(path, map_location="cpu", weights_only=True)
            if valid(value):
                say(f"  {what} read from {path}")
                return value
        except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError):
            pass  # unreadable or truncated: recompute and overwrite
    value = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save(value, tmp)
        os.replace(tmp, path)
        say(f"  {what} stored in {path}")
    return value


def load_dataset(spec: str, model: Any, *, batch: int = 32,
                 cache_dir: str | Path | None = None,
                 progress: Callable[[str], None] | None = None) -> BenchDataset:
    """Load ``spec`` (a bundled name or a WildlifeDatasets CSV), get ``model``'s backbone
    features of every image (from ``cache_dir`` when computed before: see
    :func:`backbone_features`) and make the open-set split.

    CSV images without an identity cannot be evaluated or answered, so they are left out.
    """
    import torch

    from reidal.training.launch import csv_items, synthetic_items  # torch: a run only

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
    key = feature_cache_key(fingerprint, model)
    features = backbone_features(images, model, key, cache_dir=cache_dir, progress=progress,
                                 batch=batch)
    with torch.no_grad():
        X0 = model.embed_features(features).numpy()
    split = open_set_split(identities, split=splits, X=X0, seed=SPLIT_SEED)
    return BenchDataset(dataset_name(spec), fingerprint, images, features, identities, split,
                        cache_dir=cache_dir, feature_key=key)
