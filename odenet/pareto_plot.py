"""Figures of accuracy against cost (matplotlib, headless): a search's trials with its front
highlighted, and a one-at-a-time design's cells with their intervals on both axes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from odenet.pareto import comparable
# odenet.plots sets the headless backend and saves every figure the same way
from odenet.plots import _save, plt


def front_figure(trials: pd.DataFrame, on_front: pd.Series, cost: str, accuracy: str, path: Path,
                 study: pd.Series | None = None, title: str = "") -> Path:
    """`accuracy` against `cost` for the finished trials: the front (computed over all the sweep's
    objectives, which may be more than these two) in colour and joined, dominated trials faint,
    the study's own setting (`study`: True on its trials) ringed."""
    shown = trials[comparable(trials, {cost: "min", accuracy: "max"})]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    dominated = shown[~on_front.reindex(shown.index, fill_value=False)]
    ax.scatter(dominated[cost], dominated[accuracy], color="0.5", alpha=0.3, s=22, label="dominated")
    best = shown[on_front.reindex(shown.index, fill_value=False)].sort_values(cost)
    ax.plot(best[cost], best[accuracy], color="C0", marker="o", linewidth=1, drawstyle="steps-post",
            label=f"non-dominated ({len(best)})")
    if study is not None:
        mine = shown[study.reindex(shown.index, fill_value=False)]
        ax.scatter(mine[cost], mine[accuracy], s=160, facecolors="none", edgecolors="C3", linewidths=1.5,
                   label="the study's setting")
    ax.set(xlabel=cost, ylabel=accuracy,
           title=title or f"{accuracy} against {cost}: {len(shown)} finished of {len(trials)} trials")
    ax.legend(fontsize=8)
    return _save(fig, path)


def cells_figure(table: pd.DataFrame, label: str, cost: str, accuracy: str, path: Path, title: str = "") -> Path:
    """Each cell of odenet.pareto.cells at its mean cost and accuracy, with both t-intervals."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, row in enumerate(table.itertuples(index=False)):
        values = row._asdict()
        x, y = values[cost], values[accuracy]
        xerr = _error(x, values[f"{cost}_low"], values[f"{cost}_high"])
        yerr = _error(y, values[f"{accuracy}_low"], values[f"{accuracy}_high"])
        ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="o", color=f"C{i % 10}", capsize=3,
                    label=f"{values[label]} (n={values['n']})")
    ax.set(xlabel=cost, ylabel=accuracy,
           title=title or f"{accuracy} against {cost}: mean and 95% t-interval over seeds")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _error(mean: float, low: float, high: float):
    """Asymmetric error bars; none where one seed left the interval undefined."""
    if np.isnan(low) or np.isnan(high):
        return None
    return [[mean - low], [high - mean]]



def curves_figure(points: pd.DataFrame, lines: dict, family: str, params: str, accuracy: str, path: Path,
                  title: str = "") -> Path:
    """`accuracy` against `params` (log scale) per `family`: each width's mean with its interval
    (columns `accuracy`, `accuracy`_low, `accuracy`_high and n), and the family's fitted line (odenet.stats.Line in
    log10 parameters) over the widths it ran."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (name, group) in enumerate(points.groupby(family, sort=False)):
        group = group.sort_values(params)
        yerr = np.array([[0.0, 0.0] if e is None else [e[0][0], e[1][0]] for e in
                         (_error(m, lo, hi) for m, lo, hi in zip(group[accuracy], group[f"{accuracy}_low"],
                                                                 group[f"{accuracy}_high"]))]).T
        ax.errorbar(group[params], group[accuracy], yerr=yerr, fmt="o", color=f"C{i % 10}", capsize=3,
                    label=f"{name} (n per width: {'/'.join(str(n) for n in group['n'])})")
        if name in lines:
            x = np.log10(group[params].to_numpy(dtype=float))
            ax.plot(10 ** x, lines[name].intercept + lines[name].slope * x, color=f"C{i % 10}", linewidth=1,
                    alpha=0.6)
    ax.set_xscale("log")
    ax.set(xlabel=f"{params} (log scale)", ylabel=accuracy,
           title=title or f"{accuracy} against {params} per {family}:\nmean over seeds per width, with its interval")
    ax.legend(fontsize=7)
    return _save(fig, path)
