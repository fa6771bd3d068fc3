import itertools

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from reidal.core import evaluation
from reidal.core.evaluation import (
    clustering_quality,
    evaluate_open_set,
    open_set_split,
    pairwise_scores,
    retrieval_metrics,
)
from reidal.core.validation import l2_normalise


def _circle(degrees):
    """Unit vectors on a circle: cosine similarity = cos(angle difference)."""
    t = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(t), np.sin(t)], axis=1).astype(np.float32)


# ---------------------------------------------------------------- retrieval_metrics by hand


def test_retrieval_metrics_hand_computed():
    # Gallery on a circle: g0=A at 0 deg, g1=B at 30, g2=A at 90, g3=C at 150.
    gallery = _circle([0, 30, 90, 150])
    gids = np.array(["A", "B", "A", "C"])
    # Queries: q0=A at 40, q1=B at 25, q2=D at 200 (unknown), q3=A at 80, q4=E at 7 (unknown).
    query = _circle([40, 25, 200, 80, 7])
    qids = np.array(["A", "B", "D", "A", "E"])
    m = retrieval_metrics(query, qids, gallery, gids)
    # q0 (A, 40): angular distances g1 10, g0 40, g2 50, g3 110 -> B A A C.
    #   positives at ranks 2, 3: AP = (1/2 + 2/3) / 2 = 7/12; INP = 2/3; top1 miss, top3 hit.
    # q1 (B, 25): g1 5, g0 25, g2 65, g3 125 -> B first: AP = 1, INP = 1/1 = 1, top1 hit.
    # q3 (A, 80): g2 10, g1 50, g3 70, g0 80 -> A B C A.
    #   positives at ranks 1, 4: AP = (1/1 + 2/4) / 2 = 3/4; INP = 2/4; top1 hit.
    # mAP = (7/12 + 1 + 3/4) / 3 = 7/9; mINP = (2/3 + 1 + 1/2) / 3 = 13/18.
    assert m["mAP"] == pytest.approx(7 / 9, abs=1e-6)
    assert m["mINP"] == pytest.approx(13 / 18, abs=1e-6)
    # CMC: first hits at ranks 2, 1, 1 -> top1 = 2/3, top3 = top5 = top10 = 1.
    assert m["top1"] == pytest.approx(2 / 3)
    assert m["top3"] == m["top5"] == m["top10"] == 1.0
    # BAKS: identity A has q0 wrong, q3 right -> 1/2; identity B -> 1; mean 3/4 (not 2/3).
    assert m["BAKS"] == pytest.approx(0.75)
    # AUC: scores = max similarity. known: q0 cos10, q1 cos5, q3 cos10;
    # unknown: q2 cos50 (nearest g3), q4 cos7 (nearest g0). Known > unknown in 4 of 6 pairs:
    # (q0,q2) (q1,q2) (q1,q4) (q3,q2) -> AUC = 4/6.
    assert m["AUC_ROC"] == pytest.approx(2 / 3)
    assert (m["n_queries"], m["n_known_queries"], m["n_unknown_queries"]) == (5, 3, 2)
    assert m["n_gallery"] == 4


def test_retrieval_metrics_auc_nan_with_one_class_and_nan_without_known():
    g = _circle([0, 90])
    m = retrieval_metrics(_circle([10]), [1], g, [1, 2])
    assert np.isnan(m["AUC_ROC"]) and m["mAP"] == 1.0
    m = retrieval_metrics(_circle([10]), [3], g, [1, 2])
    assert np.isnan(m["mAP"]) and np.isnan(m["top1"]) and np.isnan(m["BAKS"])


