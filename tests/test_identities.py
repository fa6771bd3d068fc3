"""Stable identity naming and identity summaries (no gRPC)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reidal.identities import stable_identity_ids, summarize


def _groups(ids, names):
    out: dict[str, set[str]] = {}
    for i, n in zip(ids, names, strict=True):
        out.setdefault(n, set()).add(i)
    return out


def test_first_naming_is_by_first_member_and_moves_the_counter():
    ids = list("abcdef")
    labels = np.array([1, 0, 1, -1, 0, -1])
    names, nxt = stable_identity_ids(ids, labels, {}, 1)
    assert names == ["id-000001", "id-000002", "id-000001", "id-000003", "id-000002", "id-000004"]
    assert nxt == 5


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-1, 5), min_size=1, max_size=40), st.randoms(use_true_random=False))
def test_unchanged_membership_keeps_every_id(labels, rnd):
    ids = [f"img{k}" for k in range(len(labels))]
    first, nxt = stable_identity_ids(ids, np.array(labels), {}, 1)
    # Same partition, other label numbers (a clustering rerun renumbers freely).
    perm = list(range(-1, 6))
    rnd.shuffle(perm)
    relabelled = np.array([perm[x + 1] + 10 if x >= 0 else -1 for x in labels])
    second, nxt2 = stable_identity_ids(ids, relabelled, dict(zip(ids, first, strict=True)), nxt)
    assert second == first and nxt2 == nxt


def test_split_merge_and_new_members():
    ids = [f"i{k}" for k in range(10)]
    previous = dict(zip(ids, ["A"] * 6 + ["B"] * 2 + ["C"] * 2, strict=True))
    # A splits 4 / 2; B and C merge (B wins the tie by id); one new image joins the merge.
    ids2 = [*ids, "new"]
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    names, nxt = stable_identity_ids(ids2, labels, previous, 7)
    assert names[:4] == ["A"] * 4
    assert names[4:6] == ["id-000007"] * 2  # the minority part of A gets a fresh id
    assert names[6:] == ["B"] * 5  # C's id retires
    assert nxt == 8
    # An identity losing a member to exclusion (absent image) keeps its id.
    names3, _ = stable_identity_ids(ids[1:6], np.zeros(5, dtype=int), previous, nxt)
    assert names3 == ["A"] * 5


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-1, 4), min_size=1, max_size=30),
       st.lists(st.integers(-1, 4), min_size=1, max_size=30))
def test_ids_are_a_consistent_partition_and_never_reused(before, after):
    n = min(len(before), len(after))
    ids = [f"x{k}" for k in range(n)]
    first, nxt = stable_identity_ids(ids, np.array(before[:n]), {}, 1)
    second, nxt2 = stable_identity_ids(ids, np.array(after[:n]),
                                       dict(zip(ids, first, strict=True)), nxt)
    # The naming is a relabelling of the new clustering: same partition.
    compact = [a if a >= 0 else 100 + k for k, a in enumerate(after[:n])]
    assert {frozenset(g) for g in _groups(ids, second).values()} == {
        frozenset(g) for g in _groups(ids, compact).values()}
    # Old ids kept only by a cluster holding a majority of their former members; fresh ids
    # are new numbers.
    old_groups = _groups(ids, first)
    for name, members in _groups(ids, second).items():
        if name in old_groups:
            assert 2 * len(members & old_groups[name]) > len(old_groups[name])
        else:
            assert nxt <= int(name.removeprefix("id-")) < nxt2


def test_labels_must_match_ids():
    with pytest.raises(ValueError, match="one entry per image"):
        stable_identity_ids(["a", "b"], np.array([0]), {}, 1)
    assert stable_identity_ids([], np.array([], dtype=int), {}, 4) == ([], 4)


def test_summaries_count_answers_and_names():
    ids = list("abcdef")
    ident = ["X", "X", "X", "Y", "Y", "Z"]
    names = ["zeb-1", "", "zeb-1", "zeb-2", "zeb-3", ""]
    ml = np.array([[0, 1], [1, 2], [3, 4]])
    cl = np.array([[0, 3], [2, 5], [4, 5]])
    got = {s.identity_id: s for s in summarize(ids, ident, names, ml, cl)}
    assert [s.identity_id for s in summarize(ids, ident, names, ml, cl)] == ["X", "Y", "Z"]
    x, y, z = got["X"], got["Y"], got["Z"]
    assert (x.image_ids, x.size, x.same_answers, x.different_answers) == (("a", "b", "c"), 3, 2, 2)
    assert (y.same_answers, y.different_answers, z.different_answers) == (1, 2, 2)
    assert x.names == ("zeb-1",) and not x.new_individual and not x.name_conflict
    assert y.name_conflict and set(y.names) == {"zeb-2", "zeb-3"}
    assert z.new_individual and z.names == ()
