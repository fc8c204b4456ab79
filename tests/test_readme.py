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
import shutil
import subprocess
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from odenet.config import RunConfig
from odenet.models import build
from tests import readme
from tests.conftest import REPO, table_rows
from tests.test_ray_job import RECIPE_HEADING, readme_recipe

KUBERNETES = "## Run on Kubernetes"
CLUSTER_TOOLS = ("kubectl", "helm", "docker", "terraform", "kind", "aws", "sed")
TINY = ["--max-epochs", "1", "--subset", "512", "--width", "4", "--test-subset", "100"]
ABLATED = "optimizer"  # the dimension the one-at-a-time designs ablate here (SMALLER)
# Appended to a command to run it at the smallest sizes it accepts (argparse: the last flag
# wins); the first entry whose fragments the command holds applies. A one-at-a-time design
# ablates the optimizer: two values, so two cells of two seeds (the fewest a verdict needs);
# the --smoke one checks the design's path, not seeds: one seed each (the named one checks seeds).
SMALLER = [
    (("make demo",), [f'DEMO_ARGS="--num-samples 2 {" ".join(TINY)}"']),
    (("odenet train",), [*TINY, "--no-reevaluate"]),
    (("sweeps/architecture_ablation.py", "--smoke", "--design one-at-a-time"),
     [*TINY, "--seeds", "1", "--dimensions", ABLATED, "--no-reevaluate"]),
    (("sweeps/architecture_ablation.py", "--design one-at-a-time"),
     [*TINY, "--seeds", "2", "--dimensions", ABLATED, "--no-reevaluate"]),
    # the demo above already runs the search smoke with two trials
    (("sweeps/architecture_ablation.py", "--smoke"), [*TINY, "--num-samples", "1"]),
    # its trials do not re-evaluate: then the eval_* metrics are solver_reevaluation.py's
    (("sweeps/architecture_ablation.py",), [*TINY, "--num-samples", "2", "--no-reevaluate"]),
    # the width curve: two widths, two seeds (the fewest an interval needs)
    (("sweeps/parameter_efficiency.py", "--widths"), [*TINY, "--widths", "2,4", "--seeds", "2", "--no-reevaluate"]),
    (("sweeps/parameter_efficiency.py",),
     [*TINY, "--models", "odenet-simple,resnet-small", "--datasets", "fashion-mnist", "--seeds", "2",
      "--no-reevaluate"]),
    (("sweeps/solver_reevaluation.py",), ["--test-subset", "100"]),
]
STEP = "=== step"
COST_HEADING = "### What a sweep will cost"
# Run after the README command that holds the fragment, in its shell: a stack the README brought
# up with `eval "$(... up ...)"` (which succeeds whatever `up` did) is healthy and keeps a run.
PROBE_RUN = ("import os, mlflow; mlflow.set_experiment('readme-probe'); run = mlflow.start_run(); "
             "mlflow.log_metric('probe', 1.0); mlflow.end_run(); "
             "got = mlflow.MlflowClient().get_run(run.info.run_id).data.metrics['probe']; "
             "print('PROBE', os.environ['MLFLOW_TRACKING_URI'], run.info.run_id, 'logged', got)")
PROBES = [("stack.sh up --backend postgres",
           lambda text: f"infra/local/stack.sh status {stack_dir(text)} && .venv/bin/python -c {shlex.quote(PROBE_RUN)}")]


def stack_dir(text: str) -> str:
    """The --dir flag of a stack.sh command, or nothing (the default folder)."""
    found = re.search(r"--dir [^\s)\"']+", text)
    return found.group() if found else ""


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


def step(name: str, text: str, steps) -> list[str]:
    """Script lines that run one command into steps/NAME.log, print it, and stop the script if it failed."""
    log = f"{steps}/{name}.log"
    return [f"echo {shlex.quote(f'{STEP} {name}: {text}')}", "started=$SECONDS",
            f"{{ {text} ; }} > {log} 2>&1; rc=$?; cat {log}",
            f'echo "{STEP} took $((SECONDS - started)) s: {name}"',
            f'[ $rc -eq 0 ] || {{ echo "{STEP} {name} failed: rc=$rc"; exit $rc; }}']


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
def test_cluster_commands_are_valid_and_name_what_exists(command, capsys):
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
        from sweeps.architecture_ablation import parse_args  # in-process: one import for every command

        try:
            parse_args(flags)
        except SystemExit as exc:
            pytest.fail(f"{program} refuses the README's flags {flags} (exit {exc.code}): {capsys.readouterr().err}")


