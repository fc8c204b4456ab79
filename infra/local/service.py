"""What every server of the stack shares: it runs in a process group of its own, so that
stopping the group stops everything it started (MLflow's uvicorn workers, PostgreSQL's
backends), and its pid is recorded in the stack's state.json as soon as it exists."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import psutil

HOST = "127.0.0.1"
REGION = "us-east-1"


class StackError(RuntimeError):
    """A service did not come up, or the stack is in a state the command cannot handle."""


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


def stop_group(pgid: int | None, handle: subprocess.Popen | None = None, timeout: float = 20) -> None:
    """SIGTERM a process group, wait for all of it to exit, SIGKILL what is left."""
    if not pgid:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
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


def venv_command(name: str, hint: str) -> str:
    """The command `name` beside this Python (the project's .venv), else on PATH; else StackError with `hint`."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise StackError(f"the `{name}` command is missing: {hint}")
    return found


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


class StackSettings(Protocol):
    """What a service reads from the stack it belongs to (infra/local/stack.py's Stack, which
    imports the services: naming it here would make an import circle)."""

    dir: Path
    ports: dict[str, int]
    bucket: str
    prefix: str
    workers: int
    auth: bool
    access_key: str | None
    secret_key: str | None
    username: str | None
    password: str | None
    pg_password: str | None
    flask_secret: str | None
    postgres: Any  # its PostgreSQL service, or None with SQLite

    @property
    def s3_endpoint(self) -> str: ...

    @property
    def tracking_uri(self) -> str: ...

    def s3_client(self, **config) -> Any: ...

    def save(self) -> None: ...


class Service:
    """One server of the stack: start() (a no-op while it runs), stop(), healthy().

    A service defines _start() (launch it through _spawn, then _wait_until it answers) and
    healthy(); it reads its settings (folder, ports, credentials) from the stack it belongs to.
    """

    name: str  # its pid's key in state.json and its line in `status`
    port_name: str  # its key in the stack's ports
    log_name: str  # its log file in the stack's folder
    label: str  # how messages name it

    def __init__(self, stack: StackSettings):
        self.stack = stack
        self.pid: int | None = None
        self._handle: subprocess.Popen | None = None

    @property
    def port(self) -> int | None:
        return self.stack.ports.get(self.port_name)

    @property
    def log(self) -> Path:
        return self.stack.dir / self.log_name

    def alive(self) -> bool:
        return bool(group_members(self.pid))

    def start(self) -> None:
        """Start it (again, on the same port and data) unless it runs; returns once it answers."""
        if not self.alive():
            self._start()

    def _start(self) -> None:
        raise NotImplementedError

    def healthy(self) -> bool:
        raise NotImplementedError

    def stop(self, timeout: float = 20) -> None:
        """Stop the whole process group (its data stays for the next start)."""
        stop_group(self.pid, self._handle, timeout=timeout)
        self.pid, self._handle = None, None
        self.stack.save()

    def _spawn(self, args: list[str], env: dict[str, str]) -> None:
        with open(self.log, "ab") as out:
            out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(args)}\n".encode())
            out.flush()
            self._handle = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.stack.dir)
        self.pid = self._handle.pid
        self.stack.save()  # so that `down` from another process finds it while it starts

    def _wait_until(self, answers: Callable[[], bool], timeout: float) -> None:
        """Return once answers() does; else stop the service and raise with the end of its log."""
        handle = self._handle
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if handle.poll() is not None:
                self.stop()
                raise StackError(f"{self.label} exited with code {handle.returncode}; "
                                 f"the end of {self.log}:\n{_tail(self.log)}")
            try:
                if answers():
                    return
            except Exception:  # not answering yet
                pass
            time.sleep(0.2)
        self.stop()
        raise StackError(f"{self.label} did not answer within {timeout:.0f}s; the end of {self.log}:\n"
                         f"{_tail(self.log)}")
