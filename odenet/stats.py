"""Interval estimates, paired comparisons over seeds and their multiplicity control, and the
verdicts put in words (scipy.stats, statsmodels).

The rules every answer follows:

- a comparison is paired by seed (same weights' seed, same batch order) and tested with a
  paired t-test; it needs at least MIN_PAIRS pairs where both runs finished;
- error is controlled over a declared family of comparisons (by default every comparison in
  one report) with Holm's step-down method, and each interval is shown at the level Holm
  used for it: 1 - alpha * p / p_holm. So an interval excludes 0 exactly when the Holm-adjusted
  p-value is below alpha, and the verdict and the interval never disagree;
- paired differences that are all equal at the test set's resolution (one image in N) are not
  estimated: a t-interval from floating-point noise would claim a precision no test set has;
- accuracies (in [0, 1]) get intervals inside [0, 1]: the range over 3 or fewer seeds, and a
  t-interval on the logit scale mapped back otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE
MIN_PAIRS = 3  # fewer finished pairs give no verdict: a t-interval on 2 pairs has 1 degree of freedom
RANGE_UP_TO = 3  # accuracy over this many seeds or fewer is shown as its range, not an interval


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


def _clean(values: Sequence[float]) -> np.ndarray:
    return np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The mean with its t-interval; with one value the interval is undefined (NaN)."""
    x = _clean(values)
    if len(x) == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    if len(x) == 1:
        return Interval(float(x[0]), math.nan, math.nan, 1)
    if np.ptp(x) == 0:  # no spread: the t-interval degenerates to the value itself
        return Interval(float(x[0]), float(x[0]), float(x[0]), len(x))
    ci = stats.ttest_1samp(x, 0.0).confidence_interval(confidence)
    return Interval(float(x.mean()), float(ci.low), float(ci.high), len(x))


def accuracy_interval(values: Sequence[float], resolution: float, confidence: float = CONFIDENCE) -> Interval:
    """Mean accuracy (a fraction) with an interval that stays inside [0, 1]: the range (min, max)
    over RANGE_UP_TO seeds or fewer; otherwise a t-interval of the accuracies' logits, mapped back.
    Accuracies of exactly 0 or 1 are moved in by half the test set's `resolution` (1/N) for the logit."""
    x = _clean(values)
    if len(x) <= 1:
        return mean_interval(x)
    if len(x) <= RANGE_UP_TO or np.ptp(x) < resolution:
        return Interval(float(x.mean()), float(x.min()), float(x.max()), len(x))
    clipped = np.clip(x, resolution / 2, 1 - resolution / 2)
    ci = stats.ttest_1samp(np.log(clipped / (1 - clipped)), 0.0).confidence_interval(confidence)
    expit = lambda v: float(1 / (1 + math.exp(-v)))  # noqa: E731
    return Interval(float(x.mean()), expit(ci.low), expit(ci.high), len(x))


def accuracy_interval_kind(n: int) -> str:
    """How accuracy_interval summarised n seeds, in words for a caption."""
    return "range (min, max)" if n <= RANGE_UP_TO else "95% t-interval on the logit scale"


@dataclass(frozen=True)
class Paired:
    """One paired comparison before its family is adjusted: the differences' mean, standard
    error, degrees of freedom and two-sided p-value, or why there is none (`not_estimable`)."""

    mean: float
    se: float
    dof: int
    p: float
    n: int
    not_estimable: str = ""

    def interval(self, level: float) -> Interval:
        """The two-sided t-interval of the mean difference at `level`."""
        if self.not_estimable or math.isnan(level):
            return Interval(self.mean, math.nan, math.nan, self.n)
        half = stats.t.ppf(1 - (1 - level) / 2, self.dof) * self.se
        return Interval(self.mean, self.mean - half, self.mean + half, self.n)