# The README's cost table: its columns, and the line of --estimate's output each is read from.
COST_COLUMNS = {"trials": r"^trials: ([\d,]+)$",
                "trial-epochs (at most)": r"^trial-epochs: at most ([\d,.]+) ",
                "GPU-hours (H200)": r"^GPU \(one H200[^)]*\): ([\d,.]+) device-hours",
                "hours on 8 GPUs": r"^GPU \(one H200[^)]*\): .*, ([\d,.]+) hours on 8 GPUs$",
                "CPU-hours (2 cores)": r"^CPU \(2 cores[^)]*\): ([\d,.]+) device-hours"}
DATA_SETS = {"FashionMNIST": "fashion-mnist", "CIFAR-10": "cifar10"}


def printed_costs(printed: str) -> dict[str, float]:
    """--estimate's numbers, by the README table's column."""
    found = {column: re.search(pattern, printed, re.M) for column, pattern in COST_COLUMNS.items()}
    assert all(found.values()), f"--estimate printed no {[c for c, m in found.items() if not m]}:\n{printed}"
    return {column: readme.number(match.group(1)) for column, match in found.items()}


def assert_row_is_printed(row: dict[str, str], printed: str) -> None:
    costs = printed_costs(printed)
    for column, value in costs.items():
        exact = column in ("trials", "trial-epochs (at most)")
        assert (readme.number(row[column]) == value) if exact else readme.same_number(row[column], value, printed=True), \
            f"the README's {row['sweep']} / {row['data set']}: {column} {row[column]}, --estimate prints {value}"


def estimate_flags(row: dict[str, str]) -> list[str]:
    """The flags of the sweep a row of the README's cost table names, at the study's settings."""
    from sweeps.architecture_ablation import SEARCH_SPACE

    if m := re.fullmatch(r"search, (\d+) samples, ASHA \(grace (\d+), η (\d+)\)", row["sweep"]):
        flags = ["--num-samples", m[1], "--grace-period", m[2], "--reduction-factor", m[3]]
    elif m := re.fullmatch(r"one-at-a-time, all (\d+) dimensions, (\d+) seeds", row["sweep"]):
        assert int(m[1]) == len(SEARCH_SPACE), f"the study searches {len(SEARCH_SPACE)} dimensions, not {m[1]}"
        flags = ["--design", "one-at-a-time", "--seeds", m[2]]
    else:
        raise AssertionError(f"no flags known for the README's cost row {row['sweep']!r}: add them here")
    return [*flags, "--dataset", DATA_SETS[row["data set"]], "--estimate"]


def test_the_readme_cost_table_is_what_estimate_prints(capsys):
    """Every row of the README's whole-study table, the total and the --recipe fast sum, against
    --estimate run with the row's flags (in-process: it starts nothing)."""
    from sweeps.architecture_ablation import architecture_ablation

    def estimate(flags: list[str]) -> str:
        assert architecture_ablation(flags) is None
        return capsys.readouterr().out

    text = readme.section(COST_HEADING)
    rows = readme.table(text)
    *sweeps, together = rows
    assert len(sweeps) == 4 and together["sweep"] == "**together**"
    fast = []
    for row in sweeps:
        assert_row_is_printed(row, estimate(estimate_flags(row)))
        fast.append(printed_costs(estimate([*estimate_flags(row), "--recipe", "fast"]))["hours on 8 GPUs"])
    for column in ("trials", "trial-epochs (at most)"):
        assert readme.number(together[column]) == sum(readme.number(r[column]) for r in sweeps), column
    for column in ("GPU-hours (H200)", "hours on 8 GPUs", "CPU-hours (2 cores)"):
        total = sum(readme.number(r[column]) for r in sweeps)
        assert total == pytest.approx(readme.number(together[column]), rel=0.01), column  # sums of rounded cells
    hours = readme.number(together["hours on 8 GPUs"])
    days = re.search(r"\(([\d.]+) days\)", together["hours on 8 GPUs"]).group(1)
    assert readme.same_number(days, hours / 24), f"{hours} hours are not {days} days"
    # "With `--recipe fast` the same four sweeps come to at most 0.25 + 1.0 + 4.0 + 17.3 = 23 hours on 8 GPUs"
    claim = re.search(r"--recipe fast` the same four sweeps come to at most ((?:[\d.,]+ \+ )+[\d.,]+) = ([\d.,]+) "
                      r"hours on 8 GPUs", " ".join(text.split()))
    assert claim, "the README's --recipe fast sentence is not where this test reads it"
    parts = sorted(claim.group(1).split(" + "), key=readme.number)  # in its own order: compared sorted
    assert len(parts) == len(fast)
    for shown, value in zip(parts, sorted(fast)):
        assert readme.same_number(shown, value, printed=True), f"--recipe fast: the README says {shown}, --estimate {value}"
    assert readme.same_number(claim.group(2), sum(fast), printed=True), f"{claim.group(2)} is not {sum(fast)}"


