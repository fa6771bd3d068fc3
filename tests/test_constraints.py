"""ConstraintSet against a dense, brute-force reference of the same rules."""

import itertools
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reidal.core.constraints import Answer, ConstraintSet, Contradiction


# --------------------------------------------------------------------------- reference
def closure(n, answers):
    """Dense boolean ML reachability (reflexive, transitive) by repeated squaring."""
    M = np.eye(n, dtype=bool)
    for a in answers:
        if a.same:
            M[a.i, a.j] = M[a.j, a.i] = True
    while True:
        M2 = (M.astype(np.int64) @ M.astype(np.int64)) > 0
        if (M2 == M).all():
            return M
        M = M2


def consistent(n, answers):
    M = closure(n, answers)
    return not any(M[a.i, a.j] for a in answers if not a.same)


def reference_applied(n, answers):
    """Newest first; an answer inconsistent with the newer applied ones is dropped."""
    applied = []
    for a in sorted(answers, key=lambda a: -a.answer_id):
        if consistent(n, applied + [a]):
            applied.append(a)
    return applied


def reference_implied(n, applied):
    """(n, n) int8: 1 same, 0 different, -1 unknown."""
    M = closure(n, applied)
    out = np.where(M, 1, -1).astype(np.int8)
    for a in applied:
        if not a.same:
            sep = np.outer(M[a.i], M[a.j])
            out[sep | sep.T] = 0
    return out


@st.composite
def answer_lists(draw, max_n=10, max_answers=25):
    n = draw(st.integers(2, max_n))
    m = draw(st.integers(0, max_answers))
    ids = draw(st.permutations(range(m)))
    out = []
    for k in range(m):
        i = draw(st.integers(0, n - 1))
        j = draw(st.integers(0, n - 2))
        j = j + 1 if j >= i else j
        out.append(Answer(i, j, draw(st.booleans()), 3 * ids[k] + 7))
    return n, out


def applied_ids(cs):
    dropped = {c.dropped_answer_id for c in cs.contradictions}
    return {a.answer_id for a in cs.answers} - dropped


# --------------------------------------------------------------------------- properties
@settings(max_examples=150, deadline=None)
@given(answer_lists())
def test_applied_set_follows_newest_first_rule(case):
    n, answers = case
    cs = ConstraintSet.from_answers(n, answers)
    ref = reference_applied(n, answers)
    assert applied_ids(cs) == {a.answer_id for a in ref}
    assert len(cs) == len(ref)
    assert len(cs.answers) == len(answers)  # dropped answers stay stored
    ref_sorted = sorted(ref, key=lambda a: a.answer_id)
    assert cs.ml_pairs().tolist() == [[a.i, a.j] for a in ref_sorted if a.same]
    assert cs.cl_pairs().tolist() == [[a.i, a.j] for a in ref_sorted if not a.same]


@settings(max_examples=150, deadline=None)
@given(answer_lists())
def test_contradictions_are_minimal_and_drop_the_oldest(case):
    n, answers = case
    cs = ConstraintSet.from_answers(n, answers)
    by_id = {a.answer_id: a for a in answers}
    for c in cs.contradictions:
        involved = [by_id[k] for k in c.answer_ids]
        assert len(set(c.answer_ids)) == len(c.answer_ids)
        assert sum(not a.same for a in involved) == 1  # exactly one CL
        assert not consistent(n, involved)
        for drop in range(len(involved)):
            assert consistent(n, involved[:drop] + involved[drop + 1:])
        assert c.dropped_answer_id == min(c.answer_ids)  # the newer answers win


@settings(max_examples=150, deadline=None)
@given(answer_lists())
def test_implied_matches_dense_reference(case):
    n, answers = case
    cs = ConstraintSet.from_answers(n, answers)
    ref = reference_implied(n, reference_applied(n, answers))
    pairs = np.array(list(itertools.combinations(range(n), 2)))
    got = cs.implied_many(pairs)
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got, ref[pairs[:, 0], pairs[:, 1]])
    np.testing.assert_array_equal(cs.implied_many(pairs[:, ::-1]), got)
    for (i, j), v in zip(pairs.tolist(), got.tolist(), strict=True):
        assert cs.implied(i, j) == {1: True, 0: False, -1: None}[v]


@settings(max_examples=100, deadline=None)
@given(answer_lists())
def test_groups_and_group_edges_match_reference(case):
    n, answers = case
    cs = ConstraintSet.from_answers(n, answers)
    applied = reference_applied(n, answers)
    M = closure(n, applied)
    g = cs.ml_groups()
    np.testing.assert_array_equal(g[:, None] == g[None, :], M)
    assert sorted(set(g.tolist())) == list(range(g.max() + 1))  # compact ids
    edges = cs.cl_group_edges()
    expected = sorted({tuple(sorted((g[a.i], g[a.j]))) for a in applied if not a.same})
    assert [tuple(e) for e in edges.tolist()] == expected


