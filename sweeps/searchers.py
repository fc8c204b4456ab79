"""A search's searcher and scheduler: HyperOpt on val_acc (the study's choice, the default) or
Optuna on one or several objectives (odenet/objectives.py), optionally told the finished
trials of an earlier sweep so that it starts from their results without training them again.

Optuna's space is define-by-run, so a dimension can depend on another: `step_size` is
sampled only where the trial's solver takes fixed steps (an adaptive solver ignores it).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Sequence

from odenet import tracking
from odenet.config import FIXED_STEP_SOLVERS
from odenet.objectives import MAX, MEASURES, Objective, ObjectiveError, parse
from odenet.sweep_record import PARENT, ROLE_TAG
from sweeps.designs import typed
from sweeps.space import Dimension, SweepError, point_problem

HYPEROPT, OPTUNA = "hyperopt", "optuna"
ASHA, FIFO = "asha", "fifo"
VAL_ACC = Objective("val_acc", MAX)  # HyperOpt's one objective, and Optuna's default
STEP_SIZE, SOLVER = "step_size", "solver"
# The Optuna study a sweep's searcher keeps (in memory, saved with Tune's searcher state).
STUDY_NAME = "odenet"
# The parent-run params that record a search's plan; `objectives` reads back with
# odenet.objectives.parse ("val_acc:max,nfe:min"), in the searcher's order.
SEARCHER_PARAM, OBJECTIVES_PARAM, SCHEDULER_PARAM, WARM_START_PARAM = (
    "searcher", "objectives", "scheduler", "warm_start_from")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--searcher, --objectives and --warm-start-from (--scheduler stays with the program's ASHA flags)."""
    group = parser.add_argument_group("search: searcher")
    group.add_argument("--searcher", choices=(HYPEROPT, OPTUNA), default=HYPEROPT,
                       help="hyperopt: TPE on val_acc, the study's choice (default); optuna: Optuna's TPE on "
                            "--objectives, one or several")
    group.add_argument("--objectives", metavar="NAME:DIR,...",
                       help="with --searcher optuna: what to weigh, each max or min, from "
                            f"{', '.join(MEASURES)} (default: val_acc:max; e.g. val_acc:max,nfe:min)")
    group.add_argument("--warm-start-from", metavar="EXPERIMENT",
                       help="with --searcher optuna: tell the searcher the finished trials of this earlier sweep "
                            "and their results first; they are not trained again")


@dataclass(frozen=True)
class Plan:
    """What searches and what stops trials, checked before Ray starts."""

    searcher: str
    objectives: tuple[Objective, ...]
    scheduler: str
    warm_start_from: str | None = None

    @property
    def metric(self) -> str | list[str]:
        """Tune's metric for the searcher: one name, or a list for several objectives."""
        names = [o.name for o in self.objectives]
        return names[0] if len(names) == 1 else names

    @property
    def mode(self) -> str | list[str]:
        modes = [o.direction for o in self.objectives]
        return modes[0] if len(modes) == 1 else modes

    def params(self) -> dict[str, str]:
        """The plan as the sweep's parent run records it."""
        recorded = {SEARCHER_PARAM: self.searcher, OBJECTIVES_PARAM: ",".join(map(str, self.objectives)),
                    SCHEDULER_PARAM: self.scheduler}
        return {**recorded, **({WARM_START_PARAM: self.warm_start_from} if self.warm_start_from else {})}

    def describe(self) -> str:
        """One line for the top of the output: which searcher, on what, and which scheduler and why."""
        searcher = "HyperOpt TPE" if self.searcher == HYPEROPT else "Optuna TPE"
        weighs = ", ".join(map(str, self.objectives))
        if self.scheduler == ASHA:
            stops = f"ASHA stops trials early on {self.objectives[0]}"
        elif len(self.objectives) > 1:
            stops = "FIFO: every trial trains to early stopping (ASHA ranks trials on one objective only)"
        else:
            stops = "FIFO: every trial trains to early stopping"
        warm = f"; first told the finished trials of {self.warm_start_from!r}" if self.warm_start_from else ""
        return f"searcher: {searcher} on {weighs}{warm}; scheduler: {stops}"


