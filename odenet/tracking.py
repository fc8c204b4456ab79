"""Where runs are tracked: the MLflow tracking server, or an embedded store, and links to its UI.

With MLFLOW_TRACKING_URI unset, runs go to an embedded store in the working directory
(`mlruns.db` and `mlartifacts/`). With a tracking server, artifacts are uploaded
through it (`--artifacts-destination s3://...`), so only the server holds S3
credentials.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

from odenet.envvars import TRACKING_PASSWORD, TRACKING_URI, TRACKING_USERNAME

EMBEDDED_DB = "mlruns.db"
EMBEDDED_ARTIFACTS = "mlartifacts"
SQLITE = "sqlite:///"
# What an experiment is for: MLflow 3 UIs before the GenAI/Model training switch (3.17 has
# one, see runs_url) open a "Machine learning" experiment (this value) on its runs, not on traces.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# A view of the runs table the UI loads from an experiment tag (its "share" links), and the
# metrics it shows; best val_acc first.
SHARED_VIEW_TAG = "mlflow.sharedViewState."
VIEW_METRICS = ("val_acc", "best_val_acc", "test_acc", "mean_fnfe")


class TrackingError(RuntimeError):
    """The tracking server cannot be used: unreachable, credentials refused, or uploads never succeeded."""


def tracking_uri() -> str:
    """The configured tracking URI, or the embedded SQLite store in the working directory."""
    return os.environ.get(TRACKING_URI) or f"{SQLITE}{Path.cwd() / EMBEDDED_DB}"


def is_embedded() -> bool:
    """True when no tracking server is configured: runs go to the embedded store."""
    return not os.environ.get(TRACKING_URI)


def pin_embedded_store() -> None:
    """Make the embedded store's absolute URI explicit, so processes started from here
    (Ray workers, which run in other folders) log to the same store."""
    if is_embedded():
        os.environ[TRACKING_URI] = tracking_uri()


def check_server() -> None:
    """Fail fast, before training, on a wrong URI or refused credentials."""
    import requests

    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    user, password = os.environ.get(TRACKING_USERNAME), os.environ.get(TRACKING_PASSWORD)
    auth = (user, password) if user else None
    try:
        response = requests.get(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search",
                                params={"max_results": 1}, auth=auth, timeout=10)
    except requests.RequestException as exc:
        raise TrackingError(
            f"cannot reach the MLflow tracking server at {uri} ({exc.__class__.__name__}); check "
            f"{TRACKING_URI}, or unset it to log to the embedded store in {Path.cwd()}"
        ) from None
    if response.status_code in (401, 403):
        raise TrackingError(
            f"the MLflow tracking server at {uri} refused the credentials (HTTP {response.status_code}); "
            f"check {TRACKING_USERNAME} and {TRACKING_PASSWORD}"
        )
    if response.status_code != 200:
        raise TrackingError(
            f"{uri} does not answer like an MLflow tracking server (HTTP {response.status_code} on "
            f"/api/2.0/mlflow/experiments/search); check {TRACKING_URI}"
        )


def client():
    """An MLflow client for tracking_uri()."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri())


def first_run(experiment: str, query: str, order_by: list[str] | None = None):
    """The first run of `experiment` matching the search `query`, or None (also when the
    experiment does not exist)."""
    mlflow_client = client()
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = mlflow_client.search_runs([found.experiment_id], query, order_by=order_by, max_results=1)
    return runs[0] if runs else None


def experiment_id(name: str) -> str:
    """The experiment's id, creating it (with local artifacts when embedded) if needed."""
    mlflow_client = client()
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    # A local SQLite store keeps its artifacts beside it, whichever folder a process
    # (a Ray worker, say) happens to run in.
    db = _sqlite_file(tracking_uri())
    location = (db.parent / EMBEDDED_ARTIFACTS).as_uri() if db else None
    try:
        return mlflow_client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except Exception:
        # Concurrent trials may create it at the same time: the loser reads the winner's.
        found = mlflow_client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def runs_url(server: str, experiment: str, params: Sequence[str]) -> str | None:
    """A link to the experiment's runs table as model training (not GenAI), best val_acc first,
    with `params` and VIEW_METRICS as columns; None if the experiment or the view cannot be had."""
    view = {"orderByKey": "metrics.`val_acc`", "orderByAsc": False,
            "selectedColumns": [f"params.`{p}`" for p in params] + [f"metrics.`{m}`" for m in VIEW_METRICS]}
    text = json.dumps(view, sort_keys=True)
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    try:
        mlflow_client = client()
        found = mlflow_client.get_experiment_by_name(experiment)
        if found is None:
            return None
        mlflow_client.set_experiment_tag(found.experiment_id, SHARED_VIEW_TAG + key, text)
    except Exception:  # the hint never fails a run that is done
        return None
    return f"{server.rstrip('/')}/#/experiments/{found.experiment_id}/runs?workflowType=machine_learning" \
           f"&viewStateShareKey={key}"


def print_ui_hint(experiment: str, params: Sequence[str] = ("model", "lr")) -> None:
    """Where to open the MLflow UI: a link to the experiment's runs sorted by val_acc."""
    uri = tracking_uri()
    db = _sqlite_file(uri)
    if db:
        shown = f"{SQLITE}{db.name}" if db.parent == Path.cwd() else uri
        server = "http://127.0.0.1:5000"
        print(f"open the MLflow UI: mlflow ui --backend-store-uri {shown} (in {db.parent}), "
              f"then {runs_url(server, experiment, params) or server}")
    else:
        print(f"open the MLflow UI: {runs_url(uri, experiment, params) or uri}")



def _sqlite_file(uri: str) -> Path | None:
    return Path(uri[len(SQLITE):]) if uri.startswith(SQLITE) else None
