"""One whole run: train, evaluate on the test set, re-evaluate the solver, report.

`execute` is what `odenet train` and every Ray Tune trial call. Reporting goes
through a `Tracker` (MLflow in practice), so this module knows nothing of where
results end up.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from odenet.config import RunConfig
from odenet.evaluate import TestReport, evaluate, reevaluate
from odenet.failures import Diverged, solver_failures
from odenet.models import SolverSettings
from odenet.summary import reevaluation_metrics, summarize
from odenet.train import CHECKPOINT_FILE, EpochCallback, EpochMetrics, FitResult, fit, load_checkpoint


@dataclass
class RunOutcome:
    config: RunConfig
    fitted: FitResult
    report: TestReport
    reevaluation: pd.DataFrame | None

    def final_metrics(self) -> dict[str, float]:
        """Test metrics, parameter counts, the history's summary and the solver re-evaluation, flat."""
        metrics = {**self.report.metrics(), **summarize([m.as_dict() for m in self.fitted.history])}
        if self.reevaluation is not None:
            metrics.update(reevaluation_metrics(self.reevaluation))
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
    run_id = tracker.start(config, *resumed(checkpoint_dir))

    def epoch_done(metrics: EpochMetrics) -> None:
        tracker.log_epoch(metrics)
        if on_epoch is not None:
            on_epoch(metrics)

    metadata: dict[str, Any] = {"tracking_run_id": run_id} if run_id else {}
    try:
        fitted = fit(config, on_epoch=epoch_done, checkpoint_dir=checkpoint_dir, checkpoint_metadata=metadata)
        evaluation = SolverSettings.for_evaluation(config)
        with solver_failures(fitted.history[-1].epoch if fitted.history else 0, None), \
                fitted.model.solving_with(evaluation):
            report = evaluate(fitted.model, fitted.data.test, fitted.data.class_names, config.batch_size)
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
    outcome = RunOutcome(config, fitted, report, reevaluation)
    tracker.finish(outcome)
    return outcome