def plan(searcher: str, objectives: str | None, scheduler: str | None, warm_start_from: str | None) -> Plan:
    """The searcher, objectives and scheduler from the flags; `scheduler` None means the default:
    ASHA for one objective, FIFO for several. Every problem raises one SweepError."""
    errors = []
    chosen: list[Objective] = [VAL_ACC]
    if searcher == HYPEROPT:
        optuna_only = {"--objectives": (objectives, "HyperOpt searches val_acc:max only"),
                       "--warm-start-from": (warm_start_from, "Ray's HyperOptSearch cannot take known results")}
        errors += [f"{flag} {value}: {why}; add --searcher {OPTUNA}"
                   for flag, (value, why) in optuna_only.items() if value is not None]
    elif objectives is not None:
        try:
            chosen = parse(objectives)
        except ObjectiveError as exc:
            errors.append(f"--objectives: {exc}")
    if scheduler is None:
        scheduler = ASHA if len(chosen) == 1 else FIFO
    elif scheduler == ASHA and len(chosen) > 1:
        errors.append(f"--scheduler {ASHA} with {len(chosen)} objectives ({objectives}): ASHA stops trials on one "
                      f"objective; use --scheduler {FIFO} (the default for several objectives) or one objective")
    if errors:
        raise SweepError(errors)
    return Plan(searcher, tuple(chosen), scheduler, warm_start_from)


# -- Optuna's space ---------------------------------------------------------------------------


def optuna_space_problems(space: dict[str, Dimension]) -> list[str]:
    """What Optuna cannot sample: grid dimensions, choices of values it cannot store."""
    errors = []
    for name, dim in space.items():
        if dim.kind == "grid":
            errors.append(f"{name}: a grid lists every value for a comparison; with --searcher {OPTUNA} give a "
                          f"choice instead (e.g. --space {name}={','.join(map(str, dim.values))})")
        elif dim.kind == "choice" and not all(v is None or isinstance(v, (bool, int, float, str)) for v in dim.values):
            errors.append(f"{name}: Optuna chooses among numbers, strings and booleans only; got {dim.describe()}")
    return errors


