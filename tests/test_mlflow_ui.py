"""The MLflow UI as a user first meets it, in Chromium, on runs the project itself logged into
the local stack (`odenet train` and the session's smoke sweep, tests/sweep_fixtures.py): the link each prints opens the runs table
as model training (not GenAI's overview), sorted by val_acc, with the searched parameters and
the metrics as columns; the sweep's parent and children show; the compare view shows the
searched parameters and val_acc; a run's learning-curve PNG renders. Screenshots go to
test-artifacts/ at the repository root."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.browser import CHROMIUM, open_runs_ui
from tests.conftest import REPO

pytestmark = [pytest.mark.stack, pytest.mark.browser,
              pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                                 reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")]

ARTIFACTS = REPO / "test-artifacts"
LINK = re.compile(r"^open the MLflow UI: (\S+)$", re.M)
PNG = b"\x89PNG\r\n\x1a\n"


def logged_by(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Run a project command; its stdout."""
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def logged(tracking_stack, real_data_dir, tmp_path_factory, smoke_sweep):
    """An `odenet train` run in an experiment of its own and the session's smoke sweep; their
    experiment names and what each printed."""
    cwd = tmp_path_factory.mktemp("ui")
    env = {**os.environ, **tracking_stack.env}
    env.pop("RAY_ADDRESS", None)
    train = f"ui-train-{uuid.uuid4().hex[:6]}"
    train_out = logged_by(["-m", "odenet.cli", "train", "--experiment", train, "--model", "resnet-small", "--width",
                           "4", "--subset", "256", "--test-subset", "100", "--max-epochs", "2", "--no-reevaluate",
                           "--data-dir", str(real_data_dir)], cwd, env)
    return {"train": (train, train_out), "sweep": (smoke_sweep.experiment, smoke_sweep.run.stdout)}


def printed_link(stdout: str, experiment_id: str, uri: str) -> str:
    """The runs link a command printed: the model-training runs table, in a view MLflow keeps."""
    (link,) = LINK.findall(stdout)
    assert link.startswith(f"{uri}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
                           f"&viewStateShareKey="), link
    return link


def opened_as_model_training(page: dict) -> None:
    """The runs table, not the GenAI overview, sorted by val_acc (the view's facets land in the URL)."""
    assert "/runs?" in page["url"] and "workflowType=machine_learning" in page["url"]
    assert "orderByKey=metrics.%60val_acc%60" in page["url"] and "orderByAsc=false" in page["url"]
    text = page["text"]
    assert "Sort: val_acc" in text and "matching run" in text
    assert "Tool calls" not in text and "Usage" not in cells(text)


def test_the_sweep_link_opens_its_runs_sorted_by_val_acc_with_the_searched_params(logged, tracking_stack,
                                                                                   tracking_env):
    name, stdout = logged["sweep"]
    c = MlflowClient()
    experiment = c.get_experiment_by_name(name)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = c.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    children = [r for r in runs if r.data.tags.get("sweep_role") != "parent"]
    assert len(children) == 6
    searched = list(json.loads(parent.data.params["search_space"]))
    link = printed_link(stdout, experiment.experiment_id, tracking_stack.tracking_uri)

    pages = open_runs_ui(link, tracking_stack.credentials, experiment.experiment_id,
                         [parent.info.run_id, *(r.info.run_id for r in children)], ARTIFACTS,
                         compare=[r.info.run_id for r in children], metrics=("val_acc",), name="test_mlflow_ui-sweep")
    opened_as_model_training(pages["runs"])
    shown = cells(pages["runs"]["text"])
    assert name in shown and {r.info.run_name for r in children} <= shown, "the parent and its children"
    assert {*searched, "val_acc", "test_acc", "Run Name"} <= set(pages["runs"]["columns"])

    # side by side in the compare view: a row per searched parameter and val_acc, every trial's values
    compare = pages["compare"]["text"]
    assert f"Comparing {len(children)} Runs from 1 Experiment" in compare
    rows = {line.split("\t")[0].strip(): [v.strip() for v in line.split("\t")[1:]] for line in compare.splitlines()}
    for param in searched:
        assert sorted(rows[param]) == sorted(r.data.params[param] for r in children), param
    # the metrics table lists names, then values (rounded to 3 places)
    assert "val_acc" in cells(compare)
    assert {str(round(r.data.metrics["val_acc"], 3)) for r in children} <= cells(compare)
    for page in ("runs", "compare"):
        assert Path(pages[page]["screenshot"]).read_bytes()[:8] == PNG


def test_the_train_link_opens_its_run_whose_learning_curves_render(logged, tracking_stack, tracking_env):
    name, stdout = logged["train"]
    c = MlflowClient()
    experiment = c.get_experiment_by_name(name)
    (run,) = c.search_runs([experiment.experiment_id])
    assert "learning_curves.png" in {a.path for a in c.list_artifacts(run.info.run_id)}
    link = printed_link(stdout, experiment.experiment_id, tracking_stack.tracking_uri)

    pages = open_runs_ui(link, tracking_stack.credentials, experiment.experiment_id, [run.info.run_id], ARTIFACTS,
                         artifact=(run.info.run_id, "learning_curves.png"), name="test_mlflow_ui-train")
    opened_as_model_training(pages["runs"])
    assert run.info.run_name in cells(pages["runs"]["text"])
    assert {"model", "lr", "val_acc", "test_acc"} <= set(pages["runs"]["columns"])
    rendered = [width for src, width in pages["artifact"]["images"]
                if "learning_curves.png" in src or src.startswith("blob:")]
    assert rendered and min(rendered) > 0, pages["artifact"]["images"]
    for page in ("runs", "artifact"):
        assert Path(pages[page]["screenshot"]).read_bytes()[:8] == PNG


def cells(text: str) -> set[str]:
    """Every line and table cell of a page's text, so that "model" does not match "Model training"."""
    return {cell.strip() for line in text.splitlines() for cell in line.split("\t") if cell.strip()}
