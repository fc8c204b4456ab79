"""The sweep on a real local Ray, logging to the real tracking stack: what a user of
`python sweeps/architecture_ablation.py` sees (`ray job submit`: tests/test_ray_job.py)."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, table_rows

pytestmark = [pytest.mark.stack, pytest.mark.ray]

ABLATION = str(REPO / "sweeps" / "architecture_ablation.py")
# Every dimension pinned to one cheap value: trials differ only where a test says so.
CHEAP = ["--space", "activation_before=relu", "--space", "activation_inside=relu", "--space", "stride=2",
         "--space", "final_time=1", "--space", "norm=groupnorm", "--space", "augment_dims=0",
         "--space", "lr=0.003", "--space", "weight_decay=0", "--space", "optimizer=adam"]


def sweep_env(stack, **extra):
    env = {**os.environ, **stack.env, **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def sweep(*args, cwd, env, timeout=900):
    return subprocess.run([sys.executable, ABLATION, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def children(experiment):
    c = MlflowClient()
    runs = c.search_runs([c.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    return parents, [r for r in runs if r.data.tags.get("sweep_role") != "parent"]


@pytest.fixture(scope="module")
def smoke(tracking_stack, real_data_dir, tmp_path_factory):
    """One --smoke sweep with its state on S3 (SeaweedFS), shared by the tests that read it."""
    cwd = tmp_path_factory.mktemp("smoke")
    storage = f"s3://{tracking_stack.bucket}/ray"
    result = sweep("--smoke", "--name", "smoke", "--storage-path", storage, "--data-dir", str(real_data_dir),
                   cwd=cwd, env=sweep_env(tracking_stack))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_smoke_sweep_logs_every_trial_as_a_child_run(smoke, tracking_stack, tracking_env):
    (parent,), runs = children("smoke")
    assert len(runs) == 6
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs)
    assert parent.info.status == "FINISHED"
    assert {a.path for a in MlflowClient().list_artifacts(parent.info.run_id)} >= {"results.csv", "results.md"}
    assert any(r.data.tags.get("stopped_by") == "asha" for r in runs), "ASHA stopped no trial"
    # a trial ASHA stopped right after its epoch still has that epoch's metrics in MLflow
    for run in runs:
        if run.info.status == "KILLED":
            assert MlflowClient().get_metric_history(run.info.run_id, "val_acc"), run.info.run_id
    assert all(r.info.status in ("FINISHED", "FAILED", "KILLED") for r in runs)
    assert len(table_rows(smoke.stdout)) == 6
    # the sweep's state and checkpoints are in the bucket
    listed = tracking_stack.s3_client().list_objects_v2(Bucket=tracking_stack.bucket, Prefix="ray/smoke/")
    keys = [obj["Key"] for obj in listed.get("Contents", [])]
    assert any("checkpoint_" in key for key in keys) and any(key.endswith("tuner.pkl") for key in keys)
    assert "mlflow ui" in smoke.stdout or "open the MLflow UI" in smoke.stdout


def test_report_of_the_smoke_search_shows_where_the_searcher_looked(smoke, tracking_stack, tracking_env, tmp_path):
    result = subprocess.run([sys.executable, "-m", "odenet.cli", "report", "--experiment", "smoke", "--out", "rep"],
                            cwd=tmp_path, env=sweep_env(tracking_stack), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "## Search" in result.stdout and "describe where the searcher looked" in result.stdout
    assert "--design one-at-a-time --base-from-experiment smoke" in result.stdout
    # ASHA stopped most trials after the grace period: every trial compares at epoch 1
    assert "Common budget: epoch 1" in result.stdout
    assert "### Importance of each dimension" in result.stdout
    assert "## Evaluation solver and tolerance" in result.stdout
    top = pd.read_csv(tmp_path / "rep" / "search_top_trials.csv")
    assert len(top) >= 5 and "val_acc@1" in top
    for _, row in top.iterrows():  # the value at epoch 1, not a later, better one
        first = [m.value for m in MlflowClient().get_metric_history(row["run_id"], "val_acc") if m.step == 1]
        assert first == [pytest.approx(row["val_acc@1"])]
    assert (tmp_path / "rep" / "search_partial_dependence.png").stat().st_size > 10_000
    (parent,), _ = children("smoke")
    logged = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id, "report")}
    assert "report/report.md" in logged and "report/search_importance.png" in logged


def _trial_processes(driver_pid):
    """The Ray worker processes running a trial, among the driver's descendants."""
    import psutil

    found = []
    for process in psutil.Process(driver_pid).children(recursive=True):
        try:
            if "run_trial" in " ".join(process.cmdline()) or "ImplicitFunc" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.NoSuchProcess:
            pass
    return found


