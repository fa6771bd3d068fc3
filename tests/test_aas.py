"""Ambiguity-Aware Sampling: each stage against a brute-force reference, then the sampler.

The references enumerate pairs and clusters with plain Python loops on small inputs; the
implementation never does. The closed-loop test runs AAS + simulated oracle + NP3 for five
cycles on synthetic re-ID embeddings with planted merges and splits.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.sparse as sp

from reidal.core.aas import (
    REASON_AGREE,
    AmbiguityAwareSampler,
    disagreement_sizes,
    mixture_probabilities,
    oversegmentation_pool,
    region_medoids,
    regions_of_uncertainty,
    undersegmentation_pool,
)
from reidal.core.constraints import ConstraintSet
from reidal.core.neighbors import jaccard_distance, knn
from reidal.core.sampling import REASON_SMALL_POOL, QueryPair, Sampler, SampleResult
from reidal.core.validation import l2_normalise

# --------------------------------------------------------------------------- fixtures


def _blobs(n_clusters: int, size: int, dim: int = 16, spread: float = 0.35, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = l2_normalise(rng.standard_normal((n_clusters, dim)))
    labels = np.repeat(np.arange(n_clusters), size)
    X = centres[labels] + spread * rng.standard_normal((labels.size, dim)) / np.sqrt(dim)
    return l2_normalise(X), labels


def _stars(centres: np.ndarray, size: int, spread: float, rng: np.random.Generator):
    """Clusters whose exact centre is a member and every other member's first neighbour.

    In high dimension the offsets are nearly orthogonal, so member-member distances are
    ~sqrt(2) x member-centre distances: FINCH's first-neighbour graph links each star
    into one cluster, which lets a test make DBSCAN and FINCH agree (or not) on purpose.
    """
    k, dim = centres.shape
    labels = np.repeat(np.arange(k), size)
    offsets = rng.standard_normal((k * size, dim)) / np.sqrt(dim)
    offsets[::size] = 0.0
    X = l2_normalise(centres[labels] + spread * offsets)
    return X, labels


def _random_labellings(n: int, seed: int):
    """A pair of correlated labellings with outliers in A, as DBSCAN/FINCH would give."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 8, n)
    la = truth.copy()
    la[rng.random(n) < 0.15] = -1
    merge = rng.random(n) < 0.2
    la[merge & (la >= 0)] = la[merge & (la >= 0)] // 2 + 20
    lb = truth * 2 + (rng.random(n) < 0.3)
    lb[rng.random(n) < 0.1] = 40
    return la.astype(np.int64), lb.astype(np.int64)


def _dense_distance(D: sp.spmatrix) -> np.ndarray:
    """Dense copy of a sparse Jaccard distance with absent entries = 1."""
    coo = sp.coo_matrix(D)
    dense = np.ones(D.shape, dtype=np.float64)
    dense[coo.row, coo.col] = coo.data
    return dense


def _singletons(labels: np.ndarray) -> list:
    """Cluster key per item with every -1 as its own cluster (a hashable tuple)."""
    return [("o", i) if v == -1 else ("c", int(v)) for i, v in enumerate(labels)]


# --------------------------------------------------------------------------- references


def _regions_reference(la: np.ndarray, lb: np.ndarray) -> list[frozenset]:
    ka, kb = _singletons(la), _singletons(lb)
    members_a: dict = {}
    members_b: dict = {}
    for i in range(la.size):
        members_a.setdefault(ka[i], set()).add(i)
        members_b.setdefault(kb[i], set()).add(i)
    parent: dict = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            x = parent[x]
        return x

    involved = set()
    for a, sa in members_a.items():
        for b, sb in members_b.items():
            inter = len(sa & sb)
            iou = inter / len(sa | sb)
            if 0 < iou < 1:
                parent[find(("A", a))] = find(("B", b))
                involved.add(("A", a))
    groups: dict = {}
    for a in involved:
        groups.setdefault(find(a), set()).update(members_a[a[1]])
    return sorted((frozenset(g) for g in groups.values()), key=min)


def _partition(region: np.ndarray) -> list[frozenset]:
    groups: dict = {}
    for i, r in enumerate(region):
        if r >= 0:
            groups.setdefault(int(r), set()).add(i)
    return sorted((frozenset(g) for g in groups.values()), key=min)


