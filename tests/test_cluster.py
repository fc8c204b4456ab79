"""A Ray cluster of a head and two worker nodes on this machine, each started with `ray start`
as on separate machines, the workers advertising one GPU each so that `--gpus-per-trial 0.5`
is scheduled; the sweep's state on S3 (SeaweedFS) and submitted with `ray job submit`, as on
Kubernetes. One worker node dies mid-trial (its raylet and workers SIGKILLed): its trials
continue on the other node from their S3 checkpoints, in their own MLflow runs, every epoch
logged once. And the head dies mid-sweep, with the driver: the same job, submitted again to a
new cluster as a RayJob's retry does, restores the sweep from S3."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest
import requests
from mlflow.tracking import MlflowClient

from infra.local.ports import free_port
from sweeps import tuning
from tests.conftest import REPO, isolation, table_rows
from tests.test_sweep import CHEAP

pytestmark = [pytest.mark.stack, pytest.mark.ray]

RAY = str(REPO / ".venv" / "bin" / "ray")
MAX_EPOCHS = 6
WORKERS = ("worker-a", "worker-b")
# The head notices a dead node after about 3 s instead of Ray's default 15 s or more.
FAST_HEALTH_CHECK = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                     "RAY_health_check_failure_threshold": "3"}


def start_node(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """`ray start --block` in a PID namespace of its own where possible (the host's network, so
    the tracking stack stays reachable): the node is that process and its descendants."""
    with log.open("w") as out:
        return subprocess.Popen([*isolation(net=False), RAY, "start", "--block", "--disable-usage-stats",
                                 "--node-ip-address", "127.0.0.1", "--object-store-memory", str(80 * 2**20), *args],
                                env=env, cwd=log.parent, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def processes(node: subprocess.Popen) -> list[psutil.Process]:
    """The node's processes: raylet, agents and workers, all descendants of its `ray start`."""
    with contextlib.suppress(psutil.NoSuchProcess):
        return psutil.Process(node.pid).children(recursive=True)
    return []


def kill_node(node: subprocess.Popen) -> None:
    """SIGKILL every process of the node at once, as a lost machine would go."""
    for process in processes(node):
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    node.kill()
    node.wait()


def trials_on(node: subprocess.Popen) -> set[str]:
    """Trial ids whose Tune actor runs on the node: Tune runs each trial in its own folder, trial_ID."""
    found = set()
    for process in processes(node):
        with contextlib.suppress(psutil.Error):
            folder = Path(process.cwd()).name
            if folder.startswith("trial_"):
                found.add(folder[len("trial_"):])
    return found


def alive_nodes(dashboard: str) -> int:
    try:
        response = requests.get(f"{dashboard}/api/v0/nodes", params={"limit": 100}, timeout=10)
        return sum(node["state"] == "ALIVE" for node in response.json()["data"]["result"]["result"])
    except (requests.RequestException, ValueError, KeyError):
        return 0


def epochs_logged(client: MlflowClient, experiment: str, trial: str, run_ids: dict[str, str]) -> int:
    """Epochs the trial's MLflow run holds (its run id found once, then remembered in run_ids)."""
    if trial not in run_ids:
        found = client.get_experiment_by_name(experiment)
        runs = client.search_runs([found.experiment_id], f"tags.run_identity = '{trial}'") if found else []
        if not runs:
            return 0
        run_ids[trial] = runs[0].info.run_id
    return len(client.get_metric_history(run_ids[trial], "val_acc"))


def wait_alive(dashboard: str, count: int, node: subprocess.Popen, log: Path, last: bool = True) -> bool:
    """Wait until the cluster has `count` live nodes; False if the node's `ray start` gave up first."""
    deadline = time.time() + 180
    while alive_nodes(dashboard) < count:
        if node.poll() is not None and not last:
            return False
        assert node.poll() is None and time.time() < deadline, log.read_text()[-4000:]
        time.sleep(1)
    return True