@settings(max_examples=100, deadline=None)
@given(answer_lists(), st.randoms(use_true_random=False))
def test_result_depends_only_on_ids_not_input_order(case, rnd):
    n, answers = case
    a = ConstraintSet.from_answers(n, answers)
    shuffled = list(answers)
    rnd.shuffle(shuffled)
    b = ConstraintSet.from_answers(n, shuffled)
    assert a.contradictions == b.contradictions
    np.testing.assert_array_equal(a.ml_groups(), b.ml_groups())
    np.testing.assert_array_equal(a.ml_pairs(), b.ml_pairs())
    np.testing.assert_array_equal(a.cl_pairs(), b.cl_pairs())
    assert a.answers == b.answers


@settings(max_examples=100, deadline=None)
@given(answer_lists(), st.booleans(), st.randoms(use_true_random=False))
def test_incremental_add_equals_rebuild(case, in_time_order, rnd):
    n, answers = case
    order = sorted(answers, key=lambda a: a.answer_id)
    if not in_time_order:
        rnd.shuffle(order)
    cs = ConstraintSet(n)
    for a in order:
        before = applied_ids(cs)
        found = cs.add(a)
        after = applied_ids(cs)
        if found is None:
            assert a.answer_id in after and before <= after
        else:
            assert found in cs.contradictions
            assert a.answer_id in found.answer_ids
    ref = ConstraintSet.from_answers(n, answers)
    assert applied_ids(cs) == applied_ids(ref)
    np.testing.assert_array_equal(cs.ml_groups(), ref.ml_groups())
    np.testing.assert_array_equal(cs.cl_group_edges(), ref.cl_group_edges())
    np.testing.assert_array_equal(
        cs.implied_many(np.array(list(itertools.combinations(range(n), 2)))),
        ref.implied_many(np.array(list(itertools.combinations(range(n), 2)))),
    )


# --------------------------------------------------------------------------- hand cases
def test_chain_contradiction_reports_exactly_the_minimal_answers():
    answers = [Answer(0, 1, True, 1), Answer(1, 2, True, 2), Answer(0, 2, False, 3),
               Answer(5, 6, True, 4)]
    cs = ConstraintSet.from_answers(10, answers)
    # Newest first: ML(5,6), CL(0,2), ML(1,2) apply; ML(0,1) would join 0 to 2: dropped.
    assert cs.contradictions == [Contradiction((1, 2, 3), 1)]
    assert len(cs) == 3 and len(cs.answers) == 4
    assert cs.implied(0, 2) is False and cs.implied(1, 2) is True
    assert cs.implied(0, 1) is False  # 1 is in 2's group, which the CL separates from 0


def test_older_cannot_link_is_dropped_and_side_branches_are_not_reported():
    answers = [Answer(0, 3, False, 0)] + [
        Answer(i, j, True, k + 1) for k, (i, j) in enumerate([(0, 1), (1, 2), (2, 3), (1, 4),
                                                              (4, 5)])
    ]
    cs = ConstraintSet.from_answers(6, answers)
    assert cs.contradictions == [Contradiction((0, 1, 2, 3), 0)]
    assert cs.implied(0, 3) is True


def test_newer_answer_wins_on_the_same_pair():
    cs = ConstraintSet.from_answers(3, [Answer(0, 1, True, 5), Answer(1, 0, False, 3)])
    assert cs.contradictions == [Contradiction((3, 5), 3)] and cs.implied(0, 1) is True
    cs = ConstraintSet.from_answers(3, [Answer(0, 1, True, 3), Answer(1, 0, False, 5)])
    assert cs.contradictions == [Contradiction((3, 5), 3)] and cs.implied(0, 1) is False


def test_add_newest_contradicting_answer_overrules_older_ones():
    cs = ConstraintSet(5)
    assert cs.add(Answer(0, 1, True, 1)) is None
    assert cs.add(Answer(1, 2, True, 2)) is None
    found = cs.add(Answer(0, 2, False, 3))
    assert found == Contradiction((1, 2, 3), 1)
    assert cs.implied(0, 2) is False and cs.implied(1, 2) is True and len(cs) == 2
    # An answer older than the newest, contradicting newer ones, drops itself.
    found = cs.add(Answer(2, 0, True, 0))
    assert found == Contradiction((0, 3), 0)
    assert cs.implied(0, 2) is False and len(cs) == 2 and len(cs.answers) == 4
    # Repeating a pair is kept as another answer.
    assert cs.add(Answer(1, 2, True, 9)) is None and len(cs) == 3


