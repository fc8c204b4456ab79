"""What a sweep will cost, before it runs (`--estimate`): its trials, its trial-epochs with
ASHA's rungs, and device-hours: the epoch costs BENCHMARKS.md measured, plus the fixed costs
of a sweep and of each trial that a small sweep spends mostly on.

A sweep costs SWEEP_S (the driver's imports and data, Ray's start, the parent run) and,
for each trial, TRIAL_S (a Ray worker starting, the trial's imports, data and MLflow run),
its epochs, and its evaluations after training (the test set, and for ODE models with
re-evaluation each solver of odenet.evaluate.REEVALUATION_SOLVERS), each a forward pass over
the test images that costs FORWARD_SHARE of a training image.

An epoch (training and validation images) costs, per image, two parts, both proportional to
the pixels of the block, (side / 14)^2, where side is the image side over the stride (28 or
32 pixels):

- the convolutions: the measured epoch of the same model family on the same device (`python
  -m bench`: FashionMNIST, 2048 images, width 64, batch size 128, stride 2, T_n = 1, dopri5 at
  1e-3 with the adjoint) per image, times ((C + A) / 66)^2;
- the element-wise work, ELEMENT_WISE_S + ELEMENT_WISE_PER_CHANNEL_S * (C + A): the solver's
  and the norms' operations over the state, and Python's dispatch per function evaluation.
  It shrinks with the width only linearly, so it is most of an epoch at small widths; it
  grows with the pixels (a width-8 epoch at stride 1 took 3.7 times one at stride 2) and not
  with the batch size (batch 64 and 128 took the same time per image at width 8). It is the
  ODE models' (about 70 function evaluations per image); the ResNets' was not measured and
  is left out.

Both scale with T_n for the ODE models (function evaluations grow as T_n^0.35, a fit to this
project's one-at-a-time run of T_n = 1, 2, 5, 10: FNFE + BNFE 69, 86, 122, 153; width 8,
3 seeds, README "Two designs"; the same sweep's epochs at T_n = 2, 5, 10 took 1.23, 1.72 and
2.18 times T_n = 1; not a law: adaptive solvers take what the dynamics ask), with
resnet-large's three blocks against resnet-small's one, and with the training solve (adjoint,
solver, step size, regulariser weights, e.g. `--recipe fast`): the measured lever with those
settings, as its epoch time over the default's on the same device; a combination that was
not measured is not estimated.

The element-wise part was fitted (least squares, what the convolutions leave) to the epoch
times of sweeps at widths 8, 16 and 32, and SWEEP_S and TRIAL_S to their wall times, on an
idle 2-core CPU, two trials at a time, one thread each (BENCHMARKS.md, "What a sweep costs"):
on the CPU the estimate is the wall time of such a sweep. Width 64 was not swept: there the
estimate extrapolates, and errs long (the benchmark's epoch already holds some of the
element-wise work). The GPU's
fixed costs and element-wise part were not measured: its figure is the CPU's fixed costs plus
its measured width-64 epoch scaled by the convolutions alone, a lower bound at small widths.
The complex models were not measured: their cost is not estimated (said so, not guessed).
Trial-epochs are an upper bound: early stopping (--patience, ASHA) ends trials sooner.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Sequence

from bench import markdown
from odenet.config import FIXED_STEP_SOLVERS, RunConfig
from odenet.data import IMAGE_SHAPE, TEST_IMAGES, TRAIN_IMAGES
from odenet.evaluate import REEVALUATION_SOLVERS

# What the benchmark measured: images per epoch, block state C + A, block side.
MEASURED_IMAGES, MEASURED_STATE, MEASURED_SIDE = 2048, 66, 14
T_EXPONENT = 0.35
# Calibrated (module docstring; BENCHMARKS.md "What a sweep costs"): seconds of a sweep and of
# a trial that no epoch explains, and device-seconds per training image (14x14 pixels, T_n = 1)
# of the element-wise work, fixed and per channel of the state C + A.
SWEEP_S = 10.0
TRIAL_S = 5.0
ELEMENT_WISE_S = {"cpu": 5.05e-4}
ELEMENT_WISE_PER_CHANNEL_S = {"cpu": 1.077e-4}
# A test image's forward pass against a training image's forward and backward (twice a forward).
FORWARD_SHARE = 1 / 3
# Which measured model an unmeasured simple model scales from, and by how many blocks.
FAMILY = {"odenet-simple": ("odenet-simple", 1), "resnet-small": ("resnet-small", 1),
          "resnet-large": ("resnet-small", 3)}

# The settings of the training solve that BENCHMARKS.md's lever rows vary.
SOLVE_SETTINGS = ("adjoint", "solver", "step_size", "kinetic_energy", "jacobian_norm")


def _solve(settings: dict[str, Any]) -> tuple:
    """A training solve as a comparable key: the study's values where `settings` leaves one out,
    the step size for fixed-step solvers only."""
    values = {**{k: getattr(STUDY, k) for k in SOLVE_SETTINGS}, **settings}
    step = float(values["step_size"]) if values["solver"] in FIXED_STEP_SOLVERS else None
    return (values["adjoint"], values["solver"], step, float(values["kinetic_energy"]),
            float(values["jacobian_norm"]))


STUDY = RunConfig()
STUDY_SOLVE = _solve({})


@dataclass(frozen=True)
class Measured:
    """BENCHMARKS.md's figures, read once per estimate (bench/markdown.py reads them)."""

    epoch_s: dict[str, dict[str, float]]  # device -> model -> seconds per epoch
    levers: dict[str, dict[tuple, float]]  # device -> training-solve key -> epoch time over the default's

    @classmethod
    def read(cls, text: str | None = None) -> "Measured":
        text = markdown.BENCHMARKS.read_text() if text is None else text
        levers: dict[str, dict[tuple, float]] = {}
        for device, rows in markdown.lever_epoch_s(text, "odenet-simple").items():
            by_solve: dict[tuple, float] = {}
            for settings, seconds in rows:
                by_solve.setdefault(_solve(settings), seconds)  # the first row: no dataloader
            if STUDY_SOLVE in by_solve:
                levers[device] = {key: s / by_solve[STUDY_SOLVE] for key, s in by_solve.items()}
        return cls(markdown.our_epoch_s(text), levers)


