"""odenet.stats on planted inputs, each expected number computed here independently (scipy's
t quantiles, the formulas by hand): the paired interval's width and degrees of freedom, Holm's
adjustment and the level of each interval, accuracy intervals inside [0, 1], the resolution
rule and paired divergence."""

import math

import numpy as np
import pytest
from scipy import stats as sp

from odenet.stats import (MIN_PAIRS, accuracy_interval, holm, paired_outcomes, paired_test, verdict)


def test_a_paired_interval_is_a_t_interval_on_the_differences_with_n_minus_1_dof():
    base = [0.80, 0.78, 0.83, 0.81, 0.79]
    variant = [0.83, 0.80, 0.85, 0.845, 0.81]  # + 3, 2, 2, 3.5, 2 points
    d = np.array(variant) - np.array(base)
    mean, sd = d.sum() / 5, math.sqrt(((d - d.sum() / 5) ** 2).sum() / 4)  # ddof = 1, by hand
    paired = paired_test(variant, base, resolution=1 / 2000)
    assert paired.dof == 4 and paired.n == 5
    assert paired.se == pytest.approx(sd / math.sqrt(5))
    half = sp.t.ppf(0.975, 4) * sd / math.sqrt(5)  # t, not z (1.96): t(0.975, 4) = 2.776
    interval = paired.interval(0.95)
    assert interval.high - interval.low == pytest.approx(2 * half)
    assert interval.low == pytest.approx(mean - half)
    # paired, not unpaired: Welch's interval on the two samples would include 0 here
    welch = sp.ttest_ind(variant, base, equal_var=False)
    assert welch.pvalue > 0.05 and paired.p < 0.01
    assert paired.p == pytest.approx(2 * sp.t.sf(mean / (sd / math.sqrt(5)), 4))


def test_holm_adjusts_over_the_whole_family_and_its_levels_match_the_verdicts():
    p = [0.01, 0.04, 0.03, 0.5]
    adjusted, levels = holm(p)
    # by hand: sorted 0.01, 0.03, 0.04, 0.5 times 4, 3, 2, 1 = 0.04, 0.09, 0.08, 0.5,
    # then the running maximum (0.08 -> 0.09), capped at 1
    assert adjusted == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert levels == pytest.approx([1 - 0.05 * 0.01 / 0.04, 1 - 0.05 * 0.04 / 0.09, 1 - 0.05 * 0.03 / 0.09,
                                    1 - 0.05])
    # a not-estimable comparison (NaN) is no member of the family
    adjusted, _ = holm([0.01, math.nan, 0.03])
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.03)


def test_the_adjustment_changes_a_verdict_in_a_table_of_several_comparisons():
    """Six comparisons; one with unadjusted p ~ 0.02 is a difference alone and none in the family."""
    base = [0.80, 0.82, 0.79, 0.81, 0.80, 0.83]
    variant = [b + d for b, d in zip(base, [0.01, 0.0, 0.012, 0.002, 0.009, 0.003])]
    paired = paired_test(variant, base, resolution=1 / 10_000)
    assert 0.05 / 6 < paired.p < 0.05
    alone_p, alone_level = (x[0] for x in holm([paired.p]))
    assert verdict(paired, alone_p, paired.interval(alone_level)).startswith("higher by")
    family_p, family_level = (x[0] for x in holm([paired.p, 0.6, 0.7, 0.8, 0.9, 0.95]))
    assert family_p == pytest.approx(min(1, 6 * paired.p))
    interval = paired.interval(family_level)
    assert interval.low < 0 < interval.high  # the interval Holm used includes 0 ...
    assert verdict(paired, family_p, interval).startswith("no difference detectable")  # ... as the verdict says


def test_fewer_than_three_finished_pairs_and_spread_below_the_resolution_give_no_verdict():
    two = paired_test([0.83, 0.84, math.nan], [0.80, 0.81, 0.80], resolution=1 / 2000)
    assert two.n == 2 and two.not_estimable.startswith("not estimable: 2 finished pair(s)") and MIN_PAIRS == 3
    # 2 points in every seed, differing only by floating-point noise: no 2 ± 3.5e-13 interval
    flat = paired_test([0.82 + 1e-15, 0.84, 0.86 - 1e-15], [0.80, 0.82, 0.84], resolution=1 / 2000)
    assert flat.not_estimable.startswith("not estimable") and "resolution" in flat.not_estimable
    assert math.isnan(flat.interval(0.95).low)
    assert verdict(flat, math.nan, flat.interval(0.95)) == flat.not_estimable


def test_accuracy_intervals_stay_inside_0_and_1():
    near_one = [0.97, 0.99, 0.99]
    three = accuracy_interval(near_one, resolution=1 / 2000)
    assert (three.low, three.high) == (0.97, 0.99)  # the range for 3 seeds: a t-interval would pass 1
    assert sp.ttest_1samp(near_one, 0).confidence_interval(0.95).high > 1
    four = accuracy_interval([0.97, 0.99, 0.99, 0.98], resolution=1 / 2000)
    logits = np.log(np.array([0.97, 0.99, 0.99, 0.98]) / (1 - np.array([0.97, 0.99, 0.99, 0.98])))
    half = sp.t.ppf(0.975, 3) * logits.std(ddof=1) / 2
    assert four.high == pytest.approx(1 / (1 + math.exp(-(logits.mean() + half))))
    assert 0 < four.low < four.mean < four.high < 1


def test_paired_divergence_is_an_exact_test_on_the_seeds_that_differ():
    # diverged in the variant in 5 seeds and in the base in none: exact McNemar = two-sided binomial
    variant = [True] * 5 + [False] * 3
    base = [False] * 8
    assert paired_outcomes(variant, base) == pytest.approx(sp.binomtest(5, 5, 0.5).pvalue)
    assert paired_outcomes(variant, base) == pytest.approx(2 * 0.5 ** 5)
    assert paired_outcomes([False] * 4, [False] * 4) == 1.0
    # in the base only, once: no evidence either way
    assert paired_outcomes([False] * 4, [True, False, False, False]) == pytest.approx(1.0)
