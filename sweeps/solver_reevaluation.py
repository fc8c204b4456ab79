"""The solver re-evaluation table for the ODE models of a finished experiment.

Each finished ODEnet run's best checkpoint is loaded back from MLflow and evaluated
on the test set with euler, rk4 and dopri5 at rtol = atol = 1e-3, 1e-2, 1e-1, as Ray
tasks in parallel; accuracy and mean FNFE go back into each run as eval_* metrics.

    python sweeps/solver_reevaluation.py --experiment architecture_ablation

Each run is evaluated at its own batch size unless --eval-batch-size N sets one for all: an
adaptive solver's FNFE per batch grows with the batch (its hardest image sets the steps), so
the eval_fnfe_* columns of runs trained at different batch sizes compare only at one N
(logged as eval_nfe_batch_size).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

import pandas as pd

from odenet import progress, tracking
from odenet.config import ODE_MODELS
from odenet.evaluate import REEVALUATION_SOLVERS
from odenet.run import load_logged_run
from odenet.stats import accuracy_interval, mean_interval
from odenet.summary import reevaluation_metrics
from odenet.sweep_record import PARENT, ROLE_TAG
from sweeps.space import SweepError
from sweeps.tuning import main, worker_env

# The metric only this program writes: the test images each run was re-evaluated on.
REEVALUATED_IMAGES = "reevaluated_test_images"


def reevaluate_run(run_id: str, data_dir: str | None, test_subset: int | None,
                   batch_size: int | None = None) -> pd.DataFrame:
    """Re-evaluate one logged run, at `batch_size` images per batch (default: the run's own), and
    log the results back into it."""
    from mlflow.entities import Metric

    from odenet.evaluate import reevaluate
    from odenet.models import SolverSettings

    config, model, splits, _ = load_logged_run(run_id, data_dir=data_dir, test_subset=test_subset)
    batch_size = batch_size or config.batch_size
    table = reevaluate(model, splits.test, SolverSettings.of(config), batch_size)
    now = int(time.time() * 1000)
    # The trial logged the same eval_* metrics after training; the images this re-evaluation
    # used are its own mark on the run.
    values = {**reevaluation_metrics(table, batch_size), REEVALUATED_IMAGES: len(splits.test)}
    metrics = [Metric(name, value, now, 0) for name, value in values.items()]
    tracking.client().log_batch(run_id, metrics=metrics)
    return table.assign(run_id=run_id, model=config.model, dataset=config.dataset, test_images=len(splits.test))


def summary_table(table: pd.DataFrame) -> pd.DataFrame:
    """Per solver: the runs it covers, how many failed, and mean accuracy (inside 0-100%, as the
    report shows it) and FNFE with 95% intervals."""
    rows = []
    resolution = 1 / table["test_images"].min()
    for solver, runs in table.groupby("solver", sort=False):
        rows.append({"solver": solver, "runs": len(runs), "failed": int(runs["accuracy"].isna().sum()),
                     "test acc %": accuracy_interval(runs["accuracy"].tolist(), resolution).format(100.0),
                     "FNFE": mean_interval(runs["fnfe"].tolist()).format()})
    return pd.DataFrame(rows)


def solver_reevaluation(argv: Sequence[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True, help="MLflow experiment of a finished sweep")
    parser.add_argument("--data-dir", help="data folder (default $ODENET_DATA_DIR)")
    parser.add_argument("--test-subset", type=int, help="evaluate on the first N test images")
    parser.add_argument("--eval-batch-size", type=int, metavar="N",
                        help="evaluate every run at N images per batch, so their FNFE compare (default: each "
                             "run's own batch size)")
    parser.add_argument("--cpus-per-task", type=float, default=1.0)
    parser.add_argument("--gpus-per-task", type=float, default=0.0)
    args = parser.parse_args(argv)
    if args.eval_batch_size is not None and args.eval_batch_size < 1:
        raise SweepError([f"--eval-batch-size {args.eval_batch_size}: expected a whole number of images >= 1, "
                          f"e.g. --eval-batch-size 128"])

    tracking.check_server()
    client = tracking.client()
    found = client.get_experiment_by_name(args.experiment)
    if found is None:
        raise SweepError([f"--experiment {args.experiment!r}: no such MLflow experiment at {tracking.tracking_uri()}"])
    # MLflow's search cannot filter params with IN: select the ODE models here.
    runs = [r for r in client.search_runs([found.experiment_id], "attributes.status = 'FINISHED'", max_results=10_000)
            if r.data.params.get("model") in ODE_MODELS and r.data.tags.get(ROLE_TAG) != PARENT]
    if not runs:
        raise SweepError([f"experiment {args.experiment!r} has no finished ODE runs ({', '.join(ODE_MODELS)}) to "
                          f"re-evaluate: run a sweep of an ODE model into it first"])
    tracking.pin_embedded_store()

    import ray

    ray.init(runtime_env={"env_vars": worker_env()})
    task = ray.remote(num_cpus=args.cpus_per_task, num_gpus=args.gpus_per_task)(reevaluate_run)
    pending = [task.remote(r.info.run_id, args.data_dir, args.test_subset, args.eval_batch_size) for r in runs]
    tables = []
    with progress.phase(f"re-evaluation with {len(REEVALUATION_SOLVERS)} solvers", len(runs), "runs") as advance:
        for task_done in pending:  # in order, so the tables follow the runs
            tables.append(ray.get(task_done))
            advance(1)
    table = pd.concat(tables, ignore_index=True)
    print(table[["run_id", "model", "dataset", "solver", "accuracy", "fnfe", "failure_cause"]]
          .to_markdown(index=False, floatfmt=".4g"))
    print()
    print(summary_table(table).to_markdown(index=False))
    return table


if __name__ == "__main__":
    sys.exit(main(solver_reevaluation))
