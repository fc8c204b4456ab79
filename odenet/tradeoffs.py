"""The report's "accuracy against cost" sections, from the runs as odenet.report.load_runs gives
them: a search's Pareto front (table and figures), and a one-at-a-time design's cells at their
mean accuracy and mean cost with intervals. Each returns its markdown, tables and figures for
the report to add where it lists the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from odenet import objectives, pareto, pareto_plot
from odenet.objectives import MAX, MIN
from odenet.stats import (ALPHA, CONFIDENCE, RANGE_UP_TO, Interval, accuracy_interval, fit_line, holm, paired_test,
                          ratio_interval, x_difference)

RULE = ("A trial is on the front when no finished trial is at least as good on every objective and better on one; "
        "trials equal on every objective are all kept. Diverged, failed, stopped and unfinished trials are never on "
        "it: their cost bought no final result.")
# The costs a one-at-a-time cell is shown against, with the accuracy its comparisons use.
CELL_ACCURACY, CELL_COSTS = "test_acc", ("nfe", "epoch_time")
BASE_CELL = "base"  # the cell label of a one-at-a-time design's base (odenet.report.BASE)


@dataclass
class Section:
    markdown: str
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)


# The parent-run param in which a search records the objectives it weighed ("val_acc:max,nfe:min").
OBJECTIVES_PARAM = "objectives"


def sweep_objectives(parent) -> dict[str, str] | None:
    """The objectives a sweep's parent run (an MLflow Run, or None) records, as {name: direction};
    None for a search that weighed one alone (HyperOpt's val_acc:max, as its parent records it):
    a front of one objective is its best trial, so that sweep is shown against the default costs."""
    text = parent.data.params.get(OBJECTIVES_PARAM) if parent is not None else None
    weighed = {o.name: o.direction for o in objectives.parse(text)} if text else {}
    return weighed if len(weighed) > 1 else None


def search_front(runs: pd.DataFrame, out: Path, settings: Sequence[str], study_points: Sequence[Mapping] = (),
                 sweep_objectives: Mapping[str, str] | None = None, scope: str = "", key: str = "") -> Section:
    """The non-dominated trials on the sweep's objectives ({name: 'max'|'min'}; a HyperOpt search has
    none, and is shown on val_acc against NFE and against epoch time), each front a table of the
    trials' `settings` and objectives and a figure of the first objective against each other one.
    `scope` ends the heading and `key` starts the file names, for an experiment of several sweeps."""
    fronts = [dict(sweep_objectives)] if sweep_objectives else list(pareto.ACCURACY_AGAINST_COST)
    runs = objectives.measured(runs, sorted({name for front in fronts for name in front}))
    study = pareto.matches(runs, study_points)
    done = pareto.comparable(runs, {name: "max" for front in fronts for name in front})
    lines = [f"## Accuracy against cost{scope}", RULE,
             f"{int(done.sum())} of {len(runs)} trials finished with every objective measured. "
             + "; ".join(f"{name}: {objectives.MEASURES[name].description}"
                         for name in dict.fromkeys(n for front in fronts for n in front))]
    lines += mixed_costs(runs[done])
    section = Section("")
    for front in fronts:
        label = "_".join(front)
        on = pareto.front(runs, front)
        table = pareto.front_table(runs.assign(study_setting=study), front, columns=("run_id", *settings,
                                                                                       "study_setting"))
        section.tables[f"{key}pareto_{label}"] = table
        lines += [f"### Non-dominated on {', '.join(f'{n} ({d})' for n, d in front.items())}: "
                  f"{len(table)} trial(s)", table.drop(columns=["run_id"]).to_markdown(index=False, floatfmt=".4g")]
        first, *others = front
        for other in others:
            # one figure per pair: the default fronts share no pair, a sweep's own objectives are one front
            section.figures.append(pareto_plot.front_figure(runs, on, other, first,
                                                            out / f"{key}pareto_{first}_against_{other}.png",
                                                            study=study))
    section.markdown = "\n\n".join(lines)
    return section


# What a cost column depends on besides the setting: NFE per batch on the batch size (logged as the
# batch_size param and, since runs log it, nfe_batch_size), epoch time and memory on the device.
COST_CONDITIONS = {"batch_size": "NFE per batch grows with the batch size", "device_model": "epoch time and peak "
                   "memory depend on the device"}


def mixed_costs(runs: pd.DataFrame) -> list[str]:
    """A warning per condition (COST_CONDITIONS) on which these runs differ: their costs then differ by
    more than their settings."""
    warnings = []
    for column, why in COST_CONDITIONS.items():
        values = runs[column].dropna().astype(str) if column in runs else pd.Series(dtype=object)
        values = values[values != ""]
        if values.nunique() > 1:
            counts = ", ".join(f"{value} ({n})" for value, n in values.value_counts().items())
            warnings.append(f"Caution: these trials ran with different {column} values ({counts}): {why}, so their "
                            f"costs compare only within one {column}.")
    return warnings


def one_at_a_time_cells(runs: pd.DataFrame, out: Path, scope: str = "", key: str = "",
                        resolution: float = 1 / 10_000) -> Section:
    """Each cell's mean test accuracy and mean cost over its finished seeds, with t-intervals, on the
    same axes, and each cell against the base cell seed by seed: what a setting costs and saves, read off
    with its uncertainty. `resolution`: one test image's share of the test set."""
    dimension, value = runs["ablated_dimension"], runs["ablated_value"].astype(str)
    # the base cell is "base" whatever value it was tagged with; another cell is "dimension=value"
    cell = dimension.where((dimension == BASE_CELL) | (dimension == value), dimension + "=" + value)
    runs = objectives.measured(runs, list(CELL_COSTS)).assign(cell=cell)
    level = f"{CONFIDENCE:.0%}"
    lines = [f"## Accuracy against cost, per cell{scope}",
             f"Each cell: mean over its finished seeds (n) and the {level} t-interval, of test accuracy and of each "
             f"cost; a cell with one seed has no interval. "
             + "; ".join(f"{name}: {objectives.MEASURES[name].description}" for name in CELL_COSTS)]
    lines += mixed_costs(runs)
    section = Section("")
    for cost in CELL_COSTS:
        table = pareto.cells(runs, ["cell"], CELL_ACCURACY, cost)
        section.tables[f"{key}cells_{CELL_ACCURACY}_{cost}"] = table
        lines += [f"### {CELL_ACCURACY} against {cost}", table.to_markdown(index=False, floatfmt=".4g")]
        section.figures.append(pareto_plot.cells_figure(table, "cell", cost, CELL_ACCURACY,
                                                        out / f"{key}cells_{CELL_ACCURACY}_{cost}.png"))
    against = against_base(runs, resolution)
    if not against.empty:
        section.tables[f"{key}cells_against_base"] = against
        lines += ["### Each cell against the base cell, seed by seed",
                  f"What a setting costs in accuracy and saves in cost, paired by seed with the base cell: the mean "
                  f"difference in test accuracy (points) with its paired {level} t-interval, and each cost's change "
                  f"(%) as the geometric mean of the seeds' ratios with the {level} t-interval of their logarithms. "
                  f"These intervals are each at {level}, not adjusted: the Holm-adjusted test of each accuracy "
                  f"difference is in the one-at-a-time tables.",
                  against[["cell", "pairs", "Δ test acc, points", *(f"{cost} change %" for cost in CELL_COSTS)]]
                  .to_markdown(index=False)]
    section.markdown = "\n\n".join(lines)
    return section


