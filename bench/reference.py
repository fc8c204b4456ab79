"""The baseline `python -m bench` measures against: training as torchdiffeq's MNIST example
writes it, a DataLoader over a TensorDataset and an ODE block that calls `odeint_adjoint`
with torchdiffeq's own solver over [0, T], output at T.

The reference block replaces an `ODEBlock` of a built model and keeps that block's
function, weights and NFE counter, so the benchmark compares the same model with the same
numbers of function evaluations, only solved the plain way (no odenet.solvers, no regularisers).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchdiffeq import odeint_adjoint

from odenet import models
from odenet.config import RunConfig
from odenet.data import DataSplits
from odenet.train import make_optimizer


class ReferenceODEBlock(nn.Module):
    def __init__(self, block: models.ODEBlock):
        super().__init__()
        self.odefunc = block.dynamics
        self.integration_time = torch.tensor([0.0, block.final_time])
        self.solver = block.solver

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        solver = self.solver
        out = odeint_adjoint(self.odefunc, x, self.integration_time.type_as(x),
                             rtol=solver.rtol, atol=solver.atol, method=solver.method)
        return out[1]


def use_reference_blocks(module: nn.Module) -> None:
    """Swap every ODEBlock under `module` for a ReferenceODEBlock, in place."""
    for name, child in module.named_children():
        if isinstance(child, models.ODEBlock):
            setattr(module, name, ReferenceODEBlock(child))
        else:
            use_reference_blocks(child)


def train_reference(config: RunConfig, data: DataSplits, device: torch.device) -> list[dict[str, float]]:
    """Per epoch, what `fit` reports of it (times, NFE, validation accuracy), trained the example's way.

    The same model (odenet.models.build), initial weights, optimiser, batch size, data and
    epochs as our loop; no loss bookkeeping, NFE is read from the model's own counters.
    """
    torch.manual_seed(config.seed)
    model = models.build(config).to(device)
    optimizer = make_optimizer(config, model)
    counters = [block.dynamics for block in model.ode_blocks]
    use_reference_blocks(model)
    train_loader = DataLoader(TensorDataset(data.train.images.cpu(), data.train.labels.cpu()),
                              batch_size=config.batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(config.seed))
    val_loader = DataLoader(TensorDataset(data.val.images.cpu(), data.val.labels.cpu()), batch_size=config.batch_size)
    epochs = []
    for epoch in range(1, config.max_epochs + 1):
        _synchronize(device)
        start = time.perf_counter()
        model.train()
        _reset(counters)
        forward_nfe = 0
        for x, y in train_loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            before = _total(counters, "fnfe")  # the adjoint's backward solve evaluates f too: count the forward alone
            logits = model(x)
            forward_nfe += _total(counters, "fnfe") - before
            F.cross_entropy(logits, y).backward()
            optimizer.step()
        fnfe, bnfe = forward_nfe / len(train_loader), _total(counters, "bnfe") / len(train_loader)
        _synchronize(device)
        validation_start = time.perf_counter()
        model.eval()
        _reset(counters)
        correct = 0
        with torch.no_grad():
            for x, y in val_loader:
                x, y = x.to(device), y.to(device)
                correct += int((model(x).argmax(1) == y).sum())
        _synchronize(device)
        end = time.perf_counter()
        epochs.append(dict(epoch=epoch, val_acc=correct / len(data.val), fnfe=fnfe, bnfe=bnfe,
                           val_fnfe=_total(counters, "fnfe") / len(val_loader), epoch_time_s=end - start,
                           val_time_s=end - validation_start))
    return epochs


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _total(counters, kind: str) -> int:
    """Summed NFE (kind: fnfe or bnfe) of the model's ODE-function counters."""
    return sum(getattr(counter, kind) for counter in counters)


def _reset(counters) -> None:
    for counter in counters:
        counter.reset()
