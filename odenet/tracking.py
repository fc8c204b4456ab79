"""Every run in MLflow: params, per-epoch metrics, tags, status and artifacts.

With MLFLOW_TRACKING_URI unset, runs go to an embedded store in the working directory
(`mlruns.db` and `mlartifacts/`). With a tracking server, artifacts are uploaded
through it (`--artifacts-destination s3://...`), so only the server holds S3
credentials. Nothing is lost to an unreachable server: epoch metrics queue in a
background writer that retries until the server is back, and artifact uploads are
retried before the run fails loudly.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import queue
import socket
import subprocess
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch
import yaml

from odenet import plots
from odenet.config import RunConfig
from odenet import envvars
from odenet.envvars import TRACKING
from odenet.failures import Diverged

EMBEDDED_DB = "mlruns.db"
EMBEDDED_ARTIFACTS = "mlartifacts"
BEST_CHECKPOINT = "checkpoints/model_best.pt"
TRACKING_URI, TRACKING_USERNAME, TRACKING_PASSWORD = TRACKING
# A tag that names what a run is for (a Tune trial's id): one run per identity.
IDENTITY_TAG = "run_identity"
# What an experiment is for: MLflow 3 UIs before the GenAI/Model training switch (3.17 has
# one, see runs_url) open a "Machine learning" experiment (this value) on its runs, not on traces.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# A view of the runs table the UI loads from an experiment tag (its "share" links), and the
# metrics it shows; best val_acc first.
SHARED_VIEW_TAG = "mlflow.sharedViewState."
VIEW_METRICS = ("val_acc", "best_val_acc", "test_acc", "mean_fnfe")


class TrackingError(RuntimeError):
    """The tracking server cannot be used: unreachable, credentials refused, or uploads never succeeded."""


def _retry_budget_s() -> float:
    # How long the end of a run waits for an outage to pass before failing loudly.
    return float(os.environ.get(envvars.TRACKING_RETRY_S, "600"))


def tracking_uri() -> str:
    """The configured tracking URI, or the embedded SQLite store in the working directory."""
    return os.environ.get(TRACKING_URI) or f"sqlite:///{Path.cwd() / EMBEDDED_DB}"


def is_embedded() -> bool:
    return not os.environ.get(TRACKING_URI)


def pin_embedded_store() -> None:
    """Make the embedded store's absolute URI explicit, so processes started from here
    (Ray workers, which run in other folders) log to the same store."""
    if is_embedded():
        os.environ[TRACKING_URI] = tracking_uri()


def check_server(uri: str | None = None, timeout: float = 10.0) -> None:
    """Fail fast, before training, on a wrong URI or refused credentials."""
    import requests

    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    user, password = os.environ.get(TRACKING_USERNAME), os.environ.get(TRACKING_PASSWORD)
    auth = (user, password) if user else None
    try:
        response = requests.get(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search",
                                params={"max_results": 1}, auth=auth, timeout=timeout)
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
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri())


def experiment_id(name: str) -> str:
    """The experiment's id, creating it (with local artifacts when embedded) if needed."""
    c = client()
    found = c.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    uri = tracking_uri()
    # A local SQLite store keeps its artifacts beside it, whichever folder a process
    # (a Ray worker, say) happens to run in.
    location = (Path(uri[len("sqlite:///"):]).parent / EMBEDDED_ARTIFACTS).as_uri() if uri.startswith("sqlite:///") else None
    try:
        return c.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except Exception:
        # Concurrent trials may create it at the same time: the loser reads the winner's.
        found = c.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def run_tags(config: RunConfig) -> dict[str, str]:
    """Tags that say what ran where: model, data set, code version, library versions, host."""
    from odenet.train import resolve_device

    commit = git_commit()
    tags = {
        "model": config.model,
        "dataset": config.dataset,
        "git_commit": commit,
        "python_version": platform.python_version(),
        "host": socket.gethostname(),
        "device": str(resolve_device(config.device)),
    }
    for package in ("torch", "torchdiffeq", "ray", "mlflow"):
        tags[f"{package}_version"] = _version(package)
    if torch.cuda.is_available():
        tags["gpu"] = torch.cuda.get_device_name()
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    return tags


