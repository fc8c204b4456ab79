"""Fixtures for the real local tracking stack (infra/local/stack.py): SeaweedFS as S3 and
an MLflow server with basic auth, on free ports, torn down at the end of the session."""

from __future__ import annotations

import pytest

from infra.local.stack import Stack


@pytest.fixture(scope="session")
def tracking_stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("stack"), auth=True, s3_port=0, mlflow_port=0)
    stack.up()
    try:
        yield stack
    finally:
        stack.down()


@pytest.fixture
def tracking_env(tracking_stack, monkeypatch):
    """This process talks to the stack, as a user who exported its variables would."""
    for key, value in tracking_stack.env.items():
        monkeypatch.setenv(key, value)
    yield tracking_stack.env