def paired_test(variant: Sequence[float], base: Sequence[float], resolution: float) -> Paired:
    """Paired t-test of variant - base over the pairs where both are numbers (finished).
    Not estimable with fewer than MIN_PAIRS pairs, or when the differences are all equal to within
    half of `resolution` (1/N for accuracies on N test images)."""
    pairs = [(v, b) for v, b in zip(variant, base) if not (math.isnan(v) or math.isnan(b))]
    d = np.array([v - b for v, b in pairs], dtype=float)
    mean = float(d.mean()) if len(d) else math.nan
    if len(d) < MIN_PAIRS:
        return Paired(mean, math.nan, len(d) - 1, math.nan, len(d),
                      f"not estimable: {len(d)} finished pair(s), need at least {MIN_PAIRS}")
    sd = float(d.std(ddof=1))
    # Accuracies move in steps of one test image: differences within half a step of each other are
    # the same count of images, and any spread left is floating-point noise, not seed variation.
    if np.ptp(d) < resolution / 2:
        return Paired(mean, math.nan, len(d) - 1, math.nan, len(d),
                      f"not estimable: the {len(d)} paired differences are equal to within the test set's "
                      f"resolution (one image: {resolution:.2g})")
    result = stats.ttest_rel([v for v, _ in pairs], [b for _, b in pairs])
    return Paired(mean, sd / math.sqrt(len(d)), len(d) - 1, float(result.pvalue), len(d))


def holm(pvalues: Sequence[float], alpha: float = ALPHA) -> tuple[list[float], list[float]]:
    """Holm-adjusted p-values over the family (statsmodels multipletests) and, per comparison,
    the confidence level of its interval: 1 - alpha * p / p_holm, so the interval excludes the
    null value exactly when the adjusted p is below alpha. NaN p-values (not estimable) are not
    members of the family."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(pvalues, dtype=float)
    members = ~np.isnan(p)
    adjusted = np.full(len(p), math.nan)
    levels = np.full(len(p), math.nan)
    if members.any():
        adjusted[members] = multipletests(p[members], alpha=alpha, method="holm")[1]
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where(adjusted > 0, p / adjusted, 1.0)
        levels[members] = 1 - alpha * ratio[members]
    return adjusted.tolist(), levels.tolist()


def ratio_interval(base: Sequence[float], variant: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """base / variant paired (same seed): the geometric mean of the ratios with the t-interval of
    their logarithms, back on the ratio scale (ratios multiply, so they are averaged in logs)."""
    logs = mean_interval([math.log(b / v) for b, v in zip(base, variant) if b > 0 and v > 0], confidence)
    return Interval(*(math.exp(x) if not math.isnan(x) else math.nan for x in (logs.mean, logs.low, logs.high)),
                    logs.n)


def paired_outcomes(variant_failed: Sequence[bool], base_failed: Sequence[bool]) -> float:
    """Exact McNemar p-value for paired yes/no outcomes (e.g. diverged) over seeds: only the seeds
    where exactly one of the two failed carry information. 1.0 when no seed differs."""
    from statsmodels.stats.contingency_tables import mcnemar

    v, b = np.asarray(variant_failed, bool), np.asarray(base_failed, bool)
    table = [[int(np.sum(v & b)), int(np.sum(v & ~b))], [int(np.sum(~v & b)), int(np.sum(~v & ~b))]]
    if table[0][1] + table[1][0] == 0:
        return 1.0
    return float(mcnemar(table, exact=True).pvalue)


def verdict(paired: Paired, adjusted_p: float, interval: Interval, unit: str = "points", scale: float = 100.0) -> str:
    """Plain words for a difference after its family's adjustment: its direction when the
    Holm-adjusted p is below alpha, else that none was detectable."""
    if paired.not_estimable:
        return paired.not_estimable
    if adjusted_p >= ALPHA or math.isnan(adjusted_p):
        return f"no difference detectable (Holm p = {adjusted_p:.2g})"
    direction = "higher" if paired.mean > 0 else "lower"
    return (f"{direction} by {abs(paired.mean) * scale:.2g} {unit}: Δ {interval.format(scale, 2)} "
            f"(Holm p = {adjusted_p:.2g})")


# -- a fitted line read backwards: the x at which a curve reaches a given y ------------------------------------------


@dataclass(frozen=True)
class Line:
    """y = intercept + slope * x fitted by ordinary least squares (statsmodels OLS), with the
    coefficients' covariance; read backwards by `x_at` (inverse prediction, or calibration)."""

    intercept: float
    slope: float
    cov: tuple[tuple[float, float], tuple[float, float]]  # of (intercept, slope)
    dof: int
    n: int
    r2: float

    def x_at(self, y: float) -> float:
        return (y - self.intercept) / self.slope

    def x_se(self, y: float) -> float:
        """Delta-method standard error of x_at(y): d x / d intercept = -1/slope, d x / d slope = -x/slope."""
        x = self.x_at(y)
        (vaa, vab), (_, vbb) = self.cov
        return math.sqrt(max(vaa + 2 * x * vab + x * x * vbb, 0.0)) / abs(self.slope)

    def x_interval(self, y: float, confidence: float = CONFIDENCE) -> Interval:
        """Fieller's interval for x_at(y): the x where the line's confidence band for its mean holds y,
        solving (a + b x - y)^2 <= t^2 var(a + b x). Bounded only where the slope differs from 0 at
        `confidence`; otherwise the bounds are NaN (the curve is too flat to say where it reaches y)."""
        t = stats.t.ppf(1 - (1 - confidence) / 2, self.dof)
        (vaa, vab), (_, vbb) = self.cov
        d = self.intercept - y
        a2 = self.slope ** 2 - t * t * vbb
        a1 = d * self.slope - t * t * vab
        a0 = d * d - t * t * vaa
        if a2 <= 0 or a1 * a1 - a2 * a0 < 0:
            return Interval(self.x_at(y), math.nan, math.nan, self.n)
        root = math.sqrt(a1 * a1 - a2 * a0)
        return Interval(self.x_at(y), (-a1 - root) / a2, (-a1 + root) / a2, self.n)


