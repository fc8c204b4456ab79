"""Ray Tune machinery shared by the study's sweep programs.

A trial is one `odenet.run.execute` call: the same training function as `odenet
train`, reporting each epoch (metrics and checkpoint) to Tune and to its own MLflow
child run. Everything here is about searching: the search space, resources, storage,
restoring a sweep, and the results table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

from odenet import envvars, tracking
from odenet.config import ConfigError, RunConfig, read_settings_file
from odenet.failures import Diverged
from odenet.provenance import git_commit
from odenet.report import SEARCH
from odenet.run import execute
from odenet.summary import summarize
from odenet.tracker import IDENTITY_TAG, MlflowTracker
from sweeps import naming, places

# The one place the sweep's objective is named: the searcher, the scheduler and the
# results table all read it from here.
METRIC, MODE = "val_acc", "max"
# How long a trial waits for its epoch metrics to reach MLflow before reporting the epoch to
# Tune; longer than a healthy server needs, short enough not to stall training in an outage.
METRICS_BEFORE_REPORT_S = 15.0
# Fields that describe where a run happens rather than what it is: never searched.
NOT_SEARCHABLE = ("data_dir", "device")
SAMPLERS = ("loguniform", "uniform")


class SweepError(ValueError):
    """Bad sweep arguments; raised before Ray starts any trial."""

    def __init__(self, errors: Sequence[str]):
        self.errors = list(errors)
        super().__init__("invalid sweep:\n  " + "\n  ".join(self.errors))


# -- the search space -------------------------------------------------------------------


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


def build_space(declared: dict[str, Any], args: argparse.Namespace) -> dict[str, Dimension]:
    """The declared space, then a --space-file, then --space flags (each overrides the last)."""
    space = {name: dimension(name, spec) for name, spec in declared.items()}
    if args.space_file:
        loaded = read_settings_file(args.space_file, "--space-file") or {}
        if not isinstance(loaded, dict):
            raise SweepError([f"--space-file {args.space_file}: expected a mapping of dimension names to values"])
        space.update({name: dimension(name, spec) for name, spec in loaded.items()})
    errors = []
    for flag in args.space or []:
        name, sep, spec = flag.partition("=")
        if not sep or not name:
            errors.append(f"--space {flag!r}: expected NAME=VALUES, e.g. final_time=1,2 or lr=loguniform:1e-4:1e-2")
            continue
        space[name.strip()] = dimension(name.strip(), spec)
    if errors:
        raise SweepError(errors)
    return space


# -- one trial ------------------------------------------------------------------------------


def run_trial(params: dict[str, Any], base: dict[str, Any], experiment: str, parent_run_id: str | None,
              tags: dict[str, str]) -> None:
    """A Tune trial: one odenet run, resumed from Tune's checkpoint when the trial restarts."""
    import torch
    from ray import tune

    context = tune.get_context()
    cpus = context.get_trial_resources().required_resources.get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))  # trials share nodes: no oversubscription
    settings, cell_tags = unpack_cell(params)
    config = RunConfig.from_dict(base).replace(**settings)
    with tempfile.TemporaryDirectory(prefix="odenet-trial-") as folder:
        _trial_in(Path(folder), config, experiment, parent_run_id, {**tags, **cell_tags}, context)


