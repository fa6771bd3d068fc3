import numpy as np
import pytest

from reidal.simulation.oracle import SimulatedOracle


def _random_pairs(rng, n, m):
    i = rng.integers(0, n, size=m)
    j = (i + rng.integers(1, n, size=m)) % n  # never equal to i
    return np.stack([i, j], axis=1)


def test_noise_free_oracle_answers_ground_truth():
    labels = np.array(["a", "b", "a", "c", "b"])
    oracle = SimulatedOracle(labels)
    got = oracle([[0, 2], [0, 1], [1, 4], [3, 4], [2, 0]])
    np.testing.assert_array_equal(got, [True, False, True, False, True])
    assert got.dtype == bool
    assert oracle.n_asked == 5 and oracle.n_flipped == 0


def test_observed_flip_rate_matches_error_rate():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 30, size=500)
    oracle = SimulatedOracle(labels, error_rate=0.1, seed=3)
    pairs = _random_pairs(rng, 500, 20_000)
    truth = labels[pairs[:, 0]] == labels[pairs[:, 1]]
    answers = np.concatenate([oracle(pairs[:12_000]), oracle(pairs[12_000:])])
    wrong = int((answers != truth).sum())
    assert oracle.n_asked == 20_000 and oracle.n_flipped == wrong
    # binomial sd = sqrt(0.1 * 0.9 / 20000) = 0.0021; allow ~5 sd
    assert abs(wrong / 20_000 - 0.1) < 0.011
    np.testing.assert_array_equal(oracle.truth(pairs), truth)


def test_same_seed_same_call_sequence_same_answers():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, size=100)
    batches = [_random_pairs(rng, 100, m) for m in (50, 1, 300)]
    a = SimulatedOracle(labels, error_rate=0.3, seed=9)
    b = SimulatedOracle(labels, error_rate=0.3, seed=9)
    c = SimulatedOracle(labels, error_rate=0.3, seed=10)
    out_a = [a(p) for p in batches]
    out_b = [b(p) for p in batches]
    out_c = [c(p) for p in batches]
    for x, y in zip(out_a, out_b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(out_a, out_c, strict=True))


def test_empty_batch():
    oracle = SimulatedOracle([0, 1, 0], error_rate=0.2)
    assert oracle(np.empty((0, 2), dtype=np.int64)).shape == (0,)
    assert oracle.n_asked == 0


@pytest.mark.parametrize("rate", [-0.01, 0.51, float("nan")])
def test_rejects_bad_error_rate(rate):
    with pytest.raises(ValueError, match="error_rate"):
        SimulatedOracle([0, 1], error_rate=rate)


def test_rejects_bad_pairs_and_labels():
    oracle = SimulatedOracle([0, 1, 1])
    with pytest.raises(ValueError, match="out of range"):
        oracle([[0, 3]])
    with pytest.raises(ValueError, match="itself"):
        oracle([[1, 1]])
    with pytest.raises(ValueError, match="shape"):
        oracle([0, 1])
    with pytest.raises(ValueError, match="true_labels"):
        SimulatedOracle(np.zeros((2, 2)))
    assert oracle.n_asked == 0
