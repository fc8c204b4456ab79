"""The baseline `odenet bench` measures against: an ODE block as torchdiffeq's MNIST
example writes it, `odeint_adjoint` with torchdiffeq's own solver over [0, T], output at T.

It replaces an `ODEBlock` of a built model and keeps that block's function, weights and
NFE counter, so the benchmark compares the same model with the same numbers of function
evaluations, only solved the plain way (no odenet.solvers, no regularisers).
"""

from __future__ import annotations

import torch
from torch import nn
from torchdiffeq import odeint_adjoint

from odenet.models import ODEBlock


class ReferenceODEBlock(nn.Module):
    def __init__(self, block: ODEBlock):
        super().__init__()
        self.odefunc = block.dynamics
        self.integration_time = torch.tensor([0.0, block.final_time])
        self.solver = block.solver

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.solver
        out = odeint_adjoint(self.odefunc, x, self.integration_time.type_as(x),
                             rtol=s.rtol, atol=s.atol, method=s.method)
        return out[1]


def use_reference_blocks(module: nn.Module) -> None:
    """Swap every ODEBlock under `module` for a ReferenceODEBlock, in place."""
    for name, child in module.named_children():
        if isinstance(child, ODEBlock):
            setattr(module, name, ReferenceODEBlock(child))
        else:
            use_reference_blocks(child)