def start_cluster(env: dict[str, str], folder: Path, ray_tmp: str, nodes: dict[str, subprocess.Popen]) -> str:
    """A head without CPUs or GPUs (the driver runs there, trials do not) and two workers with one
    CPU and one GPU each, added to `nodes` as they start (so that a caller stops whatever started);
    returns the dashboard's address."""
    folder.mkdir(parents=True, exist_ok=True)
    gcs, dashboard_port = free_port(), free_port()
    nodes["head"] = start_node(["--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
                                "--dashboard-port", str(dashboard_port), "--ray-client-server-port",
                                str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
                                "--num-cpus", "0", "--num-gpus", "0", "--temp-dir", ray_tmp],
                               env, folder / "head.log")
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    wait_alive(dashboard, 1, nodes["head"], folder / "head.log")
    for n, name in enumerate(WORKERS, start=2):
        # One at a time, and again if `ray start` gives up: it allows a raylet 30 s to register,
        # which a busy machine can exceed.
        for attempt in range(3):
            # A temporary folder per node, as on separate machines: a node's runtime-env agent
            # deletes the job's unpacked working directory in its folder when the node dies.
            nodes[name] = start_node(["--address", f"127.0.0.1:{gcs}", "--num-cpus", "1", "--num-gpus", "1",
                                      "--dashboard-agent-listen-port", str(free_port()),
                                      "--temp-dir", f"{ray_tmp}/{name}"],
                                     env, folder / f"{name}.log")
            if wait_alive(dashboard, n, nodes[name], folder / f"{name}.log", last=attempt == 2):
                break
            kill_node(nodes[name])
    return dashboard


def stop_cluster(nodes: dict[str, subprocess.Popen]) -> None:
    for node in nodes.values():
        kill_node(node)


