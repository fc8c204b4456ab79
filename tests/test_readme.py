"""Every command the README shows is run by a test, or checked statically where it needs a
cluster, a cloud account or Docker: a README command with no test cannot exist, since the
commands are read from the README itself.

- run here (test_the_readme_runs_from_top_to_bottom): every other command, in the README's
  order, in a fresh copy of the checkout, in a user's shell (no virtual environment active
  until the README activates it, no tracking server until the README starts one), with
  the smallest sizes each program accepts appended (SMALLER below: later flags win);
- the local-cluster recipe: run twice by tests/test_ray_job.py;
- `make test`: what CI runs (.ci/run);
- Kubernetes, cloud and Docker commands: bash syntax, every file they name, and the flags
  of our programs they start.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests import readme
from tests.conftest import REPO, table_rows
from tests.test_ray_job import RECIPE_HEADING, readme_recipe

KUBERNETES = "## Run on Kubernetes"
CLUSTER_TOOLS = ("kubectl", "helm", "docker", "terraform", "kind", "aws", "sed")
TINY = ["--max-epochs", "1", "--subset", "512", "--width", "4", "--test-subset", "100"]
# Appended to a command to run it at the smallest sizes it accepts (argparse: the last flag
# wins); the first entry whose fragments the command holds applies. A one-at-a-time design
# ablates the optimizer: two values, so two cells of two seeds (the fewest a verdict needs).
SMALLER = [
    (("make demo",), [f'DEMO_ARGS="--num-samples 2 {" ".join(TINY)}"']),
    (("odenet train",), [*TINY, "--no-reevaluate"]),
    (("sweeps/architecture_ablation.py", "--design one-at-a-time"),
     [*TINY, "--seeds", "2", "--dimensions", "optimizer", "--no-reevaluate"]),
    # the demo above already runs the search smoke with two trials
    (("sweeps/architecture_ablation.py", "--smoke"), [*TINY, "--num-samples", "1"]),
    (("sweeps/architecture_ablation.py",), [*TINY, "--num-samples", "2"]),
    (("sweeps/parameter_efficiency.py",),
     [*TINY, "--models", "odenet-simple,resnet-small", "--datasets", "fashion-mnist", "--seeds", "2",
      "--no-reevaluate"]),
    (("sweeps/solver_reevaluation.py",), ["--test-subset", "100"]),
]
STEP = "=== step"


def kind(command: readme.Command) -> str:
    """run | recipe | ci | static: how the test suite covers a README command."""
    first = command.text.split()[0]
    if command.section == RECIPE_HEADING:
        return "recipe"
    if command.chapter == KUBERNETES or first in CLUSTER_TOOLS or command.text.startswith("ray job submit"):
        return "static"
    if command.text.startswith("make test"):
        return "ci"
    return "run"


def smaller(text: str) -> str:
    """The command without its comment, at the smallest sizes its program accepts."""
    text = re.sub(r"\s{2,}#.*$", "", text).strip()
    if "--help" in text or "--estimate" in text:  # nothing runs: the sizes are the point
        return text
    for fragments, flags in SMALLER:
        if all(fragment in text for fragment in fragments):
            return f"{text} {' '.join(flags)}"
    return text


def runnable() -> list[str]:
    return [c.text for c in readme.commands() if kind(c) == "run"]


def test_every_readme_command_is_run_or_checked():
    kinds = {}
    for command in readme.commands():
        kinds.setdefault(kind(command), []).append(command.text)
    assert set(kinds) == {"run", "recipe", "ci", "static"}
    assert len(kinds["run"]) >= 15 and any("odenet report" in c for c in kinds["run"])
    # CI runs the README's `make test`; every `make test...` the README shows is a target make knows
    assert re.search(r"^make test\b", (REPO / ".ci" / "run").read_text(), re.M), ".ci/run does not run make test"
    for text in kinds["ci"]:
        target = re.sub(r"\s{2,}#.*$", "", text).split()[1]
        dry = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True)
        assert dry.returncode == 0 and "pytest" in dry.stdout, f"`{text}`: {dry.stderr or dry.stdout}"
    # the recipe is what tests/test_ray_job.py runs: the same commands, ray start and ray stop among them
    recipe = [c.text for c in readme.commands() if kind(c) == "recipe"]
    assert recipe == [line.strip() for line in readme_recipe()[0] if not line.strip().startswith("#")]
    assert "ray start --head" in recipe and "ray stop" in recipe
    # every program a runnable command starts is run at a smaller size, or is small already
    for text in kinds["run"]:
        if re.search(r"(sweeps/\w+\.py|odenet train)(?!.*(--help|--estimate))", text):
            assert smaller(text) != re.sub(r"\s{2,}#.*$", "", text).strip(), f"no smaller size for: {text}"


@pytest.mark.parametrize("command", [c for c in readme.commands() if kind(c) == "static"], ids=lambda c: c.text[:60])
def test_cluster_commands_are_valid_and_name_what_exists(command):
    text = command.text
    syntax = subprocess.run(["bash", "-n", "-c", text], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    tokens = shlex.split(text.replace("$(", " ").replace(")", " "), comments=True)
    for token in tokens:
        if re.match(r"^(k8s|infra|sweeps|odenet|tests)/", token):
            assert list(REPO.glob(token.rstrip("/"))), f"{token} named in the README does not exist"
    if "sweeps/" in text:
        # the flags a cluster command passes to our program are flags it has
        program = next(t for t in tokens if t.startswith("sweeps/"))
        flags = tokens[tokens.index(program) + 1:]
        assert program == "sweeps/architecture_ablation.py", f"add a flag check for {program}"
        checked = subprocess.run([sys.executable, "-c", "import sys; from sweeps.architecture_ablation import "
                                  "parse_args; parse_args(sys.argv[1:])", *flags], cwd=REPO, capture_output=True,
                                 text=True)
        assert checked.returncode == 0, checked.stderr


@pytest.mark.stack
@pytest.mark.ray
@pytest.mark.timeout(2700)
def test_the_readme_runs_from_top_to_bottom(tmp_path_factory, real_data_dir):
    root = readme.copy_checkout(tmp_path_factory.mktemp("readme") / "odenet")
    steps = tmp_path_factory.mktemp("steps")
    env = readme.user_env(tmp_path_factory.mktemp("home"), real_data_dir)
    commands = [smaller(text) for text in runnable()]
    script = ["set +e"]
    for i, text in enumerate(commands, start=1):
        # RUN_ID: the id of the latest run any earlier command printed
        text = text.replace("RUN_ID", f"$(grep -ohE 'mlflow run [0-9a-f]{{32}}' {steps}/*.log | tail -1 | cut -d' ' -f3)")
        log = f"{steps}/{i:02d}.log"
        script += [f"echo {shlex.quote(f'{STEP} {i}: {text}')}",
                   f"{{ {text} ; }} > {log} 2>&1; rc=$?; cat {log}",
                   f'[ $rc -eq 0 ] || {{ echo "{STEP} {i} failed: rc=$rc"; exit $rc; }}']
    result = readme.run_script(script, root, env, timeout=2400)
    assert result.returncode == 0, result.stdout[-8000:]
    out = {commands[i - 1]: (steps / f"{i:02d}.log").read_text() for i in range(1, len(commands) + 1)}

    def output(fragment: str) -> str:
        (found,) = [text for command, text in out.items() if fragment in command]
        return found

    # one run, its config file, its evaluation
    assert "test accuracy" in output("--model odenet-simple --dataset fashion-mnist")
    assert "run: resnet-small on fashion-mnist" in output("--config run.yaml")
    assert "--final-time" in output("train --help")
    assert "parameters:" in output("describe --model resnet-large")
    assert re.search(r"test accuracy|accuracy", output("evaluate --run-id"))
    # the sweeps, each a new sweep under its own name
    store = MlflowClient(f"sqlite:///{root / 'mlruns.db'}")
    assert len(table_rows(output("make demo"))) == 2
    assert "new sweep 'ablation-1'" in output("--name ablation-1 ")
    ablation = store.get_experiment_by_name("ablation-1").experiment_id
    ode_runs = [r for r in store.search_runs([ablation], "attributes.status = 'FINISHED'")
                if r.data.params.get("model") == "odenet-simple"]
    assert ode_runs and all("eval_acc_rk4" in r.data.metrics and "eval_fnfe_dopri5_1e-1" in r.data.metrics
                            for r in ode_runs), "solver_reevaluation.py wrote its metrics back"
    assert "| dopri5_1e-3 |" in output("solver_reevaluation.py")
    report = (root / "report" / "report.md").read_text()
    assert "## Search" in report and "## Evaluation solver and tolerance" in report
    models = pd.read_csv(root / "report-models" / "parameter_efficiency_fashion-mnist.csv")
    assert list(models["value"]) == ["odenet-simple", "resnet-small"]
    assert list(models["seeds finished"]) == ["2 of 2", "2 of 2"]
    pe = store.get_experiment_by_name("ablation-1-models").experiment_id
    assert {r.data.tags.get("design") for r in store.search_runs([pe])} == {"parameter-efficiency"}
    # the one-at-a-time designs: every cell over its seeds, tagged, reported
    for name, report_dir in (("ablation-1-effects", "report-effects"), (None, None)):
        if name is None:
            name = re.search(r"new sweep '([^']+)'", output("--smoke --design one-at-a-time")).group(1)
        runs = [r for r in store.search_runs([store.get_experiment_by_name(name).experiment_id])
                if r.data.tags.get("sweep_role") != "parent"]
        cells = {}
        for run in runs:
            tags = run.data.tags
            assert tags["design"] == "one-at-a-time" and run.info.status == "FINISHED" and "stopped_by" not in tags
            cells.setdefault((tags["ablated_dimension"], tags["ablated_value"]), []).append(tags["seed"])
        (base,) = {r.data.params["activation_before"] for r in runs if r.data.tags["ablated_dimension"] == "base"}
        others = {("activation_before", v) for v in ("none", "relu", "tanh", "softplus") if v != base}
        assert set(cells) == {("base", "base"), *others}
        assert all(sorted(seeds) == ["0", "1"] for seeds in cells.values())
    table = pd.read_csv(root / "report-effects" / "one_at_a_time_activation_before.csv")
    assert len(table) == 4 and table["verdict"].iloc[1:].str.match(
        r"(higher by|lower by|no difference detectable with 2 seeds)").all()
    # the real stack: up, healthy, a run logged through the server, down; and on PostgreSQL
    assert "export MLFLOW_TRACKING_URI=" in output("stack.sh up --auth") or "MLFLOW" in output("stack.sh status")
    assert "mlflow run" in output("--model resnet-small --subset 2048") and "http://" in output(
        "--model resnet-small --subset 2048")
    assert "stopped the stack" in output("stack.sh down --dir .stack-pg")
    # and nothing of it is left for `git status` to see
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=root,
                            capture_output=True, text=True, check=True).stdout
    assert status == "", f"written but not in .gitignore:\n{status}"
