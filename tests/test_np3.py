"""NP3 refinement and the graph colourings it uses, checked against brute-force references."""

import itertools
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reidal.core.constraints import Answer, ConstraintSet
from reidal.core.np3 import NP3, count_violations, dsatur_coloring, exact_coloring


def slow_violations(labels, cs):
    """Per-pair loop: -1 items are singleton clusters."""
    bad = 0
    for i, j in cs.ml_pairs().tolist():
        bad += labels[i] < 0 or labels[i] != labels[j]
    for i, j in cs.cl_pairs().tolist():
        bad += labels[i] >= 0 and labels[i] == labels[j]
    return int(bad)


def random_case(seed, n, n_labels, n_ids, n_pairs, outlier_rate, noisy=False):
    """Random labels (with outliers), features, and constraints from a hidden partition."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, max(n_labels, 1), n)
    labels[rng.random(n) < outlier_rate] = -1
    X = rng.normal(size=(n, 4)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    truth = rng.integers(0, n_ids, n)
    pairs = rng.integers(0, n, (n_pairs, 2))
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    same = truth[pairs[:, 0]] == truth[pairs[:, 1]]
    if noisy:  # flipped answers: contradictions, settled by the newest-wins rule
        same ^= rng.random(len(same)) < 0.2
    answers = [Answer(int(i), int(j), bool(s), int(k))
               for k, ((i, j), s) in enumerate(zip(pairs.tolist(), same.tolist(), strict=True))]
    return labels, X, ConstraintSet.from_answers(n, answers)


cases = st.builds(
    random_case,
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(2, 40),
    n_labels=st.integers(1, 6),
    n_ids=st.integers(1, 8),
    n_pairs=st.integers(0, 60),
    outlier_rate=st.sampled_from([0.0, 0.2, 0.6]),
    noisy=st.booleans(),
)


# --------------------------------------------------------------------------- NP3 properties
@settings(max_examples=200, deadline=None)
@given(cases, st.sampled_from([0, 3, 10]))
def test_output_satisfies_every_applied_constraint(case, exact_max):
    labels, X, cs = case
    before = labels.copy()
    result = NP3(exact_coloring_max_nodes=exact_max)(labels, X, cs)
    out = result.labels
    np.testing.assert_array_equal(labels, before)  # input not modified
    assert out.shape == labels.shape and out.dtype == np.int64 and out.min() >= -1
    assert slow_violations(out, cs) == 0 == count_violations(out, cs)
    assert result.n_violations_after == 0
    assert result.n_violations_before == slow_violations(labels, cs)
    assert result.n_changed == int((out != labels).sum())
    # Items in an ML pair have a real cluster; outliers in no ML pair stay outliers.
    in_ml = np.zeros(len(labels), dtype=bool)
    in_ml[cs.ml_pairs().ravel()] = True
    assert (out[in_ml] >= 0).all()
    np.testing.assert_array_equal(out[(labels < 0) & ~in_ml], -1)
    # Clusters with no constrained member keep their id, and nobody else takes it.
    constrained = np.zeros(len(labels), dtype=bool)
    constrained[np.concatenate([cs.ml_pairs().ravel(), cs.cl_pairs().ravel()])] = True
    for lab in np.unique(labels[labels >= 0]):
        members = labels == lab
        if not constrained[members].any():
            assert (out == lab).sum() == members.sum() and (out[members] == lab).all()
    # A refined labelling is a fixed point.
    again = NP3(exact_coloring_max_nodes=exact_max)(out, X, cs)
    assert again.n_changed == 0 and again.n_violations_before == 0
    np.testing.assert_array_equal(again.labels, out)


@settings(max_examples=100, deadline=None)
@given(cases)
def test_labelling_that_satisfies_the_constraints_is_returned_unchanged(case):
    _, X, cs = case
    # Labels built to satisfy the applied constraints: the ML groups split along CL edges
    # by colouring, plus some outliers on unconstrained items.
    groups = cs.ml_groups().copy()
    edges = cs.cl_group_edges()
    n_groups = int(groups.max()) + 1
    colours = dsatur_coloring(n_groups, edges)
    labels = colours[groups] * n_groups + groups  # distinct per group; CL never shared
    free = np.ones(len(labels), dtype=bool)
    free[np.concatenate([cs.ml_pairs().ravel(), cs.cl_pairs().ravel()])] = False
    labels[free & (np.arange(len(labels)) % 3 == 0)] = -1
    assert count_violations(labels, cs) == 0
    result = NP3()(labels, X, cs)
    assert result.n_changed == 0 and result.n_impure_clusters == 0
    assert result.n_violations_before == result.n_violations_after == 0
    np.testing.assert_array_equal(result.labels, labels)
    assert result.labels is not labels


# --------------------------------------------------------------------------- hand cases
def test_hungarian_matching_places_groups_by_feature_distance():
    # One cluster in 2-D. Founder: {a, a2} vs {b, b2} (ML inside, CL between) at x=+1 / -1.
    # The other CL groups are coloured with their left-side member as colour 0, so mapping
    # colour k to sub-cluster k would put them on the wrong side; matching must not.
    pts = {
        "a": (1.0, 0.0), "a2": (0.95, 0.05), "b": (-1.0, 0.0), "b2": (-0.95, 0.05),
        "c": (-0.9, 0.1), "d": (0.9, 0.1),  # two-node group: CL(c, d)
        "e": (0.9, -0.1), "f": (-0.9, -0.1), "g": (0.8, 0.0),  # CL(e, f), CL(f, g)
        "h": (0.8, 0.2), "i": (-0.7, 0.3),  # unconstrained
    }
    names = list(pts)
    k = {name: idx for idx, name in enumerate(names)}
    X = np.array([pts[name] for name in names], dtype=np.float32)
    cs = ConstraintSet.from_pairs(
        len(names),
        ml=[[k["a"], k["a2"]], [k["b"], k["b2"]]],
        cl=[[k["a"], k["b"]], [k["c"], k["d"]], [k["e"], k["f"]], [k["f"], k["g"]]],
    )
    result = NP3()(np.zeros(len(names), dtype=int), X, cs)
    right = {"a", "a2", "d", "e", "g", "h"}  # 6 items: keeps id 0; the left side is new (1)
    expected = [0 if name in right else 1 for name in names]
    np.testing.assert_array_equal(result.labels, expected)
    assert result.n_impure_clusters == 1 and result.n_changed == 5
    assert result.n_violations_before == 4


def test_merge_ids_and_outliers():
    labels = np.array([0, 0, 1, 1, 1, -1, -1, -1, 2, -1])
    cs = ConstraintSet.from_pairs(10, ml=[[1, 2], [5, 6], [7, 8]], cl=[[9, 5], [3, 8]])
    X = np.eye(10, dtype=np.float32)
    result = NP3()(labels, X, cs)
    # 0 and 1 merge under the larger part's id 1; outliers 5, 6 joined by ML get a fresh id
    # (3); outlier 7 joins cluster 2; outlier 9 has only a CL and stays an outlier.
    np.testing.assert_array_equal(result.labels, [1, 1, 1, 1, 1, 3, 3, 2, 2, -1])
    assert result.n_changed == 5 and result.n_impure_clusters == 0
    assert result.n_violations_before == 3


def test_split_cluster_keeps_its_id_on_the_part_that_carried_it():
    # Cluster 7 absorbs outliers 4, 5, 6 by ML; CL(0, 3) splits it. The part holding most
    # items labelled 7 keeps 7 although it is the smaller part; the other gets 8 (fresh).
    labels = np.array([7, 7, 7, 7, -1, -1, -1])
    X = np.array([[0, 0], [0, 0.1], [0, 0.2], [5, 0], [5, 0.1], [5, 0.2], [5, 0.3]],
                 dtype=np.float32)
    cs = ConstraintSet.from_pairs(7, ml=[[3, 4], [4, 5], [5, 6]], cl=[[0, 3]])
    result = NP3()(labels, X, cs)
    np.testing.assert_array_equal(result.labels, [7, 7, 7, 8, 8, 8, 8])
    # With a tie in carried items the larger part keeps the id.
    cs = ConstraintSet.from_pairs(7, ml=[[3, 4], [4, 5], [5, 6], [2, 3]], cl=[[0, 3]])
    X[2] = (5, 0.4)
    result = NP3()(labels, X, cs)
    np.testing.assert_array_equal(result.labels, [8, 8, 7, 7, 7, 7, 7])


def test_odd_cycle_of_cannot_links_needs_three_sub_clusters():
    X = np.array([[0, 0], [1, 0], [0, 1], [0.1, 0]], dtype=np.float32)
    cs = ConstraintSet.from_pairs(4, cl=[[0, 1], [1, 2], [2, 0]])
    result = NP3()(np.zeros(4, dtype=int), X, cs)
    assert len(set(result.labels[:3].tolist())) == 3
    assert result.labels[3] == result.labels[0]  # nearest sub-cluster
    assert count_violations(result.labels, cs) == 0


def test_count_violations_treats_outliers_as_singletons():
    cs = ConstraintSet.from_pairs(4, ml=[[0, 1], [2, 3]], cl=[[0, 2], [1, 3]])
    assert count_violations([-1, -1, -1, -1], cs) == 2  # MLs broken, CLs hold
    assert count_violations([0, 0, 0, 0], cs) == 2  # CLs broken
    assert count_violations([0, 0, 1, 1], cs) == 0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda cs: NP3()(np.zeros(4, int), np.ones((5, 2)), cs), "X has 5 rows"),
        (lambda cs: NP3()(np.zeros(3, int), np.ones((3, 2)), cs), "4 items"),
        (lambda cs: NP3()(np.array([0, -2, 0, 0]), np.ones((4, 2)), cs), ">= -1"),
        (lambda cs: NP3()(np.zeros(4, int), np.full((4, 2), np.nan), cs), "NaN"),
        (lambda cs: NP3()(np.zeros(4, int), np.ones((4, 2)), [[0, 1]]), "ConstraintSet"),
        (lambda cs: count_violations(np.zeros(5, int), cs), "4 items"),
        (lambda cs: NP3(exact_coloring_max_nodes=-1), ">= 0"),
        (lambda cs: dsatur_coloring(3, [[0, 3]]), "distinct nodes"),
    ],
)
def test_bad_input_raises_value_error(call, message):
    cs = ConstraintSet.from_pairs(4, ml=[[0, 1]], cl=[[1, 2]])
    with pytest.raises(ValueError, match=message):
        call(cs)


# --------------------------------------------------------------------------- colourings
def chromatic_number(n, edges):
    for k in range(1, n + 1):
        for colours in itertools.product(range(k), repeat=n):
            if all(colours[a] != colours[b] for a, b in edges):
                return k
    return 0


def assert_valid(colours, n, edges):
    assert colours.shape == (n,)
    assert all(colours[a] != colours[b] for a, b in edges)
    if n:
        assert set(colours.tolist()) == set(range(colours.max() + 1))  # compact


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 7).flatmap(
    lambda n: st.tuples(st.just(n), st.lists(
        st.tuples(st.integers(0, max(n - 1, 0)), st.integers(0, max(n - 1, 0))).filter(
            lambda e: e[0] != e[1]), max_size=15) if n >= 2 else st.just([]))))
def test_exact_colouring_is_optimal_and_dsatur_valid(graph):
    n, edges = graph
    exact = exact_coloring(n, edges)
    greedy = dsatur_coloring(n, edges)
    assert_valid(exact, n, edges)
    assert_valid(greedy, n, edges)
    k = chromatic_number(n, edges)
    assert (exact.max() + 1 if n else 0) == k
    assert (greedy.max() + 1 if n else 0) >= k


@settings(max_examples=50, deadline=None)
@given(st.integers(2, 60), st.integers(0, 2**32 - 1))
def test_dsatur_colours_bipartite_graphs_with_two_colours(n, seed):
    rng = np.random.default_rng(seed)
    side = rng.integers(0, 2, n)
    pairs = rng.integers(0, n, (3 * n, 2))
    edges = pairs[side[pairs[:, 0]] != side[pairs[:, 1]]]
    colours = dsatur_coloring(n, edges)
    assert_valid(colours, n, edges.tolist())
    assert colours.max() + 1 <= 2


def test_known_graphs():
    k5 = list(itertools.combinations(range(5), 2))
    c5 = [(i, (i + 1) % 5) for i in range(5)]
    petersen = c5 + [(i + 5, (i + 2) % 5 + 5) for i in range(5)] + [(i, i + 5) for i in range(5)]
    for edges, n, k in [(k5, 5, 5), (c5, 5, 3), (petersen, 10, 3)]:
        assert exact_coloring(n, edges).max() + 1 == k
        assert_valid(dsatur_coloring(n, edges), n, edges)


# --------------------------------------------------------------------------- scale
def test_np3_10k_items_10k_constraints():
    """NP3 on 10k items and 10k constraints leaves no violation (its time is printed;
    speed targets live in bench/, not in tests)."""
    rng = np.random.default_rng(1)
    n, n_ids = 10_000, 2_000
    truth = rng.permutation(np.arange(n) % n_ids)
    labels = truth // 2  # under-segmented: every cluster holds two identities
    labels[rng.random(n) < 0.1] = -1
    X = rng.normal(size=(n, 128)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    # About 7000 pairs inside clusters (where the answers matter), 3000 anywhere.
    inliers = np.flatnonzero(labels >= 0)
    order = inliers[np.argsort(labels[inliers], kind="stable")]
    size = np.bincount(labels[inliers])
    start = np.r_[0, np.cumsum(size)[:-1]]
    first = rng.choice(inliers, 8_000)
    lab = labels[first]
    second = order[start[lab] + (rng.random(8_000) * size[lab]).astype(int)]
    pairs = np.concatenate([np.stack([first, second], 1), rng.integers(0, n, (3_000, 2))])
    pairs = pairs[pairs[:, 0] != pairs[:, 1]][:10_000]
    assert len(pairs) == 10_000
    same = truth[pairs[:, 0]] == truth[pairs[:, 1]]
    cs = ConstraintSet.from_pairs(n, ml=pairs[same], cl=pairs[~same])
    start = time.perf_counter()
    result = NP3()(labels, X, cs)
    elapsed = time.perf_counter() - start
    print(f"\nNP3: n={n}, {len(pairs)} constraints: {elapsed:.3f} s, "
          f"{result.n_impure_clusters} impure clusters, {result.n_changed} labels changed")
    assert result.n_violations_after == 0 and result.n_impure_clusters > 100
