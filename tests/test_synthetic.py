import numpy as np
import pytest

from reidal.core.clustering import DBSCANJaccard, FinchFirstPartition
from reidal.core.evaluation import pairwise_scores
from reidal.simulation.synthetic import make_reid_embeddings


def _dbscan_labels(X):
    """Clustering A of docs/method.md (DBSCAN on k-reciprocal Jaccard, SpCL defaults)."""
    return np.asarray(DBSCANJaccard(use_gpu=False)(X))


def _finch_labels(X):
    """Clustering B of docs/method.md (FINCH's first partition, cosine)."""
    return np.asarray(FinchFirstPartition(use_gpu=False)(X))


def _modal(labels):
    values, counts = np.unique(labels, return_counts=True)
    return values[np.argmax(counts)]


def test_shapes_dtypes_normalisation_and_sizes():
    d = make_reid_embeddings(50, (3, 12), 32, seed=1)
    sizes = d.info["sizes"]
    assert d.X.dtype == np.float32 and d.labels.dtype == np.int64
    assert d.X.shape == (sizes.sum(), 32) and d.labels.shape == (sizes.sum(),)
    np.testing.assert_allclose(np.linalg.norm(d.X, axis=1), 1.0, atol=1e-5)
    assert sizes.min() >= 3 and sizes.max() <= 12
    np.testing.assert_array_equal(np.bincount(d.labels, minlength=50), sizes)
    assert d.info["mode"].shape == d.labels.shape
    # modes only on two-mode identities
    assert np.isin(d.labels[d.info["mode"] == 1], d.info["two_mode_identities"]).all()
    assert d.info["two_mode_identities"].size == 15  # round(0.3 * 50)
    assert d.info["twin_pairs"].shape == (7, 2)  # floor(0.3 * 50 / 2)


def test_fixed_size_and_long_tail():
    d = make_reid_embeddings(10, 4, 8, seed=0)
    np.testing.assert_array_equal(d.info["sizes"], 4)
    big = make_reid_embeddings(2000, (2, 30), 8, seed=0).info["sizes"]
    # power law: small identities far more common than large ones, the range fully used
    assert (big <= 5).mean() > 2 * (big >= 20).mean() > 0
    assert big.min() == 2 and big.max() == 30


def test_deterministic_per_seed():
    a, b = make_reid_embeddings(20, seed=3), make_reid_embeddings(20, seed=3)
    c = make_reid_embeddings(20, seed=4)
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.info["twin_pairs"], b.info["twin_pairs"])
    assert a.X.shape != c.X.shape or not np.array_equal(a.X, c.X)


def test_twin_centres_are_close_and_others_not():
    d = make_reid_embeddings(200, 2, 128, seed=2, twin_separation=0.5)
    C = d.info["centres"].astype(np.float64)
    tw = d.info["twin_pairs"]
    cos = np.sum(C[tw[:, 0]] * C[tw[:, 1]], axis=1)
    np.testing.assert_allclose(cos, 1 / np.sqrt(1 + 0.5**2), atol=1e-5)
    sims = C @ C.T
    np.fill_diagonal(sims, 0)
    sims[tw[:, 0], tw[:, 1]] = sims[tw[:, 1], tw[:, 0]] = 0
    assert sims.max() < 0.5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_identities": 0}, "n_identities"),
        ({"images_per_identity": (5, 2)}, "low <= high"),
        ({"images_per_identity": "many"}, "images_per_identity"),
        ({"twin_fraction": 1.5}, "twin_fraction"),
        ({"noise": -1.0}, "noise"),
        ({"dim": 1}, "dim"),
    ],
)
def test_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_reid_embeddings(**kwargs)


def test_scales_to_100k_images():
    d = make_reid_embeddings(10_000, (2, 30), 64, seed=5)
    assert d.X.shape[0] > 90_000
    np.testing.assert_allclose(np.linalg.norm(d.X[::997], axis=1), 1.0, atol=1e-5)


def test_density_clustering_merges_twins_and_finch_splits_identities():
    d = make_reid_embeddings(60, seed=0)
    X, y = d.X, d.labels
    a, b = _dbscan_labels(X), _finch_labels(X)
    fa, fb = pairwise_scores(a, y), pairwise_scores(b, y)
    chance = pairwise_scores(np.random.default_rng(0).permutation(b), y)["f1"]
    assert 0.5 < fa["f1"] < 0.95 and 0.4 < fb["f1"] < 0.95
    assert chance < 0.1
    # DBSCAN: the planted twins share a cluster (merge) ...
    tw = d.info["twin_pairs"]
    merged = [_modal(a[y == p]) == _modal(a[y == q]) != -1 for p, q in tw]
    assert np.mean(merged) > 0.5 and fa["precision"] < 0.95
    # ... and some two-mode identities are cut in two (split).
    split = [np.unique(a[(y == i) & (a >= 0)]).size >= 2 for i in d.info["two_mode_identities"]]
    assert sum(split) >= 1
    # FINCH's first partition is fine-grained: pure clusters, identities split.
    assert fb["precision"] > 0.85 and fb["recall"] < 0.7
    assert np.unique(b).size > 1.5 * 60
    # Without planted twins and modes, DBSCAN is almost perfect: the defects are the plants.
    clean = make_reid_embeddings(60, seed=0, twin_fraction=0.0, two_mode_fraction=0.0)
    assert pairwise_scores(_dbscan_labels(clean.X), clean.labels)["f1"] > fa["f1"] + 0.05