def test_from_pairs_ids_ml_then_cl():
    cs = ConstraintSet.from_pairs(4, ml=[[0, 1], [1, 2]], cl=[[0, 2]])
    assert [(a.i, a.j, a.same, a.answer_id) for a in cs.answers] == [
        (0, 1, True, 0), (1, 2, True, 1), (0, 2, False, 2)]
    assert cs.contradictions == [Contradiction((0, 1, 2), 0)]
    empty = ConstraintSet.from_pairs(3)
    assert len(empty) == 0 and empty.ml_pairs().shape == (0, 2)
    assert empty.cl_group_edges().shape == (0, 2)
    np.testing.assert_array_equal(empty.ml_groups(), [0, 1, 2])
    np.testing.assert_array_equal(empty.implied_many([[0, 1], [1, 2]]), [-1, -1])
    assert empty.implied_many(np.empty((0, 2), dtype=int)).shape == (0,)
    assert ConstraintSet(0).ml_groups().shape == (0,)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ConstraintSet(-1), ">= 0"),
        (lambda: ConstraintSet(2.5), "int"),
        (lambda: ConstraintSet.from_answers(3, [Answer(0, 3, True, 0)]), "out of range"),
        (lambda: ConstraintSet.from_answers(3, [Answer(1, 1, True, 0)]), "itself"),
        (lambda: ConstraintSet.from_answers(3, [Answer(0, 1, True, 0), Answer(1, 2, True, 0)]),
         "duplicate answer_id"),
        (lambda: ConstraintSet.from_answers(3, [Answer(0, 1, "yes", 0)]), "bool"),
        (lambda: ConstraintSet.from_answers(3, [(0, 1, True, 0)]), "Answer"),
        (lambda: ConstraintSet.from_pairs(3, ml=[[0, 1, 2]]), "shape"),
        (lambda: ConstraintSet.from_pairs(3, cl=[[0, 5]]), "out of range"),
        (lambda: ConstraintSet(3).implied(0, 0), "itself"),
        (lambda: ConstraintSet(3).implied_many([[0, 3]]), "out of range"),
    ],
)
def test_bad_input_raises_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_add_rejects_a_repeated_id():
    cs = ConstraintSet(3)
    cs.add(Answer(0, 1, True, 4))
    with pytest.raises(ValueError, match="duplicate"):
        cs.add(Answer(1, 2, False, 4))


