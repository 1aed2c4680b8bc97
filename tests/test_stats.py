"""The bootstrap and the paired test against hand computations and a direct numpy reimplementation; Wilson
intervals against the closed form worked by hand; bad input gives one clear line."""

from __future__ import annotations

import numpy as np
import pytest

from metadit.errors import MetaditError
from metadit.eval.stats import (CONFIDENCE, RESAMPLES, SEED, bootstrap_mean, bootstrap_means, paired_bootstrap,
                                wilson_interval)


def _direct_means(values: np.ndarray, resamples: int = 10_000, seed: int = 0) -> np.ndarray:
    """The documented procedure written out: n indices per resample from default_rng(seed), then the mean."""
    idx = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    return values[idx].mean(axis=1)


def test_the_stated_settings():
    assert (RESAMPLES, SEED, CONFIDENCE) == (10_000, 0, 0.95)


def test_bootstrap_mean_is_the_percentile_interval_of_the_documented_resampling():
    values = np.random.default_rng(7).normal(3.0, 1.0, size=11)
    means = _direct_means(values)
    got = bootstrap_mean(values.tolist())
    assert got.n == 11 and got.mean == pytest.approx(values.mean(), abs=1e-15)
    assert (got.low, got.high) == tuple(np.quantile(means, [0.025, 0.975]))
    assert np.array_equal(bootstrap_means(values), means)
    # another seed, another draw: the seed is what fixes the interval
    assert bootstrap_mean(values, seed=1).low != got.low


def test_large_inputs_are_resampled_in_chunks_from_the_same_stream():
    values = np.random.default_rng(3).random(600)  # 600 x 10,000 indices: more than one chunk
    assert np.array_equal(bootstrap_means(values), _direct_means(values))


def test_three_values_whose_bootstrap_distribution_is_enumerated_exactly():
    # [0, 0, 1]: a resample's sum k ~ Binomial(3, 1/3): P(k) = 8, 12, 6, 1 in 27.
    means = bootstrap_means([0.0, 0.0, 1.0])
    exact = {0.0: 8 / 27, 1 / 3: 12 / 27, 2 / 3: 6 / 27, 1.0: 1 / 27}
    for mean, prob in exact.items():
        share = np.isclose(means, mean).mean()
        assert abs(share - prob) < 4 * np.sqrt(prob * (1 - prob) / RESAMPLES), (mean, share, prob)
    # 2.5 %: P(0) = 0.30 covers it; 97.5 %: P(k <= 2) = 26/27 = 0.963 < 0.975, so the top value 1.
    assert bootstrap_mean([0.0, 0.0, 1.0]).as_dict() == {"n": 3, "mean": pytest.approx(1 / 3), "low": 0.0, "high": 1.0}
    # [0, 1, 2], 50 % interval: the sum S of 3 draws has CDF 1, 4, 10, 17, 23, 26, 27 in 27, so the quartiles are
    # S = 2 and S = 4: means 2/3 and 4/3.
    half = bootstrap_mean([0.0, 1.0, 2.0], confidence=0.5)
    assert half.low == pytest.approx(2 / 3) and half.high == pytest.approx(4 / 3) and half.mean == 1.0


def test_a_constant_and_a_single_value_have_a_zero_width_interval():
    assert bootstrap_mean([2.0] * 5).as_dict() == {"n": 5, "mean": 2.0, "low": 2.0, "high": 2.0}
    assert bootstrap_mean([4.0]).as_dict() == {"n": 1, "mean": 4.0, "low": 4.0, "high": 4.0}


def test_paired_bootstrap_equals_a_direct_reimplementation():
    rng = np.random.default_rng(11)
    a, b = rng.integers(1, 6, size=9).astype(float), rng.integers(1, 6, size=9).astype(float)
    means = _direct_means(a - b)
    low, high = np.quantile(means, [0.025, 0.975])
    far = min((means <= 0).sum(), (means >= 0).sum())
    got = paired_bootstrap(a, b)
    assert got.n == 9 and got.mean_a == a.mean() and got.mean_b == b.mean()
    assert got.difference == pytest.approx(a.mean() - b.mean())
    assert (got.low, got.high) == (low, high)
    assert got.p == min(1.0, 2 * (1 + far) / (1 + 10_000))


def test_paired_bootstrap_p_against_the_enumerated_distribution():
    # differences [1, 1, -1]: a resample's sum is 2k - 3, k ~ Binomial(3, 2/3); it is <= 0 when k <= 1: 7/27.
    got = paired_bootstrap([2.0, 3.0, 1.0], [1.0, 2.0, 2.0])
    assert got.difference == pytest.approx(1 / 3)
    sd = np.sqrt((7 / 27) * (20 / 27) / RESAMPLES)
    assert abs(got.p - 2 * 7 / 27) < 2 * 4 * sd
    assert (got.low, got.high) == (-1.0, 1.0)  # P(sum = -3) = 1/27 > 2.5 %, P(sum = 3) = 8/27


def test_paired_bootstrap_extremes():
    same = paired_bootstrap([1.0, 3.0, 2.0], [1.0, 3.0, 2.0])
    assert (same.difference, same.low, same.high, same.p) == (0.0, 0.0, 0.0, 1.0)
    better = paired_bootstrap([5.0, 4.0, 5.0, 3.0], [1.0, 2.0, 1.0, 1.0])  # every difference positive
    assert better.low > 0 and better.p == 2 / (1 + RESAMPLES)
    # the pairing matters: the same values shuffled within one method is another test
    assert paired_bootstrap([1.0, 2.0, 3.0, 4.0], [1.1, 2.1, 3.1, 4.1]).p == 2 / (1 + RESAMPLES)
    assert paired_bootstrap([1.0, 2.0, 3.0, 4.0], [4.1, 3.1, 2.1, 1.1]).p > 0.5


def test_wilson_interval_by_hand():
    # 32/55, z = 1.95996: centre (p + z^2/2n)/(1 + z^2/n) = 0.57648, half-width 0.12615 -> [0.4503, 0.7026]
    low, high = wilson_interval(32, 55)
    assert low == pytest.approx(0.45033, abs=1e-5) and high == pytest.approx(0.70262, abs=1e-5)
    assert tuple(round(x, 2) for x in wilson_interval(5, 8)) == (0.31, 0.86)
    assert tuple(round(x, 2) for x in wilson_interval(7, 8)) == (0.53, 0.98)
    # 0/10: the lower bound is 0 and the upper z^2 / (n + z^2) = 3.8415 / 13.8415
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.27753, abs=1e-5))
    assert wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(np.int64(3), np.int64(4)) == wilson_interval(3, 4)


@pytest.mark.parametrize("call, message", [
    (lambda: bootstrap_mean([]), "no values"),
    (lambda: bootstrap_mean([1.0, float("nan")]), "finite"),
    (lambda: bootstrap_mean([[1.0, 2.0]]), "flat list"),
    (lambda: bootstrap_mean(["a"]), "numbers"),
    (lambda: bootstrap_mean([1.0], resamples=0), "resamples"),
    (lambda: bootstrap_mean([1.0], confidence=1.0), "confidence"),
    (lambda: paired_bootstrap([], []), "no values"),
    (lambda: paired_bootstrap([1.0, 2.0], [1.0]), "same items, got 2 and 1"),
    (lambda: wilson_interval(3, 2), "successes <= n"),
    (lambda: wilson_interval(0, 0), "n >= 1"),
    (lambda: wilson_interval(1.5, 3), "successes"),
])
def test_bad_input_is_one_clear_line(call, message):
    with pytest.raises(MetaditError, match=message) as e:
        call()
    assert "\n" not in str(e.value)