def against_base(runs: pd.DataFrame, resolution: float) -> pd.DataFrame:
    """Per cell other than the base: the seeds it shares with the base cell where both finished, the paired
    difference in CELL_ACCURACY (odenet.stats.paired_test, in points) and each cost's change (stats.ratio_interval
    of cell over base, in %), each with its interval; empty without a base cell or seeds."""
    if "seed" not in runs or not (runs["cell"] == BASE_CELL).any():
        return pd.DataFrame()
    done = runs[pareto.comparable(runs, {CELL_ACCURACY: MAX, **{cost: MIN for cost in CELL_COSTS}})]
    base = done[done["cell"] == BASE_CELL].drop_duplicates("seed", keep="last").set_index("seed")
    rows = []
    for cell, group in done[done["cell"] != BASE_CELL].groupby("cell", sort=False):
        mine = group.drop_duplicates("seed", keep="last").set_index("seed")
        seeds = mine.index.intersection(base.index)
        paired = paired_test(mine.loc[seeds, CELL_ACCURACY].tolist(), base.loc[seeds, CELL_ACCURACY].tolist(),
                             resolution)
        accuracy = paired.interval(CONFIDENCE)
        row = {"cell": cell, "pairs": len(seeds),
               "Δ test acc, points": paired.not_estimable or accuracy.format(100.0, 2),
               "diff_mean": accuracy.mean, "diff_low": accuracy.low, "diff_high": accuracy.high}
        for cost in CELL_COSTS:
            ratio = ratio_interval(mine.loc[seeds, cost].tolist(), base.loc[seeds, cost].tolist())
            change = Interval(*((r - 1) * 100 for r in (ratio.mean, ratio.low, ratio.high)), ratio.n)
            row.update({f"{cost} change %": change.format(1.0, 2), f"{cost}_change": change.mean,
                        f"{cost}_change_low": change.low, f"{cost}_change_high": change.high})
        rows.append(row)
    return pd.DataFrame(rows)