@pytest.mark.stack
@pytest.mark.ray
@pytest.mark.timeout(2700)
def test_the_readme_runs_from_top_to_bottom(tmp_path_factory, real_data_dir):
    # Not under pytest's 0700 folders: the README's PostgreSQL stack runs as the postgres user,
    # which must reach its --dir inside the checkout (stack.sh refuses otherwise).
    clone = Path(tempfile.mkdtemp(prefix="odenet-readme-", dir="/tmp"))
    clone.chmod(0o711)
    try:
        readme_runs_from_top_to_bottom(readme.copy_checkout(clone / "odenet"), tmp_path_factory, real_data_dir)
    finally:
        shutil.rmtree(clone, ignore_errors=True)


def readme_runs_from_top_to_bottom(root: Path, tmp_path_factory, real_data_dir) -> None:
    steps = tmp_path_factory.mktemp("steps")
    env = readme.user_env(tmp_path_factory.mktemp("home"), real_data_dir)
    commands = [smaller(text) for text in runnable()]
    script = ["set +e"]
    for i, text in enumerate(commands, start=1):
        # RUN_ID: the id of the latest run any earlier command printed
        text = text.replace("RUN_ID", f"$(grep -ohE 'mlflow run [0-9a-f]{{32}}' {steps}/*.log | tail -1 | cut -d' ' -f3)")
        script += step(f"{i:02d}", text, steps)
        for fragment, probe in PROBES:
            if fragment in text:
                script += step(f"{i:02d}-probe", probe(text), steps)
    result = readme.run_script(script, root, env, timeout=2400)
    print("\n".join(line for line in result.stdout.splitlines() if line.startswith(f"{STEP} took")))
    assert result.returncode == 0, result.stdout[-8000:]
    out = {commands[i - 1]: (steps / f"{i:02d}.log").read_text() for i in range(1, len(commands) + 1)}

    def output(fragment: str) -> str:
        (found,) = [text for command, text in out.items() if fragment in command]
        return found

    def probed(fragment: str) -> str:
        (i,) = [i for i, command in enumerate(commands, start=1) if fragment in command]
        return (steps / f"{i:02d}-probe.log").read_text()

    # one run, its config file, its evaluation: the run evaluated again gives the accuracy it logged
    assert re.search(r"^test accuracy 0\.\d{4} ", output("--model odenet-simple --dataset fashion-mnist"), re.M)
    configured = output("--config run.yaml")
    assert "run: resnet-small on fashion-mnist" in configured
    run_id = re.search(r"^mlflow run ([0-9a-f]{32}) ", configured, re.M).group(1)
    accuracy = re.search(r"^test accuracy (\d\.\d{4}) ", configured, re.M).group(1)
    evaluated = output("evaluate --run-id")
    assert re.search(rf"^run {run_id} \(resnet-small on fashion-mnist, best epoch 1\)$", evaluated, re.M), \
        evaluated[:300]
    assert "\r" not in evaluated, "a bar drawn into a pipe"
    assert re.search(rf"^test accuracy {accuracy} ", evaluated, re.M), f"not {accuracy}:\n{evaluated[:400]}"
    assert f"\nlogged test accuracy {accuracy}\n" in evaluated
    assert "--final-time" in output("train --help")
    assert "parameters:" in output("describe --model resnet-large")
    # the cost of a sweep, as the README's table publishes it
    (row,) = [r for r in readme.table(readme.section(COST_HEADING)) if r["data set"] == "CIFAR-10"
              and r["sweep"].startswith("search, 64 samples")]
    assert_row_is_printed(row, output("--estimate"))
    # the sweeps, each a new sweep under its own name
    store = MlflowClient(f"sqlite:///{root / 'mlruns.db'}")
    assert len(table_rows(output("make demo"))) == 2
    assert "new sweep 'ablation-1'" in output("--name ablation-1 ")
    ablation = store.get_experiment_by_name("ablation-1").experiment_id
    ode_runs = [r for r in store.search_runs([ablation], "attributes.status = 'FINISHED'")
                if r.data.params.get("model") == "odenet-simple"]
    # the trials ran with --no-reevaluate: their eval_* metrics can only be solver_reevaluation.py's
    assert ode_runs and all(r.data.params["reevaluate"] == "False" for r in ode_runs)
    assert all("eval_acc_rk4" in r.data.metrics and "eval_fnfe_dopri5_1e-1" in r.data.metrics
               for r in ode_runs), "solver_reevaluation.py wrote its metrics back"
    assert "| dopri5_1e-3 |" in output("solver_reevaluation.py")
    report = (root / "report" / "report.md").read_text()
    assert "## Search" in report and "## Evaluation solver and tolerance" in report
    models = pd.read_csv(root / "report-models" / "parameter_efficiency_fashion-mnist.csv")
    assert list(models["value"]) == ["odenet-simple", "resnet-small"]
    assert list(models["seeds finished"]) == ["2 of 2", "2 of 2"]
    # the width curve: one finished run per family x width x seed, each with its counted parameters
    families, widths, seeds = ("odenet-simple", "resnet-small"), (2, 4), (0, 1)
    counted = {(m, w): sum(p.numel() for p in build(RunConfig(model=m, width=w)).parameters() if p.requires_grad)
               for m in families for w in widths}
    runs = [r for r in store.search_runs([store.get_experiment_by_name("widths-1").experiment_id])
            if r.data.tags.get("sweep_role") != "parent"]
    assert sorted((r.data.params["model"], int(r.data.params["width"]), int(r.data.params["seed"])) for r in runs) \
        == [(m, w, s) for m in families for w in widths for s in seeds]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.metrics["params_trainable"] == counted[run.data.params["model"], int(run.data.params["width"])]
    curve = pd.read_csv(root / "report-widths" / "parameter_curve_fashion-mnist.csv")
    assert sorted(zip(curve["model"], curve["width"], curve["params_trainable"], curve["n"])) == [
        (m, w, counted[m, w], len(seeds)) for m in families for w in widths]
    widths_report = (root / "report-widths" / "report.md").read_text()
    assert "## Parameter efficiency as a curve" in widths_report and "### fashion-mnist, width 2" in widths_report
    pe = store.get_experiment_by_name("ablation-1-models").experiment_id
    assert {r.data.tags.get("design") for r in store.search_runs([pe])} == {"parameter-efficiency"}
    # the one-at-a-time designs: every cell over its seeds, tagged, reported
    smoke = re.search(r"new sweep '([^']+)'", output("--smoke --design one-at-a-time")).group(1)
    for name, seeds in (("ablation-1-effects", ["0", "1"]), (smoke, ["0"])):
        runs = [r for r in store.search_runs([store.get_experiment_by_name(name).experiment_id])
                if r.data.tags.get("sweep_role") != "parent"]
        cells = {}
        for run in runs:
            tags = run.data.tags
            assert tags["design"] == "one-at-a-time" and run.info.status == "FINISHED" and "stopped_by" not in tags
            cells.setdefault((tags["ablated_dimension"], tags["ablated_value"]), []).append(tags["seed"])
        (base,) = {r.data.params[ABLATED] for r in runs if r.data.tags["ablated_dimension"] == "base"}
        others = {(ABLATED, v) for v in ("adam", "sgd") if v != base}
        assert set(cells) == {("base", "base"), *others}
        assert all(sorted(found) == seeds for found in cells.values()), cells
    table = pd.read_csv(root / "report-effects" / f"one_at_a_time_{ABLATED}.csv")
    # 2 seeds: no verdict from fewer than 3 finished pairs, and the table says why
    ablated = table[table["Δ test acc vs base, points"] != "base"]
    assert len(table) == 2 and len(ablated) == 1, table
    assert ablated["verdict"].str.startswith("not estimable: 2 finished pair(s), need at least 3").all(), table
    # the real stack: up, every service healthy, a run logged through its server; down
    status = output("stack.sh status")
    services = dict(re.findall(r"^(\w+): (healthy|running, not answering|stopped) \(", status, re.M))
    assert set(services) == {"store", "tracking"} and set(services.values()) == {"healthy"}, status
    uri = re.search(r"^MLFLOW_TRACKING_URI=(http://\S+)$", status, re.M).group(1)
    served = output("--model resnet-small --subset 2048")
    assert re.search(rf"^mlflow run [0-9a-f]{{32}} in experiment .* at {re.escape(uri)}$", served, re.M), served[-800:]
    assert "stopped the stack" in out["infra/local/stack.sh down"]
    # and on PostgreSQL: up, healthy with PostgreSQL as its store, holding the run logged through it
    pg = probed("--backend postgres")
    services = dict(re.findall(r"^(\w+): (healthy|running, not answering|stopped) \(", pg, re.M))
    assert set(services) == {"postgres", "store", "tracking"} and set(services.values()) == {"healthy"}, pg
    assert re.search(r"^PROBE http://\S+ [0-9a-f]{32} logged 1.0$", pg, re.M), pg
    assert "stopped the stack" in output("stack.sh down --dir .stack-pg")
    # and nothing of it is left for `git status` to see
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=root,
                            capture_output=True, text=True, check=True).stdout
    assert status == "", f"written but not in .gitignore:\n{status}"
