"""The local stack itself: up, healthy, artifacts through the server into the bucket, down."""

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import requests
from mlflow.tracking import MlflowClient

from infra.local.stack import POSTGRES_BIN, Stack, free_port
from tests.conftest import REPO

pytestmark = pytest.mark.stack


def processes_of(stack_dir):
    """Processes whose command line names the stack's folder (weed, mlflow, postgres)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(stack_dir) in part for part in p.info["cmdline"] or []):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def test_the_fixture_stack_stores_artifacts_in_the_bucket(tracking_stack, tracking_env, tmp_path):
    assert requests.get(f"{tracking_stack.tracking_uri}/health", timeout=5).status_code == 200
    c = MlflowClient()
    run = c.create_run(c.create_experiment("stack-check"))
    (tmp_path / "note.txt").write_text("hello")
    c.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
    listed = tracking_stack.s3_client().list_objects_v2(Bucket=tracking_stack.bucket, Prefix=tracking_stack.prefix)
    assert any(o["Key"].endswith(f"{run.info.run_id}/artifacts/note.txt") for o in listed["Contents"])


def test_wrong_credentials_are_refused(tracking_stack):
    response = requests.get(f"{tracking_stack.tracking_uri}/api/2.0/mlflow/experiments/search",
                            params={"max_results": 1}, auth=("admin", "not-the-password"), timeout=5)
    assert response.status_code == 401


def test_a_restarted_server_keeps_its_runs(tracking_stack, tracking_env):
    c = MlflowClient()
    run = c.create_run(c.create_experiment("restart-check"))
    tracking_stack.stop_tracking()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{tracking_stack.tracking_uri}/health", timeout=2)
    tracking_stack.start_tracking()
    assert MlflowClient().get_run(run.info.run_id).info.run_id == run.info.run_id


def test_cli_round_trip_leaves_no_process(tmp_path):
    script = REPO / "infra" / "local" / "stack.sh"
    folder = tmp_path / "cli-stack"
    started = time.monotonic()
    up = subprocess.run([str(script), "up", "--dir", str(folder), "--s3-port", "0", "--mlflow-port", "0"],
                        capture_output=True, text=True, timeout=240)
    assert up.returncode == 0, up.stderr
    assert "export MLFLOW_TRACKING_URI=http://127.0.0.1:" in up.stdout and "export AWS_ACCESS_KEY_ID=" in up.stdout
    assert time.monotonic() - started < 240
    try:
        again = subprocess.run([str(script), "up", "--dir", str(folder)], capture_output=True, text=True, timeout=60)
        assert again.returncode == 1 and "already running" in again.stderr
        status = subprocess.run([str(script), "status", "--dir", str(folder)], capture_output=True, text=True,
                                timeout=60)
        assert "store: healthy" in status.stdout and "tracking: healthy" in status.stdout
        assert processes_of(folder)
    finally:
        down = subprocess.run([str(script), "down", "--dir", str(folder)], capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert processes_of(folder) == []


@pytest.mark.skipif(not (POSTGRES_BIN / "initdb").exists(), reason=f"PostgreSQL 15 binaries not in {POSTGRES_BIN}")
def test_the_postgres_backend_logs_runs():
    # The postgres user must reach the data folder: pytest's tmp folders are root-only.
    folder = Path(tempfile.mkdtemp(prefix="odenet-pg-test-"))
    stack = Stack(folder, backend="postgres", s3_port=0, mlflow_port=0, postgres_port=free_port())
    stack.up()
    try:
        c = MlflowClient(tracking_uri=stack.tracking_uri)
        run = c.create_run(c.create_experiment("pg"))
        c.log_metric(run.info.run_id, "val_acc", 0.5, step=1)
        assert c.get_run(run.info.run_id).data.metrics["val_acc"] == 0.5
        assert stack.status()["postgres"] == "healthy"
    finally:
        stack.down()
    assert processes_of(folder) == []
    shutil.rmtree(folder)
