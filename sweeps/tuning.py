"""What the sweep programs share: the trial, the flags every sweep takes, and a sweep started
(or restored) with its MLflow parent run, ready for the program's Tuner.

A trial is one `odenet.run.execute` call: the same training function as `odenet train`,
reporting each epoch (metrics and checkpoint) to Tune and to its own MLflow child run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

from ray import tune

from odenet import envvars, sweep_record, tracking
from odenet.config import ConfigError, RunConfig
from odenet.failures import Diverged
from odenet.models import build, parameter_counts
from odenet.objectives import Objective, so_far, values
from odenet.progress import OFF as NO_PROGRESS
from odenet.progress import check as check_output_settings
from odenet.tracker import IDENTITY_TAG, MlflowTracker
from odenet.report import SEARCH
from odenet.run import execute, resumed
from sweeps import estimate, naming, places, searchers, trial_checkpoints
from sweeps.space import Dimension, SweepError, check_cells, check_space, describe_space

# What a sweep's trials are measured on when its program names no searcher plan (the designs:
# no searcher, no scheduler): the study's one objective.
DEFAULT_OBJECTIVES = (searchers.VAL_ACC,)
# How long a trial waits for its epoch metrics to reach MLflow before reporting the epoch to
# Tune; longer than a healthy server needs, short enough not to stall training in an outage.
METRICS_BEFORE_REPORT_S = 15.0
# A trial's state as the tables show it: the trial itself reports RUNNING after each epoch and
# FINISHED or DIVERGED at its end; a trial the scheduler stopped between epochs reads STOPPED.
STOPPED = "STOPPED"
# Checkpoints kept per trial (each epoch makes one). It also bounds what a lost head (the
# driver dies with it) costs: Tune uploads the sweep's state, which names each trial's latest
# checkpoint, at once when a trial has made this many checkpoints since the last upload, and
# otherwise at least every 10 s (Tune's "auto" snapshot period, which grows only when a
# snapshot takes over half a second). Tune deletes the checkpoint the last upload named at that
# same moment; a head lost before the new upload lands would leave a state naming deleted
# checkpoints, which sweeps/trial_checkpoints.py repairs from the newest one on storage. So a
# restore trains again at most this many epochs of a trial, plus the epoch in flight.
# SyncConfig's sync_period does not enter: in Ray 2.60 it throttles only the upload of trial
# artifacts, which the sweep does not make.
CHECKPOINTS_KEPT = 2


# -- one trial ------------------------------------------------------------------------------


def run_trial(params: dict[str, Any], base: dict[str, Any], experiment: str, parent_run_id: str | None,
              tags: dict[str, str], objectives: Sequence[Objective] = DEFAULT_OBJECTIVES) -> None:
    """A Tune trial: one odenet run, resumed from Tune's checkpoint when the trial restarts. Every
    report holds every objective (odenet/objectives.py) so far: Tune requires the searcher's metrics
    in each, and the report's Pareto front reads them; `objectives` are the searcher's, whose worst
    values a diverged trial reports."""
    import torch

    context = tune.get_context()
    cpus = context.get_trial_resources().required_resources.get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))  # trials share nodes: no oversubscription
    settings, cell_tags = unpack_cell(params)
    config = RunConfig.from_dict(base).replace(**settings)
    with tempfile.TemporaryDirectory(prefix="odenet-trial-") as folder:
        _trial_in(Path(folder), config, experiment, parent_run_id, {**tags, **cell_tags}, context, objectives)


def unpack_cell(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """(settings, tags) of a trial's config: a designed cell ({"cell": {"settings", "tags"}},
    see sweeps/designs.py) is flattened; a searched point has no tags of its own."""
    params = dict(params)
    cell = params.pop("cell", None)
    if cell is None:
        return params, {}
    return {**params, **cell["settings"]}, dict(cell["tags"])


def _trial_in(work: Path, config: RunConfig, experiment: str, parent_run_id: str | None, tags: dict[str, str],
              context, objectives: Sequence[Objective]) -> None:
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        checkpoint.to_directory(str(work))
    history = resumed(work)[1]  # the epochs trained before a restart: the objectives' means include them
    params_total = parameter_counts(build(config))["params_total"]
    tracker = MlflowTracker(
        experiment, run_name=context.get_trial_name(), parent_run_id=parent_run_id,
        extra_tags={IDENTITY_TAG: context.get_trial_id(), "tune_trial_name": context.get_trial_name(),
                    **tags},
    )

    def on_epoch(metrics) -> None:
        # ASHA may stop this process as soon as the epoch is reported: its MLflow metrics go first.
        tracker.sent(timeout_s=METRICS_BEFORE_REPORT_S)
        history.append(metrics.as_dict())
        tune.report({**metrics.as_dict(), **so_far(history, params_total), "trial_status": "RUNNING"},
                    checkpoint=tune.Checkpoint.from_directory(str(work)))

    try:
        outcome = execute(config, checkpoint_dir=work, tracker=tracker, on_epoch=on_epoch)
    except Diverged as exc:
        # Ending normally keeps Tune from retrying a trial that would diverge again; each
        # objective's worst value tells the searcher this point failed.
        tune.report({"epoch": exc.epoch, **{o.name: o.worst for o in objectives}, "trial_status": "DIVERGED",
                     "failure_cause": exc.cause, "failure_detail": exc.detail[:500]})
        return
    last = {**(outcome.fitted.history[-1].as_dict() if outcome.fitted.history else {}), **outcome.final_metrics()}
    tune.report({**last, **values(last), "trial_status": "FINISHED"})


def worker_env() -> dict[str, str]:
    """The tracking, storage and data settings the driver sees, for every Ray worker: never
    a credential (envvars.SECRETS), which workers take from their own environment. No progress
    output in workers: Tune's table, or the driver's bar, is the view."""
    return {**{name: os.environ[name] for name in envvars.FOR_WORKERS
               if os.environ.get(name) and name not in envvars.SECRETS}, envvars.PROGRESS: NO_PROGRESS}


class CloseTrialRuns(tune.Callback):
    """Closes the MLflow runs of trials Tune ended from outside: stopped by ASHA, or errored."""

    def __init__(self, experiment: str):
        self.experiment = experiment

    def on_trial_complete(self, iteration, trials, trial, **info):
        # A trial that ended between epochs was stopped by the scheduler: KILLED, as the
        # trial itself marks its run when interrupted, with the reason beside it.
        if (trial.last_result or {}).get("trial_status") == "RUNNING":
            # The progress table and the results table read the trial's state from here:
            # stopped, not running.
            trial.last_result["trial_status"] = STOPPED
            self._close(trial, "KILLED", {"stopped_by": "asha"})

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial, "FAILED", {"failure_cause": "trial_error"})

    def _close(self, trial, status: str, tags: dict[str, str]) -> None:
        try:
            sweep_record.close_trial_run(self.experiment, trial.trial_id, status, tags)
        except Exception as exc:  # never take the sweep down for bookkeeping
            print(f"could not close the MLflow run of trial {trial.trial_id}: {exc}")


# Short column names for the live progress table, so it fits a terminal.
SHORT_NAMES = {"activation_before": "act_before", "activation_inside": "act_inside", "stride": "stride",
               "final_time": "T_n", "norm": "norm", "augment_dims": "A", "lr": "lr", "weight_decay": "wd",
               "optimizer": "opt", "model": "model", "dataset": "data", "seed": "seed"}
PROGRESS_METRICS = {"epoch": "epoch", "val_acc": "val_acc", "fnfe": "fnfe", "bnfe": "bnfe"}


def progress(space: dict[str, Dimension], designed: bool, objectives: Sequence[Objective],
             ranked: bool = True) -> tune.CLIReporter:
    """The live table: the settings that differ between trials, the epoch, val_acc, FNFE/BNFE, the
    searcher's other objectives, state; with `ranked`, Tune's "current best trial" line above it."""
    if designed:
        columns = {"cell/tags/ablated_dimension": "ablated", "cell/tags/ablated_value": "value",
                   "cell/settings/seed": "seed"}
    else:
        columns = {name: SHORT_NAMES.get(name, name) for name, dim in space.items()
                   if len(dim.values) > 1 or dim.kind not in ("choice", "grid")}
    metrics = {**PROGRESS_METRICS, **{o.name: o.name for o in objectives}, "trial_status": "state"}
    table = Progress(parameter_columns=columns, metric_columns=metrics, max_column_length=10,
                     max_report_frequency=PROGRESS_EVERY_S, sort_by_metric=False)
    table.ranked = ranked
    return table


# The progress table is printed at most this often, and only when a trial's state or epoch changed.
PROGRESS_EVERY_S = 30


class Progress(tune.CLIReporter):
    """Tune's table, printed again only when something in it changed: a trial started, ended or
    reported an epoch (Tune's own prints the same table every interval)."""

    _shown: tuple = ()
    ranked = True  # print Tune's "current best trial" line

    def set_search_properties(self, metric, mode) -> bool:
        # Without Tune's metric the table has no "current best trial" line.
        return super().set_search_properties(metric, mode) if self.ranked else True

    def should_report(self, trials, done: bool = False) -> bool:
        state = tuple((t.trial_id, t.status, (t.last_result or {}).get("epoch"),
                       (t.last_result or {}).get("trial_status")) for t in trials)
        if state == self._shown:  # the last table printed is still true, at the end too
            return False
        if super().should_report(trials, done):
            self._shown = state
            return True
        return False


def trial_folder(trial) -> str:
    return f"trial_{trial.trial_id}"


def results_table(result_grid, dimensions: Sequence[str]):
    """One row per trial (odenet.sweep_record.trial_row) of a finished Tuner.fit()."""
    rows = []
    for result in result_grid:
        settings, tags = unpack_cell(result.config or {})
        metrics = result.metrics or {}
        trial = metrics.get("trial_id") or Path(result.path or "").name
        rows.append(sweep_record.trial_row(trial, {**tags, **settings}, metrics, result.metrics_dataframe,
                                           result.error, dimensions))
    return sweep_record.results_table(rows, dimensions)


# -- the flags every sweep takes --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, program: str) -> None:
    """The flags every sweep program takes, plus one flag per fixed run setting."""
    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--name", help=f"sweep name (default: a new sweep, {program}_DATE_TIME); naming "
                                      f"an unfinished sweep again restores it")
    sweep.add_argument("--resume", metavar="NAME", help="restore the unfinished sweep NAME; never starts a new one")
    sweep.add_argument("--estimate", action="store_true",
                       help="print the trials, trial-epochs and device-hours these flags imply, and stop")
    sweep.add_argument("--estimate-gpus", type=int, default=8, metavar="N",
                       help="with --estimate: the GPUs the hours are shared over (default: 8)")
    sweep.add_argument("--storage-path",
                       help="sweep state and trial checkpoints: a folder or s3://bucket/prefix (default: ray_results "
                            "in the working directory; under $ODENET_HOME, default ~/odenet, in a Ray job)")
    sweep.add_argument("--experiment", help="MLflow experiment (default: the sweep name)")
    sweep.add_argument("--num-samples", type=int, default=32, help="trials to run (default: 32)")
    sweep.add_argument("--max-concurrent", type=int, default=4, help="trials running at once (default: 4)")
    sweep.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial (default: 1)")
    sweep.add_argument("--gpus-per-trial", type=float, default=0.0,
                       help="GPUs per trial; fractions put several trials on one GPU (default: 0)")
    sweep.add_argument("--max-failures", type=int, default=2,
                       help="restarts of a trial whose process or node died (default: 2)")
    sweep.add_argument("--searcher-seed", type=int, default=0, help="seed of the search algorithm (default: 0)")
    sweep.add_argument("--smoke", action="store_true",
                       help="the same sweep sized to finish in minutes on a 2-core CPU")
    RunConfig.add_arguments(parser)


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
               smoke: dict[str, Any]) -> tuple[argparse.Namespace, RunConfig]:
    """The flags and the trials' fixed settings. With --smoke, the program's SMOKE values stand in
    for every flag or run setting not given: defaults < SMOKE < --config file < flags."""
    args = parser.parse_args(argv)
    if not args.smoke:
        return args, RunConfig.from_args(args)
    settings = {f.name for f in fields(RunConfig)}
    parser.set_defaults(**{k: v for k, v in smoke.items() if k not in settings})
    args = parser.parse_args(argv)
    return args, RunConfig.from_args(args, defaults={k: v for k, v in smoke.items() if k in settings})


