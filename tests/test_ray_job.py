"""`ray job submit` as a user runs it: the README's local-cluster recipe, word for word,
in a copy of the checkout that a demo has written into, on a real local Ray."""

from __future__ import annotations

import re
import shutil
import subprocess
import zipfile

import pytest
from mlflow.tracking import MlflowClient

from tests import readme
from tests.conftest import REPO, table_rows
from tests.readme import copy_checkout, run_script, user_env

pytestmark = [pytest.mark.stack, pytest.mark.ray]

PYTHON = str(REPO / ".venv" / "bin" / "python")
RAY = str(REPO / ".venv" / "bin" / "ray")
RECIPE_HEADING = "### On a local Ray cluster"
# The README says any sweep flag may follow --smoke, and names these for a quicker check.
QUICK = "--num-samples 2 --max-epochs 1"
# Appended after them here: what these tests check is the job path, not the trials' sizes.
SMALLER = "--subset 512 --width 4 --test-subset 100 --no-reevaluate"
MARK = "=== recipe:"
# What a demo, a run and a report write into the checkout: none of it may be uploaded.
STATE = ("ray_results/", "mlruns.db", "mlartifacts/", "runs/", "report/")
# Waits for the MLflow UI, then prints the experiments it serves.
LIST_EXPERIMENTS = """
import json, time, urllib.request
for _ in range(240):
    try:
        body = urllib.request.urlopen("http://127.0.0.1:5000/api/2.0/mlflow/experiments/search?max_results=100",
                                      timeout=5).read()
        break
    except OSError:
        time.sleep(0.5)
for experiment in json.loads(body)["experiments"]:
    print("UI-EXPERIMENT", experiment["name"])
"""


def readme_recipe() -> tuple[list[str], str]:
    """The recipe's command lines, and the prose around them, as the README has them."""
    section = (REPO / "README.md").read_text().split(RECIPE_HEADING, 1)[1].split("\n## ", 1)[0]
    (lines,) = [lines for heading, lines in readme.blocks() if heading == RECIPE_HEADING]
    return [line for line in lines if line.strip()], section


@pytest.fixture(scope="module")
def checkout(tmp_path_factory, real_data_dir):
    """A copy of the checkout as a clone has it, into which a demo sweep, a run and a report
    have written; the user's home is a fresh folder, so the demo also leaves Ray's token there."""
    root = copy_checkout(tmp_path_factory.mktemp("clone") / "odenet")

    home = tmp_path_factory.mktemp("home")
    env = user_env(home, real_data_dir)
    demo = run_script([f"{PYTHON} sweeps/architecture_ablation.py --smoke --num-samples 1 --max-epochs 1 "
                       f"{SMALLER}",
                       f"{PYTHON} -m odenet.cli train --model resnet-small --width 4 --subset 256 --test-subset 100 "
                       f"--max-epochs 1 --no-reevaluate",
                       f"{PYTHON} -m odenet.cli report --experiment odenet --out report"],
                      root, env, timeout=600)
    assert demo.returncode == 0, demo.stdout[-4000:]
    yield root, home, env
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


def test_a_demo_leaves_nothing_in_the_checkout_that_ray_would_upload(checkout):
    root, _, _ = checkout
    for state in STATE:
        assert (root / state.rstrip("/")).exists(), f"the demo wrote no {state}"
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=root,
                            capture_output=True, text=True, check=True).stdout
    assert status == "", f"written but not in .gitignore:\n{status}"

    # The package `ray job submit --working-dir .` uploads, made by Ray's own code:
    # create_package honours .gitignore and .rayignore, plus Ray's default excludes.
    from ray._private.ray_constants import get_runtime_env_default_excludes
    from ray._private.runtime_env.packaging import create_package

    package = root.parent / "package.zip"
    create_package(str(root), package, include_gitignore=True, excludes=get_runtime_env_default_excludes())
    names = zipfile.ZipFile(package).namelist()
    assert "sweeps/architecture_ablation.py" in names  # code goes up
    uploaded_state = [n for n in names if n.startswith(STATE) or n.startswith((".venv", ".git/"))]
    assert uploaded_state == []