# -- parameter efficiency as a curve -------------------------------------------------------------------------------

# What a curve counts as a model's size: its trainable parameters (runs logged before params_trainable
# existed have params_total, equal for these models, whose every parameter trains).
PARAMS, CURVE_ACCURACY = "params_trainable", "test_acc"


def parameter_counts(runs: pd.DataFrame) -> pd.Series:
    trainable = runs[PARAMS] if PARAMS in runs else pd.Series(float("nan"), runs.index)
    return pd.to_numeric(trainable, errors="coerce").fillna(pd.to_numeric(runs.get("params_total"), errors="coerce"))


def parameter_curves(runs: pd.DataFrame, out: Path, base_model: str, resolution: float, scope: str = "",
                     key: str = "") -> Section:
    """Per data set: test accuracy against trainable parameters per model family (each width: the mean
    over its finished seeds with odenet.stats.accuracy_interval), a line test_acc = a + b log10(params) per family, and
    the parameters each family needs to reach what `base_model` reaches at each of its widths, with
    Fieller intervals, and the ratio to the base family's need tested (Holm over the section).
    `resolution`: one test image's share of the test set (odenet.stats.accuracy_interval)."""
    runs = runs.assign(**{PARAMS: parameter_counts(runs)})
    level = f"{CONFIDENCE:.0%}"
    lines = [f"## Parameter efficiency as a curve{scope}",
             f"Each point: one model family at one width, the mean test accuracy over its finished seeds (n), at its "
             f"trainable parameters ({PARAMS}), with the range (min, max) for {RANGE_UP_TO} seeds or fewer and a "
             f"{level} t-interval on the logit scale otherwise (as in the tables above). Per family, a straight line "
             f"test_acc = a + b log10(params) is fitted to every finished run (statsmodels OLS; R² shown), so the "
             f"curve is read only between the widths that ran, where a line in log parameters is a fair local "
             f"description. The table asks, at each accuracy the base family ({base_model}) reached at one of its "
             f"widths, how many parameters each family's line needs (Fieller's {level} interval; none where the "
             f"line's slope is not distinguishable from 0), and tests the ratio to the base family's need (delta "
             f"method on log10 parameters, Welch degrees of freedom, Holm over every ratio in this section, each "
             f"ratio's interval at Holm's level). Only accuracies inside every fitted family's range are asked."]
    section = Section("")
    rows, comparisons = [], []
    for dataset, on_dataset in runs.groupby("dataset", sort=False):
        done = on_dataset[pareto.comparable(on_dataset, {CURVE_ACCURACY: MAX, PARAMS: MIN})]
        points = _points(done, resolution)
        section.tables[f"{key}parameter_curve_{dataset}"] = points
        fits = {model: fit_line(np.log10(group[PARAMS].to_numpy(dtype=float)), group[CURVE_ACCURACY].tolist())
                for model, group in done.groupby("model", sort=False)
                if group[PARAMS].nunique() >= 2 and len(group) >= 3}
        lines += [f"### {dataset}: test accuracy at each width",
                  points.to_markdown(index=False, floatfmt=".4g"),
                  "Fitted lines: " + ("; ".join(f"{m}: {f.intercept:.3g} + {f.slope:.3g} log10(params), R² "
                                                f"{f.r2:.2f}, n {f.n}" for m, f in fits.items())
                                      or "none (a family needs 2 or more widths and 3 finished runs)") + "."]
        section.figures.append(pareto_plot.curves_figure(points, fits, "model", PARAMS, CURVE_ACCURACY,
                                                         out / f"{key}parameter_curve_{dataset}.png"))
        if base_model not in fits or len(fits) < 2:
            lines.append(f"No parameters-for-accuracy table for {dataset}: it needs a line for {base_model} and for "
                         f"another family.")
            continue
        asked = len(rows)
        reach = {m: sorted(f.intercept + f.slope * np.log10(done.loc[done["model"] == m, PARAMS].agg(["min", "max"])))
                 for m, f in fits.items()}
        base_points = points[points["model"] == base_model]
        for target_width, target in zip(base_points["width"], base_points[CURVE_ACCURACY]):
            if not all(low <= target <= high for low, high in reach.values()):
                continue
            for model, line in fits.items():
                needed = line.x_interval(target)
                row = {"dataset": dataset, "accuracy": target, f"{base_model} width": target_width, "model": model,
                       "params needed": 10 ** needed.mean, "params_low": 10 ** needed.low,
                       "params_high": 10 ** needed.high}
                if model != base_model:
                    comparisons.append((len(rows), x_difference(line, fits[base_model], target)))
                rows.append(row)
        if len(rows) == asked:
            lines.append(f"No accuracy {base_model} reached on {dataset} lies inside every fitted family's range: "
                         f"the curves do not overlap there, so no parameters-for-accuracy comparison is made.")
    table = pd.DataFrame(rows)
    if comparisons:
        adjusted, levels = holm([c.p for _, c in comparisons])
        for (i, compared), p, level_i in zip(comparisons, adjusted, levels):
            ratio = compared.interval(level_i)
            rows[i].update({"ratio to base": 10 ** ratio.mean, "ratio_low": 10 ** ratio.low,
                            "ratio_high": 10 ** ratio.high, "holm_p": p,
                            "verdict": _needs(rows[i]["model"], base_model, 10 ** ratio.mean, p, level_i,
                                              10 ** ratio.low, 10 ** ratio.high)})
        table = pd.DataFrame(rows)
    if not table.empty:
        section.tables[f"{key}parameters_for_accuracy"] = table
        lines += ["### Parameters each family needs for a given accuracy", _shown_needs(table, base_model)]
    section.markdown = "\n\n".join(lines)
    return section


