import numpy as np
import pytest

from reidal.core.validation import (
    check_embeddings,
    check_labels,
    check_pairs,
    l2_normalise,
    resolve_budget,
    total_pairs,
)


def test_check_embeddings_accepts_normalised_rows():
    X = l2_normalise(np.random.default_rng(0).normal(size=(5, 4)))
    out = check_embeddings(X)
    assert out.dtype == np.float32 and out.shape == (5, 4)


@pytest.mark.parametrize(
    "X, message",
    [
        (np.ones(4), "2-D"),
        (np.array([[1.0, np.nan]]), "NaN or inf"),
        (np.array([[2.0, 0.0]]), "L2-normalised"),
        (np.empty((0, 3)), "at least 1 row"),
    ],
)
def test_check_embeddings_names_the_problem(X, message):
    with pytest.raises(ValueError, match=message):
        check_embeddings(X)


def test_check_labels_and_pairs():
    assert check_labels([0, -1, 2], 3).tolist() == [0, -1, 2]
    with pytest.raises(ValueError, match="length 3"):
        check_labels([0, 1], 3)
    with pytest.raises(ValueError, match=">= -1"):
        check_labels([0, -2, 1], 3)
    with pytest.raises(ValueError, match="out of range"):
        check_pairs([[0, 3]], 3)
    with pytest.raises(ValueError, match="itself"):
        check_pairs([[1, 1]], 3)
    assert check_pairs([], 3).shape == (0, 2)


def test_budget_as_count_or_fraction():
    assert total_pairs(100) == 4950
    assert resolve_budget(7, 100) == 7
    assert resolve_budget(0.001, 100) == 5  # ceil(4.95)
    for bad in (0, -1, 0.0, 1.5, float("nan"), True):
        with pytest.raises(ValueError):
            resolve_budget(bad, 100)
