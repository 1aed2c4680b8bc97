"""Uncertainty for the evaluation's tables: bootstrap intervals of a mean, a paired bootstrap of two methods'
difference over the same items, and Wilson intervals for proportions.

The bootstrap, as every table states it: **10,000 resamples with replacement of the n items, a fixed seed
(`numpy.random.default_rng(0)`), the percentile method** — the interval is the 2.5 % and 97.5 % quantiles of
the resampled means (`numpy.quantile`, its default linear interpolation). Resample b draws n item indices
uniformly, `rng.integers(0, n, size=(10000, n))` row b; its mean is the mean of the values at those indices.
For a fixed seed the indices depend on n alone, so every method scored on the same n items is resampled the
same way (the paired test below needs exactly that).

The paired bootstrap resamples the per-item differences `a_i - b_i` (one index draw moves both methods
together, so what the two share — an easy diff, a hard one — cancels). Its interval is the percentile interval
of the mean difference; its two-sided p is the share of resampled mean differences on the far side of zero,
doubled: `p = min(1, 2 * (1 + min(#{d* <= 0}, #{d* >= 0})) / (1 + 10000))` (the +1s keep a Monte Carlo p
above zero: the smallest p it can give is 2/10001 ~ 0.0002). So p < 0.05 about where the 95 % interval excludes zero.

Wilson's score interval is the closed form for a proportion k/n (exact-match rates, gate rates), for when
there are no per-item rows to resample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from numbers import Integral
from statistics import NormalDist

import numpy as np

from metadit.errors import MetaditError

RESAMPLES = 10_000
SEED = 0
CONFIDENCE = 0.95
METHOD = (f"bootstrap: {RESAMPLES:,} resamples with replacement, seed {SEED}, percentile method "
          f"({CONFIDENCE:.0%} interval); paired: the same resampling of the per-diff differences, two-sided p")
# Index draws are kept in memory up to this many entries per call (4M int32 = 16 MB); larger ones go in chunks.
_CHUNK = 4_000_000


@dataclass(frozen=True)
class Interval:
    """The mean of n values and its bootstrap percentile interval [low, high]."""

    n: int
    mean: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class PairedDifference:
    """mean(a) - mean(b) over n paired items, its bootstrap percentile interval and two-sided p."""

    n: int
    mean_a: float
    mean_b: float
    difference: float
    low: float
    high: float
    p: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _values(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise MetaditError(f"{what}: values must be numbers ({e})") from e
    if arr.ndim != 1:
        raise MetaditError(f"{what}: values must be a flat list of numbers, got shape {arr.shape}")
    if arr.size == 0:
        raise MetaditError(f"{what}: no values (a mean of nothing has no interval)")
    if not np.isfinite(arr).all():
        raise MetaditError(f"{what}: values must be finite numbers (drop missing scores first)")
    return arr


def _check_resamples(resamples: int) -> None:
    if not isinstance(resamples, int) or isinstance(resamples, bool) or resamples < 1:
        raise MetaditError(f"bootstrap: resamples must be a positive integer, got {resamples!r}")


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise MetaditError(f"bootstrap: confidence must lie strictly between 0 and 1, got {confidence!r}")


@lru_cache(maxsize=16)
def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """The resampling indices [resamples, n] (read-only), drawn once per (n, resamples, seed)."""
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n)).astype(np.int32)
    idx.setflags(write=False)
    return idx


def bootstrap_means(values: Sequence[float] | np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """The `resamples` means of `values` resampled with replacement: `values[idx].mean(axis=1)` with
    `idx = default_rng(seed).integers(0, n, size=(resamples, n))` (drawn in row chunks for large n: the same
    stream)."""
    arr = _values(values, "bootstrap")
    _check_resamples(resamples)
    n = arr.size
    if n * resamples <= _CHUNK:
        return arr[_indices(n, resamples, seed)].mean(axis=1)
    rng = np.random.default_rng(seed)
    step = max(1, _CHUNK // n)
    out = np.empty(resamples)
    for start in range(0, resamples, step):
        rows = min(step, resamples - start)
        out[start : start + rows] = arr[rng.integers(0, n, size=(rows, n))].mean(axis=1)
    return out


def _percentiles(means: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1.0 - alpha / 2])
    return float(low), float(high)


def bootstrap_mean(values: Sequence[float] | np.ndarray, resamples: int = RESAMPLES, seed: int = SEED,
                   confidence: float = CONFIDENCE) -> Interval:
    """The mean of `values` with its bootstrap percentile interval (see the module's docstring)."""
    arr = _values(values, "bootstrap")
    _check_resamples(resamples)
    _check_confidence(confidence)
    low, high = _percentiles(bootstrap_means(arr, resamples, seed), confidence)
    return Interval(int(arr.size), float(arr.mean()), low, high)


def paired_bootstrap(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, resamples: int = RESAMPLES,
                     seed: int = SEED, confidence: float = CONFIDENCE) -> PairedDifference:
    """mean(a) - mean(b) where a[i] and b[i] score the same item: the percentile interval of the resampled mean
    difference and its two-sided p (see the module's docstring)."""
    xa, xb = _values(a, "paired bootstrap (first method)"), _values(b, "paired bootstrap (second method)")
    if xa.size != xb.size:
        raise MetaditError(f"paired bootstrap: the two methods must score the same items, got {xa.size} and {xb.size} values")
    _check_resamples(resamples)
    _check_confidence(confidence)
    d = xa - xb
    means = bootstrap_means(d, resamples, seed)
    low, high = _percentiles(means, confidence)
    far = min(int((means <= 0).sum()), int((means >= 0).sum()))
    p = min(1.0, 2.0 * (1 + far) / (1 + resamples))
    return PairedDifference(int(d.size), float(xa.mean()), float(xb.mean()), float(d.mean()), low, high, p)


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson's score interval for the proportion `successes / n`."""
    integral = all(isinstance(x, Integral) and not isinstance(x, bool) for x in (successes, n))
    if not integral or n < 1 or not 0 <= successes <= n:
        raise MetaditError(f"wilson interval: need 0 <= successes <= n and n >= 1, got {successes!r} of {n!r}")
    _check_confidence(confidence)
    z = NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2)
    successes, n = int(successes), int(n)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # At k = 0 (k = n) the bound is 0 (1) exactly; the closed form leaves a rounding residue there.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high