def _points(done: pd.DataFrame, resolution: float) -> pd.DataFrame:
    """One row per family and size (a width): its finished seeds' mean accuracy with accuracy_interval."""
    rows = []
    for (model, params), group in done.sort_values(["model", PARAMS]).groupby(["model", PARAMS], sort=False):
        accuracy = accuracy_interval(group[CURVE_ACCURACY].tolist(), resolution)
        widths = group["width"].dropna() if "width" in group else pd.Series(dtype=float)
        rows.append({"model": model, "width": widths.iloc[0] if len(widths) else "study's", PARAMS: params,
                     "n": accuracy.n, CURVE_ACCURACY: accuracy.mean, f"{CURVE_ACCURACY}_low": accuracy.low,
                     f"{CURVE_ACCURACY}_high": accuracy.high})
    return pd.DataFrame(rows)


def _needs(model: str, base: str, ratio: float, p: float, level: float, low: float, high: float) -> str:
    """The ratio's verdict in words, as odenet.stats.verdict puts a difference."""
    if np.isnan(p) or p >= ALPHA:
        return f"difference not detectable (Holm p = {p:.2g})"
    return (f"{model} needs {ratio:.2g}x the parameters of {base} [{low:.2g}, {high:.2g}] at {level:.1%} "
            f"(Holm p = {p:.2g})")


def _shown_needs(table: pd.DataFrame, base_model: str) -> str:
    shown = table.assign(**{"params needed": [_interval(m, lo, hi, ".3g") for m, lo, hi in
                                              zip(table["params needed"], table["params_low"], table["params_high"])]})
    columns = [c for c in ("dataset", "accuracy", f"{base_model} width", "model", "params needed", "verdict")
               if c in shown]
    return shown[columns].fillna("base").to_markdown(index=False, floatfmt=".4g")


def _interval(mean: float, low: float, high: float, fmt: str) -> str:
    if np.isnan(low) or np.isnan(high):
        return f"{mean:{fmt}} (line too flat for an interval)"
    return f"{mean:{fmt}} [{low:{fmt}}, {high:{fmt}}]"
