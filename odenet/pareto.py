"""Accuracy against cost: the non-dominated trials of a search, and a one-at-a-time design's
cells as mean accuracy and mean cost with their intervals.

The rules of the front, stated once:
- Only finished trials with a value for every objective can be on it; a diverged, failed,
  stopped or unfinished trial never is (its cost bought no result to compare).
- Trial a dominates trial b when a is at least as good on every objective and strictly
  better on at least one. The front is the finished trials no finished trial dominates.
- So two trials equal on every objective do not dominate each other: both are on the front
  (or both off it). At equal cost the more accurate trial dominates the other.
- One finished trial alone is the front.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from odenet.objectives import MAX, MIN
from odenet.stats import mean_interval

FINISHED = "FINISHED"
# The fronts a search whose parent run names no objectives (a HyperOpt search) is shown on.
ACCURACY_AGAINST_COST = ({"val_acc": MAX, "nfe": MIN}, {"val_acc": MAX, "epoch_time": MIN})


def comparable(trials: pd.DataFrame, objectives: Mapping[str, str], status: str = "status") -> pd.Series:
    """Which trials may be on the front: finished (where `status` is a column), a finite value
    for every objective."""
    ok = pd.Series(True, index=trials.index)
    if status in trials:
        ok &= trials[status] == FINISHED
    for name in objectives:
        column = pd.to_numeric(trials[name], errors="coerce") if name in trials else pd.Series(np.nan, trials.index)
        ok &= np.isfinite(column.astype(float))
    return ok


def front(trials: pd.DataFrame, objectives: Mapping[str, str], status: str = "status") -> pd.Series:
    """True for each non-dominated trial over `objectives` ({name: 'max' | 'min'}), by the rules above."""
    if not objectives:
        raise ValueError("a Pareto front needs at least one objective")
    ok = comparable(trials, objectives, status)
    # Every objective as "larger is better", so one comparison serves both directions.
    scores = np.column_stack([pd.to_numeric(trials.loc[ok, name]).to_numpy(dtype=float)
                              * (1.0 if direction == MAX else -1.0) for name, direction in objectives.items()])
    at_least = (scores[:, None, :] >= scores[None, :, :]).all(axis=2)  # [a, b]: a at least as good as b
    better = (scores[:, None, :] > scores[None, :, :]).any(axis=2)
    dominated = (at_least & better).any(axis=0)
    on = pd.Series(False, index=trials.index)
    on[ok[ok].index] = ~dominated
    return on


def front_table(trials: pd.DataFrame, objectives: Mapping[str, str], columns: Sequence[str] = (),
                status: str = "status") -> pd.DataFrame:
    """The non-dominated trials, `columns` then the objectives, best on the first objective first."""
    on = front(trials, objectives, status)
    first, direction = next(iter(objectives.items()))
    shown = [c for c in columns if c in trials and c not in objectives] + list(objectives)
    return trials.loc[on, shown].sort_values(first, ascending=direction != MAX).reset_index(drop=True)


def cells(trials: pd.DataFrame, by: Sequence[str], accuracy: str, cost: str, status: str = "status") -> pd.DataFrame:
    """One row per cell (trials grouped `by`): the finished trials' mean `accuracy` and mean `cost`,
    each with its t-interval over seeds (odenet.stats.mean_interval), and n."""
    done = trials[comparable(trials, {accuracy: MAX, cost: MAX}, status)]
    rows = []
    for key, group in done.groupby(list(by), sort=False):
        acc = mean_interval(pd.to_numeric(group[accuracy]).tolist())
        spent = mean_interval(pd.to_numeric(group[cost]).tolist())
        rows.append({**dict(zip(by, key if isinstance(key, tuple) else (key,))), "n": acc.n,
                     accuracy: acc.mean, f"{accuracy}_low": acc.low, f"{accuracy}_high": acc.high,
                     cost: spent.mean, f"{cost}_low": spent.low, f"{cost}_high": spent.high})
    return pd.DataFrame(rows, columns=[*by, "n", accuracy, f"{accuracy}_low", f"{accuracy}_high",
                                       cost, f"{cost}_low", f"{cost}_high"])


def matches(trials: pd.DataFrame, points: Sequence[Mapping[str, object]]) -> pd.Series:
    """True for each trial whose settings equal one of `points` on every setting the point names
    (the study's own settings, say); logged params are text, so numbers compare as numbers."""
    def same(logged, value) -> bool:
        try:
            return float(logged) == float(value)
        except (TypeError, ValueError):
            return str(logged) == str(value)

    return pd.Series([any(all(name in row and same(row[name], value) for name, value in point.items())
                          for point in points) for row in trials.to_dict("records")], index=trials.index, dtype=bool)
