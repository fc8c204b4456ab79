"""Every run in MLflow with artifacts in S3, against the real local stack
(SeaweedFS + MLflow server with basic auth) from the `tracking_stack` fixture."""

import json
import logging
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from mlflow.tracking import MlflowClient

from odenet.config import RunConfig
from odenet.run import execute
from odenet.tracker import MlflowTracker
from odenet.tracking import TrackingError

pytestmark = pytest.mark.stack

# What the tracker says when epoch metrics start to wait for the server, and once they reach it.
QUEUED = "the tracking server does not take epoch metrics"
SENT_AGAIN = "epoch metrics reach the tracking server again"
EPOCH_METRICS = {"train_loss", "train_acc", "val_loss", "val_acc", "fnfe", "bnfe", "epoch_time_s"}
FINAL_METRICS = {"test_acc", "test_loss", "params_total", "params_outside_head", "best_epoch",
                 "eval_acc_rk4", "eval_fnfe_dopri5_1e-2", "eval_acc_euler", "eval_fnfe_dopri5_1e-1"}
TAGS = {"model", "dataset", "git_commit", "python_version", "torch_version", "torchdiffeq_version", "ray_version",
        "mlflow_version", "host", "device"}
ARTIFACTS = {"checkpoints/model_best.pt", "config.yaml", "classification_report.txt", "confusion_matrix.png",
             "nfe_curves.png", "learning_curves.png", "per_class_metrics.csv", "installed_packages.txt",
             "solver_reevaluation.csv", "history.csv"}


