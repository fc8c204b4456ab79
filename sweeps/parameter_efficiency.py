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
from odenet.report import PARAMETER_EFFICIENCY
from sweeps.designs import best_trial_settings
from sweeps.tuning import Sweep, SweepError, add_arguments, base_config, dimension, grid, main, run

SMOKE_CONFIG = {"subset": 1024, "test_subset": 500, "width": 8, "max_epochs": 2, "batch_size": 64}
SMOKE_SEEDS = 2  # the fewest that give an interval


def best_hyperparameters(experiment: str) -> dict:
    """The searched settings of the finished trial with the best validation accuracy."""
    tracking.check_server()
    c = tracking.client()
    found = c.get_experiment_by_name(experiment)
    parents = c.search_runs([found.experiment_id], "tags.sweep_role = 'parent'", max_results=1) if found else []
    if not parents:
        raise SweepError([f"--from-experiment {experiment!r}: no sweep logged there at {tracking.tracking_uri()}"])
    searched = json.loads(parents[0].data.params["search_space"])
    return best_trial_settings(experiment, list(searched), "--from-experiment")


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
        args.seeds = SMOKE_SEEDS if args.seeds == 3 else args.seeds
        args.max_concurrent = 2 if args.max_concurrent == 4 else args.max_concurrent
    if args.seeds < 1:
        raise SweepError([f"--seeds {args.seeds}: expected at least 1"])
    base = base_config(args, SMOKE_CONFIG)
    if args.from_experiment:
        base = base.replace(**best_hyperparameters(args.from_experiment))
    space = {
        "model": dimension("model", grid(*args.models.split(","))),
        "dataset": dimension("dataset", grid(*args.datasets.split(","))),
        "seed": dimension("seed", grid(*range(args.seeds))),
    }
    args.num_samples = 1  # the grid itself lists every trial
    return run(args, base, Sweep(space, tuner_parts, design=PARAMETER_EFFICIENCY), program="parameter_efficiency")


if __name__ == "__main__":
    sys.exit(main(parameter_efficiency))
