"""encmm.orchestrator.evidence: per-arm intervals, Welch differences, claim verdicts, Spearman (vs scipy, by hand)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from encmm.orchestrator.evidence import Difference, claim_verdict, estimate, finite, spearman, welch_difference

# Student t 97.5% quantile at 2 df in closed form, (2p - 1) * sqrt(2 / (4p(1 - p))) with p = 0.975 (tables: 4.303)
T_975_DF2 = 0.95 * math.sqrt(2 / (4 * 0.975 * 0.025))

samples = st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), min_size=2, max_size=8).filter(
    lambda xs: max(xs) - min(xs) > 1e-3
)


def test_estimate_of_three_seeds_is_the_student_t_interval_by_hand():
    e = estimate([1.0, 2.0, 3.0])
    assert (e.n, e.mean, e.sd) == (3, 2.0, 1.0)
    half = T_975_DF2 * 1.0 / math.sqrt(3)  # 2.4841
    assert e.ci_low == pytest.approx(2.0 - half, abs=1e-12) and e.ci_high == pytest.approx(2.0 + half, abs=1e-12)
    assert e.ci_low == pytest.approx(-0.48414, abs=1e-5)


def test_estimate_of_one_seed_has_no_spread_and_no_interval():
    e = estimate([71.5, None])
    assert (e.n, e.mean, e.sd, e.ci_low, e.ci_high) == (1, 71.5, None, None, None)
    assert estimate([]) == estimate([None, float("nan")])
    assert estimate([]).n == 0 and estimate([]).mean is None


@settings(max_examples=50, deadline=None)
@given(samples)
def test_estimate_agrees_with_scipy_t_interval(xs):
    e = estimate(xs)
    low, high = stats.t.interval(0.95, len(xs) - 1, loc=stats.tmean(xs), scale=stats.sem(xs))
    assert e.ci_low == pytest.approx(low, rel=1e-9, abs=1e-9) and e.ci_high == pytest.approx(high, rel=1e-9, abs=1e-9)


def test_welch_difference_by_hand():
    # a = 1,2,3: mean 2, s^2/n = 1/3; b = 2,4,7,8: mean 5.25, s^2 = 22.75/3, s^2/n = 1.8958
    d = welch_difference([1, 2, 3], [2, 4, 7, 8])
    se2 = 1 / 3 + 22.75 / 12
    df = se2**2 / ((1 / 3) ** 2 / 2 + (22.75 / 12) ** 2 / 3)
    assert (d.n_a, d.n_b, d.diff) == (3, 4, -3.25)
    assert d.df == pytest.approx(df, rel=1e-12) and d.df == pytest.approx(3.96388, abs=1e-5)
    half = stats.t.ppf(0.975, df) * math.sqrt(se2)
    assert (d.ci_low, d.ci_high) == (pytest.approx(-3.25 - half), pytest.approx(-3.25 + half))
    assert d.p == pytest.approx(0.0957090, abs=1e-6)


@settings(max_examples=50, deadline=None)
@given(samples, samples)
def test_welch_difference_agrees_with_scipy_ttest_ind_unequal_var(a, b):
    d = welch_difference(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert d.diff == pytest.approx(stats.tmean(a) - stats.tmean(b), abs=1e-9)
    assert d.p == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-12) and d.df == pytest.approx(ref.df, rel=1e-9)
    assert d.ci_low == pytest.approx(ci.low, rel=1e-7, abs=1e-7)
    assert d.ci_high == pytest.approx(ci.high, rel=1e-7, abs=1e-7)
    assert d.ci_low <= d.diff <= d.ci_high


def test_welch_difference_with_one_seed_on_a_side_has_a_difference_but_no_test():
    d = welch_difference([70.0], [60.0, 61.0, 62.0])
    assert (d.n_a, d.n_b, d.diff) == (1, 3, 9.0)
    assert (d.ci_low, d.ci_high, d.df, d.p) == (None, None, None, None)
    assert welch_difference([], [1.0, 2.0]).diff is None


def test_welch_difference_of_two_constant_arms_has_no_p():
    d = welch_difference([2.0, 2.0], [1.0, 1.0])  # scipy would say t = inf, p = 0
    assert d.diff == 1.0 and d.p is None and d.ci_low is None
    assert claim_verdict(d, "greater") == "inconclusive at n=2/2 (no spread between seeds)"


@pytest.mark.parametrize(
    "a, b, expect, verdict",
    [
        ([80, 81, 82], [70, 71, 72], "greater", "supported"),
        ([80, 81, 82], [70, 71, 72], "less", "contradicted"),
        ([70, 71, 72], [80, 81, 82], "less", "supported"),
        ([70, 71, 72], [80, 81, 82], "greater", "contradicted"),
        ([70, 75, 80], [71, 76, 79], "greater", "inconclusive at n=3/3"),
        ([80], [70, 71, 72], "greater", "inconclusive (n=1/3)"),
        ([], [70, 71], "greater", "inconclusive (n=0/2)"),
    ],
)
def test_claim_verdict_needs_p_below_005_and_the_expected_sign(a, b, expect, verdict):
    assert claim_verdict(welch_difference(a, b), expect) == verdict


def test_claim_verdict_at_the_threshold_is_inconclusive():
    d = Difference(3, 3, 1.0, 0.1, 1.9, 4.0, 0.05)
    assert claim_verdict(d, "greater") == "inconclusive at n=3/3"
    assert claim_verdict(Difference(3, 3, 1.0, 0.1, 1.9, 4.0, 0.0499), "greater") == "supported"
    with pytest.raises(ValueError, match="greater"):
        claim_verdict(d, "bigger")


def test_spearman_of_a_monotone_relation_is_one_and_matches_scipy_with_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 25, 100]).rho == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]).rho == pytest.approx(-1.0)
    x, y = [3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]
    ref = stats.spearmanr(x, y)
    c = spearman(x, y)
    assert (c.n, c.rho, c.p) == (8, pytest.approx(ref.statistic), pytest.approx(ref.pvalue))


def test_spearman_skips_missing_pairs_and_refuses_too_few_or_constant():
    c = spearman([1, None, 3, 4, float("nan")], [1, 5, 2, 3, 9])
    assert c.n == 3 and c.rho == pytest.approx(stats.spearmanr([1, 3, 4], [1, 2, 3]).statistic)
    assert (spearman([1, 2], [1, 2]).n, spearman([1, 2], [1, 2]).rho, spearman([1, 2], [1, 2]).p) == (2, None, None)
    assert spearman([1, 2, 3], [5, 5, 5]).rho is None and spearman([1, 2, 3], [5, 5, 5]).n == 3


def test_finite_drops_none_and_nan():
    assert finite([1, None, float("nan"), "2.5"]) == [1.0, 2.5]