def test_a_trial_whose_worker_is_killed_resumes_from_its_checkpoint_in_the_same_run(tracking_stack, tracking_env,
                                                                                     real_data_dir, tmp_path):
    flags = ["--num-samples", "1", "--max-epochs", "6", "--patience", "6", "--subset", "1024", "--test-subset",
             "100", "--width", "4", "--model", "resnet-small", "--data-dir", str(real_data_dir), *CHEAP]
    straight = sweep("--name", "straight", *flags, cwd=tmp_path, env=sweep_env(tracking_stack))
    assert straight.returncode == 0, straight.stdout[-3000:] + straight.stderr[-3000:]

    killed = subprocess.Popen([sys.executable, ABLATION, "--name", "killed", *flags], cwd=tmp_path,
                              env=sweep_env(tracking_stack), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    kills, deadline = 0, time.time() + 600
    while kills == 0 and time.time() < deadline and killed.poll() is None:
        found = MlflowClient().get_experiment_by_name("killed")
        runs = [r for r in MlflowClient().search_runs([found.experiment_id])
                if r.data.tags.get("sweep_role") != "parent"] if found else []
        if runs and len(MlflowClient().get_metric_history(runs[0].info.run_id, "val_acc")) >= 2:
            for process in _trial_processes(killed.pid):  # from outside, as a node or OOM kill would
                os.kill(process.pid, signal.SIGKILL)
                kills += 1
        time.sleep(0.2)
    out, _ = killed.communicate(timeout=900)
    assert kills >= 1, "found no trial process to kill"
    assert killed.returncode == 0, out[-3000:]

    _, runs = children("killed")
    assert len(runs) == 1, "a restarted trial continues its own MLflow run"
    (run,) = runs
    assert run.info.status == "FINISHED"
    steps = [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "val_acc")]
    assert steps == [1, 2, 3, 4, 5, 6], "every epoch logged once: none lost, none twice"
    assert list(tmp_path.glob("ray_results/killed/*/error.txt")), "Tune recorded the dead worker"
    # the same seed trained without the kill: the same numbers, epoch by epoch, and the same test result
    (reference,) = children("straight")[1]
    for key in ("val_loss", "train_loss"):
        assert ([m.value for m in MlflowClient().get_metric_history(run.info.run_id, key)]
                == [m.value for m in MlflowClient().get_metric_history(reference.info.run_id, key)])
    assert run.data.metrics["test_acc"] == reference.data.metrics["test_acc"]


