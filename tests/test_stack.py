"""The local tracking stack itself (infra/local/): it comes up, answers, keeps
artifacts in the bucket and runs across restarts, refuses bad credentials, and `down`
leaves no process behind; with SQLite (the session fixture, from Python) and PostgreSQL
(from the command line, `eval "$(stack.sh up ...)"` as the README has it, which fails when
`up` does)."""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
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
from tests.stack import SERVERS_ENV

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


def command_lines(processes: list[psutil.Process]) -> list[tuple[str, str]]:
    """(name, command line) of each process still there (a PostgreSQL backend may come and go)."""
    out = []
    for p in processes:
        with contextlib.suppress(psutil.Error):
            out.append((p.name(), " ".join(p.cmdline())))
    return out


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


# -- stacks of their own, through the command line as the README runs it ----------------------------------------


def explicit_ports() -> dict[str, int]:
    """A free port for every service (and its gRPC port + 10000 where weed has one), each given explicitly."""
    taken: set[int] = set()
    ports = {}
    for name in DEFAULT_PORTS:
        ports[name] = free_port(grpc=name in WEED_GRPC, avoid=taken)
        taken |= {ports[name], ports[name] + GRPC_OFFSET}
    return ports


def port_flags(ports: dict[str, int]) -> list[str]:
    named = {"s3": "--s3-port", "mlflow": "--mlflow-port", "postgres": "--postgres-port"}
    return [f"{named[n]}={p}" if n in named else f"--port={n}={p}" for n, p in ports.items()]


def stack_sh(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(STACK_SH), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=user_env())


def user_env() -> dict[str, str]:
    """A shell with none of the stack variables a test may have exported, and telemetry off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    return {**env, **SERVERS_ENV}


def eval_up(*flags: str, cwd: Path) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    """`eval "$(stack.sh up FLAGS)"` in bash, as the README has it; its exit status and the
    stack variables the shell has after it."""
    script = (f'eval "$({shlex.quote(str(STACK_SH))} up {shlex.join(flags)})" || exit $?\n'
              'env -0 | grep -zE "^(MLFLOW|AWS)_" || true\n')
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=240, cwd=cwd,
                            env=user_env())
    exported = dict(item.split("=", 1) for item in result.stdout.split("\0") if "=" in item)
    return result, exported


def own_folder() -> Path:
    # As root the cluster belongs to `postgres`, which cannot enter pytest's 0700 tmp folders.
    return Path(tempfile.mkdtemp(prefix="odenet-stack-pg-"))


@pytest.mark.skipif(postgres_bin() is None, reason="PostgreSQL server binaries (initdb, pg_ctl) are not installed")
def test_the_postgres_stack_from_the_command_line_is_up_healthy_and_holds_a_run(tmp_path, monkeypatch):
    folder = own_folder()
    ports = explicit_ports()
    processes: list[psutil.Process] = []
    try:
        up, exported = eval_up("--dir", str(folder), "--backend", "postgres", "--auth", *port_flags(ports),
                               cwd=tmp_path)
        assert up.returncode == 0, up.stdout + up.stderr
        # the shell has the stack's variables, on the ports asked for
        assert exported["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{ports['mlflow']}"
        assert exported["AWS_ENDPOINT_URL"] == exported["MLFLOW_S3_ENDPOINT_URL"] == f"http://127.0.0.1:{ports['s3']}"
        assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY"} <= set(exported)
        stack = Stack.load(folder)
        assert stack.ports == ports and stack.backend == "postgres"
        processes = stack_processes(stack)
        assert {"weed", "postgres"} <= {name for name, _ in command_lines(processes)}
        assert any("mlflow server" in line for _, line in command_lines(processes))
        # healthy
        health = requests.get(f"{exported['MLFLOW_TRACKING_URI']}/health", timeout=10)
        assert health.status_code == 200 and health.text.strip() == "OK"
        status = stack_sh("status", "--dir", str(folder), cwd=tmp_path)
        assert status.returncode == 0, status.stdout + status.stderr
        for service in ("store", "postgres", "tracking"):
            assert f"{service}: healthy" in status.stdout
        # a run logged with the exported variables, read back through MLflow, its row in PostgreSQL
        for key, value in exported.items():
            monkeypatch.setenv(key, value)
        client = MlflowClient()
        experiment_id, run_id = log_run_with_artifact(client, "stack-pg", tmp_path)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.metrics == {"val_acc": 0.5}
        note = client.download_artifacts(run_id, "notes/note.txt", str(tmp_path))
        assert Path(note).read_text() == f"hello from {run_id}\n"
        listed = stack.s3_client().list_objects_v2(Bucket=stack.bucket, Prefix=f"{stack.prefix}/{experiment_id}/")
        assert len(listed.get("Contents", [])) == 1
        row = stack.postgres._run("psql", "-h", "127.0.0.1", "-p", str(ports["postgres"]), "-U", "mlflow", "-d",
                                  "mlflow", "-tAc", f"SELECT name FROM runs WHERE run_uuid = '{run_id}'",
                                  as_owner=False, env={"PGPASSWORD": stack.pg_password})
        assert row.stdout.strip() == "stack-check"
        assert not (folder / "mlflow.db").exists(), "the runs must be in PostgreSQL, not SQLite"
        # `up` again prints the running stack's variables
        again = stack_sh("up", "--dir", str(folder), cwd=tmp_path)
        assert again.returncode == 0 and "already running" in again.stdout, again.stdout + again.stderr
        assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{ports['mlflow']}" in again.stdout
    finally:
        down = stack_sh("down", "--dir", str(folder), cwd=tmp_path)
    try:
        assert down.returncode == 0 and "stopped the stack" in down.stdout, down.stdout + down.stderr
        assert processes and alive(processes) == []
        assert Stack.load(folder).leftover_processes() == [] and Stack.load(folder).pids == {}
        after = stack_sh("status", "--dir", str(folder), cwd=tmp_path)
        assert after.returncode == 3 and "postgres: stopped" in after.stdout and "tracking: stopped" in after.stdout
    finally:
        subprocess.run(["rm", "-rf", str(folder)], check=False)


@pytest.mark.skipif(postgres_bin() is None, reason="PostgreSQL server binaries (initdb, pg_ctl) are not installed")
def test_an_up_that_fails_fails_its_eval_and_leaves_no_stack(tmp_path):
    folder = own_folder()
    ports = explicit_ports()
    try:
        with socket.socket() as squatter:  # PostgreSQL cannot have its port
            squatter.bind(("127.0.0.1", ports["postgres"]))
            squatter.listen()
            up, exported = eval_up("--dir", str(folder), "--backend", "postgres", *port_flags(ports), cwd=tmp_path)
        assert up.returncode != 0, up.stdout + up.stderr
        assert "error: pg_ctl failed" in up.stderr
        assert "MLFLOW_TRACKING_URI" not in exported and "export" not in up.stdout
        # no record of a stack that never came up, and nothing of it left running
        assert not (folder / "state.json").exists()
        assert Stack(folder).leftover_processes() == []
        status = stack_sh("status", "--dir", str(folder), cwd=tmp_path)
        assert status.returncode == 1 and "no stack in" in status.stderr, status.stdout + status.stderr
        down = stack_sh("down", "--dir", str(folder), cwd=tmp_path)
        assert down.returncode == 0 and "nothing to stop" in down.stdout, down.stdout + down.stderr
    finally:
        stack_sh("down", "--dir", str(folder), cwd=tmp_path)
        subprocess.run(["rm", "-rf", str(folder)], check=False)
