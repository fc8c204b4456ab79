"""Parameter efficiency: ODEnet-simple against ResNet-small and ResNet-large, and the
complex pair, on FashionMNIST and CIFAR-10, over several seeds.

Every combination is trained in full (no early stopping by a scheduler), with
hyperparameters taken from the best trial of a finished sweep (--from-experiment)
or given as flags (--lr, --final-time, ... or --config FILE):

    ray job submit --working-dir . -- python sweeps/parameter_efficiency.py \\
        --from-experiment architecture_ablation
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from odenet import tracking
from odenet.config import DATASETS, MODELS
from sweeps.tuning import Sweep, SweepError, add_arguments, base_config, dimension, grid, main, run

SMOKE_CONFIG = {"subset": 1024, "test_subset": 500, "width": 8, "max_epochs": 2, "batch_size": 64}


def best_hyperparameters(experiment: str) -> dict:
    """The searched settings of the finished trial with the best validation accuracy."""
    c = tracking.client()
    found = c.get_experiment_by_name(experiment)
    if found is None:
        raise SweepError([f"--from-experiment {experiment!r}: no such MLflow experiment at {tracking.tracking_uri()}"])
    parents = c.search_runs([found.experiment_id], "tags.sweep_role = 'parent'", max_results=1)
    runs = c.search_runs([found.experiment_id], "attributes.status = 'FINISHED' and metrics.best_val_acc > 0",
                         order_by=["metrics.best_val_acc DESC"], max_results=1)
    if not parents or not runs:
        raise SweepError([f"--from-experiment {experiment!r}: no finished sweep with a finished trial"])
    searched = json.loads(parents[0].data.params["search_space"])
    return {name: runs[0].data.params[name] for name in searched if name in runs[0].data.params}


def tuner_parts(base, args):
    return None, None  # every grid point, trained to the end


def parameter_efficiency(argv: Sequence[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, default_name="parameter_efficiency")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated models (default: all five)")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated data sets (default: both)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per model and data set (default: 3)")
    parser.add_argument("--from-experiment", metavar="NAME",
                        help="take the hyperparameters of the best trial of this finished sweep")
    args = parser.parse_args(argv)
    if args.smoke:
        args.datasets = "fashion-mnist" if args.datasets == ",".join(DATASETS) else args.datasets
        args.seeds = 1 if args.seeds == 3 else args.seeds
        args.max_concurrent = 2 if args.max_concurrent == 4 else args.max_concurrent
    base = base_config(args, SMOKE_CONFIG)
    if args.from_experiment:
        tracking.check_server()
        base = base.replace(**best_hyperparameters(args.from_experiment))
    if args.seeds < 1:
        raise SweepError([f"--seeds {args.seeds}: expected at least 1"])
    space = {
        "model": dimension("model", grid(*args.models.split(","))),
        "dataset": dimension("dataset", grid(*args.datasets.split(","))),
        "seed": dimension("seed", grid(*range(args.seeds))),
    }
    args.num_samples = 1  # the grid itself lists every trial
    return run(args, base, Sweep(space, tuner_parts), program="parameter_efficiency")


if __name__ == "__main__":
    sys.exit(main(parameter_efficiency))