def test_the_readme_recipe_twice_runs_two_new_sweeps_whose_runs_outlive_the_cluster(checkout):
    root, home, env = checkout
    lines, prose = readme_recipe()
    assert f"`{QUICK}`" in prose
    (submit,) = [line for line in lines if line.startswith("ray job submit")]
    (ui,) = [line for line in lines if line.startswith("mlflow ui")]
    assert lines.index(ui) > lines.index("ray stop"), "the UI opens the runs after the cluster is gone"
    script = []
    for line in lines:
        if line == submit:
            for n in (1, 2):
                script += [f"echo '{MARK} submission {n}'", f"{submit} {QUICK} {SMALLER}"]
        elif line == ui:
            # The UI blocks: start it, list the experiments it serves, stop it.
            lister = root.parent / "list_experiments.py"
            lister.write_text(LIST_EXPERIMENTS)
            script += [f"echo '{MARK} ui'", f"{ui} &", "ui=$!", f"{PYTHON} {lister}", "kill $ui"]
        else:
            script.append(line)
    result = run_script(script, root, env, timeout=1500)
    assert result.returncode == 0, result.stdout[-6000:]

    _, first, second, ui_out = result.stdout.split(MARK)
    names = []
    for output in (first, second):
        assert "succeeded" in output, output[-3000:]
        assert "restoring" not in output
        (name,) = re.findall(r"new sweep '([^']+)'", output)
        assert re.fullmatch(r"architecture_ablation_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", name)
        store = home / "odenet" / "mlruns.db"
        assert f"runs in sqlite:///{store}" in output  # said at the start and at the end
        assert f"sweep {name!r} done: runs in sqlite:///{store}" in output
        names.append(name)
        print("\n".join(line for line in output.splitlines()  # shown with pytest -s
                        if re.search(r"Job submission server address|new sweep|restoring|done: runs|succeeded", line)))
    assert names[0] != names[1]

    # Both sweeps' runs are in the store in ~/odenet, after `ray stop`, and in the UI.
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'odenet' / 'mlruns.db'}")
    trials = {}
    for name in names:
        runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
        (parent,) = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
        children = [r for r in runs if r.data.tags.get("sweep_role") != "parent"]
        assert parent.info.status == "FINISHED" and len(children) == 2
        trials[name] = {r.data.tags["run_identity"] for r in children}
    assert all(f"UI-EXPERIMENT {name}" in ui_out for name in names), ui_out[-3000:]
    # The second submission printed its own results table, not the first's.
    rows = [line.split("|")[1].strip() for line in table_rows(second)]
    assert set(rows) == trials[names[1]] and not trials[names[0]] & trials[names[1]]


def test_the_job_path_names_the_fix_for_bad_input(checkout):
    """An unreachable --address, a missing token, a --storage-path the head cannot write."""
    root, _, env = checkout
    lines, _ = readme_recipe()
    setup = [line for line in lines if line.startswith(("source ", "ray get-auth-token", "export "))]
    job = "--working-dir . -- python sweeps/architecture_ablation.py --smoke --num-samples 1"
    script = [*setup,
              f"echo '{MARK} address'", f"ray job submit --address http://127.0.0.1:9 {job} || echo rc=$?",
              "ray start --head",
              f"echo '{MARK} token'",
              f"env -u RAY_AUTH_MODE ray job submit --address http://127.0.0.1:8265 {job} || echo rc=$?",
              f"echo '{MARK} storage'",
              f"ray job submit --address http://127.0.0.1:8265 {job} --storage-path /etc/hostname/ray || echo rc=$?",
              "ray stop"]
    result = run_script(script, root, env, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:]
    _, address, token, storage = result.stdout.split(MARK)
    for output in (address, token):
        assert "rc=2" in output and "Traceback" not in output, output[-3000:]
    assert "cannot reach a Ray cluster at http://127.0.0.1:9: start one with `ray start --head`" in address
    assert "or pass the address of a running cluster's dashboard with --address" in address
    assert "asks for its authentication token and none was sent: `export RAY_AUTH_MODE=token`" in token
    assert "rc=" in storage and "Traceback" not in storage, storage[-3000:]
    assert ("error: --storage-path /etc/hostname/ray: the sweep state goes to /etc/hostname/ray, but the Ray head, "
            "which runs the driver of `ray job submit`") in storage
    assert "give --storage-path a folder it can write or an s3://bucket/prefix" in storage


def test_naming_a_finished_or_unknown_sweep_says_so(checkout):
    root, _, env = checkout
    (demo,) = [p.name for p in (root / "ray_results").iterdir()]
    args = [PYTHON, "sweeps/architecture_ablation.py", "--smoke", "--num-samples", "1", "--max-epochs", "1"]
    finished = subprocess.run([*args, "--resume", demo], cwd=root, env=env, capture_output=True, text=True,
                              timeout=300)
    assert finished.returncode == 2 and "Traceback" not in finished.stderr
    assert f"sweep {demo!r} already finished: nothing to restore. Its results are the MLflow run" in finished.stderr
    assert f"`odenet report --experiment {demo}`" in finished.stderr
    unknown = subprocess.run([*args, "--resume", "nope"], cwd=root, env=env, capture_output=True, text=True,
                             timeout=300)
    assert unknown.returncode == 2
    assert f"--resume nope: no sweep of that name in {root / 'ray_results'} (sweeps there: {demo})" in unknown.stderr


def test_in_a_ray_job_the_embedded_defaults_move_to_odenet_home_and_explicit_places_stay(tmp_path, monkeypatch):
    from odenet import envvars
    from sweeps import places

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(envvars.RAY_JOB_CONFIG, "{}")
    monkeypatch.setenv("ODENET_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    where = places.settle(None)
    assert where.tracking_uri == f"sqlite:///{tmp_path / 'home' / 'mlruns.db'}"
    assert where.storage_path == str(tmp_path / "home" / "ray_results")
    # on Kubernetes: the head's tracking server and S3 are used as given
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    where = places.settle("s3://odenet/ray-results")
    assert (where.tracking_uri, where.storage_path) == ("http://mlflow:5000", "s3://odenet/ray-results")
    # outside a Ray job: the working directory, as before
    monkeypatch.delenv(envvars.RAY_JOB_CONFIG)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    where = places.settle(None)
    assert where.storage_path == str(tmp_path / "ray_results") and where.stable_home is None