@pytest.fixture
def cluster_env(tracking_stack, tmp_path):
    """What every node sees: the tracking stack's variables, as pods see theirs; and a short
    temporary folder (socket paths are limited to 108 bytes), removed at the end."""
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "MLFLOW_", "AWS_", "ODENET_")) and k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(tracking_stack.env, **FAST_HEALTH_CHECK, HOME=str(tmp_path), RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{REPO / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', os.defpath)}")
    try:
        yield env, ray_tmp
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture
def cluster(cluster_env, tmp_path):
    env, ray_tmp = cluster_env
    nodes: dict[str, subprocess.Popen] = {}
    try:
        yield start_cluster(env, tmp_path, ray_tmp, nodes), nodes, env
    finally:
        stop_cluster(nodes)


def submit(dashboard: str, name: str, tracking_stack, env: dict[str, str], data_dir: Path, max_epochs: int,
           *extra: str) -> subprocess.Popen:
    """`ray job submit` of a two-trial sweep named `name`, stored on the stack's S3, as a RayJob's
    submitter runs it; its output on the returned process's stdout."""
    return subprocess.Popen(
        [RAY, "job", "submit", "--address", dashboard, "--working-dir", ".", "--",
         "python", "sweeps/architecture_ablation.py", "--name", name,
         "--storage-path", f"s3://{tracking_stack.bucket}/ray", "--num-samples", "2", "--max-concurrent", "2",
         "--gpus-per-trial", "0.5", "--cpus-per-trial", "0.5", "--model", "resnet-small", "--width", "4",
         "--subset", "1024", "--test-subset", "100", "--no-reevaluate", "--max-epochs", str(max_epochs),
         "--patience", str(max_epochs), "--data-dir", str(data_dir), *CHEAP, *extra],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_a_worker_node_lost_mid_trial_its_trials_finish_on_the_other_from_s3(cluster, tracking_stack, tracking_env,
                                                                               real_data_dir):
    dashboard, nodes, env = cluster
    name = f"cluster-{uuid.uuid4().hex[:8]}"
    job = submit(dashboard, name, tracking_stack, env, real_data_dir, MAX_EPOCHS)

    # Which node runs which trial, as long as the job runs; the first worker node seen running a
    # trial that has logged two epochs is killed.
    client = MlflowClient()
    ran_on: dict[str, set[str]] = {}
    run_ids: dict[str, str] = {}
    killed = None
    deadline = time.time() + 600
    while job.poll() is None and time.time() < deadline:
        for node in WORKERS:
            for trial in trials_on(nodes[node]):
                ran_on.setdefault(trial, set()).add(node)
                if killed is None and epochs_logged(client, name, trial, run_ids) >= 2:
                    kill_node(nodes[node])
                    killed = (node, trial, epochs_logged(client, name, trial, run_ids))
                    break
        time.sleep(0.5)
    try:
        out, _ = job.communicate(timeout=max(1, deadline - time.time()))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
    assert killed is not None, "no trial reached two epochs on a worker node:\n" + out[-4000:]
    dead, victim, epochs_at_kill = killed
    survivor = next(n for n in WORKERS if n != dead)
    print(f"killed {dead} while trial {victim} had logged {epochs_at_kill} epochs; trials ran on {ran_on}")
    assert job.returncode == 0 and "succeeded" in out, out[-6000:]

    # Nothing lost: both trials finished, each in one MLflow run with every epoch logged once.
    c = MlflowClient()
    runs = c.search_runs([c.get_experiment_by_name(name).experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    trials = [r for r in runs if r.data.tags.get("sweep_role") != "parent"]
    assert parent.info.status == "FINISHED"
    assert sorted(r.data.tags["run_identity"] for r in trials) == sorted(ran_on), "one MLflow run per trial"
    for run in trials:
        assert run.info.status == "FINISHED"
        steps = [m.step for m in c.get_metric_history(run.info.run_id, "val_acc")]
        assert steps == list(range(1, MAX_EPOCHS + 1)), f"epochs lost or logged twice: {steps}"
    assert len(table_rows(out)) == 2

    # The killed trial continued on the surviving node; fractional GPUs let both share it.
    assert ran_on[victim] == {dead, survivor}
    # Tune's own account: the trial failed once, with its node, and finished after the retry.
    assert re.search(rf"\| trial_{victim} +\| +1\* \|", out), out[-6000:]
    assert "The trial terminated successfully after retrying" in out

    # The sweep's state and every trial's checkpoints are on S3, where the other node found them.
    listed = tracking_stack.s3_client().list_objects_v2(Bucket=tracking_stack.bucket, Prefix=f"ray/{name}/")
    keys = [obj["Key"] for obj in listed.get("Contents", [])]
    assert any(key.endswith("tuner.pkl") for key in keys)
    for trial in ran_on:
        assert any(f"trial_{trial}/checkpoint_" in key for key in keys), f"no checkpoint of {trial} on S3"


#: Long enough that the head is killed mid-trial after a state sync (about 1.5 s an epoch here).
HEAD_KILL_MAX_EPOCHS = 60


def trial_epochs(client: MlflowClient, experiment: str) -> dict[str, list]:
    """Each trial's logged val_acc metrics (step, timestamp), by trial id, oldest first."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return {}
    return {run.data.tags["run_identity"]: sorted(client.get_metric_history(run.info.run_id, "val_acc"),
                                                 key=lambda m: m.step)
            for run in client.search_runs([found.experiment_id])
            if run.data.tags.get("sweep_role") != "parent" and "run_identity" in run.data.tags}


def polled(job: subprocess.Popen, seconds: float, client: MlflowClient, experiment: str):
    """Each trial's logged epochs (trial_epochs), every 2 s while the job runs, for at most `seconds`."""
    deadline = time.time() + seconds
    while job.poll() is None and time.time() < deadline:
        yield trial_epochs(client, experiment)
        time.sleep(2)


def state_synced_at(tracking_stack, prefix: str) -> float:
    """When the driver last uploaded the sweep's experiment state under `prefix` (0 if never)."""
    listed = tracking_stack.s3_client().list_objects_v2(Bucket=tracking_stack.bucket, Prefix=prefix)
    return max((o["LastModified"].timestamp() for o in listed.get("Contents", [])
                if "experiment_state" in o["Key"]), default=0.0)


def reported(s3, bucket: str, prefix: str, trial: str) -> list[tuple[float, int]]:
    """(time, epoch) of every result the trial reported to Tune, from its result.json on S3."""
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix)
    [key] = [o["Key"] for o in listed.get("Contents", []) if o["Key"].endswith(f"trial_{trial}/result.json")]
    lines = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode().splitlines()
    return [(r["timestamp"], r["epoch"]) for r in map(json.loads, lines) if r.get("epoch")]


@pytest.mark.timeout(2700)
def test_the_head_lost_mid_sweep_the_retried_job_restores_the_sweep_from_s3(cluster_env, tracking_stack, tracking_env,
                                                                            real_data_dir, tmp_path):
    """What a RayJob with a backoffLimit does after its head dies (k8s/jobs/): the whole cluster
    is lost with the driver, a new one starts, and the same submission, under the same --name,
    restores the sweep from S3."""
    env, ray_tmp = cluster_env
    name = f"head-{uuid.uuid4().hex[:8]}"
    client = MlflowClient()
    first_nodes: dict[str, subprocess.Popen] = {}
    second_nodes: dict[str, subprocess.Popen] = {}
    jobs: list[subprocess.Popen] = []
    try:
        dashboard = start_cluster(env, tmp_path / "first", f"{ray_tmp}/first", first_nodes)
        jobs.append(submit(dashboard, name, tracking_stack, env, real_data_dir, HEAD_KILL_MAX_EPOCHS,
                           "--scheduler", "fifo"))
        # The head dies once both trials have trained a few epochs and S3 holds a sweep state
        # synced after that (mid-sweep, not only the one written at the start): waited for as
        # an event, not a time, so a fast machine does not finish the sweep first.
        first_epoch_at = running_at = None
        for epochs in polled(jobs[0], 900, client, name):
            if first_epoch_at is None and any(epochs.values()):
                first_epoch_at = time.time()
            if running_at is None and len(epochs) == 2 and all(len(m) >= 2 for m in epochs.values()):
                running_at = time.time()
            if running_at and state_synced_at(tracking_stack, f"ray/{name}/") > running_at + 1:
                break
        assert jobs[0].poll() is None, "the sweep ended before its head could be killed:\n" + jobs[0].stdout.read()[-4000:]
        kill_node(first_nodes.pop("head"))
        killed_at = time.time()
        at_kill = {trial: metrics[-1].step for trial, metrics in trial_epochs(client, name).items()}
        # KubeRay's retry deletes the failed attempt's cluster and its submitter.
        stop_cluster(first_nodes)
        with contextlib.suppress(subprocess.TimeoutExpired):
            jobs[0].wait(timeout=60)
        assert not [t for t, e in at_kill.items() if e >= HEAD_KILL_MAX_EPOCHS], "a trial had finished"

        dashboard = start_cluster(env, tmp_path / "second", f"{ray_tmp}/second", second_nodes)
        resubmitted_at = time.time()
        jobs.append(submit(dashboard, name, tracking_stack, env, real_data_dir, HEAD_KILL_MAX_EPOCHS,
                           "--scheduler", "fifo"))
        progressed_at = None
        deadline = time.time() + 1200
        for now in polled(jobs[1], 1200, client, name):
            if progressed_at is None and any(m and m[-1].step > at_kill.get(t, 0) for t, m in now.items()):
                progressed_at = time.time()
        out, _ = jobs[1].communicate(timeout=max(1, deadline - time.time()))
    finally:
        for job in jobs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.pid, signal.SIGKILL)
        stop_cluster(first_nodes)
        stop_cluster(second_nodes)
    assert jobs[1].returncode == 0 and "succeeded" in out, out[-6000:]
    assert f"restoring sweep {name!r} (unfinished)" in out, out[-6000:]

    # One MLflow run per trial and one parent, every epoch logged once, none lost.
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    assert parent.info.status == "FINISHED"
    trials = [r for r in runs if r.data.tags.get("sweep_role") != "parent"]
    assert sorted(r.data.tags["run_identity"] for r in trials) == sorted(at_kill), "one MLflow run per trial"
    for run in trials:
        assert run.info.status == "FINISHED", (f"{run.info.status}: {run.data.tags.get('failure_cause')}: "
                                               f"{run.data.tags.get('failure_detail')}\n{out[-6000:]}")
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
        assert steps == list(range(1, HEAD_KILL_MAX_EPOCHS + 1)), f"epochs lost or logged twice: {steps}"

    # Restored, not restarted: each trial continued from a checkpoint on S3, and what it trained
    # again is at most the checkpoints the last state upload did not name (Tune uploads after a
    # trial's CHECKPOINTS_KEPT-th) and the epoch in flight when the head died.
    s3 = tracking_stack.s3_client()
    repeated = {}
    for trial, last_epoch in at_kill.items():
        after = sorted(epoch for at, epoch in reported(s3, tracking_stack.bucket, f"ray/{name}/", trial)
                       if at >= resubmitted_at - 1)
        assert after and after[0] > 1, f"trial {trial} started over instead of restoring: {after[:5]}"
        repeated[trial] = [epoch for epoch in after if epoch <= last_epoch]
        assert len(repeated[trial]) <= tuning.CHECKPOINTS_KEPT + 1, \
            f"trial {trial} trained epochs {repeated[trial]} again: more than its unsynced checkpoints and the one in flight"
    print(f"head killed {killed_at - first_epoch_at:.0f} s after the first epoch, trials at epochs {at_kill}; "
          f"epochs trained again {repeated}; first new epoch "
          f"{(progressed_at or float('nan')) - resubmitted_at:.0f} s after the resubmission (new cluster up at {resubmitted_at - killed_at:.0f} s after the kill); "
          f"checkpoints rebuilt because the state named deleted ones: {out.count('resuming from the newest one on storage')}")
