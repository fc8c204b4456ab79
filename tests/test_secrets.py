"""No credential in Ray's job metadata: the driver hands workers only non-secret settings
(odenet.envvars.SECRETS stay out of the runtime environment, which anyone who can list
jobs on the dashboard reads), while the workers still get the credentials from the
environment they inherit."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.ray

PROBE = """
import json, os
import ray
from ray.util.state import list_jobs
from sweeps.tuning import worker_env

context = ray.init(runtime_env={"env_vars": worker_env()}, num_cpus=1, include_dashboard=True)

@ray.remote
def seen():
    return {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY")}

print(json.dumps({"worker": ray.get(seen.remote()),
                  "jobs": repr(list_jobs(address=context.address_info["gcs_address"], detail=True))}))
"""


def test_the_job_runtime_env_holds_settings_but_no_credential(tmp_path):
    secrets = {"MLFLOW_TRACKING_PASSWORD": "pw-4f1c9e", "AWS_SECRET_ACCESS_KEY": "key-8a2d7b",
               "AWS_ACCESS_KEY_ID": "id-3c5e1f"}
    env = {**os.environ, **secrets, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9/the-uri",
           "AWS_ENDPOINT_URL": "http://127.0.0.1:9/the-endpoint", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    # the job's metadata holds the settings (so this inspection would see a secret there too) ...
    assert "the-uri" in seen["jobs"] and "the-endpoint" in seen["jobs"]
    # ... and no credential, which the workers still have from their own environment
    assert not [value for value in secrets.values() if value in seen["jobs"]]
    assert seen["worker"] == {k: secrets[k] for k in ("MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY")}
