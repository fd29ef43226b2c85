"""The statistics ``encmm report`` states its evidence with: pure math on lists of floats (no MLflow, no torch).

- ``estimate``: mean and Student-t confidence interval of one arm over its seeds,
  ``mean +- t_{1-(1-level)/2, n-1} * s / sqrt(n)`` with ``s`` the sample standard deviation (n - 1).
- ``welch_difference``: ``mean(a) - mean(b)`` with Welch's interval and two-sided p (unequal variances),
  ``se = sqrt(s_a^2/n_a + s_b^2/n_b)``, Welch-Satterthwaite
  ``df = se^4 / ((s_a^2/n_a)^2/(n_a-1) + (s_b^2/n_b)^2/(n_b-1))`` (Welch 1947); p from
  ``scipy.stats.ttest_ind(equal_var=False)``.
- ``claim_verdict``: supported / contradicted / inconclusive for a directional claim at a p threshold.
- ``spearman``: Spearman's rank correlation and its p (``scipy.stats.spearmanr``) over paired values.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from scipy import stats

Expect = Literal["greater", "less"]
LEVEL = 0.95
P_THRESHOLD = 0.05


def finite(values: Iterable) -> list[float]:
    """The values that are numbers (None and NaN dropped), as floats."""
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


@dataclass(frozen=True)
class Estimate:
    n: int
    mean: float | None
    sd: float | None  # sample standard deviation; None for n < 2
    ci_low: float | None  # None for n < 2: one seed says nothing about the spread
    ci_high: float | None


def estimate(values: Iterable, level: float = LEVEL) -> Estimate:
    """Mean and two-sided ``level`` Student-t interval (n - 1 df) of ``values``."""
    xs = finite(values)
    n = len(xs)
    if n == 0:
        return Estimate(0, None, None, None, None)
    mean = statistics.fmean(xs)
    if n == 1:
        return Estimate(1, mean, None, None, None)
    sd = statistics.stdev(xs)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return Estimate(n, mean, sd, mean - half, mean + half)


@dataclass(frozen=True)
class Difference:
    n_a: int
    n_b: int
    diff: float | None  # mean(a) - mean(b); None when either side is empty
    ci_low: float | None  # Welch interval; None when n < 2 on either side or both spreads are 0
    ci_high: float | None
    df: float | None
    p: float | None  # Welch two-sided p, same conditions as the interval


def welch_difference(a: Iterable, b: Iterable, level: float = LEVEL) -> Difference:
    """``mean(a) - mean(b)`` with its Welch ``level`` interval and Welch two-sided p."""
    xa, xb = finite(a), finite(b)
    na, nb = len(xa), len(xb)
    diff = statistics.fmean(xa) - statistics.fmean(xb) if na and nb else None
    if na < 2 or nb < 2:
        return Difference(na, nb, diff, None, None, None, None)
    va, vb = statistics.variance(xa) / na, statistics.variance(xb) / nb
    if va + vb == 0:  # identical values within both arms: the t statistic is undefined, not infinite
        return Difference(na, nb, diff, None, None, None, None)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (na - 1) + vb**2 / (nb - 1))
    half = float(stats.t.ppf(0.5 + level / 2, df)) * se
    p = float(stats.ttest_ind(xa, xb, equal_var=False).pvalue)
    return Difference(na, nb, diff, diff - half, diff + half, df, p)


def claim_verdict(d: Difference, expect: Expect, threshold: float = P_THRESHOLD) -> str:
    """``supported`` / ``contradicted`` when p < threshold (the sign of the difference decides), else
    ``inconclusive at n=a/b``; ``inconclusive (n=a/b)`` when a side has fewer than 2 values (no test)."""
    if expect not in ("greater", "less"):
        raise ValueError(f"expect must be 'greater' or 'less', not {expect!r}")
    if d.n_a < 2 or d.n_b < 2:
        return f"inconclusive (n={d.n_a}/{d.n_b})"
    if d.p is None:
        return f"inconclusive at n={d.n_a}/{d.n_b} (no spread between seeds)"
    if d.p >= threshold or d.diff == 0:
        return f"inconclusive at n={d.n_a}/{d.n_b}"
    return "supported" if (d.diff > 0) == (expect == "greater") else "contradicted"


@dataclass(frozen=True)
class Correlation:
    n: int  # pairs where both values are numbers
    rho: float | None  # None for n < 3 or a constant side
    p: float | None


def spearman(x: Iterable, y: Iterable) -> Correlation:
    """Spearman's rho and two-sided p over the pairs where both ``x`` and ``y`` are numbers."""
    pairs = [
        (float(u), float(v))
        for u, v in zip(x, y)
        if u is not None and v is not None and not (math.isnan(float(u)) or math.isnan(float(v)))
    ]
    n = len(pairs)
    if n < 3 or len({u for u, _ in pairs}) < 2 or len({v for _, v in pairs}) < 2:
        return Correlation(n, None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's small-sample precision notes; the numbers are still returned
        result = stats.spearmanr([u for u, _ in pairs], [v for _, v in pairs])
    rho, p = float(result.statistic), float(result.pvalue)
    return Correlation(n, None if math.isnan(rho) else rho, None if math.isnan(p) else p)