def test_retrieval_metrics_validates_inputs():
    g = _circle([0, 90])
    with pytest.raises(ValueError, match="L2-normalised"):
        retrieval_metrics(2 * _circle([10]), [1], g, [1, 2])
    with pytest.raises(ValueError, match="dimensions differ"):
        retrieval_metrics(np.ones((1, 3), np.float32) / np.sqrt(3), [1], g, [1, 2])
    with pytest.raises(ValueError, match="gallery_ids"):
        retrieval_metrics(_circle([10]), [1], g, [1, 2, 3])
    with pytest.raises(ValueError, match="query_ids"):
        retrieval_metrics(_circle([10]), [1, 2], g, [1, 2])


# ------------------------------------------------------- retrieval_metrics vs brute force


def _brute_force_metrics(Q, qids, G, gids):
    """Per-query loops written from the textbook definitions (independent reference)."""
    aps, inps, first, correct_by_id, scores, known_flags = [], [], [], {}, [], []
    for q in range(len(Q)):
        sims = [float(np.dot(Q[q], G[j])) for j in range(len(G))]
        order = sorted(range(len(G)), key=lambda j: (-sims[j], j))
        scores.append(max(sims))
        pos_ranks = [r + 1 for r, j in enumerate(order) if gids[j] == qids[q]]
        known_flags.append(bool(pos_ranks))
        if not pos_ranks:
            continue
        aps.append(np.mean([(k + 1) / r for k, r in enumerate(pos_ranks)]))
        inps.append(len(pos_ranks) / pos_ranks[-1])
        first.append(pos_ranks[0])
        correct_by_id.setdefault(qids[q], []).append(pos_ranks[0] == 1)
    first = np.array(first)
    pos = [s for s, k in zip(scores, known_flags, strict=True) if k]
    neg = [s for s, k in zip(scores, known_flags, strict=True) if not k]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return {
        "mAP": np.mean(aps),
        "mINP": np.mean(inps),
        "top1": np.mean(first <= 1),
        "top3": np.mean(first <= 3),
        "top5": np.mean(first <= 5),
        "top10": np.mean(first <= 10),
        "BAKS": np.mean([np.mean(v) for v in correct_by_id.values()]),
        "AUC_ROC": wins / (len(pos) * len(neg)),
    }


@pytest.mark.parametrize("chunk", [None, 7])
def test_retrieval_metrics_matches_brute_force(monkeypatch, chunk):
    if chunk is not None:  # force several similarity chunks, including a ragged last one
        monkeypatch.setattr(evaluation, "SIMILARITY_CHUNK_ELEMENTS", chunk * 40)
    rng = np.random.default_rng(3)
    G = l2_normalise(rng.normal(size=(40, 6)))
    Q = l2_normalise(rng.normal(size=(53, 6)))
    gids = rng.integers(0, 12, size=40)
    qids = rng.integers(0, 16, size=53)  # ids 12..15 and gallery-absent ones are unknown
    got = retrieval_metrics(Q, qids, G, gids)
    want = _brute_force_metrics(Q, qids, G, gids)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.parametrize("chunk", [None, 5])
