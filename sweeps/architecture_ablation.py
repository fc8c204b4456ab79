"""The architecture ablation: which design choices make an ODEnet train well.

Two designs, one space. --design search (the default): HyperOptSearch (seeded with the
study's own settings) proposes trials and the ASHA scheduler stops the unpromising ones
early: it finds good settings. --searcher optuna --objectives val_acc:max,epoch_time:min
weighs cost against accuracy instead (Optuna's TPE, every trial to early stopping), and
--warm-start-from EXPERIMENT tells it an earlier sweep's results first (sweeps/searchers.py).
--design one-at-a-time: from a base setting (the study's, --base-file, or
--base-from-experiment of a search), each dimension varies alone over its
values, every cell over --seeds seeds, every trial to early stopping: it measures each
setting's effect, with intervals (`odenet report`). Every trial is an MLflow child run of
the sweep's parent run. Run it on a Ray cluster or on this machine:

    ray job submit --working-dir . -- python sweeps/architecture_ablation.py
    python sweeps/architecture_ablation.py --smoke
    python sweeps/architecture_ablation.py --design one-at-a-time --dimensions final_time,norm --seeds 3

Override the space with --space NAME=VALUES (e.g. --space final_time=1,2
--space lr=loguniform:1e-4:1e-2) or a YAML --space-file; --speed-levers adds the
training solver and the regulariser weights (see BENCHMARKS.md) to it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from ray import tune
from ray.tune.search import ConcurrencyLimiter

from odenet.config import STEM_SETTINGS, RunConfig
from odenet.report import ONE_AT_A_TIME, SEARCH
from sweeps import designs, estimate, searchers, tuning
from sweeps.space import (Dimension, SweepError, build_space, choice, complete_point, load_points, loguniform,
                          point_problem)

PROGRAM = "architecture_ablation"

# The search space: every dimension the study varies, as declared once here.
SEARCH_SPACE = {
    "activation_before": choice("none", "relu", "tanh", "softplus"),
    "activation_inside": choice("relu", "tanh", "softplus"),
    "stride": choice(1, 2),
    "final_time": choice(1, 2, 5, 10),
    "norm": choice("groupnorm", "batchnorm", "none"),
    "augment_dims": choice(0, 1, 2, 3, 4, 5),
    "lr": loguniform(1e-5, 1e-2),
    "weight_decay": loguniform(1e-6, 1e-2),
    "optimizer": choice("adam", "sgd"),
}

# --speed-levers: the levers of BENCHMARKS.md that change results, as searched dimensions,
# so that a searcher given a cost objective (--searcher optuna --objectives
# val_acc:max,epoch_time:min) weighs a cheaper training solve against accuracy. Trials validate and
# test with dopri5 at the study's tolerance whatever they train with (eval_solver), so
# val_acc and test_acc stay comparable across trials; step_size matters to rk4 and euler only.
SPEED_SPACE = {
    "solver": choice("dopri5", "bosh3", "rk4", "euler"),
    "step_size": choice(0.25, 0.5, 1.0),
    "kinetic_energy": choice(0.0, 0.01, 0.1, 1.0),
    "jacobian_norm": choice(0.0, 0.01, 0.1),
}
SPEED_EVAL_SOLVER = "dopri5"
# Where the study's points sit on those dimensions: the unregularised dopri5 solve.
STUDY_SPEED_VALUES = {"solver": "dopri5", "step_size": 0.25, "kinetic_energy": 0.0, "jacobian_norm": 0.0}

# The study's own settings, evaluated first so the searcher starts from known ground.
STUDY_POINTS = [
    {"activation_before": "relu", "activation_inside": "relu", "stride": 2, "final_time": 1,
     "norm": "groupnorm", "augment_dims": 2, "lr": 1e-3, "weight_decay": 1e-5, "optimizer": "adam"},
    {"activation_before": "none", "activation_inside": "tanh", "stride": 2, "final_time": 1,
     "norm": "groupnorm", "augment_dims": 2, "lr": 1e-3, "weight_decay": 1e-5, "optimizer": "adam"},
]

# --smoke: the same code path, small enough for a 2-core CPU in a few minutes; each value
# stands in for a flag or run setting not given.
SMOKE = {"subset": 1024, "test_subset": 500, "width": 8, "max_epochs": 3, "batch_size": 64,
         "num_samples": 6, "max_concurrent": 2, "grace_period": 1, "reduction_factor": 2}
# --smoke --design one-at-a-time ablates this one dimension unless --dimensions is given.
SMOKE_DIMENSIONS = "activation_before"


def architecture_ablation(argv: Sequence[str] | None = None):
    """The search: the plan's searcher (sweeps/searchers.py) behind a ConcurrencyLimiter and its
    scheduler, ASHA over epochs or FIFO (or the one-at-a-time design)."""
    args, base, space, points, chosen = prepare(argv)
    if args.design == ONE_AT_A_TIME:
        return one_at_a_time(args, base, space)
    print(chosen.describe(), flush=True)
    epochs = None  # FIFO: every trial to max_epochs (or early stopping)
    if chosen.scheduler == searchers.ASHA:
        epochs = estimate.asha_epochs(args.num_samples, base.max_epochs, args.grace_period,
                                      args.reduction_factor) / max(args.num_samples, 1)
    # The earlier sweep is read before Ray starts, so that a bad one stops the sweep at once
    # (--estimate needs no tracking server, and the earlier results change no cost).
    warm = () if args.estimate or not chosen.warm_start_from else searchers.warm_trials(
        chosen.warm_start_from, space, base.solver, chosen.objectives)
    sweep = tuning.start(args, base, space, PROGRAM, searched_epochs=epochs, plan=chosen)
    if sweep is None:  # --estimate printed the cost
        return None
    searcher = ConcurrencyLimiter(searchers.searcher(chosen, space, base.solver, args.searcher_seed, points, warm),
                                  max_concurrent=args.max_concurrent)
    scheduler = searchers.scheduler(chosen, base.max_epochs, args.grace_period, args.reduction_factor)
    # Optuna's define-by-run space is its own: Tune's param_space must not search it again.
    param_space = {} if chosen.searcher == searchers.OPTUNA else {name: dim.to_tune() for name, dim in space.items()}
    return sweep.fit(param_space, searcher, scheduler)


def one_at_a_time(args: argparse.Namespace, base: RunConfig, space: dict[str, Dimension]):
    """Every cell of a one-at-a-time ablation around the base point, each a trial trained to the same
    budget and early stopping: no searcher, no scheduler."""
    requested = SMOKE_DIMENSIONS if args.smoke and args.dimensions is None else args.dimensions
    dimensions = designs.check_dimensions(space, requested)
    base_point = {k: v for k, v in {**STUDY_SPEED_VALUES, **STUDY_POINTS[0]}.items() if k in space}
    if args.base_file:
        base_point.update(designs.base_from_file(args.base_file, space))
    elif args.base_from_experiment:
        best = designs.best_trial_settings(args.base_from_experiment, list(space), "--base-from-experiment")
        base_point.update({name: designs.typed(space[name], value) for name, value in best.items()})
    missing = [name for name in space if name not in base_point]
    if missing:
        raise SweepError([f"the base has no value for {', '.join(missing)}: give it in --base-file"])
    seeds = [base.seed + i for i in range(args.seeds or 3)]
    cells = designs.cells(space, base_point, dimensions, seeds)
    sweep = tuning.start(args, base, space, PROGRAM, design=ONE_AT_A_TIME, cells=cells, num_samples=1,
                         columns=("seed", "ablated_dimension"),
                         parent_params={"dimensions": ",".join(dimensions), "seeds": str(len(seeds)),
                                        "base_point": json.dumps(base_point)})
    if sweep is None:  # --estimate printed the cost
        return None
    return sweep.fit({"cell": tune.grid_search(cells)})


def first_points(space: dict[str, Dimension], given: list[dict]) -> list[dict]:
    """Points the searcher evaluates first: the user's (--points-file), then those of the
    study's own settings that lie inside the space. Dimensions fixed to one value are filled in."""
    points = [complete_point(space, point) for point in given]
    for point in STUDY_POINTS:
        candidate = complete_point(space, {k: v for k, v in {**STUDY_SPEED_VALUES, **point}.items() if k in space})
        if point_problem(space, candidate) is None and candidate not in points:
            points.append(candidate)
    return points


