"""A sweep's search space: its dimensions, declared in a program, a --space-file or --space
flags, checked against RunConfig before Ray starts; and points inside it."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any, Sequence

from odenet.config import ConfigError, RunConfig, read_mapping_file, read_settings_file

# Fields that describe where a run happens rather than what it is: never searched.
NOT_SEARCHABLE = ("data_dir", "device")
SAMPLERS = ("loguniform", "uniform")


class SweepError(ValueError):
    """Bad sweep arguments; raised before Ray starts any trial."""

    def __init__(self, errors: Sequence[str]):
        self.errors = list(errors)
        super().__init__("invalid sweep:\n  " + "\n  ".join(self.errors))


@dataclass(frozen=True)
class Dimension:
    """One searched setting: a choice of values, or a (log-)uniform range."""

    name: str
    kind: str  # "choice" | "grid" | "loguniform" | "uniform"
    values: tuple

    def to_tune(self):
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        return getattr(tune, self.kind)(*self.values)

    def describe(self) -> str:
        if self.kind in ("choice", "grid"):
            return ("every one of " if self.kind == "grid" else "") + ", ".join(map(str, self.values))
        return f"{self.kind}({self.values[0]:g}, {self.values[1]:g})"


def choice(*values) -> tuple:
    return ("choice", values)


def grid(*values) -> tuple:
    """Every value, each in its own trial(s): for comparisons rather than search."""
    return ("grid", values)


def loguniform(low: float, high: float) -> tuple:
    return ("loguniform", (low, high))


def uniform(low: float, high: float) -> tuple:
    return ("uniform", (low, high))


def dimension(name: str, spec: Any) -> Dimension:
    """A Dimension from a declaration: choice(...)/loguniform(...), a YAML list or
    {loguniform: [low, high]}, a flag string ('relu,tanh', 'loguniform:1e-4:1e-2'), or a value."""
    if isinstance(spec, tuple) and len(spec) == 2 and spec[0] in ("choice", "grid", *SAMPLERS):
        return Dimension(name, spec[0], tuple(spec[1]))
    if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in SAMPLERS:
        kind, bounds = next(iter(spec.items()))
        return Dimension(name, kind, tuple(bounds) if isinstance(bounds, (list, tuple)) else (bounds,))
    if isinstance(spec, (list, tuple)):
        return Dimension(name, "choice", tuple(spec))
    if isinstance(spec, str):
        head, _, rest = spec.partition(":")
        if head in SAMPLERS:
            return Dimension(name, head, tuple(_number(v) for v in rest.split(":") if v != ""))
        return Dimension(name, "choice", tuple(_scalar(v) for v in spec.split(",") if v.strip() != ""))
    return Dimension(name, "choice", (spec,))


def _number(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text


def _scalar(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text.strip())
    except yaml.YAMLError:
        return text.strip()  # not a YAML scalar: kept as text, and the config names it if it is wrong


def check_space(space: dict[str, Dimension], base: RunConfig) -> list[str]:
    """Every problem with a search space: unknown dimensions, empty choices, reversed or
    invalid ranges, values the run configuration would reject."""
    allowed = [f.name for f in fields(RunConfig) if f.name not in NOT_SEARCHABLE]
    errors = []
    for name, dim in space.items():
        if name not in allowed:
            errors.append(f"unknown dimension {name!r}: expected one of {', '.join(allowed)}")
            continue
        if dim.kind in ("choice", "grid"):
            if not dim.values:
                errors.append(f"{name}: the choice list is empty; give at least one value")
            for value in dim.values:
                try:
                    base.replace(**{name: value})
                except ConfigError as exc:
                    errors.extend(f"{name}: {e}" for e in exc.errors)
            continue
        if len(dim.values) != 2 or not all(isinstance(v, (int, float)) for v in dim.values):
            errors.append(f"{name}: {dim.kind} needs two numbers, low and high; got {dim.values!r}")
            continue
        low, high = dim.values
        if not low < high:
            errors.append(f"{name}: {dim.kind}({low:g}, {high:g}) is reversed or empty; expected low < high")
        elif dim.kind == "loguniform" and low <= 0:
            errors.append(f"{name}: loguniform({low:g}, {high:g}) needs low > 0")
        for value in (low, high):
            try:
                base.replace(**{name: value})
            except ConfigError as exc:
                errors.extend(f"{name}: {e}" for e in exc.errors)
    return errors


def check_cells(cells: list[dict[str, Any]], base: RunConfig) -> list[str]:
    """Every problem with a designed list of trials: settings the run configuration rejects."""
    errors = []
    for cell in cells:
        try:
            base.replace(**cell["settings"])
        except ConfigError as exc:
            errors.extend(f"{cell['tags'].get('ablated_dimension', 'cell')}: {e}" for e in exc.errors)
    return list(dict.fromkeys(errors))  # a bad base value shows up in every cell: say it once


def build_space(declared: dict[str, Any], space_file: str | None, overrides: Sequence[str] | None
                ) -> dict[str, Dimension]:
    """The declared space, then a --space-file, then --space flags (each overrides the last)."""
    space = {name: dimension(name, spec) for name, spec in declared.items()}
    if space_file:
        loaded = read_mapping_file(space_file, "--space-file", "dimension names to values")
        space.update({name: dimension(name, spec) for name, spec in loaded.items()})
    errors = []
    for flag in overrides or []:
        name, sep, spec = flag.partition("=")
        if not sep or not name:
            errors.append(f"--space {flag!r}: expected NAME=VALUES, e.g. final_time=1,2 or lr=loguniform:1e-4:1e-2")
            continue
        space[name.strip()] = dimension(name.strip(), spec)
    if errors:
        raise SweepError(errors)
    return space


def describe_space(space: dict[str, Dimension]) -> str:
    """The space as JSON, one line per dimension: the parent run's search_space param."""
    return json.dumps({name: dim.describe() for name, dim in space.items()}, indent=1)


def load_points(path: str | None, space: dict[str, Dimension]) -> list[dict]:
    """A YAML or JSON list of settings; every point must lie inside the space."""
    if path is None:
        return []
    points = read_settings_file(path, "--points-file")
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise SweepError([f"--points-file {path}: expected a list of mappings of dimension names to values"])
    errors = [f"--points-file {path}: point {i + 1}: {problem}" for i, p in enumerate(points)
              if (problem := point_problem(space, complete_point(space, p))) is not None]
    if errors:
        raise SweepError(errors)
    return points


def complete_point(space: dict[str, Dimension], point: dict) -> dict:
    """The point with the dimensions fixed to one value filled in."""
    fixed = {name: dim.values[0] for name, dim in space.items() if dim.kind == "choice" and len(dim.values) == 1}
    return {**fixed, **point}


def point_problem(space: dict[str, Dimension], point: dict) -> str | None:
    """Why a point is not a point of the space, or None."""
    for name, value in point.items():
        if name not in space:
            return f"{name!r} is not a searched dimension ({', '.join(space)})"
        dim = space[name]
        if dim.kind == "choice" and value not in dim.values:
            return f"{name}={value!r} is not one of {dim.describe()}"
        if dim.kind != "choice" and not dim.values[0] <= value <= dim.values[1]:
            return f"{name}={value!r} lies outside {dim.describe()}"
    missing = [name for name in space if name not in point]
    return f"missing {', '.join(missing)}" if missing else None
