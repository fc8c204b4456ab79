"""A sweep's record in MLflow: one parent run per sweep (what was searched, then the results
table), and the closing of trial runs the sweep ended from outside.

Nothing here knows Ray: the sweep programs in sweeps/ hand over plain values.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from odenet import tracking
from odenet.provenance import git_commit
from odenet.tracker import IDENTITY_TAG
from odenet.summary import summarize

# Columns of the results table after each trial's settings.
RESULT_COLUMNS = ("best_val_acc", "test_acc", "test_loss", "mean_fnfe", "mean_bnfe", "mean_epoch_time_s", "epochs")
# The tag that tells a sweep's parent run from its trials' runs.
ROLE_TAG, PARENT = "sweep_role", "parent"
PARENT_ROLE = f"tags.{ROLE_TAG} = '{PARENT}'"


def find_parent_run(experiment: str, sweep_name: str | None = None):
    """The parent run of the sweep `sweep_name` in `experiment` (the most recent sweep's when None), or None."""
    query = PARENT_ROLE + (f" and tags.sweep_name = '{sweep_name}'" if sweep_name else "")
    return tracking.first_run(experiment, query, order_by=["attributes.start_time DESC"])


def start_parent_run(experiment: str, sweep_name: str, params: dict[str, str], restoring: bool, design: str) -> str:
    """The id of the sweep's parent run; a restored sweep continues the parent it had."""
    from mlflow.entities import Param

    client = tracking.client()
    if restoring and (found := find_parent_run(experiment, sweep_name)) is not None:
        client.update_run(found.info.run_id, status="RUNNING")
        return found.info.run_id
    run = client.create_run(tracking.experiment_id(experiment), run_name=sweep_name,
                            tags={"sweep_name": sweep_name, ROLE_TAG: PARENT, "design": design,
                                  "git_commit": git_commit()})
    client.log_batch(run.info.run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
    return run.info.run_id


def finish_parent_run(parent_run_id: str, table) -> None:
    """The results table as CSV and markdown on the parent run, which then finishes."""
    client = tracking.client()
    with tempfile.TemporaryDirectory() as folder:
        table.to_csv(Path(folder) / "results.csv", index=False)
        (Path(folder) / "results.md").write_text(table.to_markdown(index=False, floatfmt=".4g"))
        client.log_artifacts(parent_run_id, folder)
    client.set_terminated(parent_run_id, "FINISHED")


# The epoch metrics a run's summary (odenet.summary.summarize) is computed from.
SUMMARIZED = ("val_acc", "val_loss", "epoch_time_s", "fnfe", "bnfe")


def close_trial_run(experiment: str, trial_id: str, status: str, tags: dict[str, str]) -> None:
    """Tag and end the run of a trial that did not end itself (stopped by the scheduler, or errored),
    with the summary of the epochs it logged: the runs table shows best_val_acc, mean_fnfe ... for
    every trial, stopped or finished, so they sort and compare together."""
    from mlflow.entities import Metric, RunTag

    run = tracking.first_run(experiment, f"tags.{IDENTITY_TAG} = '{trial_id}'")
    if run is None:
        return
    run_id = run.info.run_id
    client = tracking.client()
    summary = epoch_summary(run_id)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in summary.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status)


def epoch_summary(run_id: str) -> dict[str, float]:
    """odenet.summary.summarize of the epochs a run logged to MLflow (empty before its first epoch)."""
    import pandas as pd

    client = tracking.client()
    columns = {name: {m.step: m.value for m in client.get_metric_history(run_id, name)} for name in SUMMARIZED}
    frame = pd.DataFrame(columns).rename_axis("epoch").reset_index()
    return summarize(frame.dropna(subset=["val_acc"])) if len(frame) else {}


def trial_row(trial: str, settings: dict[str, Any], last: dict[str, Any], history, error: BaseException | None,
              dimensions: Sequence[str]) -> dict[str, Any]:
    """One trial's row: its settings, the summary of its epochs, its test result, status and cause.
    `last` is the trial's last report, `history` every report (a DataFrame) or None."""
    row: dict[str, Any] = {"trial": trial, **{d: settings.get(d) for d in dimensions}}
    status = last.get("trial_status")
    if error is not None:
        row["status"], row["cause"] = "ERROR", f"{type(error).__name__}: {str(error)[:80]}"
    elif status == "DIVERGED":
        row["status"], row["cause"] = "DIVERGED", last.get("failure_cause", "")
    elif status == "FINISHED":
        row["status"], row["cause"] = "FINISHED", ""
    else:
        row["status"], row["cause"] = "STOPPED", "asha"
    if history is not None and "trial_status" in history:
        epochs = history[history["trial_status"] == "RUNNING"]
        row.update({k: v for k, v in summarize(epochs).items() if k in RESULT_COLUMNS})
    if status == "FINISHED":
        row["test_acc"] = last.get("test_acc")
        row["test_loss"] = last.get("test_loss")
    return row


def results_table(rows: list[dict[str, Any]], dimensions: Sequence[str]):
    """One row per trial, best validation accuracy first."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    for column in RESULT_COLUMNS:
        if column not in frame:
            frame[column] = math.nan
    ordered = ["trial", *dimensions, *RESULT_COLUMNS, "status", "cause"]
    return frame[ordered].sort_values("best_val_acc", ascending=False, na_position="last").reset_index(drop=True)
