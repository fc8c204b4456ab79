"""The MLflow tracking server: runs in SQLite (dir/mlflow.db) or PostgreSQL, artifacts written
by the server itself to s3://bucket/prefix, and optionally MLflow's basic-auth app."""

from __future__ import annotations

import os
from pathlib import Path

import requests

from infra.local.service import HOST, REGION, Service, venv_command


class MlflowServer(Service):
    name = "tracking"
    port_name = "mlflow"
    log_name = "mlflow.log"
    label = "the MLflow server"

    @property
    def backend_store_uri(self) -> str:
        postgres = self.stack.postgres
        return postgres.uri if postgres else f"sqlite:///{self.stack.dir / 'mlflow.db'}"

    def _start(self) -> None:
        mlflow = venv_command("mlflow", "use the project's .venv")
        stack, port = self.stack, self.port
        args = [mlflow, "server", "--host", HOST, "--port", str(port), "--workers", str(stack.workers),
                "--backend-store-uri", self.backend_store_uri,
                "--artifacts-destination", f"s3://{stack.bucket}/{stack.prefix}",
                # MLflow 3 answers only Host headers it allows
                "--allowed-hosts", f"{HOST}:{port},localhost:{port},{HOST},localhost"]
        env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": stack.s3_endpoint, "AWS_ACCESS_KEY_ID": stack.access_key,
               "AWS_SECRET_ACCESS_KEY": stack.secret_key, "AWS_DEFAULT_REGION": REGION,
               # the job runner (huey consumers, a folder in /dev/shm) serves GenAI features only
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
               # an upload to a store that is down fails in about a second, not after botocore's
               # 5 tries: the client retries it within its own budget (odenet.tracker)
               "AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": "2"}
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                     "MLFLOW_TRACKING_TOKEN", "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD",
                     "MLFLOW_AUTH_CONFIG_PATH", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
            env.pop(name, None)
        if stack.postgres:
            env["PGPASSWORD"] = stack.pg_password
        if stack.auth:
            args += ["--app-name", "basic-auth"]
            env["MLFLOW_AUTH_CONFIG_PATH"] = str(self._write_auth_config())
            env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = stack.flask_secret
        self._spawn(args, env)
        self._wait_until(self.healthy, timeout=120)

    def healthy(self) -> bool:
        """/health answers 200 and, with auth, the admin's credentials are accepted (a server
        that answers /health but refuses the stack's secrets is of no use to a user)."""
        try:
            if requests.get(f"{self.stack.tracking_uri}/health", timeout=5).status_code != 200:
                return False
            return not self.stack.auth or requests.post(
                f"{self.stack.tracking_uri}/api/2.0/mlflow/experiments/search", json={"max_results": 1},
                auth=(self.stack.username, self.stack.password), timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def _write_auth_config(self) -> Path:
        config = self.stack.dir / "basic_auth.ini"
        config.write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = sqlite:///{self.stack.dir / 'basic_auth.db'}\n"
            f"admin_username = {self.stack.username}\nadmin_password = {self.stack.password}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            # A worker checks a password it accepted once a minute, not on every request: each
            # check is a deliberately slow hash (scrypt, about 0.1-0.4 s of CPU), which a sweep's
            # stream of metric and artifact requests otherwise pays on every call.
            "auth_cache_ttl_seconds = 60\n")
        config.chmod(0o600)  # it holds the admin's password
        return config
