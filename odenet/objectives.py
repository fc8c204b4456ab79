"""What a search can weigh: validation accuracy and the costs every finished run reports,
each named once, with its direction, and measured from a run's final metrics.

The same `measure` reads a Tune trial's final report and an MLflow run's logged metrics,
so a searcher, a warm start from an earlier sweep and the report's Pareto front see one
number for one trial.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import pandas as pd

MAX, MIN = "max", "min"
DIRECTIONS = (MAX, MIN)


class ObjectiveError(ValueError):
    """A bad --objectives string; the message names the fix."""


@dataclass(frozen=True)
class Measure:
    description: str
    of: Callable[[Mapping[str, float]], float]
    high: float = math.inf  # the largest value it can take (every measure here is >= 0)


def _metric(name: str) -> Callable[[Mapping[str, float]], float]:
    return lambda metrics: float(metrics.get(name, math.nan))


# The objectives, by the name --objectives takes; every run's final metrics hold what they need
# (odenet.summary's mean_* and odenet.evaluate's params_total).
MEASURES: dict[str, Measure] = {
    "val_acc": Measure(
        "validation accuracy of the last epoch the trial reported (what the HyperOpt search maximises)",
        _metric("val_acc"), high=1.0),
    "nfe": Measure(
        "function evaluations of f per training batch, forward plus backward (mean FNFE + mean BNFE over "
        "the epochs): every image of a batch passes through f that many times, and an adaptive solver's "
        "count grows with the batch size, so compare runs at one batch_size",
        lambda m: float(m.get("mean_fnfe", math.nan)) + float(m.get("mean_bnfe", math.nan))),
    "epoch_time": Measure(
        "seconds per epoch, training plus validation, on the trial's device (mean epoch_time_s)",
        _metric("mean_epoch_time_s")),
    "params": Measure(
        "trainable parameters of the model (params_total: every parameter of these models trains)",
        _metric("params_total")),
}


@dataclass(frozen=True)
class Objective:
    name: str
    direction: str  # MAX or MIN

    def __str__(self) -> str:
        return f"{self.name}:{self.direction}"

    @property
    def worst(self) -> float:
        """The value a trial that failed reports, so that every finished trial dominates it: 0 for a
        measure to maximise (as the HyperOpt search's diverged val_acc today), its highest value
        for one to minimise (infinity for a cost: Optuna takes infinities, not NaN)."""
        return 0.0 if self.direction == MAX else MEASURES[self.name].high


def parse(text: str) -> list[Objective]:
    """Objectives from 'val_acc:max,nfe:min': every name in MEASURES, once, with min or max."""
    objectives, errors = [], []
    for item in (part.strip() for part in text.split(",")):
        name, _, direction = item.partition(":")
        name, direction = name.strip(), direction.strip()
        if name not in MEASURES:
            errors.append(f"unknown objective {name!r} in {text!r}: expected one of {', '.join(MEASURES)}, "
                          f"each as NAME:max or NAME:min (e.g. val_acc:max,nfe:min)")
        elif direction not in DIRECTIONS:
            errors.append(f"objective {item!r}: the direction must be max or min, e.g. {name}:"
                          f"{MAX if name == 'val_acc' else MIN}")
        elif any(o.name == name for o in objectives):
            errors.append(f"objective {name!r} is given twice in {text!r}: give each once")
        else:
            objectives.append(Objective(name, direction))
    if errors:
        raise ObjectiveError("; ".join(errors))
    return objectives


def values(metrics: Mapping[str, float], names: Sequence[str] = tuple(MEASURES)) -> dict[str, float]:
    """The objectives `names` measured from a finished run's final metrics (NaN where one is missing)."""
    return {name: MEASURES[name].of(metrics) for name in names}


def so_far(history: Sequence[Mapping[str, float]], params_total: int) -> dict[str, float]:
    """Every objective after the epochs in `history` (EpochMetrics dicts): what a trial reports with
    each epoch, since Tune requires the searcher's metrics in every report. After the last epoch
    it equals `values` of the run's final metrics."""
    from odenet.summary import summarize

    return values({**history[-1], **summarize(history), "params_total": params_total})


def measured(runs: pd.DataFrame, names: Sequence[str] = tuple(MEASURES)) -> pd.DataFrame:
    """`runs` (one row per run, a column per final metric, as odenet.report.load_runs gives them)
    with a column per objective, measured as `values` measures one run."""
    return runs.assign(**{name: [MEASURES[name].of(row) for row in runs.to_dict("records")] for name in names})