# --------------------------------------------------------------------------- stages


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_regions_match_bruteforce(seed):
    la, lb = _random_labellings(70, seed)
    region = regions_of_uncertainty(la, lb)
    assert _partition(region) == _regions_reference(la, lb)
    assert region.max() + 1 == len(_regions_reference(la, lb))


def test_regions_identical_clusterings_give_none():
    la = np.array([0, 0, 1, 1, 2, 2, 2, -1])
    lb = np.array([5, 5, 3, 3, 9, 9, 9, 7])  # same partition, other names; outlier alone
    assert np.all(regions_of_uncertainty(la, lb) == -1)
    # An outlier that B puts into a cluster is a partial overlap: {7} vs {6, 7}.
    lb2 = lb.copy()
    lb2[7] = 9
    region = regions_of_uncertainty(la, lb2)
    assert set(np.flatnonzero(region >= 0)) == {4, 5, 6, 7}


@pytest.mark.parametrize("seed", [0, 3])
def test_disagreement_sizes_match_pair_enumeration(seed):
    la, lb = _random_labellings(60, seed)
    region = regions_of_uncertainty(la, lb)
    m = int(region.max()) + 1
    tangle = disagreement_sizes(la, lb, region, m)
    ref = np.zeros((3, m))
    for i, j in itertools.combinations(range(la.size), 2):
        if region[i] < 0 or region[i] != region[j]:
            continue
        same_a = la[i] == la[j] and la[i] != -1
        same_b = lb[i] == lb[j]
        if same_a != same_b:
            ref[int(la[i] == -1) + int(la[j] == -1), region[i]] += 1
    np.testing.assert_allclose(tangle, ref)
    assert ref.sum() > 0


@pytest.fixture(scope="module")
def small_world():
    X, truth = _blobs(10, 8, seed=4)
    D = jaccard_distance(X, k1=8, k2=3)
    la, lb = _random_labellings(X.shape[0], 5)
    return X, D, la, lb


def test_medoids_match_dense_reference(small_world):
    X, D, la, lb = small_world
    region = regions_of_uncertainty(la, lb)
    medoids = region_medoids(region, D, X)
    dense = _dense_distance(D)
    cos = X.astype(np.float64) @ X.T.astype(np.float64)
    for k in range(int(region.max()) + 1):
        members = np.flatnonzero(region == k)
        best = None
        for i in members:
            others = members[members != i]
            jac = np.mean(1.0 - dense[i, others])
            cm = np.mean(cos[i, others])
            key = (round(jac, 9), round(cm, 9), -i)
            if best is None or key > best[0]:
                best = (key, i)
        assert medoids[k] == best[1]


def test_oversegmentation_pool_matches_dense_reference(small_world):
    X, D, _, _ = small_world
    medoids = np.arange(0, X.shape[0], 3)  # any set of items works as "medoids"
    pool = oversegmentation_pool(medoids, D, k_max=2, s_min=0.05)
    sim = 1.0 - _dense_distance(D)
    expected = {}
    for a in medoids:
        others = [b for b in medoids if b != a]
        ranked = sorted(others, key=lambda b: (-sim[a, b], b))[:2]
        for b in ranked:
            if sim[a, b] >= 0.05:
                expected[(min(a, b), max(a, b))] = sim[a, b]
    got = {(int(i), int(j)): s for (i, j), s in zip(pool.pairs, pool.similarity, strict=True)}
    assert got.keys() == expected.keys()
    assert len(got) > 0
    for key, s in got.items():
        assert s == pytest.approx(expected[key], abs=1e-6)
    assert np.all(pool.region == -1)