def check_resources(args: argparse.Namespace, on_cluster: bool) -> list[str]:
    errors = []
    if args.cpus_per_trial <= 0:
        errors.append(f"--cpus-per-trial {args.cpus_per_trial:g}: expected a number > 0")
    if args.gpus_per_trial < 0:
        errors.append(f"--gpus-per-trial {args.gpus_per_trial:g}: expected a number >= 0")
    if args.num_samples < 1:
        errors.append(f"--num-samples {args.num_samples}: expected at least 1")
    if args.max_concurrent < 1:
        errors.append(f"--max-concurrent {args.max_concurrent}: expected at least 1")
    if args.gpus_per_trial > 0 and not on_cluster:
        import torch

        # A local Ray has the GPUs this machine has; on a cluster, GPU workers may
        # autoscale from zero, so trials wait for them instead.
        if torch.cuda.device_count() == 0:
            errors.append(f"--gpus-per-trial {args.gpus_per_trial:g}: this machine has no GPU and no Ray "
                          f"cluster is set (RAY_ADDRESS); use --gpus-per-trial 0 or submit to a GPU cluster")
    return errors


# -- a sweep, started ----------------------------------------------------------------------------------------


@dataclass
class Sweep:
    """A sweep named, its places settled, Ray and its MLflow parent run started: what a program's
    Tuner needs besides its space, searcher and scheduler."""

    name: str
    experiment: str
    space: dict[str, Dimension]
    designed: bool  # a list of cells (sweeps/designs.py) rather than a searched space
    columns: Sequence[str]  # results-table columns after the space's (a design's seed, ablated dimension)
    where: places.Places
    restoring: bool
    parent_run_id: str
    trainable: Any  # run_trial with the sweep's fixed settings and per-trial resources
    num_samples: int
    max_concurrent: int
    max_failures: int
    objectives: Sequence[Objective] = DEFAULT_OBJECTIVES  # the searcher's; Tune's metric is the first
    # Whether the progress table names a best trial: not for an Optuna search, whose several
    # objectives have no one best, and whose trials may lack the conditional step_size that
    # Tune's best-trial line looks up (and fails on).
    ranked: bool = True

    def fit(self, param_space: dict[str, Any], search_alg=None, scheduler=None):
        """Run the sweep, the unfinished one restored where it stopped or a new Tuner over
        `param_space` with the program's searcher and scheduler; then finish it (the results table)."""
        path, filesystem = self.where.tune_storage
        if self.restoring:
            tuner = tune.Tuner.restore(f"{path}/{self.name}", self.trainable, resume_unfinished=True,
                                       resume_errored=True, storage_filesystem=filesystem)
        else:
            tuner = tune.Tuner(self.trainable, param_space=param_space,
                               tune_config=self._tune_config(search_alg, scheduler), run_config=self.run_config())
        return self.finish(tuner.fit())

    def _tune_config(self, search_alg, scheduler) -> tune.TuneConfig:
        """The objective, the program's searcher and scheduler, and how many trials run, how many at once.
        Tune's metric is one name: the first objective (ASHA's, with one); a searcher of several
        objectives holds them all itself."""
        first = self.objectives[0]
        return tune.TuneConfig(metric=first.name, mode=first.direction, search_alg=search_alg, scheduler=scheduler,
                               num_samples=self.num_samples, max_concurrent_trials=self.max_concurrent,
                               # short trial names and folders: the settings are in the table and in
                               # MLflow, not in the name
                               trial_name_creator=trial_folder, trial_dirname_creator=trial_folder)

    def run_config(self) -> tune.RunConfig:
        """Where Tune keeps the sweep, how it retries a trial, what it prints and who closes trial runs."""
        path, filesystem = self.where.tune_storage
        return tune.RunConfig(
            name=self.name,
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=tune.FailureConfig(max_failures=self.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
            callbacks=[CloseTrialRuns(self.experiment)],
            progress_reporter=progress(self.space, self.designed, self.objectives, self.ranked),
            verbose=1,
        )

    def finish(self, result_grid):
        """Print the results table, log it to the parent run (which finishes) and say where things are."""
        table = results_table(result_grid, [*self.space, *self.columns])
        print(table.to_markdown(index=False, floatfmt=".4g"))
        sweep_record.finish_parent_run(self.parent_run_id, table)
        print(f"results logged to MLflow run {self.parent_run_id} (experiment {self.experiment!r})")
        tracking.print_ui_hint(self.experiment, params=[*self.space])
        print(f"sweep {self.name!r} done: {self.where.describe(self.name)}")
        return table


def start(args: argparse.Namespace, base: RunConfig, space: dict[str, Dimension], program: str, *,
          design: str = SEARCH, cells: list[dict[str, Any]] | None = None, num_samples: int | None = None,
          columns: Sequence[str] = (), parent_params: dict[str, str] | None = None,
          searched_epochs: float | None = None, plan: searchers.Plan | None = None) -> Sweep | None:
    """Check everything, then start the sweep (a new one or the unfinished one named again); with
    --estimate, print what it would cost instead and return None. `cells`: a designed list of
    trials (sweeps/designs.py) over `space`; `num_samples`: 1 where a grid lists every trial
    (default: --num-samples); `searched_epochs`: the mean epochs of a searched trial under the
    program's scheduler, for --estimate (default: max_epochs); `plan`: a search's searcher, objectives
    and scheduler (sweeps/searchers.py), recorded on the parent run and reported by every trial."""
    on_cluster = bool(os.environ.get(envvars.RAY_ADDRESS))
    errors = check_cells(cells, base) if cells is not None else check_space(space, base)
    errors += check_resources(args, on_cluster)
    if errors:
        raise SweepError(errors)
    num_samples = args.num_samples if num_samples is None else num_samples
    if args.estimate:
        print("\n".join(cost(base, space, cells, num_samples, searched_epochs).lines(gpus=args.estimate_gpus)))
        return None
    name = naming.sweep_name(args.name, args.resume, program)
    experiment = args.experiment or name
    base = with_data(base, on_cluster)
    where = places.settle(args.storage_path)  # in a Ray job: out of Ray's temporary working directory
    tracking.check_server()
    tracking.pin_embedded_store()
    restoring = naming.restoring(name, bool(args.resume), *where.tune_storage, experiment)
    print(naming.announce(name, restoring, experiment, where), flush=True)

    # Tune's classic progress table, whose columns we choose (the newer output prints every
    # trial's whole config): see progress().
    os.environ.setdefault(envvars.RAY_AIR_NEW_OUTPUT, "0")
    import ray

    ray.init(runtime_env={"env_vars": worker_env()}, log_to_driver=True)
    if args.gpus_per_trial > 0 and ray.cluster_resources().get("GPU", 0) < args.gpus_per_trial:
        print("no GPU in the cluster yet: trials wait for the autoscaler to add GPU workers", flush=True)
    params = {"program": program, "design": design, "search_space": describe_space(space),
              "base_config": json.dumps(base.to_dict()), "num_samples": str(num_samples),
              "storage_path": where.storage_path, **(plan.params() if plan else {}), **(parent_params or {})}
    parent = sweep_record.start_parent_run(experiment, name, params, restoring, design)
    objectives = plan.objectives if plan else DEFAULT_OBJECTIVES
    trial = tune.with_parameters(run_trial, base=base.to_dict(), experiment=experiment, parent_run_id=parent,
                                 tags={"design": design}, objectives=objectives)
    return Sweep(name=name, experiment=experiment, space=space, designed=cells is not None, columns=columns,
                 where=where, restoring=restoring, parent_run_id=parent,
                 trainable=trial_checkpoints.restoring_newest(
                     tune.with_resources(trial, {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial}),
                     kept=CHECKPOINTS_KEPT),
                 num_samples=num_samples, max_concurrent=args.max_concurrent, max_failures=args.max_failures,
                 objectives=objectives, ranked=plan is None or plan.searcher == searchers.HYPEROPT)


def with_data(base: RunConfig, on_cluster: bool) -> RunConfig:
    """The trials' config with an absolute data folder. On this machine the data set is loaded
    once here, so that a missing one fails the sweep before any trial, not every trial."""
    from odenet import data

    if not on_cluster and base.data_dir is None:
        base = base.replace(data_dir=str(data.default_data_dir().expanduser().resolve()))
    elif base.data_dir is not None:
        base = base.replace(data_dir=str(Path(base.data_dir).expanduser().resolve()))
    if not on_cluster:
        data.load(base, "cpu")
    return base


def cost(base: RunConfig, space: dict[str, Dimension], cells: list[dict[str, Any]] | None, num_samples: int,
         searched_epochs: float | None) -> estimate.Estimate:
    """What the sweep will cost (sweeps/estimate.py): designed cells and grids trial by trial;
    `num_samples` searched trials of `searched_epochs` each (default: max_epochs)."""
    if cells is not None:
        trials = [([base.replace(**cell["settings"])], base.max_epochs) for cell in cells]
    elif all(dim.kind == "grid" for dim in space.values()):
        grid = [dict(zip(space, values)) for values in itertools.product(*(d.values for d in space.values()))]
        trials = [([base.replace(**point)], base.max_epochs) for point in grid]
    else:
        epochs = base.max_epochs if searched_epochs is None else searched_epochs
        trials = [(estimate.alternatives(space, base), epochs)] * num_samples
    return estimate.estimate(trials)


def main(program: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> int:
    """Run a sweep program, turning bad input into one clear message and exit code 2."""
    from odenet.data import DataError

    try:
        check_output_settings()
        program(argv)
    except (SweepError, ConfigError, DataError, tracking.TrackingError, naming.SweepNameError,
            places.PlaceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
