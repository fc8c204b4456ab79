"""Interval estimates and paired comparisons over seeds (scipy.stats), and their verdicts.

A difference is claimed only when its interval, widened for the number of comparisons
in one table (Bonferroni), excludes zero; otherwise the verdict says that no difference
was detectable with the seeds there were.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    def format(self, scale: float = 1.0, digits: int = 3) -> str:
        if self.n == 0:
            return ""
        if math.isnan(self.low):
            return f"{self.mean * scale:.{digits}g}"
        return f"{self.mean * scale:.{digits}g} [{self.low * scale:.{digits}g}, {self.high * scale:.{digits}g}]"


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The mean with its t-interval; with one value the interval is undefined (NaN)."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if len(x) == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    if len(x) == 1:
        return Interval(float(x[0]), math.nan, math.nan, 1)
    if np.ptp(x) == 0:  # no spread: the t-interval degenerates to the value itself
        return Interval(float(x[0]), float(x[0]), float(x[0]), len(x))
    ci = stats.ttest_1samp(x, 0.0).confidence_interval(confidence)
    return Interval(float(x.mean()), float(ci.low), float(ci.high), len(x))


def paired_difference(variant: Sequence[float], base: Sequence[float], comparisons: int = 1,
                      confidence: float = CONFIDENCE) -> Interval:
    """Mean of variant - base over pairs (same seed), with a paired t-interval at the
    Bonferroni-adjusted level for `comparisons` comparisons."""
    pairs = [(v, b) for v, b in zip(variant, base) if not (math.isnan(v) or math.isnan(b))]
    level = 1 - (1 - confidence) / max(1, comparisons)
    if len(pairs) < 2:
        diff = float(np.mean([v - b for v, b in pairs])) if pairs else math.nan
        return Interval(diff, math.nan, math.nan, len(pairs))
    v, b = np.array(pairs).T
    d = v - b
    if np.ptp(d) == 0:
        return Interval(float(d[0]), float(d[0]), float(d[0]), len(d))
    ci = stats.ttest_rel(v, b).confidence_interval(level)
    return Interval(float(d.mean()), float(ci.low), float(ci.high), len(d))


def ratio_interval(base: Sequence[float], variant: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """base / variant paired (same seed): the geometric mean of the ratios with the t-interval of
    their logarithms, back on the ratio scale (ratios multiply, so they are averaged in logs)."""
    logs = mean_interval([math.log(b / v) for b, v in zip(base, variant) if b > 0 and v > 0], confidence)
    return Interval(*(math.exp(x) if not math.isnan(x) else math.nan for x in (logs.mean, logs.low, logs.high)),
                    logs.n)


def verdict(diff: Interval, unit: str = "points", scale: float = 100.0) -> str:
    """Plain words for a difference: its direction when the interval excludes zero."""
    if diff.n < 2:
        return f"not testable: {diff.n} paired seed(s), need at least 2"
    size, half = abs(diff.mean) * scale, (diff.high - diff.low) / 2 * scale
    if diff.low > 0:
        return f"higher by {size:.2g} ± {half:.2g} {unit}"
    if diff.high < 0:
        return f"lower by {size:.2g} ± {half:.2g} {unit}"
    return f"no difference detectable with {diff.n} seeds"
