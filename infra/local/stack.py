"""The local tracking stack: an S3 store (SeaweedFS `weed mini`), its bucket, and an MLflow
tracking server that writes artifacts there itself (`--artifacts-destination s3://...`),
with a SQLite or PostgreSQL backend store and, optionally, MLflow's basic-auth app.

    infra/local/stack.sh up [--dir .stack] [--backend sqlite|postgres] [--auth] [ports...]
    infra/local/stack.sh status [--dir .stack]
    infra/local/stack.sh down [--dir .stack]

`up` prints the variables to export, or, when it fails, the one command `false`, so that
`eval "$(stack.sh up)"` fails too (an empty output would eval to success). Each service runs
in its own process group and is stopped by it, so nothing it started (MLflow's uvicorn
workers, PostgreSQL's backends) outlives `down`. Data, logs, `secrets.json` (the credentials
the services were set up with; mode 0600) and `state.json` (ports, PIDs; written once every
service answers, so a failed `up` leaves no stack for `status` or `down` to report) stay in
--dir, and a later `up` there reuses them.

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
  stack.store, .postgres (None with SQLite), .tracking: the services, each with start(), stop(),
  healthy() (seaweedfs.py, postgres.py, mlflow_server.py)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

try:
    import boto3
    import psutil
    import requests  # noqa: F401  (the MLflow server's health check)
    from botocore.config import Config
except ImportError as exc:  # pragma: no cover - only without the project's environment
    sys.exit(f"stack.py needs boto3, requests and psutil ({exc}): use the project's .venv")

from odenet import envvars
from infra.local.mlflow_server import MlflowServer
from infra.local.ports import DEFAULT_PORTS, pick_ports
from infra.local.postgres import Postgres
from infra.local.seaweedfs import SeaweedFS
from infra.local.service import HOST, REGION, Service, StackError, group_members

PORT_TAKEN = re.compile(r"address already in use|is not available|could not bind", re.IGNORECASE)
#: Secrets that a later `up` in the same folder reuses unless it is given new ones.
SECRETS = ("access_key", "secret_key", "username", "password", "pg_password", "flask_secret")
#: What `up` prints when it fails: `eval` of it fails, as `up` did.
UP_FAILED = "false"


class AlreadyRunning(StackError):
    """`up` in a folder whose stack is running."""


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
        self.store = SeaweedFS(self)
        self.postgres = Postgres(self) if backend == "postgres" else None
        self.tracking = MlflowServer(self)
        self._lock = threading.RLock()
        # state.json is written only for a stack that came up (or was loaded): until then it
        # would announce services that may never answer
        self._recorded = False

    @property
    def services(self) -> list[Service]:
        """In the order they start: MLflow needs the store (and PostgreSQL) up."""
        return [s for s in (self.store, self.postgres, self.tracking) if s is not None]

    @property
    def pids(self) -> dict[str, int]:
        """The process group of each service that was started and not stopped."""
        return {s.name: s.pid for s in self.services if s.pid}

    # -- state --------------------------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    @property
    def secrets_file(self) -> Path:
        return self.dir / "secrets.json"

    def save(self) -> None:
        """Record ports and PIDs in state.json, once the stack came up; a no-op before."""
        with self._lock:
            if not self._recorded or not self.dir.exists():  # removed after `down` (tests do)
                return
            state = {"dir": str(self.dir), "backend": self.backend, "auth": self.auth, "ports": self.ports,
                     "bucket": self.bucket, "prefix": self.prefix, "workers": self.workers, "pids": self.pids}
            _write_json(self.state_file, state)

    @classmethod
    def load(cls, directory: str | os.PathLike = ".stack") -> Stack:
        """The stack recorded in `directory` (running or not)."""
        path = Path(directory).resolve() / "state.json"
        if not path.exists():
            raise StackError(f"no stack in {path.parent} (no state.json): run `up` first")
        state = json.loads(path.read_text())
        stack = cls(state["dir"], backend=state["backend"], auth=state["auth"], ports=state["ports"],
                    bucket=state["bucket"], prefix=state["prefix"], workers=state.get("workers", 2))
        for name, value in _read_secrets(path.parent).items():
            setattr(stack, name, value)
        stack.ports = dict(state["ports"])
        for service in stack.services:
            service.pid = state.get("pids", {}).get(service.name)
        stack._recorded = True
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

    def up(self) -> float:
        """Start everything; returns the seconds it took. On failure, stops what it started."""
        started = time.monotonic()
        with self._lock:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.dir.chmod(0o700)
            if self.state_file.exists():
                if any(s.alive() for s in Stack.load(self.dir).services):
                    raise AlreadyRunning(f"a stack is already running from {self.dir}")
                self.state_file.unlink()  # that stack is stopped; this one is recorded once it is up
            self._take_secrets(_read_secrets(self.dir))
            self.access_key = self.access_key or "odenet-" + secrets.token_hex(6)
            self.secret_key = self.secret_key or secrets.token_urlsafe(30)
            self.username = self.username or "admin"
            self.password = self.password or secrets.token_urlsafe(18)  # MLflow wants 12+ characters
            self.pg_password = self.pg_password or secrets.token_urlsafe(18)
            self.flask_secret = self.flask_secret or secrets.token_hex(24)  # CSRF key of the auth app
            # before any service starts: initdb and MLflow's auth database keep the first ones
            _write_json(self.secrets_file, {name: getattr(self, name) for name in SECRETS})
            for attempt in range(3):
                self.ports = pick_ports(self.requested_ports)
                try:
                    self.ensure_running()
                    self._recorded = True
                    self.save()
                    break
                except BaseException as exc:
                    with contextlib.suppress(Exception):
                        self.down()
                    # a free port picked here can be taken by someone else before our server binds it
                    lost_race = isinstance(exc, StackError) and PORT_TAKEN.search(str(exc))
                    if not (lost_race and 0 in self.requested_ports.values() and attempt < 2):
                        raise
        return time.monotonic() - started

    def _take_secrets(self, recorded: dict[str, str | None]) -> None:
        """Reuse the secrets an earlier `up` in this folder recorded (even a failed one: the services
        may have been set up with them), unless given new ones."""
        for name in SECRETS:
            if getattr(self, name) is None:
                setattr(self, name, recorded.get(name))
        if (self.dir / "basic_auth.db").exists() and recorded.get("password"):
            # MLflow creates the admin once; later admin settings are ignored
            self.username, self.password = recorded["username"], recorded["password"]

    def ensure_running(self) -> None:
        """Start, in order, each service that is not running: `up` does, and so do the tests after one
        that stopped a service and failed before restarting it."""
        with self._lock:
            for service in self.services:
                service.start()

    def down(self) -> list[str]:
        """Stop every process the stack started (data stays); returns what had to be killed after the fact."""
        with self._lock:
            for service in reversed(self.services):
                service.stop()
            leftovers = self.leftover_processes()
            for p in leftovers:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            psutil.wait_procs(leftovers, timeout=5)
            self.store.remove_stale_sockets()
            self.save()
            survivors = [p for p in self.leftover_processes() if p.is_running()]
            if survivors:
                raise StackError(f"processes of the stack survived `down`: {[p.pid for p in survivors]}")
            return [f"{p.pid}" for p in leftovers]

    def leftover_processes(self) -> list[psutil.Process]:
        """Processes of this stack: in a recorded process group, or weed/mlflow/postgres working in `dir`."""
        found = {p.pid: p for pid in self.pids.values() for p in group_members(pid)}
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
        for service in self.services:
            alive = service.alive()
            out[service.name] = {"pid": service.pid, "port": service.port, "alive": alive,
                                 "healthy": alive and service.healthy()}
        return out

    # The restarts the tests use; under the lock, as one runs from a timer thread.
    def start_store(self) -> None:
        with self._lock:
            self.store.start()

    def stop_store(self) -> None:
        with self._lock:
            self.store.stop()

    def start_tracking(self) -> None:
        with self._lock:
            self.tracking.start()

    def stop_tracking(self) -> None:
        with self._lock:
            self.tracking.stop()


def _write_json(path: Path, data: dict) -> None:
    """Write atomically, readable by the owner only (the files hold credentials or say where they work)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.chmod(0o600)
    tmp.replace(path)