def test_ten_thousand_answers_on_100k_items():
    """A history with hundreds of contradictions on a large collection builds and answers
    implied queries (its time is printed; speed targets live in bench/, not in tests)."""
    rng = np.random.default_rng(0)
    n, m = 100_000, 10_000
    # Half the answers touch only 2000 items with random labels: long ML chains and
    # hundreds of contradictions; the other half are spread over all items.
    pairs = np.concatenate([rng.integers(0, 2000, (m // 2, 2)), rng.integers(0, n, (m // 2, 2))])
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    same = rng.random(len(pairs)) < 0.6
    answers = [Answer(int(i), int(j), bool(s), k)
               for k, ((i, j), s) in enumerate(zip(pairs.tolist(), same.tolist(), strict=True))]
    start = time.perf_counter()
    cs = ConstraintSet.from_answers(n, answers)
    cs.implied_many(pairs)
    elapsed = time.perf_counter() - start
    print(f"\nConstraintSet: {len(answers)} answers on {n} items: {elapsed:.3f} s, "
          f"{len(cs.contradictions)} contradictions")
    assert len(cs.contradictions) > 100


@settings(max_examples=100, deadline=None)
@given(answer_lists(), st.randoms(use_true_random=False))
def test_remove_equals_a_rebuild_without_the_answer(case, rnd):
    n, answers = case
    cs = ConstraintSet.from_answers(n, answers)
    kept = list(answers)
    for _ in range(min(3, len(kept))):
        gone = kept.pop(rnd.randrange(len(kept)))
        cs.remove(gone.answer_id)
        assert_same_state(cs, n, kept)


def test_grow_adds_unconstrained_items():
    cs = ConstraintSet.from_answers(2, [Answer(0, 1, True, 1)])
    cs.grow(4)
    assert cs.add(Answer(2, 3, False, 2)) is None
    assert cs.add(Answer(1, 2, True, 3)) is None
    np.testing.assert_array_equal(cs.ml_groups(), [0, 0, 0, 1])
    assert cs.implied(0, 3) is False
    with pytest.raises(KeyError):
        cs.remove(99)


def test_from_arrays_equals_from_answers():
    rng = np.random.default_rng(3)
    pairs = rng.integers(0, 300, (2000, 2))
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    same = rng.random(len(pairs)) < 0.7
    ids = rng.permutation(len(pairs)) * 2 + 1
    a = ConstraintSet.from_arrays(300, pairs[:, 0], pairs[:, 1], same, ids)
    b = ConstraintSet.from_answers(300, [Answer(int(i), int(j), bool(s), int(k)) for (i, j), s, k
                                         in zip(pairs.tolist(), same.tolist(), ids.tolist(),
                                                strict=True)])
    assert a.contradictions == b.contradictions and len(a.contradictions) > 10
    np.testing.assert_array_equal(a.ml_pairs(), b.ml_pairs())
    with pytest.raises(ValueError, match="duplicate"):
        ConstraintSet.from_arrays(3, [0, 1], [1, 2], [True, True], [4, 4])


@settings(max_examples=100, deadline=None)
@given(answer_lists(), st.randoms(use_true_random=False))
def test_replace_by_the_same_answer_keeps_the_rebuild_state(case, rnd):
    n, answers = case
    if not answers:
        return
    cs = ConstraintSet.from_answers(n, answers)
    old = rnd.choice(answers)
    new = Answer(old.j, old.i, old.same, max(a.answer_id for a in answers) + 1)
    cs.replace(old.answer_id, new)
    assert_same_state(cs, n, [a for a in answers if a is not old] + [new])


def assert_same_state(cs: ConstraintSet, n: int, answers) -> None:
    """``cs`` equals a set built from scratch from ``answers``, as a whole."""
    ref = ConstraintSet.from_answers(n, answers)
    assert cs.contradictions == ref.contradictions
    assert applied_ids(cs) == applied_ids(ref) and len(cs) == len(ref)
    np.testing.assert_array_equal(cs.ml_groups(), ref.ml_groups())
    np.testing.assert_array_equal(cs.ml_pairs(), ref.ml_pairs())
    np.testing.assert_array_equal(cs.cl_group_edges(), ref.cl_group_edges())
    pairs = np.array(list(itertools.combinations(range(n), 2)))
    np.testing.assert_array_equal(cs.implied_many(pairs), ref.implied_many(pairs))


@pytest.mark.parametrize("seed", range(6))
def test_adds_relabels_and_removals_rebuild_only_their_part_and_equal_a_full_build(seed):
    """Random sequences of new answers, relabels (replace with the other label) and
    removals, on a set with a few ML components and many contradictions: after every step
    the set equals one built from scratch, and no step rebuilt the whole set."""
    rng = np.random.default_rng(seed)
    n = 40
    cs = ConstraintSet(n)
    present: dict[int, Answer] = {}
    next_id = 0
    for _ in range(250):
        roll = rng.random()
        if present and roll < 0.2:
            gone = present.pop(int(rng.choice(list(present))))
            cs.remove(gone.answer_id)
        elif present and roll < 0.4:
            old = present.pop(int(rng.choice(list(present))))
            new = Answer(old.i, old.j, not old.same if rng.random() < 0.8 else old.same, next_id)
            cs.replace(old.answer_id, new)
            present[next_id] = new
            next_id += 1
        else:
            # items in 4 clusters of 10, mostly answered inside a cluster: components grow
            # and fill with contradictions
            c = int(rng.integers(4))
            i, j = (int(x) for x in rng.choice(10, 2, replace=False) + 10 * c)
            if rng.random() < 0.1:
                j = int(rng.integers(n))
            if i == j:
                continue
            a = Answer(i, j, bool(rng.random() < 0.7), next_id)
            cs.add(a)
            present[next_id] = a
            next_id += 1
        assert_same_state(cs, n, present.values())
    assert cs.rebuilds == 0 and cs.local_rebuilds > 50 and cs.contradictions


@settings(max_examples=100, deadline=None)
@given(answer_lists(), st.randoms(use_true_random=False))
def test_relabel_equals_a_rebuild_with_the_new_label(case, rnd):
    n, answers = case
    if not answers:
        return
    cs = ConstraintSet.from_answers(n, answers)
    kept = list(answers)
    for k in range(min(3, len(kept))):
        old = kept.pop(rnd.randrange(len(kept)))
        new = Answer(old.i, old.j, not old.same, max(a.answer_id for a in answers) + 1 + k)
        cs.replace(old.answer_id, new)
        kept.append(new)
        assert_same_state(cs, n, kept)
    assert cs.rebuilds == 1