@dataclass(frozen=True)
class Estimate:
    trials: int
    trial_epochs: float
    device_hours: dict[str, float | None]  # device -> hours of the sweep; None: not measured

    def lines(self, gpus: int) -> list[str]:
        out = [f"trials: {self.trials}", f"trial-epochs: at most {self.trial_epochs:,.0f} (early stopping ends "
                                         "trials sooner)"]
        for device, hours in self.device_hours.items():
            name = {"cpu": "CPU (2 cores, as in BENCHMARKS.md)", "cuda": "GPU (one H200, as in BENCHMARKS.md)"}.get(
                device, device)
            if hours is None:
                out.append(f"{name}: not estimated (a model of this sweep has no measured epoch cost)")
            else:
                out.append(f"{name}: {_hours(hours)} device-hours" + (
                    f", {_hours(hours / gpus)} hours on {gpus} GPUs" if device == "cuda" and gpus > 1 else ""))
        return out


def _hours(hours: float) -> str:
    return f"{hours:,.0f}" if hours >= 100 else f"{hours:.3g}"


def asha_epochs(trials: int, max_epochs: int, grace_period: int, reduction_factor: float) -> float:
    """Trial-epochs of successive halving: every trial runs to the first rung, 1/eta of them on
    to the next, and so on; the rungs sit at grace * eta^k below max_t = max_epochs + 1."""
    rungs = []
    milestone = grace_period
    while milestone < max_epochs + 1:
        rungs.append(milestone)
        milestone *= reduction_factor
    epochs, done = 0.0, 0.0
    for k, rung in enumerate(rungs):
        epochs += trials / reduction_factor ** k * (min(rung, max_epochs) - done)
        done = min(rung, max_epochs)
    epochs += trials / reduction_factor ** len(rungs) * (max_epochs - done)
    return epochs


def image_cost(config: RunConfig, device: str, measured: Measured) -> float | None:
    """Seconds per training image of one trial's config on a device (its share of a measured
    epoch); None where nothing comparable was measured."""
    if config.model not in FAMILY or FAMILY[config.model][0] not in measured.epoch_s.get(device, {}):
        return None
    family, blocks = FAMILY[config.model]
    solve = 1.0
    if config.is_ode:
        if (key := _solve({k: getattr(config, k) for k in SOLVE_SETTINGS})) != STUDY_SOLVE:
            solve = measured.levers.get(device, {}).get(key)
            if solve is None:
                return None
        solve *= float(config.final_time) ** T_EXPONENT
    pixels = (math.ceil(IMAGE_SHAPE[config.dataset][-1] / (config.stride or 1)) / MEASURED_SIDE) ** 2
    state = config.channels + config.augment_dims
    convolutions = measured.epoch_s[device][family] / MEASURED_IMAGES * (state / MEASURED_STATE) ** 2
    # the element-wise part is the ODE block's, per function evaluation; a ResNet block runs once
    # per image, so its part was too small to fit and is left out (a lower bound at small widths)
    element_wise = ELEMENT_WISE_S.get(device, 0.0) + ELEMENT_WISE_PER_CHANNEL_S.get(device, 0.0) * state
    return (convolutions + (element_wise if config.is_ode else 0.0)) * pixels * blocks * solve


def trial_s(config: RunConfig, epochs: float, device: str, measured: Measured) -> float | None:
    """Seconds of one trial: its fixed cost, its epochs and its evaluations after training."""
    per_image = image_cost(config, device, measured)
    if per_image is None:
        return None
    images = config.subset or TRAIN_IMAGES[config.dataset]
    test_images = config.test_subset or TEST_IMAGES[config.dataset]
    passes = 1 + (len(REEVALUATION_SOLVERS) if config.is_ode and config.reevaluate else 0)
    return TRIAL_S + epochs * images * per_image + passes * test_images * per_image * FORWARD_SHARE


def estimate(trials: Sequence[tuple[Sequence[RunConfig], float]]) -> Estimate:
    """Trials, trial-epochs and device-hours of trials given as (configs it may have, epochs):
    a designed trial has one config; a searched one each point of the space's cost-changing
    choices, equally likely (the searcher's preferences are not known before it runs)."""
    measured = Measured.read()
    hours: dict[str, float | None] = {}
    for device in ("cpu", "cuda"):
        total: float | None = SWEEP_S
        for alternatives, epochs in trials:
            costs = [trial_s(config, epochs, device, measured) for config in alternatives]
            if any(c is None for c in costs):
                total = None
                break
            total += sum(costs) / len(costs)
        hours[device] = None if total is None else total / 3600
    return Estimate(len(trials), float(sum(epochs for _, epochs in trials)), hours)


COST_DIMENSIONS = ("model", "dataset", "stride", "final_time", "augment_dims", "width", "subset", "test_subset",
                   "batch_size", *SOLVE_SETTINGS)


def alternatives(space, base: RunConfig) -> list[RunConfig]:
    """The configs a searched trial may have, as far as they change its cost."""
    varying = {name: list(dim.values) for name, dim in space.items()
               if name in COST_DIMENSIONS and dim.kind in ("choice", "grid")}
    return [base.replace(**dict(zip(varying, combo))) for combo in itertools.product(*varying.values())]
