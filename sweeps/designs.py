"""The one-at-a-time design: from a base setting, vary one dimension at a time over its
values with everything else at the base, every cell repeated over seeds.

Unlike a search, whose trials vary every setting together where the searcher found
promise, each cell here differs from the base in exactly one setting, and each seed of a
cell pairs with the same seed of the base (same initial weights where shapes allow, same
batch order): `odenet report` compares them pair by pair.
"""

from __future__ import annotations

from typing import Any, Sequence

from odenet import tracking
from odenet.config import read_mapping_file
from odenet.report import BASE
from odenet.sweep_record import PARENT, ROLE_TAG
from sweeps.space import Dimension, SweepError

# Continuous dimensions are ablated over a small grid around the base value: these factors.
CONTINUOUS_FACTORS = {"lr": (1 / 3, 3.0), "weight_decay": (0.1, 10.0)}
# ... and, where the base value is 0 (no weight decay), these values.
CONTINUOUS_FROM_ZERO = (1e-5, 1e-4)


def ablated_values(dim: Dimension, base_value: Any) -> list[Any]:
    """The values a dimension takes in its cells: every choice, or a grid around the base."""
    if dim.kind in ("choice", "grid"):
        return list(dim.values)
    if base_value == 0:
        return [base_value, *CONTINUOUS_FROM_ZERO]
    factors = CONTINUOUS_FACTORS.get(dim.name, (0.1, 10.0))
    return sorted({base_value, *(float(f"{base_value * f:.3g}") for f in factors)})


def cells(space: dict[str, Dimension], base_point: dict[str, Any], dimensions: Sequence[str],
          seeds: Sequence[int]) -> list[dict[str, Any]]:
    """The base cell, then one cell per other value of each ablated dimension, each over every seed."""
    def cell(dimension: str, value: Any, seed: int) -> dict[str, Any]:
        settings = {**base_point, **({} if dimension == BASE else {dimension: value}), "seed": seed}
        return {"settings": settings,
                "tags": {"ablated_dimension": dimension, "ablated_value": str(value), "seed": str(seed)}}

    out = [cell(BASE, BASE, seed) for seed in seeds]
    for name in dimensions:
        for value in ablated_values(space[name], base_point[name]):
            if value != base_point[name]:
                out.extend(cell(name, value, seed) for seed in seeds)
    return out


def check_dimensions(space: dict[str, Dimension], requested: str | None) -> list[str]:
    """The ablated dimensions from --dimensions a,b (default: every searched one)."""
    if requested is None:
        return list(space)
    names = [n.strip() for n in requested.split(",") if n.strip()]
    unknown = [n for n in names if n not in space]
    if unknown or not names:
        raise SweepError([f"--dimensions {requested!r}: unknown dimension(s) {', '.join(unknown) or '(none given)'};"
                          f" expected names from {', '.join(space)}"])
    return names


def base_from_file(path: str, space: dict[str, Dimension]) -> dict[str, Any]:
    """A YAML mapping of dimension names to the base's values."""
    loaded = read_mapping_file(path, "--base-file", "dimension names to values")
    unknown = [k for k in loaded if k not in space]
    if unknown:
        raise SweepError([f"--base-file {path}: unknown key(s) {', '.join(map(str, unknown))}; "
                          f"expected dimension names from {', '.join(space)}"])
    return loaded


def best_trial_settings(experiment: str, names: Sequence[str], flag: str) -> dict[str, str]:
    """The settings `names` (as logged: strings) of the finished trial with the best validation
    accuracy in an experiment: the base of an ablation or a comparison after a search."""
    tracking.check_server()
    client = tracking.client()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SweepError([f"{flag} {experiment!r}: no such MLflow experiment at {tracking.tracking_uri()}"])
    runs = [r for r in client.search_runs([found.experiment_id],
                                          "attributes.status = 'FINISHED' and metrics.best_val_acc > 0",
                                          order_by=["metrics.best_val_acc DESC"], max_results=50)
            if r.data.tags.get(ROLE_TAG) != PARENT]
    if not runs:
        raise SweepError([f"{flag} {experiment!r}: the experiment has no finished trial to start from"])
    params = runs[0].data.params
    return {name: params[name] for name in names if name in params and params[name] != "None"}


def typed(dim: Dimension, raw: str) -> Any:
    """A value logged as an MLflow param (a string), as the dimension's own value."""
    for value in dim.values if dim.kind in ("choice", "grid") else ():
        if str(value) == raw or (isinstance(value, (int, float)) and _number(raw) == value):
            return value
    number = _number(raw)
    return raw if number is None else number


def _number(raw: str) -> float | None:
    try:
        return float(raw)
    except ValueError:
        return None
