"""The sweep on a real local Ray, logging to the real tracking stack: what a user of
`python sweeps/architecture_ablation.py` sees (`ray job submit`: tests/test_ray_job.py)."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from odenet.failures import SOLVER_FAILURES
from sweeps.architecture_ablation import architecture_ablation
from sweeps.solver_reevaluation import REEVALUATED_IMAGES
from sweeps.tuning import main
from tests.conftest import REPO, table_rows

pytestmark = [pytest.mark.stack, pytest.mark.ray]

ABLATION = str(REPO / "sweeps" / "architecture_ablation.py")
# Every dimension pinned to one cheap value: trials differ only where a test says so.
CHEAP = ["--space", "activation_before=relu", "--space", "activation_inside=relu", "--space", "stride=2",
         "--space", "final_time=1", "--space", "norm=groupnorm", "--space", "augment_dims=0",
         "--space", "lr=0.003", "--space", "weight_decay=0", "--space", "optimizer=adam"]


# Why a trial's run may be FAILED in a sweep that works: it diverged, and says how.
DIVERGED = {cause for _, cause in SOLVER_FAILURES} | {"non_finite_loss"}
# The summary every trial's run carries, stopped or finished: the runs table sorts on them.
SUMMARY = ("best_val_acc", "best_val_loss", "mean_fnfe", "mean_bnfe", "mean_epoch_time_s", "epochs", "best_epoch")


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


def progress_tables(stdout):
    """Tune's live tables as printed: for each, {trial: (Tune's status, our state column)}."""
    tables = []
    for block in stdout.split("== Status ==")[1:]:
        rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in block.splitlines()
                if line.startswith("| trial_")]
        header = next(line for line in block.splitlines() if line.startswith("| Trial name"))
        has_state = header.rstrip(" |").endswith("state")
        tables.append({row[0]: (row[1], row[-1] if has_state else "") for row in rows})
    return tables


def test_smoke_sweep_logs_every_trial_as_a_child_run(smoke_sweep, tracking_stack, tracking_env):
    stdout = smoke_sweep.run.stdout
    (parent,), runs = children(smoke_sweep.experiment)
    assert len(runs) == 6
    # inside trials none of our progress (Tune's table is the view there): no plan, no phase
    # lines, no bars in the trials' output that Ray hands to the driver
    shown = stdout + smoke_sweep.run.stderr
    assert "plan: " not in shown and "images/s" not in shown and "test evaluation" not in shown
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs)
    assert parent.info.status == "FINISHED"
    assert {a.path for a in MlflowClient().list_artifacts(parent.info.run_id)} >= {"results.csv", "results.md"}
    assert any(r.data.tags.get("stopped_by") == "asha" for r in runs), "ASHA stopped no trial"
    for run in runs:
        status, tags, metrics = run.info.status, run.data.tags, run.data.metrics
        # every trial ended for a reason the sweep names: trained to the end, stopped by ASHA
        # (with that epoch's metrics in MLflow), or diverged with its cause; never a crash
        if status == "FAILED":
            assert tags.get("failure_cause") in DIVERGED, (run.info.run_id, tags.get("failure_cause"),
                                                          tags.get("failure_detail", "")[-2000:])
        else:
            if status == "KILLED":
                assert tags.get("stopped_by") == "asha", (run.info.run_id, tags)
            else:
                assert status == "FINISHED" and "test_acc" in metrics, (run.info.run_id, status)
            # stopped or finished, the run carries the summary the runs table shows, from its own epochs
            assert set(SUMMARY) <= set(metrics), (run.info.run_id, status, sorted(metrics))
            history = MlflowClient().get_metric_history(run.info.run_id, "val_acc")
            assert metrics["epochs"] == max(m.step for m in history)
            assert metrics["best_val_acc"] in {m.value for m in history}
    assert len(table_rows(stdout)) == 6
    # the sweep's state and checkpoints are in the bucket
    listed = tracking_stack.s3_client().list_objects_v2(Bucket=tracking_stack.bucket, Prefix=smoke_sweep.storage_prefix)
    keys = [obj["Key"] for obj in listed.get("Contents", [])]
    assert any("checkpoint_" in key for key in keys) and any(key.endswith("tuner.pkl") for key in keys)
    assert "mlflow ui" in stdout or "open the MLflow UI" in stdout


def test_the_progress_table_tells_stopped_trials_from_running_ones_and_prints_only_changes(smoke_sweep,
                                                                                           tracking_stack,
                                                                                           tracking_env):
    tables = progress_tables(smoke_sweep.run.stdout)
    assert tables
    _, runs = children(smoke_sweep.experiment)
    stopped = {r.info.run_name for r in runs if r.data.tags.get("stopped_by") == "asha"}
    last = tables[-1]
    assert stopped and all(last[name] == ("TERMINATED", "STOPPED") for name in stopped), last
    # a trial Tune no longer runs never reads RUNNING in our state column
    assert not [row for table in tables for row in table.values() if row == ("TERMINATED", "RUNNING")]
    # a table is printed again only when a trial's state changed (Tune's own repeats it every 30 s)
    assert all(a != b for a, b in zip(tables, tables[1:])), "the same table printed twice in a row"


def test_report_of_the_smoke_search_shows_where_the_searcher_looked(smoke_sweep, tracking_stack, tracking_env,
                                                                    tmp_path):
    result = subprocess.run([sys.executable, "-m", "odenet.cli", "report", "--experiment", smoke_sweep.experiment,
                             "--out", "rep"], cwd=tmp_path, env=sweep_env(tracking_stack), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "## Search" in result.stdout and "describe where the searcher looked" in result.stdout
    assert f"--design one-at-a-time --base-from-experiment {smoke_sweep.experiment}" in result.stdout
    # ASHA stopped most trials after the grace period: the epoch most trials reached is 1
    assert "Budget: epoch 1," in result.stdout
    assert "### Importance of each dimension" in result.stdout
    # a ranking only from a forest that predicts held-out trials; otherwise the sentence that says so
    too_few = "to rank the dimensions; no ranking is given" in result.stdout or "Too few trials" in result.stdout
    ranking_given = "Importance: the drop in held-out R²" in result.stdout
    assert ranking_given != too_few, result.stdout
    figures = ["search_importance.png", "search_partial_dependence.png"]
    assert (tmp_path / "rep" / figures[0]).exists() == ranking_given
    assert "## Evaluation solver and tolerance" in result.stdout
    top = pd.read_csv(tmp_path / "rep" / "search_top_trials.csv")
    assert len(top) >= 5 and "val_acc@1" in top
    for _, row in top.iterrows():  # the value at epoch 1, not a later, better one
        first = [m.value for m in MlflowClient().get_metric_history(row["run_id"], "val_acc") if m.step == 1]
        assert first == [pytest.approx(row["val_acc@1"])]
    if ranking_given:
        assert (tmp_path / "rep" / figures[1]).stat().st_size > 10_000
    (parent,), _ = children(smoke_sweep.experiment)
    logged = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id, "report")}
    assert "report/report.md" in logged
    assert all((f"report/{name}" in logged) == ranking_given for name in figures), logged


def test_solver_reevaluation_writes_back_what_the_trials_did_not(smoke_sweep, tracking_stack, tracking_env,
                                                                 real_data_dir, tmp_path):
    """The trials logged eval_* metrics themselves: the program's own mark is the test images it used."""
    _, runs = children(smoke_sweep.experiment)
    finished = [r for r in runs if r.info.status == "FINISHED" and r.data.params["model"] == "odenet-simple"]
    assert finished and not [r for r in finished if REEVALUATED_IMAGES in r.data.metrics]
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    try:
        result = subprocess.run([sys.executable, str(REPO / "sweeps" / "solver_reevaluation.py"), "--experiment",
                                 smoke_sweep.experiment, "--test-subset", "100", "--data-dir", str(real_data_dir)],
                                cwd=tmp_path, env=sweep_env(tracking_stack, HOME=str(tmp_path), RAY_TMPDIR=ray_tmp),
                                capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| dopri5_1e-3 |" in result.stdout
    for run in finished:
        metrics = MlflowClient().get_run(run.info.run_id).data.metrics
        assert metrics.get(REEVALUATED_IMAGES) == 100, run.info.run_id
        assert len(MlflowClient().get_metric_history(run.info.run_id, "eval_acc_rk4")) == 2  # the trial's, and this


def _stop(process):
    """Kill a sweep started in its own session and the local Ray it started, whatever is left of them."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


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
    try:
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
    finally:
        _stop(killed)
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
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            found = MlflowClient().get_experiment_by_name("restore")
            if found and any(r.info.status == "FINISHED" and r.data.tags.get("sweep_role") != "parent"
                             for r in MlflowClient().search_runs([found.experiment_id])):
                break
            assert first.poll() is None, "the sweep ended before it could be killed"
            time.sleep(0.5)
    finally:
        _stop(first)  # the driver and the local Ray it started, as a crash would
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


def _nothing_started(folder):
    import ray

    assert not ray.is_initialized()
    assert not (folder / "ray_results").exists()


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
        (["--dimensions", "norm"], "--dimensions: only for --design one-at-a-time"),
        (["--model", "odenet-complex", "--space", "stride=1,2"], "odenet-complex has no stem, so stride does not apply"),
        (["--model", "resnet-complex", "--activation-before", "tanh"], "activation_before='tanh': resnet-complex has no stem"),
    ],
)
def test_bad_arguments_fail_before_ray_starts(flags, message, tmp_path, real_data_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/m.db")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(architecture_ablation, ["--smoke", "--data-dir", str(real_data_dir), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    _nothing_started(tmp_path)


def test_a_bad_argument_exits_2_from_the_command_line_before_ray_starts(tmp_path, real_data_dir):
    """The one case run as a user runs it: exit code 2, the message, no Ray, no sweep state."""
    # Ray's INFO lines on: were Ray started, its "Started a local Ray instance" would show.
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db", "HOME": str(tmp_path),
           "ODENET_LOG_LEVEL": "INFO"}
    env.pop("RAY_ADDRESS", None)
    result = sweep("--smoke", "--data-dir", str(real_data_dir), "--space", "colour=red,blue", cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "unknown dimension 'colour': expected one of" in result.stderr
    assert "Started a local Ray instance" not in result.stdout + result.stderr
    assert not (tmp_path / "ray_results").exists()


def test_a_bad_base_fails_before_ray_starts(tmp_path, real_data_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/m.db")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    MlflowClient(f"sqlite:///{tmp_path}/m.db").create_experiment("empty")
    (tmp_path / "base.yaml").write_text("final_time: 2\ncolour: red\n")
    (tmp_path / "list.yaml").write_text("- final_time\n")
    oat = ["--smoke", "--design", "one-at-a-time", "--data-dir", str(real_data_dir)]
    for flags, message in [
        (["--base-file", "base.yaml"], "--base-file base.yaml: unknown key(s) colour; expected dimension names from"),
        (["--base-file", "missing.yaml"], "--base-file missing.yaml: No such file or directory"),
        (["--base-file", "list.yaml"], "--base-file list.yaml: expected a mapping of dimension names to values"),
        (["--base-from-experiment", "nope"], "--base-from-experiment 'nope': no such MLflow experiment"),
        (["--base-from-experiment", "empty"], "--base-from-experiment 'empty': the experiment has no finished trial"),
    ]:
        assert main(architecture_ablation, [*oat, *flags]) == 2, flags
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (flags, err)
        _nothing_started(tmp_path)