def test_undersegmentation_pool_matches_bruteforce(small_world):
    X, D, la, lb = small_world
    n = X.shape[0]
    region = regions_of_uncertainty(la, lb)
    # kNN over all items: every pair inside a region is a candidate, so the argmin is exact.
    _, idx = knn(X, n)
    pool = undersegmentation_pool(la, lb, region, D, X, knn_idx=idx)
    dense = _dense_distance(D)
    cos = X @ X.T
    expected = {}
    for labels in (_singletons(la), _singletons(lb)):
        best: dict = {}
        for i, j in itertools.combinations(range(n), 2):  # lexicographic: first wins ties
            if region[i] < 0 or region[i] != region[j] or labels[i] == labels[j]:
                continue
            key = tuple(sorted((labels[i], labels[j])))
            score = (dense[i, j], -cos[i, j])
            if key not in best or score < best[key][0]:
                best[key] = (score, (i, j))
        for _, (i, j) in best.values():
            same_a = la[i] == la[j] and la[i] != -1
            same_b = lb[i] == lb[j]
            if same_a != same_b:
                expected[(i, j)] = (region[i], int(la[i] == -1) + int(la[j] == -1))
    got = {
        (int(i), int(j)): (int(r), int(t))
        for (i, j), r, t in zip(pool.pairs, pool.region, pool.kind, strict=True)
    }
    assert got == expected
    assert len(got) > 5
    np.testing.assert_allclose(
        pool.similarity, 1.0 - dense[pool.pairs[:, 0], pool.pairs[:, 1]], atol=1e-6
    )


def test_mixture_probabilities_match_reference():
    rng = np.random.default_rng(0)
    tangle = rng.integers(1, 50, size=(3, 4)).astype(float)
    kind = np.array([0, 0, 0, 1, 1, 0, 2])
    reg = np.array([0, 0, 2, 1, 3, 3, 1])
    os_sim = np.array([0.5, 0.9, 0.3])
    p_os, p_us = mixture_probabilities(os_sim, kind, reg, tangle, eps=0.6)
    np.testing.assert_allclose(p_os, 0.6 * os_sim / os_sim.sum())
    present = {(int(t), int(r)) for t, r in zip(kind, reg, strict=True)}
    types = {t for t, _ in present}
    for y in range(kind.size):
        t, r = int(kind[y]), int(reg[y])
        rho = tangle[t, r] / sum(tangle[t, rr] for tt, rr in present if tt == t)
        omega = 1.0 / sum(1 for tt, rr in zip(kind, reg, strict=True) if (tt, rr) == (t, r))
        assert p_us[y] == pytest.approx(0.4 * (1 / len(types)) * rho * omega)
    assert p_os.sum() + p_us.sum() == pytest.approx(1.0)
    # One empty pool: the other takes all the mass.
    p_os, p_us = mixture_probabilities(np.empty(0), kind, reg, tangle)
    assert p_os.size == 0 and p_us.sum() == pytest.approx(1.0)
    p_os, p_us = mixture_probabilities(os_sim, np.empty(0, int), np.empty(0, int), tangle)
    assert p_os.sum() == pytest.approx(1.0)


def test_mixture_factors_are_pluggable():
    tangle = np.array([[10.0, 1.0], [4.0, 4.0], [0.0, 2.0]])
    kind = np.array([0, 0, 1])
    reg = np.array([0, 1, 1])
    _, uniform = mixture_probabilities(
        np.empty(0), kind, reg, tangle, region_weights="uniform"
    )
    np.testing.assert_allclose(uniform, [0.25, 0.25, 0.5])
    _, custom = mixture_probabilities(
        np.empty(0), kind, reg, tangle,
        type_weights=lambda present, t: np.array([3.0, 1.0, 0.0]),
        region_weights=lambda t: np.ones_like(t),
    )
    np.testing.assert_allclose(custom, [0.375, 0.375, 0.25])
    _, sim_w = mixture_probabilities(
        np.empty(0), np.array([0, 0]), np.array([0, 0]), tangle,
        pair_weights="similarity", us_similarity=np.array([0.2, 0.6]),
    )
    np.testing.assert_allclose(sim_w, [0.25, 0.75])
    with pytest.raises(ValueError, match="type_weights"):
        mixture_probabilities(np.empty(0), kind, reg, tangle, type_weights="bogus")
    with pytest.raises(ValueError, match="all zero"):
        mixture_probabilities(
            np.empty(0), kind, reg, tangle, type_weights=lambda p, t: np.zeros(3)
        )


# --------------------------------------------------------------------------- sampler on given clusterings