def distributions(space: dict[str, Dimension]) -> dict[str, Any]:
    """Each dimension as an Optuna distribution: what the define-by-run space samples and what a
    warm-start trial is recorded with, so the sampler reads both alike."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    return {name: CategoricalDistribution(list(dim.values)) if dim.kind == "choice"
            else FloatDistribution(*dim.values, log=dim.kind == "loguniform") for name, dim in space.items()}


def uses_step_size(point: dict[str, Any], base_solver: str) -> bool:
    """Whether the point's solver (searched, or the sweep's fixed one) takes fixed steps."""
    return point.get(SOLVER, base_solver) in FIXED_STEP_SOLVERS


def conditional(point: dict[str, Any], base_solver: str) -> dict[str, Any]:
    """The point without a step_size its adaptive solver would ignore."""
    return {k: v for k, v in point.items() if k != STEP_SIZE or uses_step_size(point, base_solver)}


class ConditionalSpace:
    """Optuna's define-by-run space: every dimension, step_size last and only for fixed-step
    solvers. A class, not a closure, so Tune can pickle the searcher into its checkpoints."""

    def __init__(self, space: dict[str, Dimension], base_solver: str):
        self.shapes = distributions(space)
        self.base_solver = base_solver

    def __call__(self, trial) -> None:
        from optuna.distributions import CategoricalDistribution

        point: dict[str, Any] = {}
        for name in sorted(self.shapes, key=lambda n: n == STEP_SIZE):  # the solver is known before its step
            if name == STEP_SIZE and not uses_step_size(point, self.base_solver):
                continue
            shape = self.shapes[name]
            if isinstance(shape, CategoricalDistribution):
                point[name] = trial.suggest_categorical(name, shape.choices)
            else:
                point[name] = trial.suggest_float(name, shape.low, shape.high, log=shape.log)


# -- a warm start from an earlier sweep ---------------------------------------------------------------


def warm_trials(experiment: str, space: dict[str, Dimension], base_solver: str,
                objectives: Sequence[Objective]) -> list:
    """The finished trials of `experiment` inside `space`, as completed Optuna trials with their
    objective values measured as a running sweep measures them (odenet.objectives.values). Trials
    stopped, diverged or failed are left out: they have no final result."""
    import optuna

    from odenet.objectives import values

    flag = f"--warm-start-from {experiment}"
    tracking.check_server()
    client = tracking.client()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SweepError([f"{flag}: no such MLflow experiment at {tracking.tracking_uri()}; give the experiment "
                          f"of an earlier sweep (its --experiment, or its name)"])
    runs = [run for run in client.search_runs([found.experiment_id], "attributes.status = 'FINISHED'",
                                              max_results=50_000)
            if run.data.tags.get(ROLE_TAG) != PARENT]
    if not runs:
        raise SweepError([f"{flag}: the experiment has no finished trial to start from; give a sweep whose trials "
                          f"finished, or leave out --warm-start-from"])
    shapes = distributions(space)
    trials, outside, unmeasured = [], 0, 0
    for run in runs:
        logged = run.data.params
        if any(name not in logged for name in space):
            outside += 1
            continue
        point = conditional({name: typed(dim, logged[name]) for name, dim in space.items()},
                            logged.get(SOLVER, base_solver))
        if point_problem({name: space[name] for name in point}, point) is not None:
            outside += 1
            continue
        measured = values(run.data.metrics, [o.name for o in objectives])
        if any(v != v for v in measured.values()):  # NaN: a run that did not log what an objective needs
            unmeasured += 1
            continue
        trials.append(optuna.trial.create_trial(
            params=point, distributions={name: shapes[name] for name in point},
            values=[measured[o.name] for o in objectives], user_attrs={"mlflow_run_id": run.info.run_id}))
    if not trials:
        raise SweepError([f"{flag}: none of its {len(runs)} finished trials can start this search ({outside} lie "
                          f"outside this search space, {unmeasured} did not log every objective's metrics); "
                          f"give a sweep over the same space"])
    return trials


# -- the searcher and the scheduler -----------------------------------------------------------------


def searcher(chosen: Plan, space: dict[str, Dimension], base_solver: str, seed: int,
             points: Sequence[dict[str, Any]] = (), warm: Sequence = ()):
    """The plan's searcher (not yet behind a ConcurrencyLimiter). HyperOpt takes Tune's space from the
    Tuner; Optuna brings its own define-by-run space (so the Tuner's param_space stays empty), its
    study holding the `warm` trials, and evaluates first the `points` not among them."""
    if chosen.searcher == HYPEROPT:
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(points_to_evaluate=list(points) or None, random_state_seed=seed)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    # Ray's evaluated_rewards cannot take a define-by-run space nor several objectives: the
    # earlier trials go into the study itself, which OptunaSearch then loads by name (quietly:
    # Optuna's "using an existing study" line would read like a resumed sweep).
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME,
                                directions=["maximize" if o.direction == MAX else "minimize"
                                            for o in chosen.objectives])
    study.add_trials(list(warm))
    known = [trial.params for trial in warm]
    fresh = [p for p in (conditional(point, base_solver) for point in points) if p not in known]
    return OptunaSearch(ConditionalSpace(space, base_solver), metric=chosen.metric, mode=chosen.mode,
                        points_to_evaluate=fresh or None,
                        sampler=optuna.samplers.TPESampler(seed=sampler_seed(seed, warm)),
                        study_name=STUDY_NAME, storage=storage)


def sampler_seed(seed: int, warm: Sequence) -> int:
    """The TPE sampler's seed: --searcher-seed, moved to another stream by a warm start. TPE's first
    proposals are random draws from its seed whatever the study holds, so the earlier sweep's seed
    would propose the earlier sweep's points again, and they would train twice."""
    if not warm:
        return seed
    import numpy as np

    return int(np.random.SeedSequence([seed, len(warm)]).generate_state(1)[0])


def scheduler(chosen: Plan, max_epochs: int, grace_period: int, reduction_factor: float):
    """ASHA over epochs, or None (Tune's FIFO: every trial trains to early stopping)."""
    if chosen.scheduler != ASHA:
        return None
    from ray.tune.schedulers import ASHAScheduler

    # max_t beyond the last epoch: ASHA stops trials between rungs, while a trial that
    # reaches max_epochs ends by itself and still evaluates on the test set.
    return ASHAScheduler(time_attr="epoch", max_t=max_epochs + 1, grace_period=grace_period,
                         reduction_factor=reduction_factor)