def fit_line(x: Sequence[float], y: Sequence[float]) -> Line:
    """OLS of y on x (statsmodels) over the pairs where both are numbers; needs 3 pairs and 2 distinct x."""
    import statsmodels.api as sm

    pairs = np.array([(a, b) for a, b in zip(x, y) if not (math.isnan(a) or math.isnan(b))], dtype=float)
    if len(pairs) < 3 or np.ptp(pairs[:, 0]) == 0:
        raise ValueError(f"a line needs at least 3 points at 2 or more x values, got {len(pairs)}")
    fitted = sm.OLS(pairs[:, 1], sm.add_constant(pairs[:, 0])).fit()
    cov = np.asarray(fitted.cov_params())
    return Line(float(fitted.params[0]), float(fitted.params[1]), ((cov[0, 0], cov[0, 1]), (cov[1, 0], cov[1, 1])),
                int(fitted.df_resid), len(pairs), float(fitted.rsquared))


def x_difference(line: Line, base: Line, y: float) -> Paired:
    """line.x_at(y) - base.x_at(y) for two independently fitted lines: delta-method standard error,
    Welch-Satterthwaite degrees of freedom, two-sided t-test of no difference (as a Paired, so that
    its interval at Holm's level and its verdict read as every other comparison's)."""
    diff = line.x_at(y) - base.x_at(y)
    v1, v2 = line.x_se(y) ** 2, base.x_se(y) ** 2
    se = math.sqrt(v1 + v2)
    dof = (v1 + v2) ** 2 / (v1 ** 2 / line.dof + v2 ** 2 / base.dof) if v1 + v2 > 0 else line.dof + base.dof
    p = float(2 * stats.t.sf(abs(diff) / se, dof)) if se > 0 else math.nan
    return Paired(diff, se, dof, p, line.n + base.n)
