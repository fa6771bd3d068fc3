"""collection_state: ids, parameters, budgets, filters, answers -> constraints (no gRPC)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reidal.collection_state import (
    ImageFilter,
    budget_value,
    check_id,
    constraints_from_answers,
    effective_params,
    load_view,
    make_sampler,
    pair_rows_of,
    rows_of,
)
from reidal.errors import FailedPrecondition, InvalidArgument, NotFound
from reidal.store import AnswerIn, ImageRecord, Store, StoredAnswer


def test_check_id():
    assert check_id("zebra-17", "image id") == "zebra-17"
    for bad, message in (("", "non-empty"), ("a" * 300, "longer"), ("a\tb", "control")):
        with pytest.raises(InvalidArgument, match=message):
            check_id(bad, "image id")


def test_effective_params_fill_defaults_and_name_bad_values():
    p = effective_params({"k1": 8}, {"seed": 3, "default_budget": {"count": 5}})
    assert p["clustering"] == {"mode": "fixed", "dbscan_eps": 0.6, "min_samples": 4, "k1": 8,
                               "k2": 6, "finch_level": 0}
    assert p["sampling"]["seed"] == 3 and p["sampling"]["default_budget"] == {"count": 5}
    assert p["sampling"]["mixture_eps"] == 0.6 and p["sampling"]["region_weights"] == "disagreement"
    sampler = make_sampler(p)
    assert sampler.dbscan.k1 == 8 and sampler.k_max == 5
    for clustering, sampling, message in (
        ({"dbscan_eps": 1.0}, None, "eps"),
        ({"min_samples": 0}, None, "min_samples"),
        (None, {"mixture_eps": 1.5}, "eps"),
        (None, {"pair_weights": "odd"}, "pair_weights"),
        (None, {"default_budget": {"fraction": 0.0}}, "fraction"),
        ({"k3": 1}, None, "unknown clustering parameter"),
        ({"mode": "adaptive"}, None, "mode must be one of .*got 'adaptive'"),
        ({"mode": "calibrated", "dbscan_eps": 1.0}, None, "eps"),
        ({"finch_level": 9}, None, "finch_level"),
        (None, {"sampler": "nis"}, "sampler must be one of .*got 'nis'"),
    ):
        with pytest.raises(InvalidArgument, match=message):
            effective_params(clustering, sampling)


def test_budget_value():
    assert budget_value({"count": 7}, 10) == 7
    assert budget_value({"fraction": 0.1}, 10) == 5  # ceil(0.1 * 45)
    assert budget_value({"fraction": 1e-9}, 10) == 1
    for bad in ({"count": 0}, {"fraction": 1.5}, {}, {"count": 1, "fraction": 0.1}):
        with pytest.raises(InvalidArgument):
            budget_value(bad, 10)


def _images() -> list[ImageRecord]:
    return [
        ImageRecord("a", metadata={"site": "n", "view": "left", "date": "2024-05-01"}),
        ImageRecord("b", metadata={"site": "n", "view": "right", "date": "2024-05-01T23:30:00Z"}),
        ImageRecord("c", metadata={"site": "s", "view": "left", "date": "2024-05-02T01:00:00+02:00"}),
        ImageRecord("d", metadata={"site": "n", "view": "left"}),
        ImageRecord("e", metadata={"site": "n", "view": "left", "date": "not a date"}),
    ]


def test_image_filter():
    imgs = _images()
    ids = np.array([i.image_id for i in imgs])
    assert ImageFilter().empty and ImageFilter().mask(imgs).all()
    assert ids[ImageFilter(metadata={"site": "n", "view": "left"}).mask(imgs)].tolist() == [
        "a", "d", "e"]
    # A date-only upper bound is the end of that day; c is 2024-05-01 23:00 UTC.
    day = ImageFilter(date_from="2024-05-01", date_to="2024-05-01")
    assert ids[day.mask(imgs)].tolist() == ["a", "b", "c"]
    later = ImageFilter(date_from="2024-05-01T23:15:00Z")
    assert ids[later.mask(imgs)].tolist() == ["b"]
    assert ids[ImageFilter(image_ids=("c", "a")).mask(imgs)].tolist() == ["a", "c"]
    assert ids[ImageFilter(date_key="view", date_from="2024-01-01").mask(imgs)].tolist() == []
    with pytest.raises(NotFound, match="zz"):
        ImageFilter(image_ids=("a", "zz")).mask(imgs)
    with pytest.raises(InvalidArgument, match="date_to"):
        ImageFilter(date_to="May")
    with pytest.raises(InvalidArgument, match="after"):
        ImageFilter(date_from="2024-06-01", date_to="2024-05-01")
    f = ImageFilter(metadata={"site": "n"}, date_from="2024-05-01")
    assert ImageFilter.from_dict(f.to_dict()) == f and ImageFilter().to_dict() == {}


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=4), unique=True, max_size=30),
       st.lists(st.text(min_size=1, max_size=4), max_size=30))
def test_rows_of_matches_a_dict(rows, queries):
    where = {r: k for k, r in enumerate(rows)}
    assert rows_of(rows, queries).tolist() == [where.get(q, -1) for q in queries]


def _answer(seq, a, b, label, superseded=None, deleted=False):
    lo, hi = sorted((a, b))
    return StoredAnswer(seq, lo, hi, label, "", None, (), "", 0.0, "", "", "", superseded, deleted)


def test_constraints_from_answers_against_a_reference():
    rows = ["a", "b", "c", "d", "e", "f"]
    answers = [
        _answer(1, "a", "b", "SAME"),
        _answer(2, "b", "c", "SAME"),
        _answer(3, "d", "e", "DIFFERENT"),
        _answer(4, "e", "f", "UNSURE"),
        _answer(5, "a", "x", "SAME"),  # x is not a row (excluded / filtered out)
        _answer(6, "c", "d", "SAME", superseded=9),  # not current
        _answer(7, "a", "f", "DIFFERENT", deleted=True),  # not current
        _answer(8, "c", "a", "DIFFERENT"),  # contradicts 1 and 2: the oldest (1) is dropped
    ]
    got = constraints_from_answers(rows, answers)
    assert got.ignored == 1 and sorted(got.used) == [1, 2, 3, 4, 8]
    assert got.unsure_pairs.tolist() == [[4, 5]]
    cs = got.constraints
    assert cs.n_items == 6
    [c] = got.contradictions()
    assert set(c.answer_ids) == {1, 2, 8} and c.dropped_answer_id == 1
    assert cs.implied(1, 2) is True and cs.implied(0, 2) is False and cs.implied(3, 4) is False
    assert cs.implied(0, 1) is False  # the dropped SAME is not applied: a, b now differ
    assert cs.implied(4, 5) is None  # UNSURE is never a constraint
    assert pair_rows_of(rows, [("f", "e"), ("a", "x"), ("b", "b")]).tolist() == [[4, 5]]


def test_load_view_picks_rows_vectors_and_refuses_missing_vectors(tmp_path):
    store = Store(tmp_path)
    try:
        store.collections.create("c", model_name="m")
        store.images.add("c", [ImageRecord(i, metadata={"site": s})
                               for i, s in zip("abcd", "nnsn", strict=True)])
        with pytest.raises(FailedPrecondition, match="no embedded image"):
            load_view(store, "c")
        rng = np.random.default_rng(0)
        X = rng.normal(size=(4, 3)).astype(np.float32)
        store.images.put_vectors("c", "m", "2", list("abc"), X[:3])
        store.collections.set_model("c", "m", "2")
        with pytest.raises(FailedPrecondition, match="1 of 4 image.*'d'"):
            load_view(store, "c")
        store.images.exclude("c", "d", "blurred")
        store.answers.submit("c", [AnswerIn("a", "c", "SAME"), AnswerIn("a", "d", "SAME")])
        view = load_view(store, "c")
        assert view.image_ids == ["a", "b", "c"]
        np.testing.assert_array_equal(view.X, X[:3])
        assert view.answers.constraints.implied(0, 2) is True and view.answers.ignored == 1
        north = load_view(store, "c", ImageFilter(metadata={"site": "n"}))
        assert north.image_ids == ["a", "b"]
        np.testing.assert_array_equal(north.X, X[:2])
    finally:
        store.close()


def test_load_view_reuses_the_rows_of_an_unchanged_image_state_and_follows_every_change(
        tmp_path):
    store = Store(tmp_path)
    try:
        rng = np.random.default_rng(1)
        X = rng.normal(size=(6, 3)).astype(np.float32)
        store.collections.create("c", model_name="m", model_version="1")
        store.images.add("c", [ImageRecord(i, metadata={"site": s})
                               for i, s in zip("abcd", "nnsn", strict=True)])
        store.images.put_vectors("c", "m", "1", list("abcd"), X[:4])
        first = load_view(store, "c")
        again = load_view(store, "c")
        assert again.X is first.X and not first.X.flags.writeable  # shared, read-only
        store.answers.submit("c", [AnswerIn("a", "b", "SAME")])
        answered = load_view(store, "c")  # an answer changes no row: the same rows
        assert answered.X is first.X and answered.answers.constraints.implied(0, 1) is True
        store.images.add("c", [ImageRecord("e", metadata={"site": "n"})])
        # a new image without its vector: refused, and only when it is among the rows
        with pytest.raises(FailedPrecondition, match="1 of 5 image.*'e'"):
            load_view(store, "c")
        assert load_view(store, "c", ImageFilter(metadata={"site": "s"})).image_ids == ["c"]
        store.images.put_vectors("c", "m", "1", ["e"], X[4:5])
        view = load_view(store, "c")
        assert view.image_ids == list("abcde")
        np.testing.assert_array_equal(view.X, X[:5])
        store.images.exclude("c", "b", "blurred")
        assert load_view(store, "c").image_ids == list("acde")
        store.images.restore("c", "b")
        assert load_view(store, "c").image_ids == list("abcde")
        store.images.add_vectors("c", "m", "1", ["a"], X[5:6])  # a replaced vector
        np.testing.assert_array_equal(load_view(store, "c").X, np.vstack([X[5:6], X[1:5]]))
        newest = store.images.newest("c")
        store.images.delete("c", "d")  # not the newest image: the answers epoch tells
        assert store.images.newest("c") == newest
        assert load_view(store, "c").image_ids == list("abce")
        north = load_view(store, "c", ImageFilter(metadata={"site": "n"}))
        assert north.image_ids == list("abe")
        np.testing.assert_array_equal(north.X, np.vstack([X[5:6], X[1:2], X[4:5]]))
        store.collections.delete("c")
        store.collections.create("c", model_name="m", model_version="1")
        store.images.add("c", [ImageRecord(i) for i in "abce"])
        store.images.put_vectors("c", "m", "1", list("abce"), X[:4])
        np.testing.assert_array_equal(load_view(store, "c").X, X[:4])  # a new collection
    finally:
        store.close()