def odenet(*args, cwd, env, timeout=600):
    return subprocess.run([sys.executable, "-m", "odenet.cli", *args], cwd=cwd, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


def small_run_flags(data_dir, *extra):
    return ["--model", "odenet-simple", "--width", "4", "--subset", "256", "--test-subset", "100",
            "--data-dir", str(data_dir), "--device", "cpu", *extra]


def runs_of(experiment):
    c = MlflowClient()
    found = c.get_experiment_by_name(experiment)
    return c.search_runs([found.experiment_id]) if found else []


def artifact_paths(c, run_id, path=""):
    out = set()
    for item in c.list_artifacts(run_id, path):
        out |= artifact_paths(c, run_id, item.path) if item.is_dir else {item.path}
    return out


def test_a_cli_run_is_in_mlflow_with_artifacts_in_the_bucket(tracking_stack, tracking_env, tmp_path, real_data_dir):
    result = odenet("train", *small_run_flags(real_data_dir, "--max-epochs", "2"), "--experiment", "cli",
                    "--run-name", "first", cwd=tmp_path, env=tracking_stack.env)
    assert result.returncode == 0, result.stderr
    (run,) = runs_of("cli")
    c = MlflowClient()
    assert run.info.status == "FINISHED" and run.info.run_name == "first"
    assert set(run.data.params) == set(RunConfig().to_dict())
    assert run.data.params["model"] == "odenet-simple" and run.data.params["subset"] == "256"
    for key in EPOCH_METRICS:
        assert [m.step for m in c.get_metric_history(run.info.run_id, key)] == [1, 2], key
    assert FINAL_METRICS <= set(run.data.metrics)
    assert TAGS <= set(run.data.tags) and run.data.tags["model"] == "odenet-simple"
    assert ARTIFACTS <= artifact_paths(c, run.info.run_id)
    listed = tracking_stack.s3_client().list_objects_v2(Bucket=tracking_stack.bucket, Prefix=tracking_stack.prefix)
    keys = {obj["Key"] for obj in listed.get("Contents", [])}
    for name in ARTIFACTS:
        assert any(key.endswith(f"{run.info.run_id}/artifacts/{name}") for key in keys), name

    evaluated = odenet("evaluate", "--run-id", run.info.run_id, "--data-dir", str(real_data_dir), "--device", "cpu",
                       "--test-subset", "100", cwd=tmp_path, env=tracking_stack.env)
    assert evaluated.returncode == 0, evaluated.stderr
    line = next(l for l in evaluated.stdout.splitlines() if l.startswith("test accuracy"))
    assert f"test accuracy {run.data.metrics['test_acc']:.4f}" in line


def epochs_done(lines):
    return sum(1 for line in lines if line.startswith("epoch"))


def wait_until(condition, process, lines, what, timeout=300):
    """Poll `condition` until it holds; fail with the output if the process ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"training ended before {what}:\n" + "".join(lines)
        assert time.monotonic() < deadline, f"no {what} within {timeout}s:\n" + "".join(lines)
        time.sleep(0.1)


def test_training_goes_on_through_a_tracking_outage(tracking_stack, tracking_env, tmp_path, real_data_dir):
    # The server goes down once training is under way and comes back once the tracker has been
    # seen waiting for it, however fast the epochs are. A ResNet's epochs cost the same each time:
    # ~0.2 s here on a quiet machine, so the stop (a second or two) and two epochs fit well inside.
    epochs = 30
    process = subprocess.Popen(
        [sys.executable, "-m", "odenet.cli", "train", "--model", "resnet-small", "--width", "4", "--subset", "3072",
         "--test-subset", "100", "--data-dir", str(real_data_dir), "--device", "cpu", "--max-epochs", str(epochs),
         "--patience", "100", "--experiment", "outage", "--no-reevaluate"],
        cwd=tmp_path, env={**os.environ, **tracking_stack.env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    try:
        wait_until(lambda: epochs_done(lines) >= 2, process, lines, "epoch 2")
        tracking_stack.stop_tracking()
        down_at = epochs_done(lines)
        # our MetricWriter meets the outage and waits, while epochs go on
        wait_until(lambda: any(QUEUED in line for line in lines) and epochs_done(lines) >= down_at + 2, process,
                   lines, "two epochs and the tracker waiting while the server is down")
        tracking_stack.start_tracking()
        assert process.wait(timeout=600) == 0, "".join(lines)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout=10)
    assert any(SENT_AGAIN in line for line in lines), "".join(lines)
    (run,) = runs_of("outage")
    assert run.info.status == "FINISHED"
    steps = [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "val_acc")]
    assert steps == list(range(1, epochs + 1))


@pytest.fixture
def tracker_log():
    """The tracker's outage records, as they come (odenet.tracker logs each failed try)."""
    records = TrackerLog()
    logger = logging.getLogger("odenet.tracker")
    logger.addHandler(records)
    try:
        yield records
    finally:
        logger.removeHandler(records)


class TrackerLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.changed = threading.Condition()

    def emit(self, record):
        with self.changed:
            self.messages.append(record.getMessage())
            self.changed.notify_all()

    def wait_for(self, text: str, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: any(text in m for m in self.messages), timeout=timeout)


def test_artifact_uploads_wait_for_the_store(tracking_stack, tracking_env, tiny, tracker_log):
    tracker = MlflowTracker(experiment="s3-outage")
    tracking_stack.stop_store()
    with ThreadPoolExecutor(1) as pool:
        try:
            run = pool.submit(execute, tiny(model="odenet-simple", subset=128, max_epochs=1), tracker=tracker)
            # the store comes back once our retry is seen waiting for it, not on a timer
            assert tracker_log.wait_for("uploading artifacts failed", timeout=300), tracker_log.messages
            assert not run.done(), "the run ended while the store was down"
        finally:
            tracking_stack.start_store()
        run.result(timeout=600)
    assert MlflowClient().get_run(tracker.run_id).info.status == "FINISHED"
    assert "checkpoints/model_best.pt" in artifact_paths(MlflowClient(), tracker.run_id)


def test_a_store_that_never_comes_back_fails_the_run_loudly_within_the_budget(tracking_stack, tracking_env, tiny,
                                                                              monkeypatch):
    budget = 6
    monkeypatch.setenv("ODENET_TRACKING_RETRY_S", str(budget))
    tracker = MlflowTracker(experiment="s3-gone")
    config = tiny(max_epochs=1, subset=128, test_subset=100)
    tracking_stack.stop_store()
    started = time.monotonic()
    try:
        with pytest.raises(TrackingError, match="uploading artifacts failed"):
            execute(config, tracker=tracker)
    finally:
        elapsed = time.monotonic() - started
        tracking_stack.start_store()
    # the budget bounds the whole wait: a tiny run plus the budget plus one try of MLflow's
    # own (a few seconds), not MLflow's 4-minute retry loop per try (it took 256 s)
    assert elapsed < budget + 60, f"failed after {elapsed:.0f}s with a {budget}s budget"
    run = MlflowClient().get_run(tracker.run_id)
    assert run.info.status == "FAILED" and run.data.tags["failure_cause"] == "artifact_upload"


def test_a_resumed_run_continues_its_mlflow_run(tracking_stack, tracking_env, tmp_path, real_data_dir):
    flags = small_run_flags(real_data_dir, "--experiment", "resume", "--checkpoint-dir", "ck", "--no-reevaluate")
    assert odenet("train", *flags, "--max-epochs", "2", cwd=tmp_path, env=tracking_stack.env).returncode == 0
    (first,) = runs_of("resume")
    resumed = odenet("train", *flags, "--max-epochs", "3", "--resume", cwd=tmp_path, env=tracking_stack.env)
    assert resumed.returncode == 0, resumed.stderr
    (run,) = runs_of("resume")
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    assert [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "val_loss")] == [1, 2, 3]


