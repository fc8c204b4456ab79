"""What one `python -m bench` run measures: the configurations and the trials sharing the machine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.levers import parse_lever
from bench.settings import Settings
from odenet.config import ODE_MODELS, RunConfig


@dataclass
class Case:
    """One configuration, trained in a process of its own per repetition."""

    key: str
    model: str
    loop: str  # ours | reference
    lever: str  # "default" or the lever's name
    changes: dict[str, Any] = field(default_factory=dict)  # RunConfig fields
    dataloader: bool = False


@dataclass
class SharedMachine:
    """`trials` trials of one model's default settings at once, `threads` torch threads each."""

    key: str
    model: str
    trials: int
    threads: int


def plan(settings: Settings, cores: int) -> tuple[list[Case], list[SharedMachine]]:
    """Every model by both loops, then each lever on the models it applies to; and each number
    of trials sharing the machine, per model."""
    cases: dict[str, Case] = {}  # by key: a lever named twice (with and without MODEL:) is measured once
    for model in settings.models:
        cases[f"{model}/ours"] = Case(f"{model}/ours", model, "ours", "default")
        cases[f"{model}/reference"] = Case(f"{model}/reference", model, "reference", "default")
    for text in settings.levers:
        lever = parse_lever(text)
        name = text.rpartition(":")[2]
        for model in settings.models:
            if lever.model in (None, model) and (model in ODE_MODELS or not lever.ode_only):
                key = f"{model}/{name}"
                cases.setdefault(key, Case(key, model, "ours", name, lever.changes, lever.dataloader))
    sharing = [SharedMachine(f"{model}/x{n}", model, n, max(1, cores // n))
               for model in settings.models for n in settings.concurrency]
    return list(cases.values()), sharing


def run_config(settings: Settings, model: str, changes: dict[str, Any], epochs: int) -> RunConfig:
    """The run a measurement trains: the benchmark's data, width and batch size, seed 0, no early stop."""
    values = dict(dataset="fashion-mnist", data_dir=settings.data_dir, subset=settings.subset, test_subset=10,
                  model=model, width=settings.width, batch_size=settings.batch_size, max_epochs=epochs,
                  patience=epochs + 1, device=settings.device, reevaluate=False, seed=0, split_seed=0)
    return RunConfig.from_dict({**values, **changes})
