"""The training procedure: one function, `fit`, for a CLI run and a Ray Tune trial alike.

Per epoch it trains, validates, keeps the early-stopping state, writes a checkpoint
that resumes the run exactly, and hands the epoch's metrics to a callback (where
MLflow, Tune and the benchmark plug in). A solver that underflows or runs out of steps and a loss
that stops being finite end the run as `Diverged`: a result, not a crash.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from odenet import data as data_module
from odenet import models, progress
from odenet.config import ConfigError, RunConfig
from odenet.evaluate import predict
from odenet.failures import Diverged, solver_failures

CHECKPOINT_FILE = "checkpoint.pt"  # the latest epoch's, in the run's checkpoint folder: resumes the run
BEST_CHECKPOINT = "checkpoints/model_best.pt"  # the best epoch's weights, among a finished run's artifacts


@dataclass
class EpochMetrics:
    """What one epoch measured: fnfe/bnfe are means per training batch, val_fnfe per validation
    batch (with the evaluation solver); epoch_time_s is training plus validation, val_time_s the
    validation alone."""

    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    fnfe: float
    bnfe: float
    val_fnfe: float
    epoch_time_s: float
    val_time_s: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class EarlyStopping:
    """Stop when validation loss has not improved for `patience` epochs; keep the best weights."""

    patience: int
    best_val_loss: float = math.inf
    best_epoch: int = 0
    epochs_without_improvement: int = 0
    best_weights: dict[str, torch.Tensor] | None = None

    def update(self, epoch: int, val_loss: float, model: torch.nn.Module) -> None:
        if val_loss < self.best_val_loss:
            self.best_val_loss, self.best_epoch = val_loss, epoch
            self.epochs_without_improvement = 0
            self.best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.epochs_without_improvement += 1

    @property
    def should_stop(self) -> bool:
        return self.epochs_without_improvement >= self.patience


@dataclass
class FitResult:
    model: models.Classifier
    data: data_module.DataSplits
    history: list[EpochMetrics]
    best_epoch: int
    stopped_early: bool


EpochCallback = Callable[[EpochMetrics], None]


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; asking for CUDA on a machine without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError([f"device={name!r}: CUDA is not available on this machine; expected auto or cpu"])
    return torch.device(name)


def make_optimizer(config: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def fit(
    config: RunConfig,
    data: data_module.DataSplits | None = None,
    *,
    on_epoch: EpochCallback | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_metadata: dict[str, Any] | None = None,
) -> FitResult:
    """Train until max_epochs or early stopping; resume from `checkpoint_dir` when it holds a checkpoint.

    `checkpoint_metadata` is stored in every checkpoint and kept on resume (e.g. the MLflow
    run id, so a resumed run continues its own tracking run).
    """
    device = resolve_device(config.device)
    data = data if data is not None else data_module.load(config, device)
    torch.manual_seed(config.seed)
    model = models.build(config).to(device)
    optimizer = make_optimizer(config, model)
    stopping = EarlyStopping(config.patience)
    history: list[EpochMetrics] = []
    metadata = dict(checkpoint_metadata or {})
    start_epoch = 1

    path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    if path is not None and path.exists():
        saved = load_checkpoint(path, device)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        stopping = EarlyStopping(config.patience, **saved["early_stopping"])
        history = [EpochMetrics(**m) for m in saved["history"]]
        metadata = {**saved["metadata"], **metadata}
        _set_rng_state(saved["rng"])
        start_epoch = saved["epoch"] + 1

    for epoch in range(start_epoch, config.max_epochs + 1):
        if stopping.should_stop:
            break
        metrics = _run_epoch(config, model, optimizer, data, epoch, device)
        stopping.update(epoch, metrics.val_loss, model)
        history.append(metrics)
        if path is not None:
            save_checkpoint(path, config, epoch, model, optimizer, stopping, history, metadata)
        if on_epoch is not None:
            on_epoch(metrics)

    if stopping.best_weights is not None:
        model.load_state_dict(stopping.best_weights)
    return FitResult(model, data, history, stopping.best_epoch, stopping.should_stop)


def _run_epoch(config, model, optimizer, data, epoch, device) -> EpochMetrics:
    start = time.perf_counter()
    model.train()
    # The batch order depends only on (seed, epoch), so a resumed run sees the same batches.
    order = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    loss_sum, correct, seen, fnfe, bnfe, batches = 0.0, 0, 0, 0, 0, 0
    with progress.phase(f"epoch {epoch} training", len(data.train), per_epoch=True) as advance:
        for batch, (x, y) in enumerate(data.train.batches(config.batch_size, order), start=1):
            model.reset_nfe()
            with solver_failures(epoch, batch):
                logits = model(x)
                forward_nfe = model.fnfe
                loss = F.cross_entropy(logits, y)
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise Diverged("non_finite_loss", epoch, batch, f"loss = {loss_value}")
                optimizer.zero_grad(set_to_none=True)
                # The regularisers shape training only; train_loss stays comparable across runs.
                (loss + model.regularisation()).backward()
            optimizer.step()
            loss_sum += loss_value * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            fnfe += forward_nfe
            bnfe += model.bnfe
            batches += 1
            advance(len(y))
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the training's queued kernels count as training time
    validation_start = time.perf_counter()
    with solver_failures(epoch, None), model.solving_with(models.SolverSettings.for_evaluation(config)):
        validation = predict(model, data.val, config.batch_size, f"epoch {epoch} validation", per_epoch=True)
    if not math.isfinite(validation.loss):
        raise Diverged("non_finite_loss", epoch, None, f"validation loss = {validation.loss}")
    end = time.perf_counter()
    return EpochMetrics(
        epoch=epoch,
        train_loss=loss_sum / seen,
        train_acc=correct / seen,
        val_loss=validation.loss,
        val_acc=validation.accuracy,
        fnfe=fnfe / batches,
        bnfe=bnfe / batches,
        val_fnfe=validation.fnfe,
        epoch_time_s=end - start,
        val_time_s=end - validation_start,
    )


# -- checkpoints ------------------------------------------------------------------------


def save_checkpoint(path: Path, config, epoch, model, optimizer, stopping, history, metadata) -> None:
    """Write atomically: a run killed mid-write still resumes from the previous checkpoint."""
    state = {
        "config": config.to_dict(),
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "early_stopping": {
            "best_val_loss": stopping.best_val_loss,
            "best_epoch": stopping.best_epoch,
            "epochs_without_improvement": stopping.epochs_without_improvement,
            "best_weights": stopping.best_weights,
        },
        "history": [m.as_dict() for m in history],
        "rng": _rng_state(),
        "metadata": metadata,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    return torch.load(path, map_location=device, weights_only=False)


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