@pytest.fixture(scope="module")
def labelled_world():
    """Embeddings plus a merged (A) and a split (B) labelling of the true identities."""
    X, truth = _blobs(24, 10, dim=8, spread=0.8, seed=7)  # low dim: regions touch (U_os)
    n = X.shape[0]
    la = truth // 2  # A merges identity pairs
    la[np.arange(n) % 10 == 9] = -1  # and calls some images outliers
    lb = truth * 2 + (np.arange(n) % 10 >= 5)  # B splits every identity in two
    D = jaccard_distance(X, k1=16, k2=4)
    _, idx = knn(X, 12)
    return X, truth, la, lb, D, idx


def _pair_set(result: SampleResult) -> set[tuple[int, int]]:
    return {(p.i, p.j) for p in result.pairs}


def test_given_clusterings_respect_budget_and_label_pools(labelled_world):
    X, truth, la, lb, D, idx = labelled_world
    aas = AmbiguityAwareSampler(s_min=0.05)
    res = aas.sample_from_clusterings(X, la, lb, D, None, 15, seed=1, knn_idx=idx)
    assert isinstance(aas, Sampler)
    assert len(res.pairs) == 15 and res.budget == 15
    assert res.stats["U_os"] + res.stats["U_us"] > 15
    assert len(_pair_set(res)) == 15
    region = regions_of_uncertainty(la, lb)
    medoids = set(res.stats["medoids"])
    seen = set()
    for p in res.pairs:
        assert isinstance(p, QueryPair) and p.i < p.j
        seen.add(p.pool)
        if p.pool == "U_os":
            assert p.i in medoids and p.j in medoids
            assert region[p.i] != region[p.j] and p.region == -1
            assert p.similarity >= 0.05
        else:
            assert p.pool == "U_us"
            assert region[p.i] == region[p.j] == p.region >= 0
            same_a = la[p.i] == la[p.j] and la[p.i] != -1
            assert same_a != (lb[p.i] == lb[p.j])
        assert 0 < p.probability <= 1
    assert seen == {"U_os", "U_us"}
    # Fraction budget: 0.1 % of 28680 pairs = 29 pairs, rounded up.
    res = aas.sample_from_clusterings(X, la, lb, D, None, 0.001, seed=1, knn_idx=idx)
    assert res.budget == 29 and len(res.pairs) == 29


def test_probabilities_sum_to_one_over_pool(labelled_world):
    X, truth, la, lb, D, idx = labelled_world
    aas = AmbiguityAwareSampler(s_min=0.05)
    res = aas.sample_from_clusterings(X, la, lb, D, None, 10**6, seed=0, knn_idx=idx)
    assert res.reason == REASON_SMALL_POOL
    assert len(res.pairs) == res.stats["U_os"] + res.stats["U_us"]
    total = sum(p.probability for p in res.pairs)
    assert total == pytest.approx(1.0)
    os_mass = sum(p.probability for p in res.pairs if p.pool == "U_os")
    assert os_mass == pytest.approx(aas.eps)


def test_deterministic_for_a_seed(labelled_world):
    X, truth, la, lb, D, idx = labelled_world
    aas = AmbiguityAwareSampler(s_min=0.05)
    a = aas.sample_from_clusterings(X, la, lb, D, None, 12, seed=3, knn_idx=idx)
    b = aas.sample_from_clusterings(X, la, lb, D, None, 12, seed=3, knn_idx=idx)
    c = aas.sample_from_clusterings(X, la, lb, D, None, 12, seed=4, knn_idx=idx)
    assert a.pairs == b.pairs
    assert a.pairs != c.pairs


