"""One whole run: train, evaluate on the test set, re-evaluate the solver, report; and a
logged run's test evaluation repeated from its best checkpoint (`odenet evaluate --run-id`).

`execute` is what `odenet train` and every Ray Tune trial call. Reporting goes
through a `Tracker` (MLflow in practice), so `execute` knows nothing of where
results end up.
"""

from __future__ import annotations

import math
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import torch
import torch.nn.functional as F

from odenet import data, machine, progress
from odenet.config import RunConfig
from odenet.evaluate import REEVALUATION_SOLVERS, TestReport, evaluate, reevaluate
from odenet.failures import Diverged, solver_failures
from odenet.models import Classifier, SolverSettings, build
from odenet.summary import reevaluation_metrics, summarize
from odenet.tracking import check_server, client
from odenet.train import (BEST_CHECKPOINT, CHECKPOINT_FILE, EpochCallback, EpochMetrics, FitResult, fit,
                          load_checkpoint, resolve_device)


# The run's cost columns beside FNFE and BNFE: the images per batch that fnfe, bnfe, val_fnfe and
# test_fnfe are means over (an adaptive solver's count per batch grows with it), and the peak memory.
NFE_BATCH_SIZE, PEAK_MEMORY = "nfe_batch_size", "peak_memory_mib"


@dataclass
class RunOutcome:
    config: RunConfig
    fitted: FitResult
    report: TestReport
    reevaluation: pd.DataFrame | None
    peak_memory_mib: float = math.nan  # as machine.peak_memory_method says, for the run's device

    def final_metrics(self) -> dict[str, float]:
        """Test metrics, parameter counts, the history's summary, the solver re-evaluation and the
        run's cost columns, flat."""
        metrics = {**self.report.metrics(), **summarize([m.as_dict() for m in self.fitted.history]),
                   NFE_BATCH_SIZE: self.config.batch_size, PEAK_MEMORY: self.peak_memory_mib}
        if self.reevaluation is not None:
            metrics.update(reevaluation_metrics(self.reevaluation, self.config.batch_size))
        return metrics


class Tracker(Protocol):
    """Where a run's results go. `start` returns the tracking run id, kept in checkpoints."""

    def start(self, config: RunConfig, resume_run_id: str | None, history: list[dict] = ()) -> str | None: ...
    def log_epoch(self, metrics: EpochMetrics) -> None: ...
    def finish(self, outcome: RunOutcome) -> None: ...
    def fail(self, error: Diverged) -> None: ...
    def error(self, trace: str) -> None: ...
    def abort(self) -> None: ...


class NoTracker:
    """Reports nowhere: `execute` without a tracker."""

    def start(self, config, resume_run_id, history=()):
        return resume_run_id

    def log_epoch(self, metrics):
        pass

    def finish(self, outcome):
        pass

    def fail(self, error):
        pass

    def error(self, trace):
        pass

    def abort(self):
        pass


@dataclass(frozen=True)
class Plan:
    """What a run will do, in images, and roughly how long at a pace measured on one batch."""

    epochs: int  # still to train
    epochs_done: int  # by the run this one resumes
    train_images: int
    val_images: int
    test_images: int
    solvers: tuple[str, ...]  # the re-evaluation's
    seconds: float | None  # None: the solver gave up on the timed batch (training will say so)

    def __str__(self) -> str:
        done = f" ({self.epochs_done} done before)" if self.epochs_done else ""
        work = [f"{self.epochs} epoch{'s' * (self.epochs != 1)}{done} on {self.train_images:,} training images "
                f"(validation on {self.val_images:,} after each)",
                f"the test evaluation on {self.test_images:,} images"]
        if self.solvers:
            work.append(f"its re-evaluation with {len(self.solvers)} solvers ({', '.join(self.solvers)}), "
                        f"{self.test_images:,} images each")
        how_long = "" if self.seconds is None else f"; roughly {_duration(self.seconds)} on this machine"
        return (f"plan: {', then '.join(work)}{how_long} (--test-subset N and --no-reevaluate shorten "
                f"the test phases)")


def plan(config: RunConfig, splits: data.DataSplits, epochs_done: int) -> Plan:
    """The run's work, timed on one batch of a fresh model: rough, since a trained ODE model may
    take more solver steps than an untrained one."""
    solvers = tuple(name for name, _, _ in REEVALUATION_SOLVERS) if config.is_ode and config.reevaluate else ()
    epochs = max(config.max_epochs - epochs_done, 0)
    images = (len(splits.train), len(splits.val), len(splits.test))
    try:
        per_train_image, per_eval_image = _pace(config, splits)
    except Diverged:
        return Plan(epochs, epochs_done, *images, solvers, None)
    seconds = (epochs * (images[0] * per_train_image + images[1] * per_eval_image)
               + images[2] * (1 + len(solvers)) * per_eval_image)
    return Plan(epochs, epochs_done, *images, solvers, seconds)


