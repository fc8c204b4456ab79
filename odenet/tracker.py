"""A run's life in MLflow: params, tags, per-epoch metrics through outages, artifacts, status.

Nothing is lost to an unreachable server: epoch metrics queue in a background writer
that retries until the server is back, and artifact uploads are retried before the run
fails loudly.
"""

from __future__ import annotations

import logging
import os
import queue
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from mlflow.entities import Metric, Param, RunStatus, RunTag

from odenet import envvars
from odenet.artifacts import write_history_artifacts, write_run_artifacts
from odenet.config import RunConfig
from odenet.failures import Diverged
from odenet.provenance import run_tags
from odenet.tracking import TrackingError, check_server, client, experiment_id, first_run, print_ui_hint, tracking_uri
from odenet.train import EpochMetrics

if TYPE_CHECKING:
    from odenet.run import RunOutcome

# Outages and retries are reported here (on stderr, through logging's last-resort handler, when
# nothing configured logging); tests wait on these records to meet an outage.
log = logging.getLogger(__name__)

# A tag that names what a run is for (a Tune trial's id): one run per identity.
IDENTITY_TAG = "run_identity"


def _retry_budget_s() -> float:
    # How long the start or the end of a run waits for an outage to pass before failing loudly.
    return float(os.environ.get(envvars.TRACKING_RETRY_S, "600"))


def _deadline() -> float:
    """When the wait that starts now must end (time.monotonic()), and MLflow's own HTTP retries
    kept inside it."""
    budget = _retry_budget_s()
    bound_mlflow_http(budget)
    return time.monotonic() + budget


# What this process last set each of MLflow's HTTP variables to: a value that differs was set by
# the user, who then keeps it (and with it MLflow's own wait per call).
_http_set_here: dict[str, str] = {}


def mlflow_http_limits(budget_s: float) -> dict[str, str]:
    """MLflow's own retries and timeout per call, from the budget. Each MLflow call retries by
    itself (by default 7 times with doubling waits: about 4 minutes) before our loop sees the
    error, and our deadline is checked only between calls. So MLflow retries twice, ~0 s and
    ~2 s apart (kept for a blip in calls our loop does not wrap), with a timeout of budget/8
    (5 to 120 s) for connecting and for each read: a refused connection or a server error
    costs one call a few seconds, a server that hangs about 3 timeouts."""
    timeout = int(min(max(budget_s / 8, 5), 120))
    return {envvars.MLFLOW_HTTP_MAX_RETRIES: "2", envvars.MLFLOW_HTTP_BACKOFF_FACTOR: "1",
            envvars.MLFLOW_HTTP_TIMEOUT: str(timeout)}


def bound_mlflow_http(budget_s: float) -> None:
    """Set MLflow's HTTP variables, which it reads at every call, from the budget (for this
    process and those it starts), unless the user set them."""
    for name, value in mlflow_http_limits(budget_s).items():
        if os.environ.get(name) in (None, _http_set_here.get(name)):
            os.environ[name] = _http_set_here[name] = value


