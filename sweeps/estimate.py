"""What a sweep will cost, before it runs (`--estimate`): its trials, its trial-epochs with
ASHA's rungs, and device-hours from the epoch costs BENCHMARKS.md measured.

The cost of one epoch is the measured epoch of the same model family on the same device
(`python -m bench`: FashionMNIST, 2048 images of which 1638 train and 410 validate, width
64, stride 2, T_n = 1, dopri5 at 1e-3 with the adjoint), scaled by what changes the work:

- images: the subset (or the whole training set) over the measured 2048;
- the block's convolution: ((C + A) / 66)^2 channels and (side / 14)^2 pixels, where side
  is the image side over the stride (28 or 32 pixels);
- T_n, for the ODE models: function evaluations grow as T_n^0.35. That exponent is a fit
  to this project's one-at-a-time run of T_n = 1, 2, 5, 10 (FNFE + BNFE 69, 86, 122, 153;
  width 8, 3 seeds, README "Two designs"), not a law: adaptive solvers take what the
  dynamics ask;
- resnet-large: three blocks where resnet-small has one;
- the training solve (adjoint, solver, step size, regulariser weights, e.g. `--recipe fast`):
  the measured lever with those settings, as its epoch time over the default's on the same
  device; a combination that was not measured is not estimated.

The complex models were not measured: their cost is not estimated (said so, not guessed).
Trial-epochs are an upper bound: early stopping (--patience) ends trials sooner.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
MEASURED_IMAGES, MEASURED_STATE, MEASURED_SIDE = 2048, 66, 14
T_EXPONENT = 0.35
TRAIN_IMAGES = {"fashion-mnist": 60_000, "cifar10": 50_000}
IMAGE_SIDE = {"fashion-mnist": 28, "cifar10": 32}
# Which measured model an unmeasured simple model scales from, and by how many blocks.
FAMILY = {"odenet-simple": ("odenet-simple", 1), "resnet-small": ("resnet-small", 1),
          "resnet-large": ("resnet-small", 3)}


def _sections(text: str | None) -> list[tuple[str, str]]:
    """(key, body) of each section the benchmarks wrote into BENCHMARKS.md (or `text`)."""
    text = BENCHMARKS.read_text() if text is None else text
    return re.findall(r"<!-- odenet bench: (\w+) -->(.*?)<!-- odenet bench: \1 end -->", text, re.S)


def measured_epoch_s(text: str | None = None) -> dict[str, dict[str, float]]:
    """{device: {model: seconds per epoch}} from BENCHMARKS.md's "our loop" rows, per section."""
    found: dict[str, dict[str, float]] = {}
    for device, body in _sections(text):
        for model, seconds in re.findall(r"^\| (\S+)\s+\| ours\s+\|\s+([\d.]+) \|", body, re.M):
            found.setdefault(device, {})[model] = float(seconds)
    return found


# The settings of the training solve that BENCHMARKS.md's lever rows vary, with the study's values.
SOLVE_DEFAULTS = {"adjoint": "adjoint", "solver": "dopri5", "step_size": None, "kinetic_energy": 0.0,
                  "jacobian_norm": 0.0}
FIXED_STEP = ("euler", "midpoint", "rk4")


def _solve(settings: dict[str, Any]) -> tuple:
    """The training solve's settings as a comparable key (the step size matters for fixed steps only)."""
    values = {**SOLVE_DEFAULTS, **{k: settings[k] for k in SOLVE_DEFAULTS if settings.get(k) is not None}}
    if values["solver"] not in FIXED_STEP:
        values["step_size"] = None
    return (values["adjoint"], values["solver"], None if values["step_size"] is None else float(values["step_size"]),
            float(values["kinetic_energy"]), float(values["jacobian_norm"]))


STUDY_SOLVE = _solve({})


def measured_levers(text: str | None = None) -> dict[str, dict[tuple, float]]:
    """{device: {training-solve key: epoch time over the default's}} from the odenet-simple rows of
    BENCHMARKS.md's lever tables."""
    found: dict[str, dict[tuple, float]] = {}
    for device, body in _sections(text):
        for settings, seconds in re.findall(r"^\| odenet-simple\s+\| \S+\s+\| ([^|]+?)\s+\|\s+([\d.]+) \|",
                                            body.split("## Levers", 1)[-1], re.M):
            pairs = dict(item.split("=", 1) for item in settings.split(", ") if "=" in item)
            found.setdefault(device, {}).setdefault(_solve(pairs), float(seconds))  # the first row: no dataloader
    return {device: {key: s / rows[STUDY_SOLVE] for key, s in rows.items()} for device, rows in found.items()
            if STUDY_SOLVE in rows}


@dataclass(frozen=True)
class Estimate:
    trials: int
    trial_epochs: float
    device_hours: dict[str, float | None]  # device -> hours of one trial at a time; None: not measured

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


def epoch_cost(settings: dict[str, Any], device: str, measured: dict[str, dict[str, float]],
               levers: dict[str, dict[tuple, float]]) -> float | None:
    """Seconds per epoch of one trial's settings on a device; None where nothing comparable was measured."""
    model = settings["model"]
    if model not in FAMILY or device not in measured or FAMILY[model][0] not in measured[device]:
        return None
    lever = 1.0
    if model.startswith("odenet") and (solve := _solve(settings)) != STUDY_SOLVE:
        lever = levers.get(device, {}).get(solve)
        if lever is None:
            return None
    family, blocks = FAMILY[model]
    dataset = settings["dataset"]
    images = settings.get("subset") or TRAIN_IMAGES[dataset]
    width = settings.get("width") or (64 if dataset == "fashion-mnist" else 256)
    state = width + int(settings.get("augment_dims", 2))
    side = math.ceil(IMAGE_SIDE[dataset] / int(settings.get("stride") or 2))
    work = (images / MEASURED_IMAGES) * (state / MEASURED_STATE) ** 2 * (side / MEASURED_SIDE) ** 2 * blocks
    if model.startswith("odenet"):
        work *= float(settings.get("final_time", 1.0)) ** T_EXPONENT
    return measured[device][family] * work * lever


def estimate(trials: Sequence[tuple[Sequence[dict[str, Any]], float]]) -> Estimate:
    """Trials, trial-epochs and device-hours of trials given as (settings it may have, epochs):
    a designed trial has one setting; a searched one each point of the space's cost-changing
    choices, equally likely (the searcher's preferences are not known before it runs)."""
    # BENCHMARKS.md is read once per estimate, not once per trial and setting.
    text = BENCHMARKS.read_text()
    measured = measured_epoch_s(text)
    levers = measured_levers(text)
    hours: dict[str, float | None] = {}
    for device in ("cpu", "cuda"):
        total = 0.0
        for alternatives, epochs in trials:
            costs = [epoch_cost(s, device, measured, levers) for s in alternatives]
            if any(c is None for c in costs):
                total = None
                break
            total += sum(costs) / len(costs) * epochs
        hours[device] = None if total is None else total / 3600
    return Estimate(len(trials), float(sum(epochs for _, epochs in trials)), hours)


COST_DIMENSIONS = ("model", "dataset", "stride", "final_time", "augment_dims", "width", "subset", *SOLVE_DEFAULTS)


def alternatives(space, base: dict[str, Any]) -> list[dict[str, Any]]:
    """The settings a searched trial may have, as far as they change its cost."""
    import itertools

    varying = {name: list(dim.values) for name, dim in space.items()
               if name in COST_DIMENSIONS and dim.kind in ("choice", "grid")}
    return [{**base, **dict(zip(varying, combo))} for combo in itertools.product(*varying.values())]