def git_commit() -> str:
    """The code's commit: from git where the package is a checkout, else $ODENET_GIT_COMMIT (images)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("ODENET_GIT_COMMIT", "unknown")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _retrying(action: Callable[[], Any], what: str, budget_s: float, first_wait: float = 1.0) -> Any:
    """Run `action` until it succeeds or `budget_s` has passed; then raise TrackingError."""
    deadline = time.monotonic() + budget_s
    wait = first_wait
    while True:
        try:
            return action()
        except Exception as exc:  # MLflow raises MlflowException, requests and botocore errors
            if time.monotonic() + wait > deadline:
                raise TrackingError(f"{what} failed for {budget_s:.0f}s, last error: {exc}") from exc
            time.sleep(wait)
            wait = min(wait * 2, 15.0)


class MetricWriter:
    """Sends epoch metrics from a background thread so an outage never stalls training.

    Metrics wait in order in a queue; a failed send is retried until it succeeds, so once
    the server is back every epoch is in the run.
    """

    def __init__(self, send: Callable[[list], None]):
        self._send = send
        self._queue: queue.Queue = queue.Queue()
        self._pending = 0
        self._lock = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="mlflow-metrics", daemon=True)
        self._thread.start()

    def put(self, metrics: list) -> None:
        with self._lock:
            self._pending += 1
        self._queue.put(metrics)

    def _loop(self) -> None:
        while True:
            batch = self._queue.get()
            wait = 1.0
            while True:
                try:
                    self._send(batch)
                    break
                except Exception:
                    time.sleep(wait)
                    wait = min(wait * 2, 10.0)
            with self._lock:
                self._pending -= 1
                self._lock.notify_all()

    def flush(self, timeout_s: float) -> None:
        """Wait until every queued batch is sent; TrackingError if the server stays away."""
        with self._lock:
            if not self._lock.wait_for(lambda: self._pending == 0, timeout=timeout_s):
                raise TrackingError(f"{self._pending} batches of epoch metrics could not be sent to "
                                    f"{tracking_uri()} within {timeout_s:.0f}s")


class MlflowTracker:
    """A run's life in MLflow; resuming with the run id from a checkpoint continues that run."""

    def __init__(self, experiment: str = "odenet", run_name: str | None = None,
                 parent_run_id: str | None = None, extra_tags: dict[str, str] | None = None):
        self.experiment = experiment
        self.run_name = run_name
        self.parent_run_id = parent_run_id
        self.extra_tags = extra_tags or {}
        self.run_id: str | None = None
        self._writer: MetricWriter | None = None
        self._history: list[dict] = []
        self._logged_epochs: set[int] = set()

    @classmethod
    def from_environment(cls, **kwargs) -> "MlflowTracker":
        """A tracker for the configured server (checked now), or for the embedded store."""
        check_server()
        return cls(**kwargs)

    # -- the Tracker protocol ------------------------------------------------------------

    def start(self, config: RunConfig, resume_run_id: str | None, history: list[dict] = ()) -> str:
        """Create the run, or reopen it on resume. A resumed run's checkpointed epochs that never
        reached the server are sent now, and epochs the server already has are not sent again
        when a restarted trial trains them anew: each epoch is logged once."""
        from mlflow.entities import Param, RunStatus

        c = client()
        budget = _retry_budget_s()
        resume_run_id = resume_run_id or self._existing_run()
        if resume_run_id is not None:
            self.run_id = resume_run_id
            _retrying(lambda: c.update_run(resume_run_id, status=RunStatus.to_string(RunStatus.RUNNING)),
                      "reopening the run", budget)
            self._logged_epochs = _retrying(
                lambda: {m.step for m in c.get_metric_history(resume_run_id, "val_acc")}, "reading the run", budget)
        else:
            tags = {**run_tags(config), **self.extra_tags}
            if self.parent_run_id:
                tags["mlflow.parentRunId"] = self.parent_run_id
            experiment = _retrying(lambda: experiment_id(self.experiment), "finding the experiment", budget)
            run = _retrying(lambda: c.create_run(experiment, run_name=self.run_name, tags=tags),
                            "creating the run", budget)
            self.run_id = run.info.run_id
            params = [Param(k, _param_value(v)) for k, v in config.to_dict().items()]
            _retrying(lambda: c.log_batch(self.run_id, params=params), "logging params", budget)
        self._writer = MetricWriter(lambda metrics: client().log_batch(self.run_id, metrics=metrics))
        for values in history:
            self._log(dict(values))
        return self.run_id

    def log_epoch(self, metrics) -> None:
        self._log(metrics.as_dict())

    def sent(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for the queued epoch metrics to reach the server: before a Tune
        trial reports an epoch, after which the scheduler may stop its process at once. False
        when the server is away (an outage): the metrics stay queued and training goes on."""
        try:
            self._writer.flush(timeout_s)
        except TrackingError:
            return False
        return True

    def _log(self, values: dict) -> None:
        from mlflow.entities import Metric

        self._history.append(dict(values))  # a copy: the epoch leaves `values` below
        step = values.pop("epoch")
        if step in self._logged_epochs:
            return
        self._logged_epochs.add(step)
        now = int(time.time() * 1000)
        self._writer.put([Metric(k, float(v), now, step) for k, v in values.items()])

    def finish(self, outcome) -> None:
        with tempfile.TemporaryDirectory() as folder:
            write_run_artifacts(outcome, Path(folder))
            self._close(outcome.final_metrics(), Path(folder), "FINISHED")

    def fail(self, error: Diverged) -> None:
        tags = {"failure_cause": error.cause, "failure_epoch": str(error.epoch),
                "failure_batch": "" if error.batch is None else str(error.batch),
                "failure_detail": error.detail[:4000]}
        self._set_tags(tags)
        with tempfile.TemporaryDirectory() as folder:
            write_history_artifacts(self._history, Path(folder))
            self._close({}, Path(folder), "FAILED")

    def error(self, trace: str) -> None:
        """A run that raised: FAILED, with the traceback as a tag and as `error.txt`."""
        if self.run_id is None:
            return
        self._set_tags({"failure_cause": "error", "failure_detail": trace[-4000:]})
        with tempfile.TemporaryDirectory() as folder:
            write_history_artifacts(self._history, Path(folder))
            (Path(folder) / "error.txt").write_text(trace)
            self._close({}, Path(folder), "FAILED")

    def abort(self) -> None:
        """An interrupted run (Ctrl-C, a stopped trial) is KILLED; a resume sets it RUNNING again."""
        if self.run_id is None:
            return
        try:
            self._writer.flush(timeout_s=30)
            client().set_terminated(self.run_id, "KILLED")
        except Exception:
            pass  # best effort: we are already on the way out

    # -- helpers ---------------------------------------------------------------------------

    def _existing_run(self) -> str | None:
        """A run already made for this identity (e.g. a Tune trial that died before its first
        checkpoint): continuing it keeps one MLflow run per trial."""
        identity = self.extra_tags.get(IDENTITY_TAG)
        if identity is None:
            return None
        found = client().get_experiment_by_name(self.experiment)
        if found is None:
            return None
        runs = client().search_runs([found.experiment_id], f"tags.{IDENTITY_TAG} = '{identity}'", max_results=1)
        return runs[0].info.run_id if runs else None

    def _set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        _retrying(lambda: client().log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()]),
                  "setting tags", _retry_budget_s())

    def _close(self, final_metrics: dict[str, float], artifacts: Path, status: str) -> None:
        from mlflow.entities import Metric

        budget = _retry_budget_s()
        self._writer.flush(timeout_s=budget)
        c = client()
        now = int(time.time() * 1000)
        if final_metrics:
            metrics = [Metric(k, float(v), now, 0) for k, v in final_metrics.items()]
            _retrying(lambda: c.log_batch(self.run_id, metrics=metrics), "logging final metrics", budget)
        try:
            _retrying(lambda: c.log_artifacts(self.run_id, str(artifacts)), "uploading artifacts", budget)
        except TrackingError as exc:
            self._set_tags({"failure_cause": "artifact_upload", "failure_detail": str(exc)[:4000]})
            c.set_terminated(self.run_id, "FAILED")
            raise
        _retrying(lambda: c.set_terminated(self.run_id, status), "closing the run", budget)

    def print_where(self) -> None:
        """Tell the user where the run is and how to look at it."""
        if self.run_id is None:
            return
        print(f"mlflow run {self.run_id} in experiment {self.experiment!r} at {tracking_uri()}")
        print_ui_hint(self.experiment)


def runs_url(server: str, experiment: str, params: Sequence[str]) -> str | None:
    """A link to the experiment's runs table as model training (not GenAI), best val_acc first,
    with `params` and VIEW_METRICS as columns; None if the experiment or the view cannot be had."""
    view = {"orderByKey": "metrics.`val_acc`", "orderByAsc": False,
            "selectedColumns": [f"params.`{p}`" for p in params] + [f"metrics.`{m}`" for m in VIEW_METRICS]}
    text = json.dumps(view, sort_keys=True)
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    try:
        c = client()
        found = c.get_experiment_by_name(experiment)
        if found is None:
            return None
        c.set_experiment_tag(found.experiment_id, SHARED_VIEW_TAG + key, text)
    except Exception:  # the hint never fails a run that is done
        return None
    return f"{server.rstrip('/')}/#/experiments/{found.experiment_id}/runs?workflowType=machine_learning" \
           f"&viewStateShareKey={key}"


def print_ui_hint(experiment: str | None = None, params: Sequence[str] = ("model", "lr")) -> None:
    """Where to open the MLflow UI: with an experiment, a link to its runs sorted by val_acc."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        shown = f"sqlite:///{db.name}" if db.parent == Path.cwd() else uri
        server = "http://127.0.0.1:5000"
        print(f"open the MLflow UI: mlflow ui --backend-store-uri {shown} (in {db.parent}), "
              f"then {experiment and runs_url(server, experiment, params) or server}")
    else:
        print(f"open the MLflow UI: {experiment and runs_url(uri, experiment, params) or uri}")


def _param_value(value: Any) -> str:
    return "None" if value is None else str(value)


# -- what a run leaves behind ---------------------------------------------------------------


def write_history_artifacts(history: list[dict], folder: Path) -> None:
    """Per-epoch table and curves, plus the installed packages: logged for failed runs too."""
    (folder / "installed_packages.txt").write_text(installed_packages())
    if not history:
        return
    frame = pd.DataFrame(history)
    frame.to_csv(folder / "history.csv", index=False)
    plots.learning_curves(frame, folder / "learning_curves.png")
    plots.nfe_curves(frame, folder / "nfe_curves.png")


def write_run_artifacts(outcome, folder: Path) -> None:
    """Every file a finished run logs: checkpoint, config, report, figures, tables, packages."""
    fitted, report = outcome.fitted, outcome.report
    write_history_artifacts([m.as_dict() for m in fitted.history], folder)
    (folder / "checkpoints").mkdir()
    torch.save({"config": outcome.config.to_dict(), "model": fitted.model.state_dict(),
                "best_epoch": fitted.best_epoch}, folder / BEST_CHECKPOINT)
    (folder / "config.yaml").write_text(yaml.safe_dump(outcome.config.to_dict(), sort_keys=False))
    (folder / "classification_report.txt").write_text(report.report_text)
    report.per_class.to_csv(folder / "per_class_metrics.csv", index=False)
    plots.confusion_matrix(report.confusion, fitted.data.class_names, folder / "confusion_matrix.png")
    if outcome.reevaluation is not None:
        outcome.reevaluation.to_csv(folder / "solver_reevaluation.csv", index=False)
    (folder / "final_metrics.json").write_text(json.dumps(outcome.final_metrics(), indent=2))


def installed_packages() -> str:
    return "\n".join(sorted(f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions())) + "\n"


# -- odenet evaluate --run-id -----------------------------------------------------------------


def load_logged_run(run_id: str, **overrides):
    """(config, model with its best weights, data splits) of a run logged in MLflow."""
    from odenet import data as data_module
    from odenet.models import build
    from odenet.train import load_checkpoint, resolve_device

    check_server()
    c = client()
    with tempfile.TemporaryDirectory() as folder:
        saved = load_checkpoint(c.download_artifacts(run_id, BEST_CHECKPOINT, folder))
    config = RunConfig.from_dict({**saved["config"], **{k: v for k, v in overrides.items() if v is not None}})
    device = resolve_device(config.device)
    model = build(config).to(device)
    model.load_state_dict(saved["model"])
    return config, model, data_module.load(config, device), saved["best_epoch"]


def evaluate_logged_run(run_id: str, data_dir: str | None = None, device: str = "auto",
                        test_subset: int | None = None) -> str:
    """Load a run's best checkpoint back from MLflow and repeat its test evaluation."""
    from odenet.evaluate import evaluate

    config, model, splits, best_epoch = load_logged_run(run_id, data_dir=data_dir, device=device,
                                                        test_subset=test_subset)
    report = evaluate(model, splits.test, splits.class_names, config.batch_size)
    logged = client().get_run(run_id).data.metrics.get("test_acc")
    lines = [f"run {run_id} ({config.model} on {config.dataset}, best epoch {best_epoch})",
             f"test accuracy {report.accuracy:.4f}  test loss {report.loss:.4f}  test fnfe {report.fnfe:.1f}"]
    if logged is not None:
        lines.append(f"logged test accuracy {logged:.4f}")
    lines.append(report.report_text)
    return "\n".join(lines)