def test_a_diverged_run_is_failed_with_its_cause(tracking_stack, tracking_env, tmp_path, real_data_dir):
    result = odenet("train", *small_run_flags(real_data_dir, "--rtol", "1e-9", "--atol", "1e-9", "--max-num-steps",
                                              "3", "--experiment", "diverged"), cwd=tmp_path, env=tracking_stack.env)
    assert result.returncode == 3
    (run,) = runs_of("diverged")
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_cause"] == "max_num_steps" and run.data.tags["failure_epoch"] == "1"


def test_a_wrong_tracking_uri_fails_before_training(tmp_path, real_data_dir):
    result = odenet("train", *small_run_flags(real_data_dir), cwd=tmp_path,
                    env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    assert result.returncode == 2
    assert "cannot reach the MLflow tracking server at http://127.0.0.1:9" in result.stderr
    assert "epoch" not in result.stdout and not (tmp_path / "runs").exists()


def test_bad_credentials_fail_before_training(tracking_stack, tmp_path, real_data_dir):
    env = {**tracking_stack.env, "MLFLOW_TRACKING_PASSWORD": "wrong"}
    result = odenet("train", *small_run_flags(real_data_dir), cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert "refused the credentials" in result.stderr and "MLFLOW_TRACKING_PASSWORD" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_the_embedded_store_needs_no_setup(tmp_path, real_data_dir, monkeypatch):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    result = subprocess.run([sys.executable, "-m", "odenet.cli", "train", *small_run_flags(real_data_dir),
                             "--max-epochs", "1", "--no-reevaluate"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "mlflow ui --backend-store-uri sqlite:///mlruns.db" in result.stdout
    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    experiment = c.get_experiment_by_name("odenet")
    (run,) = c.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert (tmp_path / "mlartifacts").is_dir()
    # the printed link opens `mlflow ui`'s runs table in a view kept in the experiment: best val_acc first
    link = f"then http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning"
    key = result.stdout.split(f"{link}&viewStateShareKey=", 1)[1].split()[0]
    view = json.loads(experiment.tags[f"mlflow.sharedViewState.{key}"])
    assert (view["orderByKey"], view["orderByAsc"]) == ("metrics.`val_acc`", False)
    assert {"params.`model`", "metrics.`val_acc`"} <= set(view["selectedColumns"])
    assert "checkpoints/model_best.pt" in artifact_paths(c, run.info.run_id)


def test_a_run_that_raises_is_failed_with_its_traceback_not_diverged(tracking_env, real_data_dir, tmp_path):
    config = RunConfig.from_dict(dict(dataset="fashion-mnist", data_dir=str(real_data_dir), model="resnet-small",
                                      width=4, subset=256, test_subset=100, max_epochs=2, device="cpu"))
    tracker = MlflowTracker("raises")

    def bug(metrics):
        assert metrics.epoch > 1, "a bug in the epoch callback"

    with pytest.raises(AssertionError, match="a bug in the epoch callback"):
        execute(config, tracker=tracker, on_epoch=bug)
    run = MlflowClient().get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure_cause"] == "error" and "a bug in the epoch callback" in run.data.tags["failure_detail"]
    trace = MlflowClient().download_artifacts(tracker.run_id, "error.txt", str(tmp_path))
    assert "Traceback" in open(trace).read()


def test_reading_a_report_leaves_the_processs_tracking_uri_to_the_environment(tracking_env, monkeypatch):
    """load_runs once pinned its store with mlflow.set_tracking_uri, a process-wide setting that
    wins over MLFLOW_TRACKING_URI: whatever the process logged afterwards went to that store (a
    later test's client met the first server with the second server's password: 401)."""
    import mlflow

    from odenet import report

    with pytest.raises(TrackingError, match="has no runs"):
        report.load_runs(f"no-such-experiment-{os.getpid()}")
    elsewhere = "http://127.0.0.1:9/"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    assert mlflow.get_tracking_uri() == elsewhere