def test_never_returns_answered_implied_or_excluded_pairs(labelled_world):
    X, truth, la, lb, D, idx = labelled_world
    n = X.shape[0]
    aas = AmbiguityAwareSampler(s_min=0.05)
    first = aas.sample_from_clusterings(X, la, lb, D, None, 10**6, seed=0, knn_idx=idx)
    pool = np.array([(p.i, p.j) for p in first.pairs])
    answered = pool[::3]
    same = truth[answered[:, 0]] == truth[answered[:, 1]]
    # ML chains make further pool pairs implied without being answered.
    chains = np.array([(i, i + 1) for i in range(0, n - 1, 10)])
    cs = ConstraintSet.from_pairs(
        n, np.concatenate([answered[same], chains]), answered[~same]
    )
    excluded = pool[1::3]
    res = aas.sample_from_clusterings(
        X, la, lb, D, cs, 10**6, seed=0, exclude_pairs=excluded, knn_idx=idx
    )
    got = res.as_array()
    assert len(got) > 0
    assert np.all(cs.implied_many(got) == -1)
    assert not (_pair_set(res) & {tuple(p) for p in excluded.tolist()})
    assert res.stats["U_os_resolved"] + res.stats["U_us_resolved"] >= len(answered)
    implied_only = pool[(cs.implied_many(pool) != -1)]
    assert len(implied_only) > len(answered) // 2


def test_bad_inputs_name_the_problem(labelled_world):
    X, truth, la, lb, D, idx = labelled_world
    aas = AmbiguityAwareSampler()
    with pytest.raises(ValueError, match="budget"):
        aas.sample_from_clusterings(X, la, lb, D, None, 0)
    with pytest.raises(ValueError, match="budget"):
        aas.sample(X, None, -0.5)
    bad = X.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        aas.sample(bad, None, 10)
    with pytest.raises(ValueError, match="constraint set is for 5 items"):
        aas.sample(X, ConstraintSet(5), 10)
    with pytest.raises(ValueError, match="labels_a"):
        aas.sample_from_clusterings(X, la[:-1], lb, D, None, 10)
    with pytest.raises(ValueError, match="exclude_pairs"):
        aas.sample(X, None, 10, exclude_pairs=[[0, X.shape[0]]])
    with pytest.raises(ValueError, match="s_min"):
        AmbiguityAwareSampler(s_min=0.0)
    with pytest.raises(ValueError, match="region_weights"):
        AmbiguityAwareSampler(region_weights="nope")


# --------------------------------------------------------------------------- full sampler


def _planted_world(seed: int = 0):
    """Two look-alike identities (0 and 1, star clusters at cosine 0.9) among 10 fillers."""
    rng = np.random.default_rng(seed)
    centres = l2_normalise(rng.standard_normal((12, 32)))
    u = centres[1] - (centres[1] @ centres[0]) * centres[0]
    centres[1] = 0.9 * centres[0] + np.sqrt(1 - 0.81) * u / np.linalg.norm(u)
    return _stars(centres, 12, 0.3, rng)


def test_planted_merge_is_asked_across_the_two_identities():
    from reidal.core.clustering import DBSCANJaccard, FinchFirstPartition

    X, truth = _planted_world()
    dbscan, finch = DBSCANJaccard(k1=20), FinchFirstPartition()
    la, lb = dbscan(X), finch(X)
    # The planted disagreement really is there: DBSCAN merges 0 and 1, FINCH splits them,
    # and both get every filler identity exactly.
    first, second = truth == 0, truth == 1
    assert np.unique(la[first | second]).size == 1 and la[first][0] >= 0
    assert np.unique(lb[first]).size == 1 and np.unique(lb[second]).size == 1
    assert lb[first][0] != lb[second][0]
    rest = truth >= 2
    assert _partition_equal(la[rest], truth[rest]) and _partition_equal(lb[rest], truth[rest])

    res = AmbiguityAwareSampler(dbscan=dbscan, finch=finch).sample(X, None, 5, seed=0)
    assert res.stats["n_regions"] == 1
    assert len(res.pairs) >= 1 and res.reason == REASON_SMALL_POOL
    for p in res.pairs:
        assert p.pool == "U_us" and {truth[p.i], truth[p.j]} == {0, 1}
    assert sum(p.probability for p in res.pairs) == pytest.approx(1.0)