def unpack_cell(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """(settings, tags) of a trial's config: a designed cell ({"cell": {"settings", "tags"}},
    see sweeps/designs.py) is flattened; a searched point has no tags of its own."""
    params = dict(params)
    cell = params.pop("cell", None)
    if cell is None:
        return params, {}
    return {**params, **cell["settings"]}, dict(cell["tags"])


def _trial_in(work: Path, config: RunConfig, experiment: str, parent_run_id: str | None, tags: dict[str, str],
              context) -> None:
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        checkpoint.to_directory(str(work))
    tracker = MlflowTracker(
        experiment, run_name=context.get_trial_name(), parent_run_id=parent_run_id,
        extra_tags={IDENTITY_TAG: context.get_trial_id(), "tune_trial_name": context.get_trial_name(),
                    **tags},
    )

    def on_epoch(metrics) -> None:
        # ASHA may stop this process as soon as the epoch is reported: its MLflow metrics go first.
        tracker.sent(timeout_s=METRICS_BEFORE_REPORT_S)
        tune.report({**metrics.as_dict(), "trial_status": "RUNNING"},
                    checkpoint=tune.Checkpoint.from_directory(str(work)))

    try:
        outcome = execute(config, checkpoint_dir=work, tracker=tracker, on_epoch=on_epoch)
    except Diverged as exc:
        # Ending normally keeps Tune from retrying a trial that would diverge again; the
        # worst value of the metric tells the searcher this point failed.
        tune.report({"epoch": exc.epoch, METRIC: 0.0, "trial_status": "DIVERGED", "failure_cause": exc.cause,
                     "failure_detail": exc.detail[:500]})
        return
    last = outcome.fitted.history[-1].as_dict() if outcome.fitted.history else {}
    tune.report({**last, **outcome.final_metrics(), "trial_status": "FINISHED"})


# Short column names for the live progress table, so it fits a terminal.
SHORT_NAMES = {"activation_before": "act_before", "activation_inside": "act_inside", "stride": "stride",
               "final_time": "T_n", "norm": "norm", "augment_dims": "A", "lr": "lr", "weight_decay": "wd",
               "optimizer": "opt", "model": "model", "dataset": "data", "seed": "seed"}
PROGRESS_METRICS = {"epoch": "epoch", METRIC: METRIC, "fnfe": "fnfe", "bnfe": "bnfe", "trial_status": "state"}


def progress(sweep):
    """The live table: the settings that differ between trials, the epoch, val_acc, FNFE/BNFE, status."""
    from ray.tune import CLIReporter

    if sweep.cells is not None:
        columns = {"cell/tags/ablated_dimension": "ablated", "cell/tags/ablated_value": "value",
                   "cell/settings/seed": "seed"}
    else:
        columns = {name: SHORT_NAMES.get(name, name) for name, dim in sweep.space.items()
                   if len(dim.values) > 1 or dim.kind not in ("choice", "grid")}
    return CLIReporter(parameter_columns=columns, metric_columns=PROGRESS_METRICS, max_column_length=10,
                       max_report_frequency=30, sort_by_metric=False)


def trial_folder(trial) -> str:
    return f"trial_{trial.trial_id}"


def trainable(base: RunConfig, experiment: str, parent_run_id: str | None, cpus: float, gpus: float,
              tags: dict[str, str]):
    """The Tune trainable: run_trial with the sweep's fixed settings, tags and per-trial resources."""
    from ray import tune

    fn = tune.with_parameters(run_trial, base=base.to_dict(), experiment=experiment, parent_run_id=parent_run_id,
                              tags=tags)
    return tune.with_resources(fn, {"cpu": cpus, "gpu": gpus})


# -- where the sweep lives ------------------------------------------------------------------------


def storage(path: str):
    """(storage path, filesystem) for Tune: a local folder, or s3://bucket/prefix on AWS S3 or an
    S3-compatible store whose endpoint comes from the standard variables."""
    if not path.startswith("s3://"):
        return str(Path(path).expanduser().resolve()), None
    import pyarrow.fs

    endpoint = os.environ.get(envvars.S3_ENDPOINT) or os.environ.get(envvars.MLFLOW_S3_ENDPOINT)
    options: dict[str, Any] = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        options.update(endpoint_override=host or scheme, scheme=scheme if host else "http")
    region = os.environ.get(envvars.REGION) or os.environ.get(envvars.AWS_REGION)
    if region:
        options["region"] = region
    return path[len("s3://"):].rstrip("/"), pyarrow.fs.S3FileSystem(**options)


def worker_env() -> dict[str, str]:
    """The tracking, storage and data settings the driver sees, for every Ray worker: never
    a credential (envvars.SECRETS), which workers take from their own environment."""
    return {name: os.environ[name] for name in envvars.FOR_WORKERS
            if os.environ.get(name) and name not in envvars.SECRETS}


# -- MLflow: one parent run per sweep ----------------------------------------------------------------


def parent_run(experiment: str, sweep_name: str, params: dict[str, str], restoring: bool, design: str) -> str:
    """The sweep's parent run; a restored sweep continues the parent it had."""
    from mlflow.entities import Param

    c = tracking.client()
    experiment_id = tracking.experiment_id(experiment)
    if restoring:
        runs = c.search_runs([experiment_id], f"tags.sweep_name = '{sweep_name}' and tags.sweep_role = 'parent'",
                             max_results=1)
        if runs:
            c.update_run(runs[0].info.run_id, status="RUNNING")
            return runs[0].info.run_id
    run = c.create_run(experiment_id, run_name=sweep_name,
                       tags={"sweep_name": sweep_name, "sweep_role": "parent", "design": design,
                             "git_commit": git_commit()})
    c.log_batch(run.info.run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
    return run.info.run_id


def trial_callback():
    """Closes the MLflow runs of trials Tune ended from outside: stopped by ASHA, or errored."""
    from ray import tune

    class CloseTrialRuns(tune.Callback):
        def __init__(self, experiment: str):
            self.experiment = experiment

        def _close(self, trial, status: str, tags: dict[str, str]) -> None:
            try:
                c = tracking.client()
                found = c.get_experiment_by_name(self.experiment)
                runs = c.search_runs([found.experiment_id], f"tags.{IDENTITY_TAG} = '{trial.trial_id}'",
                                     max_results=1)
                if not runs:
                    return
                from mlflow.entities import RunTag

                c.log_batch(runs[0].info.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
                if c.get_run(runs[0].info.run_id).info.status == "RUNNING":
                    c.set_terminated(runs[0].info.run_id, status)
            except Exception as exc:  # never take the sweep down for bookkeeping
                print(f"could not close the MLflow run of trial {trial.trial_id}: {exc}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            # A trial that ended between epochs was stopped by the scheduler: KILLED, as the
            # trial itself marks its run when interrupted, with the reason beside it.
            if (trial.last_result or {}).get("trial_status") == "RUNNING":
                self._close(trial, "KILLED", {"stopped_by": "asha"})

        def on_trial_error(self, iteration, trials, trial, **info):
            self._close(trial, "FAILED", {"failure_cause": "trial_error"})

    return CloseTrialRuns


# -- the results table ------------------------------------------------------------------------------------


RESULT_COLUMNS = ("best_val_acc", "test_acc", "test_loss", "mean_fnfe", "mean_bnfe", "mean_epoch_time_s", "epochs")


def results_table(result_grid, dimensions: Sequence[str]) -> "pd.DataFrame":
    """One row per trial: its settings, validation accuracy of its best epoch, test accuracy,
    FNFE, BNFE, mean epoch time, status and cause."""
    import pandas as pd

    rows = []
    for result in result_grid:
        metrics = result.metrics or {}
        history = result.metrics_dataframe
        settings, tags = unpack_cell(result.config or {})
        row: dict[str, Any] = {"trial": metrics.get("trial_id") or Path(result.path or "").name}
        row.update({d: settings.get(d, tags.get(d)) for d in dimensions})
        status = metrics.get("trial_status")
        if result.error is not None:
            row["status"], row["cause"] = "ERROR", f"{type(result.error).__name__}: {str(result.error)[:80]}"
        elif status == "DIVERGED":
            row["status"], row["cause"] = "DIVERGED", metrics.get("failure_cause", "")
        elif status == "FINISHED":
            row["status"], row["cause"] = "FINISHED", ""
        else:
            row["status"], row["cause"] = "STOPPED", "asha"
        if history is not None and "trial_status" in history:
            epochs = history[history["trial_status"] == "RUNNING"]
            row.update({k: v for k, v in summarize(epochs).items() if k in RESULT_COLUMNS})
        if status == "FINISHED":
            row["test_acc"] = metrics.get("test_acc")
            row["test_loss"] = metrics.get("test_loss")
        rows.append(row)
    frame = pd.DataFrame(rows)
    for column in RESULT_COLUMNS:
        if column not in frame:
            frame[column] = math.nan
    ordered = ["trial", *dimensions, *RESULT_COLUMNS, "status", "cause"]
    return frame[ordered].sort_values("best_val_acc", ascending=False, na_position="last").reset_index(drop=True)


def log_results(parent_run_id: str, table) -> None:
    """The results table as CSV and markdown on the parent run, which then finishes."""
    c = tracking.client()
    with tempfile.TemporaryDirectory() as folder:
        table.to_csv(Path(folder) / "results.csv", index=False)
        (Path(folder) / "results.md").write_text(table.to_markdown(index=False, floatfmt=".4g"))
        c.log_artifacts(parent_run_id, folder)
    c.set_terminated(parent_run_id, "FINISHED")


def describe_space(space: dict[str, Dimension]) -> str:
    return json.dumps({name: dim.describe() for name, dim in space.items()}, indent=1)


# -- running a sweep -------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, default_name: str) -> None:
    """The flags every sweep program takes, plus one flag per fixed run setting."""
    from odenet.cli import add_config_options

    sweep = parser.add_argument_group("sweep")
    sweep.add_argument("--name", help=f"sweep name (default: a new sweep, {default_name}_DATE_TIME); naming "
                                      f"an unfinished sweep again restores it")
    sweep.add_argument("--resume", metavar="NAME", help="restore the unfinished sweep NAME; never starts a new one")
    parser.set_defaults(default_name=default_name)
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
    add_config_options(parser)


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


def base_config(args: argparse.Namespace, smoke_defaults: dict[str, Any]) -> RunConfig:
    """The fixed settings of every trial: defaults < --smoke sizes < --config file < flags."""
    from odenet.cli import config_from_args

    given = config_from_args(args)
    if not args.smoke:
        return given
    explicit = {f.name for f in fields(RunConfig) if getattr(args, f.name) is not None}
    if args.config:
        explicit |= set(RunConfig.from_file(args.config).to_dict()) & set(_file_keys(args.config))
    return given.replace(**{k: v for k, v in smoke_defaults.items() if k not in explicit})


def _file_keys(path: str) -> list[str]:
    return list((read_settings_file(path, "--config") or {}).keys())


@dataclass
class Sweep:
    """What a program hands to `run`: the space and how to search it, or (a designed
    comparison) the list of cells to run, each a trial."""

    space: dict[str, Dimension]
    make_tuner_parts: Callable[[RunConfig, argparse.Namespace], tuple[Any, Any]]  # (search_alg, scheduler)
    design: str = SEARCH
    cells: list[dict[str, Any]] | None = None  # sweeps/designs.py: {"settings": {...}, "tags": {...}}
    columns: Sequence[str] = ()  # extra results-table columns (a design's seed, ablated dimension)
    parent_params: dict[str, str] = field(default_factory=dict)


def cost(args: argparse.Namespace, base: RunConfig, sweep: Sweep):
    """What the sweep will cost (sweeps/estimate.py), from its flags alone."""
    import itertools

    from sweeps import estimate

    fixed = base.to_dict()
    if sweep.cells is not None:
        trials = [([base.replace(**cell["settings"]).to_dict()], base.max_epochs) for cell in sweep.cells]
    elif all(dim.kind == "grid" for dim in sweep.space.values()):
        grid = [dict(zip(sweep.space, values)) for values in itertools.product(*(d.values for d in sweep.space.values()))]
        trials = [([base.replace(**point).to_dict()], base.max_epochs) for point in grid]
    else:
        n = args.num_samples
        if getattr(args, "scheduler", "asha") == "asha":
            epochs = estimate.asha_epochs(n, base.max_epochs, args.grace_period, args.reduction_factor) / n
        else:
            epochs = base.max_epochs
        trials = [(estimate.alternatives(sweep.space, fixed), epochs)] * n
    return estimate.estimate(trials)


def run(args: argparse.Namespace, base: RunConfig, sweep: Sweep, program: str):
    """Validate everything, start (or restore) the sweep, print and log the results table."""
    on_cluster = bool(os.environ.get(envvars.RAY_ADDRESS))
    errors = (check_cells(sweep.cells, base) if sweep.cells is not None else check_space(sweep.space, base))
    errors += check_resources(args, on_cluster)
    if errors:
        raise SweepError(errors)
    if args.estimate:
        print("\n".join(cost(args, base, sweep).lines(gpus=args.estimate_gpus)))
        return None
    args.name = naming.sweep_name(args, args.default_name)
    experiment = args.experiment or args.name
    if not on_cluster and base.data_dir is None:
        base = base.replace(data_dir=str(_default_data_dir()))
    elif base.data_dir is not None:
        base = base.replace(data_dir=str(Path(base.data_dir).expanduser().resolve()))
    if not on_cluster:
        from odenet import data

        data.load(base, "cpu")  # a missing data set fails here, not in every trial
    where = places.settle(args.storage_path)  # in a Ray job: out of Ray's temporary working directory
    args.storage_path = where.storage_path
    tracking.check_server()
    tracking.pin_embedded_store()
    storage_path, filesystem = storage(args.storage_path)
    restoring = naming.restoring(args, storage_path, filesystem, experiment)
    print(naming.announce(args.name, restoring, experiment, where), flush=True)

    # Tune's classic progress table, whose columns we choose (the newer output prints every
    # trial's whole config): see progress().
    os.environ.setdefault(envvars.RAY_AIR_NEW_OUTPUT, "0")
    import ray
    from ray import tune

    ray.init(runtime_env={"env_vars": worker_env()}, log_to_driver=True)
    if args.gpus_per_trial > 0 and ray.cluster_resources().get("GPU", 0) < args.gpus_per_trial:
        print("no GPU in the cluster yet: trials wait for the autoscaler to add GPU workers", flush=True)

    path = f"{storage_path}/{args.name}"
    params = {"program": program, "design": sweep.design, "search_space": describe_space(sweep.space),
              "base_config": json.dumps(base.to_dict()), "num_samples": str(args.num_samples),
              "storage_path": args.storage_path, **sweep.parent_params}
    parent = parent_run(experiment, args.name, params, restoring, sweep.design)
    fn = trainable(base, experiment, parent, args.cpus_per_trial, args.gpus_per_trial, {"design": sweep.design})
    if restoring:
        tuner = tune.Tuner.restore(path, fn, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=filesystem)
    else:
        search_alg, scheduler = sweep.make_tuner_parts(base, args)
        if sweep.cells is not None:
            param_space = {"cell": tune.grid_search(sweep.cells)}
        else:
            param_space = {name: dim.to_tune() for name, dim in sweep.space.items()}
        tuner = tune.Tuner(
            fn,
            param_space=param_space,
            tune_config=tune.TuneConfig(metric=METRIC, mode=MODE, search_alg=search_alg, scheduler=scheduler,
                                        num_samples=args.num_samples, max_concurrent_trials=args.max_concurrent,
                                        # short trial names and folders: the settings are in the table and
                                        # in MLflow, not in the name
                                        trial_name_creator=trial_folder, trial_dirname_creator=trial_folder),
            run_config=tune.RunConfig(
                name=args.name,
                storage_path=storage_path,
                storage_filesystem=filesystem,
                failure_config=tune.FailureConfig(max_failures=args.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                callbacks=[trial_callback()(experiment)],
                progress_reporter=progress(sweep),
                verbose=1,
            ),
        )
    grid = tuner.fit()
    table = results_table(grid, [*sweep.space, *sweep.columns])
    print(table.to_markdown(index=False, floatfmt=".4g"))
    log_results(parent, table)
    print(f"results logged to MLflow run {parent} (experiment {experiment!r})")
    tracking.print_ui_hint(experiment, params=[*sweep.space])
    print(f"sweep {args.name!r} done: {where.describe(args.name)}")
    return table


def _default_data_dir() -> Path:
    from odenet.data import default_data_dir

    return default_data_dir().expanduser().resolve()


def main(program: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> int:
    """Run a sweep program, turning bad input into one clear message and exit code 2."""
    import sys

    from odenet.data import DataError

    try:
        program(argv)
    except (SweepError, ConfigError, DataError, tracking.TrackingError, naming.SweepNameError,
            places.PlaceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
