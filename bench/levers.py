"""The lever mini-language: each lever names the RunConfig changes (and data source) it stands for.

A lever is a combination of atoms joined by `+`, optionally restricted to one model
with `MODEL:`; atoms:

    direct | seminorm | adjoint          backpropagation (RunConfig.adjoint)
    SOLVER[@STEP]                        training solver (step size for fixed-step
                                         ones), evaluation with dopri5
    kinetic[@W] | jacobian[@W]           regulariser weights (default W = 0.1)
    dataloader                           our loop, training batches from a DataLoader
    channels_last | bf16 | compile       RunConfig channels_last, block_precision=bf16,
                                         compile_block (every model; GPU levers)

Atoms other than `dataloader` and the GPU ones apply to ODE models only; a combination is
measured on every model of --models that all its atoms apply to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from odenet.config import FIXED_STEP_SOLVERS, MODELS, ODE_MODELS, SOLVERS

DEFAULT_REGULARISER_WEIGHT = 0.1
EVAL_SOLVER = "dopri5"
BACKPROPAGATION_ATOMS = ("direct", "seminorm", "adjoint")
# Levers of how the block functions run, for every model (they matter on a GPU).
DEVICE_ATOMS = {
    "channels_last": {"channels_last": True},
    "bf16": {"block_precision": "bf16"},
    "compile": {"compile_block": True},
}


@dataclass(frozen=True)
class Lever:
    name: str
    changes: dict[str, Any]  # RunConfig fields
    dataloader: bool  # training batches from a DataLoader
    ode_only: bool
    model: str | None  # restricted to this model


def parse_lever(text: str) -> Lever:
    """'MODEL:atom+atom' -> the RunConfig changes and data source it stands for."""
    model, _, combination = text.rpartition(":")
    if model and model not in MODELS:
        raise ValueError(f"unknown model {model!r}")
    changes: dict[str, Any] = {}
    dataloader, ode_only = False, False
    atoms = [a.strip() for a in combination.split("+")]
    if not all(atoms):
        raise ValueError("empty atom")
    for atom in atoms:
        name, _, argument = atom.partition("@")
        value = _positive_number(atom, argument) if argument else None
        if name == "dataloader" and value is None:
            dataloader = True
            continue
        if name in DEVICE_ATOMS and value is None:
            changes.update(DEVICE_ATOMS[name])
            continue
        ode_only = True
        if name in BACKPROPAGATION_ATOMS and value is None:
            changes["adjoint"] = name
        elif name in ("kinetic", "jacobian"):
            changes["kinetic_energy" if name == "kinetic" else "jacobian_norm"] = (
                DEFAULT_REGULARISER_WEIGHT if value is None else value)
        elif name in SOLVERS:
            changes["solver"] = name
            if name != EVAL_SOLVER:
                changes["eval_solver"] = EVAL_SOLVER
            if value is not None:
                if name not in FIXED_STEP_SOLVERS:
                    raise ValueError(f"{atom!r}: a step size is for fixed-step solvers "
                                     f"({', '.join(FIXED_STEP_SOLVERS)})")
                changes["step_size"] = value
        else:
            raise ValueError(f"unknown atom {atom!r}: expected {', '.join(BACKPROPAGATION_ATOMS)}, dataloader, "
                             f"{', '.join(DEVICE_ATOMS)}, "
                             f"kinetic[@W], jacobian[@W] or a solver[@STEP] ({', '.join(SOLVERS)})")
    if model and ode_only and model not in ODE_MODELS:
        raise ValueError(f"{combination!r} changes the ODE solve; {model} has none")
    return Lever(text, changes, dataloader, ode_only, model or None)


def _positive_number(atom: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{atom!r}: expected a number after @") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{atom!r}: expected a number > 0 after @")
    return value