def _partition_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Same grouping of items, whatever the label names."""
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == np.unique(a).size == np.unique(b).size


def test_agreeing_clusterings_ask_nothing():
    from reidal.core.clustering import DBSCANJaccard

    rng = np.random.default_rng(1)
    X, truth = _stars(l2_normalise(rng.standard_normal((12, 32))), 12, 0.3, rng)
    res = AmbiguityAwareSampler(dbscan=DBSCANJaccard(k1=8)).sample(X, None, 20, seed=0)
    assert res.pairs == []
    assert res.reason == REASON_AGREE
    assert res.stats["n_regions"] == 0
    assert res.stats["n_clusters_a"] == res.stats["n_clusters_b"] == 12


@pytest.fixture(scope="module")
def reid_world():
    from reidal.simulation.synthetic import make_reid_embeddings

    data = make_reid_embeddings(60, dim=64, seed=0)
    return data.X, data.labels


def test_full_sampler_with_constraints_never_reasks(reid_world):
    from reidal.core.clustering import DBSCANJaccard

    X, truth = reid_world
    n = X.shape[0]
    aas = AmbiguityAwareSampler(dbscan=DBSCANJaccard(k1=20))
    first = aas.sample(X, None, 60, seed=0)
    assert len(first.pairs) == 60
    # DBSCAN inside the sampler (fed the eps-truncated matrix) clusters as it does alone.
    alone = DBSCANJaccard(k1=20)(X)
    assert first.stats["n_clusters_a"] == np.unique(alone[alone >= 0]).size
    assert first.stats["n_outliers_a"] == np.sum(alone == -1)
    for stage in ("knn_jaccard", "dbscan", "finch", "np3", "regions", "pools", "draw"):
        assert first.stats["seconds"][stage] >= 0
    asked = first.as_array()
    same = truth[asked[:, 0]] == truth[asked[:, 1]]
    cs = ConstraintSet.from_pairs(n, asked[same], asked[~same])
    unsure = np.array([[0, 1], [2, 3]])
    second = aas.sample(X, cs, 10**5, seed=0, exclude_pairs=unsure)
    got = second.as_array()
    assert len(got) > 0
    assert np.all(cs.implied_many(got) == -1)
    assert not (_pair_set(second) & {(0, 1), (2, 3)})
    assert second.stats["np3_changed_a"] > 0
    again = aas.sample(X, cs, 25, seed=5, exclude_pairs=unsure)
    assert again.pairs == aas.sample(X, cs, 25, seed=5, exclude_pairs=unsure).pairs
    frac = aas.sample(X, cs, 0.0001, seed=5)
    assert frac.budget == int(np.ceil(0.0001 * n * (n - 1) / 2)) >= len(frac.pairs) > 0


def test_closed_loop_raises_f1_and_asks_less_later(reid_world):
    from reidal.core.clustering import DBSCANJaccard
    from reidal.simulation.loop import ActiveLearningLoop
    from reidal.simulation.oracle import SimulatedOracle

    X, truth = reid_world
    dbscan = DBSCANJaccard(k1=20)
    loop = ActiveLearningLoop(AmbiguityAwareSampler(dbscan=dbscan), clustering=dbscan,
                              budget_per_cycle=80, cycles=5, seed=0)
    result = loop.run(X, SimulatedOracle(truth, seed=0), true_labels=truth)
    asked = np.concatenate([r.pairs for r in result.reports])
    # Never the same pair twice over the whole run.
    assert len({tuple(p) for p in asked.tolist()}) == len(asked)
    counts = [r.pairs_asked for r in result.reports]
    f1 = [result.initial_quality["f1"]] + [r.quality["f1"] for r in result.reports]
    assert counts[0] == 80
    assert counts[-1] < counts[0] and sum(counts[2:]) < counts[0]
    assert f1[-1] > f1[0] + 0.01, f1


def test_neighbour_graph_is_reused_across_cycles_on_the_same_vectors(reid_world):
    X, truth = reid_world
    sampler = AmbiguityAwareSampler()
    first = sampler.sample(X, None, 30, seed=3)
    again = AmbiguityAwareSampler().sample(X, None, 30, seed=3)  # a new sampler, same vectors
    # (the first call may already hit: other tests sample the same vectors in this process)
    assert again.stats["neighbour_graph_cached"] is True
    assert again.as_array().tolist() == first.as_array().tolist()
    moved = X.copy()
    moved[[0, 1]] = moved[[1, 0]]  # same set of vectors, different rows: a different graph
    assert sampler.sample(moved, None, 30, seed=3).stats["neighbour_graph_cached"] is False