def _read_secrets(directory: Path) -> dict[str, str | None]:
    """The secrets recorded in `directory`; a state.json from before secrets.json held them."""
    for name in ("secrets.json", "state.json"):
        if (directory / name).exists():
            found = json.loads((directory / name).read_text())
            if any(key in found for key in SECRETS):
                return {key: found.get(key) for key in SECRETS}
    return {}


# -- the command line -----------------------------------------------------------------------------------------


def _port_arg(text: str) -> tuple[str, int]:
    name, _, port = text.partition("=")
    if name not in DEFAULT_PORTS or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=PORT with NAME in {', '.join(DEFAULT_PORTS)}")
    return name, int(port)


def _print_env(stack: Stack) -> None:
    for key, value in stack.env.items():
        print(f"export {key}={shlex.quote(value)}")


def _parser() -> argparse.ArgumentParser:
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
    return parser


def _up(args: argparse.Namespace) -> int:
    ports = dict.fromkeys(DEFAULT_PORTS, 0) if args.free_ports else {}
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
    # A SIGTERM or SIGHUP (a closed terminal) unwinds like Ctrl-C, so `up` stops what it started.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
    try:
        seconds = stack.up()
    except AlreadyRunning:
        running = Stack.load(args.dir)
        print(f"# the stack in {running.dir} is already running ({running.backend}"
              f"{', auth' if running.auth else ''}); `status` or `down` it. Its variables:")
        _print_env(running)
        return 0
    except BaseException:
        print(UP_FAILED)
        raise
    print(f"# the stack is up in {seconds:.1f}s ({stack.backend}{', auth' if stack.auth else ''}; "
          f"data and logs in {stack.dir}). Export these to use it:")
    _print_env(stack)
    print(f"# MLflow UI: {stack.tracking_uri}" + (f" (user {stack.username})" if stack.auth else ""))
    return 0


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


def _down(args: argparse.Namespace) -> int:
    # Without state.json (an `up` that failed or was killed) the stack's processes are found by folder.
    stack = Stack.load(args.dir) if (Path(args.dir) / "state.json").exists() else Stack(args.dir)
    running = any(s.alive() for s in stack.services) or bool(stack.leftover_processes())
    killed = stack.down()
    if not running:
        print(f"nothing to stop: no stack runs from {stack.dir}")
        return 0
    print(f"stopped the stack in {stack.dir}" + (f" (killed stragglers {', '.join(killed)})" if killed else ""))
    return 0


def _status(args: argparse.Namespace) -> int:
    """Exits 0 only when every service answers, 3 otherwise."""
    stack = Stack.load(args.dir)
    services = stack.status()
    for name, service in services.items():
        state = "healthy" if service["healthy"] else ("running, not answering" if service["alive"] else "stopped")
        print(f"{name}: {state} (pid {service['pid'] or '-'}, port {service['port']})")
    if all(service["healthy"] for service in services.values()):
        print(f"MLFLOW_TRACKING_URI={stack.tracking_uri}")
        return 0
    return 3


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = {"up": _up, "down": _down, "status": _status}[args.command]
    try:
        return command(args)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