def test_retrieval_metrics_breaks_ties_in_gallery_order(monkeypatch, chunk):
    if chunk is not None:
        monkeypatch.setattr(evaluation, "SIMILARITY_CHUNK_ELEMENTS", chunk * 30)
    # Four entries of +-0.5 in 8 dims: unit norm and similarities in multiples of 1/4,
    # exact in float32 whatever the summation order, so ties abound and are exact.
    rng = np.random.default_rng(11)

    def vectors(m):
        V = np.zeros((m, 8), np.float32)
        for r in range(m):
            V[r, rng.choice(8, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
        return V

    G, Q = vectors(30), vectors(25)
    gids, qids = rng.integers(0, 6, 30), rng.integers(0, 7, 25)
    got = retrieval_metrics(Q, qids, G, gids)
    want = _brute_force_metrics(Q, qids, G, gids)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


# --------------------------------------------------------------------------- open_set_split


def _blocks(n_ids, per_id):
    return np.repeat(np.arange(n_ids), per_id)


def test_open_set_split_counts_and_disjointness():
    ids = _blocks(50, 10)
    s = open_set_split(ids, held_out_fraction=0.2, gallery_per_identity=5, test_fraction=0.3)
    assert s.known_identities.size == 40 and s.unknown_identities.size == 10
    assert np.intersect1d(s.known_identities, s.unknown_identities).size == 0
    assert s.query_idx.size == 50 * 3  # round(0.3 * 10) test images per identity
    assert s.train_idx.size == 40 * 7  # training images of the known identities only
    assert s.gallery_idx.size == 40 * 5
    for arr in (s.train_idx, s.query_idx, s.gallery_idx):
        assert arr.dtype == np.int64
    assert np.isin(s.gallery_idx, s.train_idx).all()
    assert np.intersect1d(s.train_idx, s.query_idx).size == 0
    assert not np.isin(ids[s.gallery_idx], s.unknown_identities).any()
    assert not np.isin(ids[s.train_idx], s.unknown_identities).any()
    np.testing.assert_array_equal(s.query_known, np.isin(ids[s.query_idx], s.known_identities))
    assert s.query_known.sum() == 40 * 3 and (~s.query_known).sum() == 10 * 3
    # each known identity has exactly 5 gallery exemplars
    np.testing.assert_array_equal(np.unique(ids[s.gallery_idx], return_counts=True)[1], 5)
    # the images of held-out identities that are not queries are used nowhere
    unused = np.setdiff1d(np.arange(ids.size), np.r_[s.train_idx, s.query_idx])
    assert np.isin(ids[unused], s.unknown_identities).all() and unused.size == 10 * 7


def test_open_set_split_is_deterministic_per_seed():
    ids = _blocks(30, 6)
    a, b = open_set_split(ids, seed=4), open_set_split(ids, seed=4)
    c = open_set_split(ids, seed=5)
    for name in ("train_idx", "query_idx", "gallery_idx", "known_identities"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not all(
        np.array_equal(getattr(a, n), getattr(c, n)) for n in ("query_idx", "known_identities")
    )


def test_open_set_split_singleton_identities_stay_in_train():
    ids = np.r_[_blocks(5, 4), np.arange(100, 110)]  # ten identities with one image each
    s = open_set_split(ids, held_out_fraction=0.0, test_fraction=0.5)
    assert not np.isin(ids[s.query_idx], np.arange(100, 110)).any()
    assert s.unknown_identities.size == 0 and s.query_known.all()


def test_open_set_split_with_given_database_query_split():
    ids = np.array(["a", "a", "a", "b", "b", "c", "c", "c", "d", "e"])
    split = np.array(
        "database database query database query DATABASE database query database query".split()
    )
    s = open_set_split(ids, split=split, held_out_fraction=0.25, gallery_per_identity=1)
    np.testing.assert_array_equal(s.query_idx, [2, 4, 7, 9])
    # "e" is only in the query split -> unknown; one of the 4 train identities is held out
    assert "e" in s.unknown_identities and s.unknown_identities.size == 2
    assert s.known_identities.size == 3 and s.gallery_idx.size == 3
    np.testing.assert_array_equal(s.query_known, np.isin(ids[s.query_idx], s.known_identities))
    with pytest.raises(ValueError, match="split values"):
        open_set_split(ids, split=np.array(["train"] * 9 + ["val"]))
    with pytest.raises(ValueError, match="length"):
        open_set_split(ids, split=np.array(["train"] * 3))


def test_open_set_split_gallery_by_similarity_to_centroid():
    rng = np.random.default_rng(1)
    ids = _blocks(8, 12)
    X = l2_normalise(rng.normal(size=(ids.size, 5)))
    s = open_set_split(ids, X=X, gallery_per_identity=3, held_out_fraction=0.25, seed=2)
    for ident in s.known_identities:
        rows = s.train_idx[ids[s.train_idx] == ident]
        c = X[rows].astype(np.float64).sum(0)
        c /= np.linalg.norm(c)
        best = rows[np.argsort(-(X[rows] @ c), kind="stable")[:3]]
        np.testing.assert_array_equal(np.sort(best), s.gallery_idx[ids[s.gallery_idx] == ident])


def test_open_set_split_validates():
    ids = _blocks(4, 3)
    with pytest.raises(ValueError, match="held_out_fraction"):
        open_set_split(ids, held_out_fraction=1.0)
    with pytest.raises(ValueError, match="gallery_per_identity"):
        open_set_split(ids, gallery_per_identity=0)
    with pytest.raises(ValueError, match="rows"):
        open_set_split(ids, X=l2_normalise(np.ones((5, 2))))


def test_perfect_embedding_scores_one():
    # Each identity gets its own axis: same-identity similarity 1, otherwise 0.
    ids = _blocks(20, 6)
    X = np.eye(20, dtype=np.float32)[ids]
    s = open_set_split(ids, seed=1)
    m = evaluate_open_set(X, ids, s)
    for key in ("mAP", "mINP", "top1", "top10", "BAKS", "AUC_ROC"):
        assert m[key] == pytest.approx(1.0), key
    assert m["n_unknown_queries"] == 4 * 2  # round(0.2 * 20) ids x round(0.3 * 6) queries


def test_random_embedding_scores_low():
    rng = np.random.default_rng(0)
    ids = _blocks(40, 8)
    X = l2_normalise(rng.normal(size=(ids.size, 64)))
    m = evaluate_open_set(X, ids, open_set_split(ids))
    assert m["mAP"] < 0.3 and 0.2 < m["AUC_ROC"] < 0.8


# --------------------------------------------------------------- pairwise / clustering


def _brute_pairwise(pred, true):
    pred = np.asarray(pred)
    tp = fp = fn = 0
    for i, j in itertools.combinations(range(len(pred)), 2):
        same_pred = pred[i] == pred[j] and pred[i] != -1
        same_true = true[i] == true[j]
        tp += same_pred and same_true
        fp += same_pred and not same_true
        fn += same_true and not same_pred
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / (tp + fn) if tp + fn else 1.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


@pytest.mark.parametrize("seed", range(6))
def test_pairwise_scores_matches_pair_enumeration(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 60))
    pred = rng.integers(-1, int(rng.integers(1, 8)), size=n)
    true = rng.integers(0, int(rng.integers(1, 10)), size=n)
    got = pairwise_scores(pred, true)
    p, r, f = _brute_pairwise(pred, true)
    assert got["precision"] == pytest.approx(p)
    assert got["recall"] == pytest.approx(r)
    assert got["f1"] == pytest.approx(f)


def test_pairwise_scores_edge_conventions():
    assert pairwise_scores([-1, -1, -1], [0, 1, 2]) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert pairwise_scores([-1, -1, -1], [0, 0, 2])["f1"] == 0.0
    assert pairwise_scores([5, 5, 9], ["x", "x", "y"])["f1"] == 1.0
    with pytest.raises(ValueError, match="pred_labels"):
        pairwise_scores([0, 1], [0, 1, 2])


def test_clustering_quality():
    rng = np.random.default_rng(7)
    true = rng.integers(0, 6, size=80)
    pred = rng.integers(-1, 5, size=80)
    q = clustering_quality(pred, true)
    relabelled = np.where(pred == -1, 100 + np.arange(80), pred)
    assert q["ari"] == pytest.approx(adjusted_rand_score(true, relabelled))
    assert q["n_outliers"] == int((pred == -1).sum())
    assert q["n_clusters"] == np.unique(pred[pred >= 0]).size
    p, r, f = _brute_pairwise(pred, true)
    assert (q["precision"], q["recall"], q["f1"]) == pytest.approx((p, r, f))
    assert clustering_quality(true, true)["ari"] == pytest.approx(1.0)
