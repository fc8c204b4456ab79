"""Pytest fixtures for the real local tracking stack (infra/local/): SeaweedFS as S3
and an MLflow server with basic auth, on free ports in a temporary folder.

    tracking_stack  (session) the running Stack: .env, .tracking_uri, .credentials, .bucket,
                    .prefix, .s3_client(), .stop_tracking()/.start_tracking(),
                    .stop_store()/.start_store()
    tracking_env    (function) os.environ holds the stack's variables (MLFLOW_TRACKING_URI,
                    MLFLOW_TRACKING_USERNAME/PASSWORD, AWS_*), so MLflow clients in the test
                    and its subprocesses use the stack; restarts a service an earlier test left down

Load it with `pytest_plugins = ["tests.stack"]` in tests/conftest.py (or `-p tests.stack`).
The stack is stopped at the end of the session, after a failure, on Ctrl-C and on SIGTERM/SIGHUP.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal

import pytest

from infra.local.stack import Stack
from odenet import envvars

#: What the servers a test starts (and their clients) get: no usage reports to MLflow.
SERVERS_ENV = {envvars.MLFLOW_TELEMETRY_OFF: "true"}

_live: list[Stack] = []


def _down_all() -> None:
    while _live:
        with contextlib.suppress(Exception):
            _live.pop().down()


def _on_signal(signum, frame):
    _down_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _guard(stack: Stack) -> None:
    """Stop the stack even when pytest is killed by a signal or exits without teardown."""
    if not _live:
        atexit.register(_down_all)
        for signum in (signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(ValueError):  # not in the main thread
                if signal.getsignal(signum) in (signal.SIG_DFL, None):
                    signal.signal(signum, _on_signal)
    _live.append(stack)


@pytest.fixture(scope="session")
def tracking_stack(tmp_path_factory) -> Stack:
    """SeaweedFS + bucket + MLflow server (SQLite, basic auth) on free ports, for the whole session."""
    os.environ.update(SERVERS_ENV)  # the servers inherit it, also when a test restarts one
    stack = Stack(tmp_path_factory.mktemp("stack"), backend="sqlite", auth=True, ports=0)
    _guard(stack)
    try:
        stack.up()
        yield stack
    finally:
        stack.down()
        with contextlib.suppress(ValueError):
            _live.remove(stack)


@pytest.fixture
def tracking_env(tracking_stack, monkeypatch) -> dict[str, str]:
    """This process talks to the stack, as a user who exported `stack.sh up`'s variables would."""
    tracking_stack.ensure_running()
    for name in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_INSECURE_TLS", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for key, value in tracking_stack.env.items():
        monkeypatch.setenv(key, value)
    return tracking_stack.env
