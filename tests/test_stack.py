"""The local tracking stack itself (infra/local/): it comes up, answers, keeps
artifacts in the bucket and runs across restarts, refuses bad credentials, and `down`
leaves no process behind; with SQLite (the session fixture) and PostgreSQL; from Python
and from the command line."""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import uuid
from pathlib import Path

import psutil
import pytest
import requests
from botocore.exceptions import BotoCoreError, ClientError
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from infra.local.ports import DEFAULT_PORTS, GRPC_OFFSET, WEED_GRPC, free_port
from infra.local.postgres import postgres_bin
from infra.local.service import group_members
from infra.local.stack import Stack

pytestmark = pytest.mark.stack

REPO = Path(__file__).resolve().parents[1]
STACK_SH = REPO / "infra" / "local" / "stack.sh"


def stack_processes(stack: Stack, *services: str) -> list[psutil.Process]:
    """Every live process of the stack's process groups (or those of `services`), and their descendants."""
    found = {}
    for name, pgid in stack.pids.items():
        if services and name not in services:
            continue
        for p in group_members(pgid):
            found[p.pid] = p
            with contextlib.suppress(psutil.Error):
                for child in p.children(recursive=True):
                    found[child.pid] = child
    return list(found.values())


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """is_running() checks the creation time too, so a reused PID does not count."""
    out = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def log_run_with_artifact(client: MlflowClient, experiment: str, tmp_path: Path) -> tuple[str, str]:
    experiment_id = client.create_experiment(f"{experiment}-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment_id, run_name="stack-check")
    client.log_param(run.info.run_id, "lr", 0.01)
    client.log_metric(run.info.run_id, "val_acc", 0.5, step=1)
    note = tmp_path / "note.txt"
    note.write_text(f"hello from {run.info.run_id}\n")
    client.log_artifact(run.info.run_id, str(note), artifact_path="notes")
    client.set_terminated(run.info.run_id)
    return experiment_id, run.info.run_id


# -- the session fixture's stack: SQLite, basic auth, free ports --------------------------------------------


def test_the_stack_is_up_and_healthy(tracking_stack):
    status = tracking_stack.status()
    assert set(status) == {"store", "tracking"}
    assert all(s["alive"] and s["healthy"] for s in status.values()), status
    health = requests.get(f"{tracking_stack.tracking_uri}/health", timeout=5)
    assert health.status_code == 200 and health.text.strip() == "OK"
    buckets = [b["Name"] for b in tracking_stack.s3_client().list_buckets()["Buckets"]]
    assert tracking_stack.bucket in buckets
    env = tracking_stack.env
    assert env["MLFLOW_TRACKING_URI"] == tracking_stack.tracking_uri
    assert env["MLFLOW_S3_ENDPOINT_URL"] == env["AWS_ENDPOINT_URL"] == tracking_stack.s3_endpoint
    assert env["MLFLOW_TRACKING_USERNAME"] and len(env["MLFLOW_TRACKING_PASSWORD"]) >= 12
    # free ports: nothing on the well-known ones
    assert tracking_stack.ports["s3"] != DEFAULT_PORTS["s3"] and tracking_stack.ports["mlflow"] != DEFAULT_PORTS["mlflow"]


def test_an_artifact_logged_through_the_server_lands_in_the_bucket(tracking_stack, tracking_env, tmp_path):
    client = MlflowClient()
    experiment_id, run_id = log_run_with_artifact(client, "stack-artifacts", tmp_path)
    assert client.get_experiment(experiment_id).artifact_location == f"mlflow-artifacts:/{experiment_id}"
    key = f"{tracking_stack.prefix}/{experiment_id}/{run_id}/artifacts/notes/note.txt"
    s3 = tracking_stack.s3_client()
    listed = s3.list_objects_v2(Bucket=tracking_stack.bucket, Prefix=f"{tracking_stack.prefix}/{experiment_id}/")
    assert [o["Key"] for o in listed.get("Contents", [])] == [key]
    body = s3.get_object(Bucket=tracking_stack.bucket, Key=key)["Body"].read().decode()
    assert body == f"hello from {run_id}\n"
    assert [f.path for f in client.list_artifacts(run_id, "notes")] == ["notes/note.txt"]


def test_wrong_or_missing_credentials_are_refused(tracking_stack, tracking_env, monkeypatch):
    url = f"{tracking_stack.tracking_uri}/api/2.0/mlflow/experiments/search"
    good = requests.get(url, params={"max_results": 1}, auth=tracking_stack.credentials, timeout=10)
    assert good.status_code == 200
    wrong = requests.get(url, params={"max_results": 1}, auth=(tracking_stack.username, "not-the-password"),
                         timeout=10)
    assert wrong.status_code == 401
    assert requests.get(url, params={"max_results": 1}, timeout=10).status_code == 401
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    with pytest.raises(MlflowException, match="401"):
        MlflowClient().search_experiments(max_results=1)
    # S3 refuses a wrong secret too
    s3 = Stack.load(tracking_stack.dir)
    s3.secret_key = "not-the-secret"
    with pytest.raises(ClientError, match="SignatureDoesNotMatch|AccessDenied|InvalidAccessKeyId"):
        s3.s3_client().list_buckets()


def test_a_restarted_tracking_server_keeps_its_runs(tracking_stack, tracking_env, tmp_path):
    client = MlflowClient()
    _, run_id = log_run_with_artifact(client, "stack-restart", tmp_path)
    server = stack_processes(tracking_stack, "tracking")
    assert len(server) >= 3  # mlflow, uvicorn, its workers
    tracking_stack.stop_tracking()
    assert "tracking" not in tracking_stack.pids and alive(server) == []
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{tracking_stack.tracking_uri}/health", timeout=5)
    assert tracking_stack.status()["store"]["healthy"], "stopping MLflow must leave S3 alone"
    port = tracking_stack.ports["mlflow"]
    tracking_stack.start_tracking()
    assert tracking_stack.ports["mlflow"] == port
    run = MlflowClient().get_run(run_id)
    assert run.data.metrics == {"val_acc": 0.5} and run.data.params == {"lr": "0.01"}
    assert [f.path for f in client.list_artifacts(run_id, "notes")] == ["notes/note.txt"]


def test_a_restarted_store_keeps_its_objects(tracking_stack, tracking_env):
    s3 = tracking_stack.s3_client()
    key = f"stack-check/{uuid.uuid4().hex}.txt"
    s3.put_object(Bucket=tracking_stack.bucket, Key=key, Body=b"kept")
    tracking_stack.stop_store()
    refusing = tracking_stack.s3_client(connect_timeout=2, read_timeout=2, retries={"max_attempts": 1})
    with pytest.raises((BotoCoreError, ClientError)):
        refusing.put_object(Bucket=tracking_stack.bucket, Key=key + ".new", Body=b"refused")
    assert requests.get(f"{tracking_stack.tracking_uri}/health", timeout=5).status_code == 200
    tracking_stack.start_store()
    assert s3.get_object(Bucket=tracking_stack.bucket, Key=key)["Body"].read() == b"kept"
    s3.delete_object(Bucket=tracking_stack.bucket, Key=key)


# -- stacks of their own -----------------------------------------------------------------------------------------


@pytest.mark.skipif(postgres_bin() is None, reason="PostgreSQL server binaries (initdb, pg_ctl) are not installed")
def test_the_postgres_backend_logs_runs_and_down_leaves_no_process(tmp_path):
    # As root the cluster belongs to `postgres`, which cannot enter pytest's 0700 tmp folders.
    folder = Path(tempfile.mkdtemp(prefix="odenet-stack-pg-"))
    stack = Stack(folder, backend="postgres", ports=0)
    try:
        stack.up()
        status = stack.status()
        assert all(s["healthy"] for s in status.values()) and set(status) == {"store", "postgres", "tracking"}
        assert stack.tracking.backend_store_uri.startswith("postgresql+psycopg2://")
        client = MlflowClient(tracking_uri=stack.tracking_uri)
        experiment_id, run_id = log_run_with_artifact(client, "stack-pg", tmp_path)
        assert client.get_run(run_id).data.metrics == {"val_acc": 0.5}
        listed = stack.s3_client().list_objects_v2(Bucket=stack.bucket, Prefix=f"{stack.prefix}/{experiment_id}/")
        assert len(listed.get("Contents", [])) == 1
        assert not (folder / "mlflow.db").exists(), "the runs must be in PostgreSQL, not SQLite"
        processes = stack_processes(stack)
        names = {p.name() for p in processes}
        assert {"weed", "postgres"} <= names and any("mlflow" in " ".join(p.cmdline()) for p in processes)
    finally:
        stack.down()
    assert alive(processes) == []
    assert stack.leftover_processes() == []
    assert stack.pids == {} and Stack.load(folder).pids == {}
    subprocess.run(["rm", "-rf", str(folder)], check=False)


def test_the_command_line_round_trip_with_explicit_ports(tmp_path):
    folder = tmp_path / "cli-stack"
    taken: set[int] = set()
    ports = {}
    for name in DEFAULT_PORTS:
        if name == "postgres":
            continue
        ports[name] = free_port(grpc=name in WEED_GRPC, avoid=taken)
        taken |= {ports[name], ports[name] + GRPC_OFFSET}
    flags = ["--dir", str(folder), "--auth", "--s3-port", str(ports["s3"]), "--mlflow-port", str(ports["mlflow"])]
    flags += [f"--port={name}={port}" for name, port in ports.items() if name not in ("s3", "mlflow")]

    def cli(*args, timeout=180):
        return subprocess.run([str(STACK_SH), *args], capture_output=True, text=True, timeout=timeout, cwd=tmp_path)

    up = cli("up", *flags)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        exports = dict(line.removeprefix("export ").split("=", 1) for line in up.stdout.splitlines()
                       if line.startswith("export "))
        assert exports["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{ports['mlflow']}"
        assert exports["AWS_ENDPOINT_URL"] == exports["MLFLOW_S3_ENDPOINT_URL"] == f"http://127.0.0.1:{ports['s3']}"
        assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY"} <= set(exports)
        assert "the stack is up in " in up.stdout
        stack = Stack.load(folder)
        assert stack.ports == {**DEFAULT_PORTS, **ports, "postgres": DEFAULT_PORTS["postgres"]}
        auth = (exports["MLFLOW_TRACKING_USERNAME"], exports["MLFLOW_TRACKING_PASSWORD"])
        assert requests.get(f"{exports['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search",
                            params={"max_results": 1}, auth=auth, timeout=10).status_code == 200

        again = cli("up", "--dir", str(folder))
        assert again.returncode == 0 and "already running" in again.stdout, again.stdout + again.stderr
        assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{ports['mlflow']}" in again.stdout

        status = cli("status", "--dir", str(folder))
        assert status.returncode == 0, status.stdout + status.stderr
        assert "store: healthy" in status.stdout and "tracking: healthy" in status.stdout
        processes = stack_processes(stack)
        assert {"weed"} <= {p.name() for p in processes} and len(processes) >= 3  # weed, mlflow, uvicorn + workers
    finally:
        down = cli("down", "--dir", str(folder))
    assert down.returncode == 0, down.stdout + down.stderr
    assert alive(processes) == []
    assert Stack.load(folder).leftover_processes() == []
    after = cli("status", "--dir", str(folder))
    assert after.returncode == 3 and "store: stopped" in after.stdout and "tracking: stopped" in after.stdout