def _retrying(action: Callable[[], Any], what: str, deadline: float) -> Any:
    """Run `action` until it succeeds; after the first try, only until `deadline`
    (time.monotonic()); then raise TrackingError. Each failure is logged with the time left."""
    started = time.monotonic()
    wait = 1.0
    while True:
        try:
            return action()
        except Exception as exc:  # MLflow raises MlflowException, requests and botocore errors
            left = deadline - time.monotonic()
            if left <= 0:
                raise TrackingError(f"{what} failed for {time.monotonic() - started:.0f}s "
                                    f"({envvars.TRACKING_RETRY_S}={_retry_budget_s():g}), last error: {exc}") from exc
            log.warning("%s failed (%s: %s); trying again in %.0f s, %.0f s left of %s", what,
                        type(exc).__name__, str(exc)[:300], min(wait, left), left, envvars.TRACKING_RETRY_S)
            time.sleep(min(wait, left))  # the last try comes at the deadline
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
            wait, down_since = 1.0, None
            while True:
                try:
                    self._send(batch)
                    break
                except Exception as exc:
                    if down_since is None:
                        down_since = time.monotonic()
                        log.warning("the tracking server does not take epoch metrics (%s: %s); they wait "
                                    "and are sent once it answers", type(exc).__name__, str(exc)[:300])
                    time.sleep(wait)
                    wait = min(wait * 2, 10.0)
            if down_since is not None:
                log.warning("epoch metrics reach the tracking server again, after %.0f s",
                            time.monotonic() - down_since)
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
        mlflow_client = client()
        deadline = _deadline()  # one wait for opening the run, however many calls it takes
        resume_run_id = resume_run_id or _retrying(self._existing_run, "looking for the run", deadline)
        if resume_run_id is not None:
            self.run_id = resume_run_id
            running = RunStatus.to_string(RunStatus.RUNNING)
            _retrying(lambda: mlflow_client.update_run(resume_run_id, status=running), "reopening the run", deadline)
            self._logged_epochs = _retrying(
                lambda: {m.step for m in mlflow_client.get_metric_history(resume_run_id, "val_acc")},
                "reading the run", deadline)
        else:
            tags = {**run_tags(config), **self.extra_tags}
            if self.parent_run_id:
                tags["mlflow.parentRunId"] = self.parent_run_id
            experiment = _retrying(lambda: experiment_id(self.experiment), "finding the experiment", deadline)
            run = _retrying(lambda: mlflow_client.create_run(experiment, run_name=self.run_name, tags=tags),
                            "creating the run", deadline)
            self.run_id = run.info.run_id
            params = [Param(k, str(v)) for k, v in config.to_dict().items()]
            _retrying(lambda: mlflow_client.log_batch(self.run_id, params=params), "logging params", deadline)
        self._writer = MetricWriter(lambda metrics: client().log_batch(self.run_id, metrics=metrics))
        for values in history:
            self._queue_epoch(dict(values))
        return self.run_id

    def log_epoch(self, metrics: EpochMetrics) -> None:
        self._queue_epoch(metrics.as_dict())

    def sent(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for the queued epoch metrics to reach the server: before a Tune
        trial reports an epoch, after which the scheduler may stop its process at once. False
        when the server is away (an outage): the metrics stay queued and training goes on."""
        try:
            self._writer.flush(timeout_s)
        except TrackingError:
            return False
        return True

    def _queue_epoch(self, values: dict) -> None:
        self._history.append(dict(values))  # a copy: the epoch leaves `values` below
        step = values.pop("epoch")
        if step in self._logged_epochs:
            return
        self._logged_epochs.add(step)
        now = int(time.time() * 1000)
        self._writer.put([Metric(k, float(v), now, step) for k, v in values.items()])

    def finish(self, outcome: RunOutcome) -> None:
        with tempfile.TemporaryDirectory() as folder:
            write_run_artifacts(outcome, Path(folder))
            self._close(outcome.final_metrics(), Path(folder), "FINISHED", _deadline())

    def fail(self, error: Diverged) -> None:
        tags = {"failure_cause": error.cause, "failure_epoch": str(error.epoch),
                "failure_batch": "" if error.batch is None else str(error.batch),
                "failure_detail": error.detail[:4000]}
        deadline = _deadline()
        self._set_tags(tags, deadline)
        with tempfile.TemporaryDirectory() as folder:
            write_history_artifacts(self._history, Path(folder))
            self._close({}, Path(folder), "FAILED", deadline)

    def error(self, trace: str) -> None:
        """A run that raised: FAILED, with the traceback as a tag and as `error.txt`."""
        if self.run_id is None:
            return
        deadline = _deadline()
        self._set_tags({"failure_cause": "error", "failure_detail": trace[-4000:]}, deadline)
        with tempfile.TemporaryDirectory() as folder:
            write_history_artifacts(self._history, Path(folder))
            (Path(folder) / "error.txt").write_text(trace)
            self._close({}, Path(folder), "FAILED", deadline)

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
        run = first_run(self.experiment, f"tags.{IDENTITY_TAG} = '{identity}'")
        return run.info.run_id if run else None

    def _set_tags(self, tags: dict[str, str], deadline: float) -> None:
        _retrying(lambda: client().log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()]),
                  "setting tags", deadline)

    def _close(self, final_metrics: dict[str, float], artifacts: Path, status: str, deadline: float) -> None:
        """Send what is queued, the final metrics and the artifacts, and close the run, all within
        one wait (`deadline`): the budget bounds the end of a run, not each of its calls."""
        self._writer.flush(timeout_s=max(deadline - time.monotonic(), 0))
        mlflow_client = client()
        now = int(time.time() * 1000)
        if final_metrics:
            metrics = [Metric(k, float(v), now, 0) for k, v in final_metrics.items()]
            _retrying(lambda: mlflow_client.log_batch(self.run_id, metrics=metrics), "logging final metrics", deadline)
        try:
            _retrying(lambda: mlflow_client.log_artifacts(self.run_id, str(artifacts)), "uploading artifacts", deadline)
        except TrackingError as exc:
            # the budget is spent: one try each to mark the run, then fail loudly
            self._set_tags({"failure_cause": "artifact_upload", "failure_detail": str(exc)[:4000]}, deadline)
            mlflow_client.set_terminated(self.run_id, "FAILED")
            raise
        _retrying(lambda: mlflow_client.set_terminated(self.run_id, status), "closing the run", deadline)

    def print_where(self) -> None:
        """Tell the user where the run is and how to look at it."""
        if self.run_id is None:
            return
        print(f"mlflow run {self.run_id} in experiment {self.experiment!r} at {tracking_uri()}")
        print_ui_hint(self.experiment)
