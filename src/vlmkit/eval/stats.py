"""Confidence intervals for eval scores.

Eval sets are small enough that a score difference of a point or two can be noise; reports and
comparisons show intervals so that is visible. The percentile bootstrap collapses to a single
point at 0% or 100% (every resample is all-right), so 0/1 scores get the Wilson score interval
and paired 0/1 differences Newcombe's hybrid score interval (method 10), both honest at the
extremes; graded scores (VQA accuracy, ANLS) get the bootstrap, with the Wilson interval of
their mean as the fallback when the bootstrap has zero width. `Interval.method` says which.
Resampling is seeded, so a report written twice shows the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from vlmkit.errors import DataError

#: Maps a resampled block of per-sample rows (n_samples, ...) to one number; default: the mean.
Statistic = Callable[[np.ndarray], float]

_CHUNK = 100  # resamples drawn at once: bounds memory at _CHUNK x n_samples values


@dataclass(frozen=True)
class Interval:
    """A point estimate with its interval at `level` (0.95 = 95%) and the method that gave it."""

    estimate: float
    low: float
    high: float
    level: float = 0.95
    method: str = "percentile bootstrap"

    def to_dict(self) -> dict[str, float | str]:
        return asdict(self)


def _z(level: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + level / 2.0)


def wilson_ci(successes: float, n: int, level: float = 0.95) -> Interval:
    """Wilson score interval of a proportion: never zero-width at 0 or n successes (43/43 at 95%
    gives 0.918 - 1.0). `successes` may be fractional (a sum of scores in [0, 1])."""
    if n < 1:
        raise DataError("no scores to compute a confidence interval from")
    z = _z(level)
    p = successes / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0)) / denominator
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), level, "Wilson score")


def newcombe_paired_ci(a: np.ndarray, b: np.ndarray, level: float = 0.95) -> Interval:
    """Newcombe (1998) method 10: interval of mean(b) - mean(a) for paired proportions, from the
    two Wilson intervals and the phi correlation of the pairs (phi = 0 when undefined)."""
    n = a.shape[0]
    pa, pb = float(a.mean()), float(b.mean())
    la, ua = wilson_ci(pa * n, n, level).low, wilson_ci(pa * n, n, level).high
    lb, ub = wilson_ci(pb * n, n, level).low, wilson_ci(pb * n, n, level).high
    both = float((a * b).sum())
    only_a = float((a * (1 - b)).sum())
    only_b = float(((1 - a) * b).sum())
    neither = float(((1 - a) * (1 - b)).sum())
    denominator = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = (both * neither - only_a * only_b) / math.sqrt(denominator) if denominator > 0 else 0.0
    theta = pb - pa
    low = theta - math.sqrt(max((pb - lb) ** 2 - 2 * phi * (pb - lb) * (ua - pa) + (ua - pa) ** 2, 0.0))
    high = theta + math.sqrt(max((ub - pb) ** 2 - 2 * phi * (ub - pb) * (pa - la) + (pa - la) ** 2, 0.0))
    return Interval(theta, max(-1.0, low), min(1.0, high), level, "Newcombe paired score (method 10)")


def is_binary(values: np.ndarray) -> bool:
    """Whether every value is 0 or 1 (a proportion, where Wilson/Newcombe apply)."""
    return values.ndim == 1 and bool(np.isin(values, (0.0, 1.0)).all())


def score_ci(
    scores: Sequence[float] | np.ndarray,
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    statistic: Statistic | None = None,
) -> Interval:
    """The interval reports show: Wilson for 0/1 scores, else the bootstrap (`bootstrap_ci`);
    a zero-width bootstrap of a mean in [0, 1] falls back to the Wilson interval of that mean."""
    values = np.asarray(scores, dtype=np.float64)
    _check(values, n, level)
    if statistic is None and is_binary(values):
        return wilson_ci(float(values.sum()), values.shape[0], level)
    interval = bootstrap_ci(values, n=n, seed=seed, level=level, statistic=statistic)
    bounded = statistic is None and bool(((values >= 0) & (values <= 1)).all())
    if interval.high - interval.low <= 0 and bounded:
        wilson = wilson_ci(float(values.sum()), values.shape[0], level)
        return Interval(
            interval.estimate,
            wilson.low,
            wilson.high,
            level,
            "Wilson score of the mean (bootstrap had zero width)",
        )
    return interval


def paired_score_ci(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    statistic: Statistic | None = None,
) -> Interval:
    """The difference interval comparisons show: Newcombe for paired 0/1 scores, else the paired
    bootstrap, falling back to Newcombe on the scores when that has zero width."""
    first = np.asarray(a, dtype=np.float64)
    second = np.asarray(b, dtype=np.float64)
    if first.shape != second.shape:
        raise DataError(f"paired scores must have the same shape, got {first.shape} and {second.shape}")
    _check(first, n, level)
    if statistic is None and is_binary(first) and is_binary(second):
        return newcombe_paired_ci(first, second, level)
    interval = paired_bootstrap_ci(first, second, n=n, seed=seed, level=level, statistic=statistic)
    bounded = statistic is None and all(bool(((v >= 0) & (v <= 1)).all()) for v in (first, second))
    if interval.high - interval.low <= 0 and bounded:
        fallback = newcombe_paired_ci(first, second, level)
        return Interval(
            interval.estimate,
            fallback.low,
            fallback.high,
            level,
            "Newcombe paired score of the means (bootstrap had zero width)",
        )
    return interval


def _mean(rows: np.ndarray) -> float:
    return float(rows.mean())


def _resample_statistics(values: np.ndarray, statistic: Statistic | None, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    size = values.shape[0]
    out = np.empty(n, dtype=np.float64)
    for start in range(0, n, _CHUNK):
        count = min(_CHUNK, n - start)
        index = rng.integers(0, size, size=(count, size))
        if statistic is None:
            out[start : start + count] = values[index].mean(axis=1)
        else:
            out[start : start + count] = [statistic(values[row]) for row in index]
    return out


def _interval(estimate: float, resampled: np.ndarray, level: float) -> Interval:
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(resampled, [tail, 100.0 - tail])
    return Interval(estimate=float(estimate), low=float(low), high=float(high), level=level)


def _check(values: np.ndarray, n: int, level: float) -> None:
    if values.shape[0] == 0:
        raise DataError("no scores to compute a confidence interval from")
    if n < 1 or not 0.0 < level < 1.0:
        raise DataError(f"bootstrap needs n >= 1 and 0 < level < 1 (got n={n}, level={level})")


def bootstrap_ci(
    scores: Sequence[float] | np.ndarray,
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    statistic: Statistic | None = None,
) -> Interval:
    """Percentile bootstrap interval of the mean of `scores` (or of `statistic` over resampled rows).

    `scores` may be 2-D (one row of sufficient statistics per sample) when `statistic` is given,
    e.g. corpus BLEU from summed n-gram counts.
    """
    values = np.asarray(scores, dtype=np.float64)
    _check(values, n, level)
    estimate = _mean(values) if statistic is None else statistic(values)
    return _interval(estimate, _resample_statistics(values, statistic, n, seed), level)


def paired_bootstrap_ci(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    statistic: Statistic | None = None,
) -> Interval:
    """Interval of statistic(B) - statistic(A) resampling the same samples for both systems.

    Pairing removes the per-question difficulty both systems share, so the interval is much
    tighter than comparing two independent intervals. `a[i]` and `b[i]` must be the same sample.
    """
    first = np.asarray(a, dtype=np.float64)
    second = np.asarray(b, dtype=np.float64)
    if first.shape != second.shape:
        raise DataError(f"paired scores must have the same shape, got {first.shape} and {second.shape}")
    _check(first, n, level)
    stat = statistic or _mean
    estimate = stat(second) - stat(first)
    rng = np.random.default_rng(seed)
    size = first.shape[0]
    out = np.empty(n, dtype=np.float64)
    for start in range(0, n, _CHUNK):
        count = min(_CHUNK, n - start)
        index = rng.integers(0, size, size=(count, size))
        if statistic is None:
            out[start : start + count] = (second[index] - first[index]).mean(axis=1)
        else:
            out[start : start + count] = [stat(second[row]) - stat(first[row]) for row in index]
    return _interval(estimate, out, level)
