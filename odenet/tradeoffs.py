"""The report's "accuracy against cost" sections, from the runs as odenet.report.load_runs gives
them: a search's Pareto front (table and figures), and a one-at-a-time design's cells at their
mean accuracy and mean cost with intervals. Each returns its markdown, tables and figures for
the report to add where it lists the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from odenet import objectives, pareto, pareto_plot
from odenet.stats import CONFIDENCE

RULE = ("A trial is on the front when no finished trial is at least as good on every objective and better on one; "
        "trials equal on every objective are all kept. Diverged, failed, stopped and unfinished trials are never on "
        "it: their cost bought no final result.")
# The costs a one-at-a-time cell is shown against, with the accuracy its comparisons use.
CELL_ACCURACY, CELL_COSTS = "test_acc", ("nfe", "epoch_time")


@dataclass
class Section:
    markdown: str
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)


def search_front(runs: pd.DataFrame, out: Path, settings: Sequence[str], study_points: Sequence[Mapping] = (),
                 sweep_objectives: Mapping[str, str] | None = None) -> Section:
    """The non-dominated trials on the sweep's objectives ({name: 'max'|'min'}; a HyperOpt search has
    none, and is shown on val_acc against NFE and against epoch time), each front a table of the
    trials' `settings` and objectives and a figure of the first objective against each other one."""
    fronts = [dict(sweep_objectives)] if sweep_objectives else list(pareto.ACCURACY_AGAINST_COST)
    runs = objectives.measured(runs, sorted({name for front in fronts for name in front}))
    study = pareto.matches(runs, study_points)
    done = pareto.comparable(runs, {name: "max" for front in fronts for name in front})
    lines = ["## Accuracy against cost", RULE,
             f"{int(done.sum())} of {len(runs)} trials finished with every objective measured. "
             + "; ".join(f"{name}: {objectives.MEASURES[name].description}"
                         for name in dict.fromkeys(n for front in fronts for n in front))]
    section = Section("")
    for front in fronts:
        label = "_".join(front)
        on = pareto.front(runs, front)
        table = pareto.front_table(runs.assign(study_setting=study), front, columns=("run_id", *settings,
                                                                                       "study_setting"))
        section.tables[f"pareto_{label}"] = table
        lines += [f"### Non-dominated on {', '.join(f'{n} ({d})' for n, d in front.items())}: "
                  f"{len(table)} trial(s)", table.drop(columns=["run_id"]).to_markdown(index=False, floatfmt=".4g")]
        first, *others = front
        for other in others:
            # one figure per pair: the default fronts share no pair, a sweep's own objectives are one front
            section.figures.append(pareto_plot.front_figure(runs, on, other, first,
                                                            out / f"pareto_{first}_against_{other}.png", study=study))
    section.markdown = "\n\n".join(lines)
    return section


def one_at_a_time_cells(runs: pd.DataFrame, out: Path) -> Section:
    """Each cell's mean test accuracy and mean cost over its finished seeds, with t-intervals, on the
    same axes: what a setting costs and saves, read off with its uncertainty."""
    runs = objectives.measured(runs, list(CELL_COSTS)).assign(
        cell=lambda r: r["ablated_dimension"].where(r["ablated_dimension"] == r["ablated_value"],
                                                    r["ablated_dimension"] + "=" + r["ablated_value"].astype(str)))
    level = f"{CONFIDENCE:.0%}"
    lines = ["## Accuracy against cost, per cell",
             f"Each cell: mean over its finished seeds (n) and the {level} t-interval, of test accuracy and of each "
             f"cost; a cell with one seed has no interval. "
             + "; ".join(f"{name}: {objectives.MEASURES[name].description}" for name in CELL_COSTS)]
    section = Section("")
    for cost in CELL_COSTS:
        table = pareto.cells(runs, ["cell"], CELL_ACCURACY, cost)
        section.tables[f"cells_{CELL_ACCURACY}_{cost}"] = table
        lines += [f"### {CELL_ACCURACY} against {cost}", table.to_markdown(index=False, floatfmt=".4g")]
        section.figures.append(pareto_plot.cells_figure(table, "cell", cost, CELL_ACCURACY,
                                                        out / f"cells_{CELL_ACCURACY}_{cost}.png"))
    section.markdown = "\n\n".join(lines)
    return section
