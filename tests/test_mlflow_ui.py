"""The MLflow UI of the local stack, in Chromium: two runs logged with the client show up,
with their parameters and metrics, on the experiment page and in the compare view.
Screenshots go to test-artifacts/ at the repository root."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.browser import CHROMIUM, open_runs_ui

pytestmark = [pytest.mark.stack, pytest.mark.browser]

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
PARAMS = ("lr", "model")
METRICS = ("val_acc", "val_loss")


@pytest.fixture
def two_runs(tracking_stack, tracking_env):
    client = MlflowClient()
    experiment_id = client.create_experiment(f"ui-check-{uuid.uuid4().hex[:8]}")
    runs = {}
    for run_name, lr, model, best in (("odenet-lr0.1", 0.1, "odenet-simple", 0.81),
                                      ("resnet-lr0.01", 0.01, "resnet-small", 0.74)):
        run = client.create_run(experiment_id, run_name=run_name)
        client.log_param(run.info.run_id, "lr", lr)
        client.log_param(run.info.run_id, "model", model)
        for step in range(3):
            client.log_metric(run.info.run_id, "val_acc", round(best - 0.1 * (2 - step), 3), step=step)
            client.log_metric(run.info.run_id, "val_loss", round(1.5 - 0.4 * step + lr, 3), step=step)
        client.set_terminated(run.info.run_id)
        runs[run.info.run_id] = run_name
    return experiment_id, runs


@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")
def test_runs_show_on_the_experiment_page_and_in_the_compare_view(tracking_stack, two_runs):
    experiment_id, runs = two_runs
    pages = open_runs_ui(tracking_stack.tracking_uri, tracking_stack.credentials, experiment_id, list(runs),
                         ARTIFACTS, name="test_mlflow_ui")
    assert pages["run_names"] == runs
    for view in ("experiment", "compare"):
        shown = cells(pages[view]["text"])
        for expected in (*runs.values(), *PARAMS, *METRICS):
            assert expected in shown, f"{expected!r} missing from the {view} page {pages[view]['url']}"
        screenshot = Path(pages[view]["screenshot"])
        assert screenshot.parent == ARTIFACTS and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # on the experiment page as columns of the runs table, with each run's values
    assert {*PARAMS, *METRICS, "Run Name"} <= set(pages["experiment"]["columns"])
    assert {"odenet-simple", "resnet-small", "0.1", "0.01", "0.81", "0.74"} <= cells(pages["experiment"]["text"])
    # side by side in the compare view: a row per parameter, with both runs' values
    compare = pages["compare"]["text"]
    assert "Comparing 2 Runs from 1 Experiment" in compare
    rows = {line.split("\t")[0].strip(): [c.strip() for c in line.split("\t")[1:]] for line in compare.splitlines()}
    assert sorted(rows["lr"]) == ["0.01", "0.1"] and sorted(rows["model"]) == ["odenet-simple", "resnet-small"]


def cells(text: str) -> set[str]:
    """Every line and table cell of a page's text, so that "model" does not match "Model training"."""
    return {cell.strip() for line in text.splitlines() for cell in line.split("\t") if cell.strip()}