def _pace(config: RunConfig, splits: data.DataSplits) -> tuple[float, float]:
    """Seconds per image of a training step and of an evaluation, on one batch of a fresh model
    (the run's own model is built and seeded by `fit`)."""
    model = build(config).to(splits.train.images.device)
    x, y = next(splits.train.batches(config.batch_size))
    with solver_failures(0, None):
        start = time.perf_counter()
        (F.cross_entropy(model(x), y) + model.regularisation()).backward()
        per_train_image = (time.perf_counter() - start) / len(y)
        model.eval()
        start = time.perf_counter()
        with torch.no_grad(), model.solving_with(SolverSettings.for_evaluation(config)):
            model(x)
    return per_train_image, (time.perf_counter() - start) / len(y)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 100 else f"{seconds / 60:.0f} min"


def resumed(checkpoint_dir: str | Path | None) -> tuple[str | None, list[dict]]:
    """The tracking run id and the epochs already trained, from an existing checkpoint."""
    if checkpoint_dir is None or not (Path(checkpoint_dir) / CHECKPOINT_FILE).exists():
        return None, []
    saved = load_checkpoint(Path(checkpoint_dir) / CHECKPOINT_FILE)
    return saved["metadata"].get("tracking_run_id"), list(saved["history"])


def execute(
    config: RunConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    tracker: Tracker | None = None,
    on_epoch: EpochCallback | None = None,
) -> RunOutcome:
    """Train, evaluate and report one run; a `Diverged` run, or one that raised, is reported as
    failed and the exception re-raised."""
    tracker = tracker or NoTracker()
    resumed_run_id, history = resumed(checkpoint_dir)
    run_id = tracker.start(config, resumed_run_id, history)

    def epoch_done(metrics: EpochMetrics) -> None:
        tracker.log_epoch(metrics)
        if on_epoch is not None:
            on_epoch(metrics)

    metadata: dict[str, Any] = {"tracking_run_id": run_id} if run_id else {}
    try:
        device = resolve_device(config.device)
        machine.reset_peak_memory(device)
        splits = data.load(config, device)
        if progress.mode() != progress.OFF:
            progress.say(str(plan(config, splits, len(history))))
        fitted = fit(config, splits, on_epoch=epoch_done, checkpoint_dir=checkpoint_dir,
                     checkpoint_metadata=metadata)
        evaluation = SolverSettings.for_evaluation(config)
        with solver_failures(fitted.history[-1].epoch if fitted.history else 0, None), \
                fitted.model.solving_with(evaluation):
            test_report = evaluate(fitted.model, fitted.data.test, fitted.data.class_names, config.batch_size)
        reevaluation = None
        if config.is_ode and config.reevaluate:
            reevaluation = reevaluate(fitted.model, fitted.data.test, evaluation, config.batch_size)
    except Diverged as exc:
        tracker.fail(exc)
        raise
    except Exception:
        # A fault of the run (a bug, a lost file, a dead GPU), not a result: FAILED with its
        # traceback, and raised on, so a Tune trial is retried.
        tracker.error(traceback.format_exc())
        raise
    except BaseException:
        tracker.abort()  # interrupted (Ctrl-C): KILLED, resumable
        raise
    outcome = RunOutcome(config, fitted, test_report, reevaluation, machine.peak_memory_mib(device))
    tracker.finish(outcome)
    return outcome


def load_logged_run(run_id: str, data_dir: str | None = None, device: str | None = None,
                    test_subset: int | None = None) -> tuple[RunConfig, Classifier, data.DataSplits, int]:
    """(config, model with its best weights, data splits, best epoch) of a run logged in MLflow;
    the arguments given replace those of the run's config."""
    check_server()
    with tempfile.TemporaryDirectory() as folder:
        saved = load_checkpoint(client().download_artifacts(run_id, BEST_CHECKPOINT, folder))
    given = {"data_dir": data_dir, "device": device, "test_subset": test_subset}
    config = RunConfig.from_dict({**saved["config"], **{k: v for k, v in given.items() if v is not None}})
    on = resolve_device(config.device)
    model = build(config).to(on)
    model.load_state_dict(saved["model"])
    return config, model, data.load(config, on), saved["best_epoch"]


def evaluate_logged_run(run_id: str, data_dir: str | None = None, device: str = "auto",
                        test_subset: int | None = None) -> str:
    """Load a run's best checkpoint back from MLflow and repeat its test evaluation."""
    config, model, splits, best_epoch = load_logged_run(run_id, data_dir=data_dir, device=device,
                                                        test_subset=test_subset)
    test_report = evaluate(model, splits.test, splits.class_names, config.batch_size)
    logged = client().get_run(run_id).data.metrics.get("test_acc")
    lines = [f"run {run_id} ({config.model} on {config.dataset}, best epoch {best_epoch})",
             f"test accuracy {test_report.accuracy:.4f}  test loss {test_report.loss:.4f}  "
             f"test fnfe {test_report.fnfe:.1f}"]
    if logged is not None:
        lines.append(f"logged test accuracy {logged:.4f}")
    lines.append(test_report.report_text)
    return "\n".join(lines)