def test_a_killed_driver_restores_the_sweep_and_no_trial_runs_twice(tracking_stack, tracking_env, real_data_dir,
                                                                     tmp_path):
    args = [sys.executable, ABLATION, "--name", "restore", "--num-samples", "3", "--max-concurrent", "1",
            "--max-epochs", "2", "--grace-period", "2", "--subset", "512", "--test-subset", "100", "--width", "4",
            "--model", "resnet-small", "--data-dir", str(real_data_dir), *CHEAP[:-4], "--space",
            "lr=0.001,0.003,0.01", "--space", "optimizer=adam"]
    first = subprocess.Popen(args, cwd=tmp_path, env=sweep_env(tracking_stack), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        found = MlflowClient().get_experiment_by_name("restore")
        if found and any(r.info.status == "FINISHED" and r.data.tags.get("sweep_role") != "parent"
                         for r in MlflowClient().search_runs([found.experiment_id])):
            break
        assert first.poll() is None, "the sweep ended before it could be killed"
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)  # the driver and the local Ray it started
    first.wait()
    _, before = children("restore")
    finished_before = {r.data.tags["run_identity"]: r.info.run_id for r in before if r.info.status == "FINISHED"}
    assert finished_before

    second = subprocess.run(args, cwd=tmp_path, env=sweep_env(tracking_stack), capture_output=True, text=True,
                            timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "restoring sweep 'restore'" in second.stdout
    assert len(table_rows(second.stdout)) == 3
    _, after = children("restore")
    identities = [r.data.tags["run_identity"] for r in after]
    assert len(identities) == len(set(identities)) == 3
    for identity, run_id in finished_before.items():
        run = MlflowClient().get_run(run_id)
        assert run.info.status == "FINISHED"
        assert [m.step for m in MlflowClient().get_metric_history(run_id, "val_acc")] == [1, 2]


def test_a_diverged_trial_fails_with_its_cause_and_the_sweep_goes_on(tracking_stack, tracking_env, real_data_dir,
                                                                     tmp_path):
    points = tmp_path / "points.yaml"
    points.write_text(json.dumps([{"max_num_steps": 2}, {"max_num_steps": 1000}]))
    result = sweep("--name", "diverge", "--num-samples", "2", "--max-epochs", "1", "--subset", "256",
                   "--test-subset", "100", "--width", "4", "--model", "odenet-simple", "--no-reevaluate",
                   "--data-dir", str(real_data_dir), *CHEAP, "--space", "max_num_steps=2,1000",
                   "--points-file", str(points), cwd=tmp_path, env=sweep_env(tracking_stack))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = table_rows(result.stdout)
    assert len(rows) == 2
    assert sum("DIVERGED" in row and "max_num_steps" in row for row in rows) == 1
    assert sum("FINISHED" in row for row in rows) == 1
    _, runs = children("diverge")
    statuses = sorted((r.info.status, r.data.tags.get("failure_cause", "")) for r in runs)
    assert statuses == [("FAILED", "max_num_steps"), ("FINISHED", "")]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--space", "colour=red,blue"], "unknown dimension 'colour': expected one of"),
        (["--space", "norm="], "norm: the choice list is empty"),
        (["--space", "lr=loguniform:1e-2:1e-4"], "lr: loguniform(0.01, 0.0001) is reversed or empty"),
        (["--space", "activation_inside=relu,gelu"], "activation_inside='gelu': expected one of relu, tanh, softplus"),
        (["--gpus-per-trial", "0.5"], "--gpus-per-trial 0.5: this machine has no GPU"),
        (["--grace-period", "0"], "--grace-period 0: expected at least 1"),
        (["--design", "one-at-a-time", "--seeds", "0"], "--seeds 0: expected at least 1"),
        (["--design", "one-at-a-time", "--dimensions", "final_time,colour"], "unknown dimension(s) colour"),
        (["--seeds", "3"], "--seeds: only for --design one-at-a-time"),
        (["--model", "odenet-complex", "--space", "stride=1,2"], "odenet-complex has no stem, so stride does not apply"),
        (["--model", "resnet-complex", "--activation-before", "tanh"], "activation_before='tanh': resnet-complex has no stem"),
    ],
)
def test_bad_arguments_fail_before_ray_starts(flags, message, tmp_path, real_data_dir):
    result = sweep("--smoke", "--data-dir", str(real_data_dir), *flags, cwd=tmp_path,
                   env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"})
    assert result.returncode == 2
    assert message in result.stderr
    assert "Started a local Ray instance" not in result.stdout + result.stderr
    assert not (tmp_path / "ray_results").exists()


def test_a_bad_base_fails_before_ray_starts(tmp_path, real_data_dir):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    env.pop("RAY_ADDRESS", None)
    MlflowClient(env["MLFLOW_TRACKING_URI"]).create_experiment("empty")
    (tmp_path / "base.yaml").write_text("final_time: 2\ncolour: red\n")
    oat = ["--smoke", "--design", "one-at-a-time", "--data-dir", str(real_data_dir)]
    for flags, message in [
        (["--base-file", "base.yaml"], "--base-file base.yaml: unknown key(s) colour; expected dimension names from"),
        (["--base-file", "missing.yaml"], "--base-file missing.yaml: No such file or directory"),
        (["--base-from-experiment", "nope"], "--base-from-experiment 'nope': no such MLflow experiment"),
        (["--base-from-experiment", "empty"], "--base-from-experiment 'empty': the experiment has no finished trial"),
    ]:
        result = sweep(*oat, *flags, cwd=tmp_path, env=env, timeout=300)
        assert result.returncode == 2, (flags, result.stderr[-2000:])
        assert message in result.stderr and "Traceback" not in result.stderr
        assert "Started a local Ray instance" not in result.stdout + result.stderr
        assert not (tmp_path / "ray_results").exists()
