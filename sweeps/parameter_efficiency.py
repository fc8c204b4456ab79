"""Parameter efficiency: ODEnet-simple against ResNet-small and ResNet-large, and the
complex pair, on FashionMNIST and CIFAR-10, over several seeds.

Every combination is trained in full (no early stopping by a scheduler), with
hyperparameters taken from the best trial of a finished sweep (--from-experiment)
or given as flags (--lr, --final-time, ... or --config FILE):

    ray job submit --working-dir . -- python sweeps/parameter_efficiency.py \\
        --from-experiment architecture_ablation

--widths 8,16,32,64 trains every model at each width too (default: the study's width only),
so that the report draws test accuracy against trainable parameters per family.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from odenet import sweep_record, tracking
from odenet.config import DATASETS, MODELS
from odenet.report import PARAMETER_EFFICIENCY
from sweeps import tuning
from sweeps.designs import best_trial_settings
from sweeps.space import SweepError, dimension, grid

PROGRAM = "parameter_efficiency"
# --smoke: each value stands in for a flag or run setting not given; two seeds are the
# fewest that give an interval.
SMOKE = {"subset": 1024, "test_subset": 500, "width": 8, "max_epochs": 2, "batch_size": 64,
         "datasets": "fashion-mnist", "seeds": 2, "max_concurrent": 2}


def parameter_efficiency(argv: Sequence[str] | None = None):
    """Every model on every data set over the seeds: a grid, each point trained to the end."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tuning.add_arguments(parser, PROGRAM)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated models (default: all five)")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated data sets (default: both)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per model and data set (default: 3)")
    parser.add_argument("--widths", metavar="W1,W2,...",
                        help="train each model at each of these widths (channels C), e.g. 8,16,32,64, for a curve of "
                             "accuracy against parameters (default: the study's width only)")
    parser.add_argument("--from-experiment", metavar="NAME",
                        help="take the hyperparameters of the best trial of this finished sweep")
    args, base = tuning.parse_args(parser, argv, SMOKE)
    errors = [f"--seeds {args.seeds}: expected at least 1"] if args.seeds < 1 else []
    widths = parse_widths(args.widths, errors) if args.widths is not None else None
    if errors:
        raise SweepError(errors)
    if args.from_experiment:
        base = base.replace(**best_hyperparameters(args.from_experiment))
    space = {
        "model": dimension("model", grid(*args.models.split(","))),
        "dataset": dimension("dataset", grid(*args.datasets.split(","))),
        **({"width": dimension("width", grid(*widths))} if widths else {}),
        "seed": dimension("seed", grid(*range(args.seeds))),
    }
    sweep = tuning.start(args, base, space, PROGRAM, design=PARAMETER_EFFICIENCY, num_samples=1)
    if sweep is None:  # --estimate printed the cost
        return None
    return sweep.fit({name: dim.to_tune() for name, dim in space.items()})


def parse_widths(text: str, errors: list[str]) -> list[int]:
    """The widths of --widths '8,16,32,64': distinct whole numbers >= 1; each problem goes to `errors`."""
    widths = []
    for item in (part.strip() for part in text.split(",")):
        if not item.isdigit() or int(item) < 1:
            errors.append(f"--widths {text!r}: {item!r} is not a width; expected whole numbers >= 1 separated by "
                          f"commas, e.g. --widths 8,16,32,64")
        elif int(item) in widths:
            errors.append(f"--widths {text!r}: {item} is given twice; give each width once, e.g. --widths 8,16,32,64")
        else:
            widths.append(int(item))
    return widths


def best_hyperparameters(experiment: str) -> dict:
    """The searched settings of the finished trial with the best validation accuracy."""
    tracking.check_server()
    parent = sweep_record.find_parent_run(experiment)
    if parent is None:
        raise SweepError([f"--from-experiment {experiment!r}: no sweep logged there at {tracking.tracking_uri()}"])
    searched = json.loads(parent.data.params["search_space"])
    return best_trial_settings(experiment, list(searched), "--from-experiment")


if __name__ == "__main__":
    sys.exit(tuning.main(parameter_efficiency))
