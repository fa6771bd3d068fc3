"""The recall-driven k-NN graph: the calibrated inverted file meets its target on generated
collections, agrees with exact search where it should, and reports the recall it reached.

Every recall here is checked against exact search of *all* rows, not the calibration
sample the code measures itself on, so a calibration that fooled itself would fail.
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from reidal.core import ivf_knn
from reidal.core.neighbors import knn, knn_recall, knn_search
from reidal.simulation.synthetic import make_reid_embeddings


@pytest.fixture(scope="module")
def collection():
    # Look-alike groups: the structure real embedding spaces have (see synthetic.py).
    data = make_reid_embeddings(200, (10, 30), dim=64, seed=7, group_size=10, group_spread=1.0)
    X = data.X
    return X, knn(X, 20, use_gpu=False)


@pytest.mark.parametrize("target", [0.9, 0.95])
def test_calibrated_ivf_meets_the_target_on_every_row(collection, target):
    X, (_, exact) = collection
    sims, idx, report = knn_search(
        X, 20, index="auto", target_recall=target, exact_below=1000, use_gpu=False
    )
    assert report.index == "ivf" and report.params["calibrated"]
    assert report.params["nprobe"] < report.params["nlist"]  # not exhaustive
    full = knn_recall(idx, exact)
    print(f"target {target}: nprobe {report.params['nprobe']}/{report.params['nlist']}, "
          f"sample recall {report.recall:.4f} +- {report.recall_se:.4f}, all rows {full:.4f}")
    assert full >= target
    assert abs(report.recall - full) < 4 * report.recall_se + 0.01
    assert report.target_recall == target and report.n_queries == 500
    assert (idx[:, 0] == np.arange(len(X))).all() and (idx >= 0).all()
    assert (np.diff(sims, axis=1) <= 1e-6).all()


def test_a_higher_target_probes_more_lists(collection):
    X, _ = collection
    probes = [
        knn_search(X, 20, target_recall=t, exact_below=1000, use_gpu=False)[2].params["nprobe"]
        for t in (0.8, 0.9, 0.95)
    ]
    assert probes == sorted(probes) and probes[0] < probes[-1]


def test_small_collections_and_a_target_of_one_are_exact(collection):
    X, (e_sims, exact) = collection
    for kwargs in ({}, {"target_recall": 1.0, "exact_below": 10}):
        sims, idx, report = knn_search(X, 20, use_gpu=False, **kwargs)
        assert report.index == "flat" and report.recall == 1.0
        np.testing.assert_array_equal(idx, exact)
        np.testing.assert_array_equal(sims, e_sims)


def test_ivf_probing_every_list_is_exact(collection):
    X, (e_sims, exact) = collection
    sims, idx, report = knn_search(X, 20, index="ivf", nlist=16, nprobe=16, use_gpu=False)
    assert report.recall == 1.0 and "calibrated" not in report.params
    assert knn_recall(idx, exact) == 1.0
    np.testing.assert_allclose(sims, e_sims, atol=1e-5)


def test_self_join_equals_faiss_ivf_with_the_same_lists(collection):
    X, _ = collection
    centroids = ivf_knn.train_centroids(X, 30, seed=1)
    sims, idx = ivf_knn.ivf_self_knn(X, 15, ivf_knn.nearest_lists(X, centroids, 3))
    quantizer = faiss.IndexFlatIP(X.shape[1])
    quantizer.add(centroids)
    ref = faiss.IndexIVFFlat(quantizer, X.shape[1], 30, faiss.METRIC_INNER_PRODUCT)
    ref.is_trained = True
    ref.add(X)
    ref.nprobe = 3
    ref_sims, ref_idx = ref.search(X, 15)
    ok = (ref_idx >= 0).all(axis=1)  # faiss pads short rows with -1, we with -1 too
    assert knn_recall(idx[ok], ref_idx[ok]) > 0.999  # ties may order differently
    np.testing.assert_allclose(sims[ok], ref_sims[ok], atol=1e-5)


def test_recall_read_from_list_ranks_is_the_searched_recall(collection):
    X, (_, exact) = collection
    centroids = ivf_knn.train_centroids(X, 30, seed=2)
    home = ivf_knn.nearest_lists(X, centroids, 1)[:, 0]
    curve = ivf_knn.recall_by_nprobe(home[exact], ivf_knn.nearest_lists(X, centroids, 8))
    for p in (1, 2, 5):
        _, idx = ivf_knn.ivf_self_knn(X, 20, ivf_knn.nearest_lists(X, centroids, p))
        assert curve[:, p - 1].mean() == pytest.approx(knn_recall(idx, exact), abs=1e-3)


def test_an_unreachable_target_falls_back_to_exact(collection):
    # Here no quarter of the lists holds 99.5 % of the neighbours (measured: about 0.98).
    X, (_, exact) = collection
    sims, idx, report = knn_search(X, 20, target_recall=0.995, exact_below=100, use_gpu=False)
    assert report.index == "flat" and "below the target" in report.reason
    np.testing.assert_array_equal(idx, exact)


def test_top_k_columns_with_ties():
    S = np.array([[1, 3, 3, 3, 0], [5, 4, 3, 2, 1]], dtype=np.float32)
    cols = ivf_knn._top_k_columns(S, 2)
    assert cols.shape == (2, 2)
    assert set(cols[0]) <= {1, 2, 3} and len(set(cols[0])) == 2
    assert set(cols[1]) == {0, 1}


@pytest.mark.parametrize(
    "kwargs, message",
    [({"target_recall": 0.0}, "target_recall"), ({"target_recall": 1.5}, "target_recall"),
     ({"index": "lsh"}, "index must be"), ({"exact_below": 0}, "exact_below"),
     ({"nprobe": 0, "index": "ivf"}, "nprobe")],
)
def test_bad_parameters_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        knn_search(np.eye(4, dtype=np.float32), 2, use_gpu=False, **kwargs)
