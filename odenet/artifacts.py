"""The files a run leaves behind: checkpoint, config, per-epoch table, figures, test tables, packages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch
import yaml

from odenet import plots
from odenet.provenance import installed_packages
from odenet.train import BEST_CHECKPOINT

if TYPE_CHECKING:
    from odenet.run import RunOutcome


def write_history_artifacts(history: list[dict], folder: Path) -> None:
    """Per-epoch table and curves, plus the installed packages: logged for failed runs too."""
    (folder / "installed_packages.txt").write_text(installed_packages())
    if not history:
        return
    frame = pd.DataFrame(history)
    frame.to_csv(folder / "history.csv", index=False)
    plots.learning_curves(frame, folder / "learning_curves.png")
    plots.nfe_curves(frame, folder / "nfe_curves.png")


def write_run_artifacts(outcome: RunOutcome, folder: Path) -> None:
    """Every file a finished run logs: checkpoint, config, test report, figures, tables, packages."""
    fitted, test = outcome.fitted, outcome.report
    write_history_artifacts([m.as_dict() for m in fitted.history], folder)
    (folder / "checkpoints").mkdir()
    torch.save({"config": outcome.config.to_dict(), "model": fitted.model.state_dict(),
                "best_epoch": fitted.best_epoch}, folder / BEST_CHECKPOINT)
    (folder / "config.yaml").write_text(yaml.safe_dump(outcome.config.to_dict(), sort_keys=False))
    (folder / "classification_report.txt").write_text(test.report_text)
    test.per_class.to_csv(folder / "per_class_metrics.csv", index=False)
    plots.confusion_matrix(test.confusion, fitted.data.class_names, folder / "confusion_matrix.png")
    if outcome.reevaluation is not None:
        outcome.reevaluation.to_csv(folder / "solver_reevaluation.csv", index=False)
    (folder / "final_metrics.json").write_text(json.dumps(outcome.final_metrics(), indent=2))