def prepare(argv: Sequence[str] | None) -> tuple[argparse.Namespace, RunConfig, dict[str, Dimension], list[dict],
                                               searchers.Plan | None]:
    """The flags, the trials' base config, the space, the searcher's first points and the search's
    plan (None for the one-at-a-time design); every problem with them reported before Ray starts."""
    args, base = parse_args(argv)
    declared = SEARCH_SPACE
    if args.speed_levers:
        declared = {**SEARCH_SPACE, **SPEED_SPACE}
        if base.eval_solver is None:
            base = base.replace(eval_solver=SPEED_EVAL_SOLVER)
    if base.is_complex:
        # The complex models have no stem: its settings leave the declared space (a --space
        # that names them again is refused, as every setting the model would ignore).
        declared = {k: v for k, v in declared.items() if k not in STEM_SETTINGS}
    space = build_space(declared, args.space_file, args.space)
    points = first_points(space, load_points(args.points_file, space))
    errors, chosen = [], None
    if args.grace_period < 1:
        errors.append(f"--grace-period {args.grace_period}: expected at least 1")
    if args.reduction_factor <= 1:
        errors.append(f"--reduction-factor {args.reduction_factor:g}: expected a number > 1")
    if args.design == SEARCH:
        given = [flag for flag, value in (("--seeds", args.seeds), ("--dimensions", args.dimensions),
                                          ("--base-file", args.base_file),
                                          ("--base-from-experiment", args.base_from_experiment)) if value is not None]
        if given:
            errors.append(f"{', '.join(given)}: only for --design one-at-a-time")
        try:
            chosen = searchers.plan(args.searcher, args.objectives, args.scheduler, args.warm_start_from)
        except SweepError as exc:
            errors += exc.errors
        if args.searcher == searchers.OPTUNA:
            errors += searchers.optuna_space_problems(space)
    else:
        searching = [flag for flag, given in (("--searcher optuna", args.searcher == searchers.OPTUNA),
                                              ("--objectives", args.objectives is not None),
                                              ("--warm-start-from", args.warm_start_from is not None)) if given]
        if searching:
            errors.append(f"{', '.join(searching)}: only for --design search (a design has no searcher)")
        if args.seeds is not None and args.seeds < 1:
            errors.append(f"--seeds {args.seeds}: expected at least 1")
    if errors:
        raise SweepError(errors)
    return args, base, space, points, chosen


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, RunConfig]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tuning.add_arguments(parser, PROGRAM)
    parser.add_argument("--design", choices=(SEARCH, ONE_AT_A_TIME), default=SEARCH,
                        help="search: HyperOptSearch + ASHA over the whole space, to find good settings (default); "
                             "one-at-a-time: vary one dimension at a time from a base over --seeds seeds, "
                             "to measure each setting's effect with intervals")
    searchers.add_arguments(parser)
    asha = parser.add_argument_group("search: ASHA scheduler (over epochs; max epochs is --max-epochs)")
    asha.add_argument("--scheduler", choices=(searchers.ASHA, searchers.FIFO),
                      help="asha stops unpromising trials early; fifo trains every trial to early stopping "
                           "(default: asha with one objective, fifo with several)")
    asha.add_argument("--grace-period", type=int, default=2, help="epochs before a trial may be stopped (default: 2)")
    asha.add_argument("--reduction-factor", type=float, default=2, help="keep 1 in this many at each rung (default: 2)")
    oat = parser.add_argument_group("one-at-a-time design")
    oat.add_argument("--seeds", type=int, help="seeds per cell: initial weights and batch order; the validation "
                                               "split stays fixed (default: 3)")
    oat.add_argument("--dimensions", metavar="A,B", help="the dimensions to ablate (default: every searched one; "
                                                         f"with --smoke: {SMOKE_DIMENSIONS})")
    where = oat.add_mutually_exclusive_group()
    where.add_argument("--base-file", metavar="FILE", help="YAML mapping of dimensions to the base's values "
                                                           "(default: the study's setting)")
    where.add_argument("--base-from-experiment", metavar="NAME",
                       help="the base is the best finished trial of this earlier search")
    parser.add_argument("--space", action="append", metavar="NAME=VALUES",
                        help="override a dimension: relu,tanh (a choice), loguniform:1e-4:1e-2, uniform:0:1")
    parser.add_argument("--space-file", metavar="FILE", help="YAML mapping of dimensions to lists or {loguniform: [a, b]}")
    parser.add_argument("--speed-levers", action="store_true",
                        help="also search the training solver, its step size and the kinetic-energy and "
                             "Jacobian regulariser weights (validation and test stay dopri5)")
    parser.add_argument("--points-file", metavar="FILE",
                        help="YAML/JSON list of settings to evaluate first, before the study's own")
    return tuning.parse_args(parser, argv, SMOKE)


if __name__ == "__main__":
    sys.exit(tuning.main(architecture_ablation))
