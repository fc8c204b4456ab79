"""`--searcher optuna` end to end, on a real local Ray logging to the real tracking stack: a
two-objective search whose every report holds every objective, its parent run recording the
objectives, and a second search warm-started from the first, whose searcher holds the first
one's results and trains none of its trials again. Bad flags: in-process, before Ray starts."""

from __future__ import annotations

import json
import math
import pickle
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from optuna.trial import TrialState

from odenet.objectives import MEASURES
from sweeps.architecture_ablation import architecture_ablation
from sweeps.tuning import main
from tests.test_searchers import plant
from tests.test_sweep import CHEAP, _nothing_started, children, sweep, sweep_env

# Every dimension pinned but the learning rate and the training solver (step_size is then
# sampled for rk4 only); two epochs, so that "every epoch" is more than one.
SEARCHED = [*CHEAP[:-4], "--space", "lr=loguniform:1e-3:1e-2", "--space", "optimizer=adam",
            "--speed-levers", "--space", "solver=dopri5,rk4", "--space", "step_size=0.5,1",
            "--space", "kinetic_energy=0", "--space", "jacobian_norm=0"]
SIZES = ["--smoke", "--max-epochs", "2", "--patience", "2", "--subset", "256", "--test-subset", "100", "--width",
         "4", "--no-reevaluate", "--max-concurrent", "2"]
TWO = ["--searcher", "optuna", "--objectives", "val_acc:max,nfe:min"]
FIRST, SECOND = "optuna-two", "optuna-warm"


def reports(folder: Path, name: str) -> dict[str, list[dict]]:
    """Every report of every trial of sweep `name`, as Tune wrote them (result.json: a line per report)."""
    return {trial.name: [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
            for trial in (folder / "ray_results" / name).glob("trial_*")}


def searcher_study(folder: Path, name: str):
    """The Optuna study of sweep `name`'s searcher as Tune saved it at the sweep's end."""
    (state,) = (folder / "ray_results" / name).glob("searcher-state-*.pkl")
    return pickle.loads(state.read_bytes())["_ot_study"]


@pytest.fixture(scope="module")
def searches(tracking_stack, real_data_dir, tmp_path_factory):
    """Two searches in one folder: FIRST (3 trials), then SECOND (2 trials) warm-started from it."""
    folder = tmp_path_factory.mktemp("optuna")
    ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
    env = sweep_env(tracking_stack, HOME=str(folder), RAY_TMPDIR=ray_tmp)
    flags = [*SIZES, "--data-dir", str(real_data_dir), *SEARCHED, *TWO]
    try:
        first = sweep("--name", FIRST, "--num-samples", "3", *flags, cwd=folder, env=env)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        second = sweep("--name", SECOND, "--num-samples", "2", "--warm-start-from", FIRST, *flags, cwd=folder,
                       env=env)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return folder, first, second


@pytest.mark.stack
@pytest.mark.ray
def test_a_two_objective_search_reports_every_objective_with_every_epoch(searches, tracking_env):
    folder, first, _ = searches
    assert first.stdout.splitlines()[0] == (
        "searcher: Optuna TPE on val_acc:max, nfe:min; scheduler: FIFO: every trial trains to early stopping "
        "(ASHA ranks trials on one objective only)")
    (parent,), runs = children(FIRST)
    assert {k: parent.data.params.get(k) for k in ("searcher", "objectives", "scheduler")} == {
        "searcher": "optuna", "objectives": "val_acc:max,nfe:min", "scheduler": "fifo"}
    assert "warm_start_from" not in parent.data.params
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}

    by_trial = reports(folder, FIRST)
    assert len(by_trial) == 3
    for trial, lines in by_trial.items():
        assert [line["trial_status"] for line in lines] == ["RUNNING", "RUNNING", "FINISHED"], trial
        for line in lines:
            assert all(math.isfinite(line[name]) for name in MEASURES), (trial, line)
        # each epoch's nfe is FNFE + BNFE averaged over the epochs so far; the last report's is the run's
        epochs = lines[:2]
        assert epochs[1]["nfe"] == pytest.approx((epochs[0]["fnfe"] + epochs[0]["bnfe"] + epochs[1]["fnfe"]
                                                   + epochs[1]["bnfe"]) / 2)
        assert lines[-1]["nfe"] == pytest.approx(epochs[1]["nfe"])
        assert len({line["params"] for line in lines}) == 1 and lines[0]["params"] > 0

    # the searcher was told each trial's two objectives, as the trial's last report has them
    study = searcher_study(folder, FIRST)
    told = sorted(t.values for t in study.trials if t.state == TrialState.COMPLETE)
    assert told == sorted([lines[-1]["val_acc"], lines[-1]["nfe"]] for lines in by_trial.values())
    # step_size only for the fixed-step solver
    assert all(("step_size" in t.params) == (t.params["solver"] == "rk4") for t in study.trials)


@pytest.mark.stack
@pytest.mark.ray
def test_the_report_of_a_two_objective_search_shows_its_front_on_those_objectives(searches, tracking_env, tmp_path):
    """The report reads the objectives the parent run recorded: one front, on val_acc and nfe, not
    the default fronts a HyperOpt search gets; its trials are the non-dominated ones."""
    from odenet import report

    report.main(FIRST, str(tmp_path / "out"))
    fronts = sorted(p.name for p in (tmp_path / "out").rglob("pareto_*.csv"))
    assert fronts == ["pareto_val_acc_nfe.csv"], fronts
    _, runs = children(FIRST)
    measured = {r.info.run_id: (r.data.metrics["val_acc"], r.data.metrics["mean_fnfe"] + r.data.metrics["mean_bnfe"])
                for r in runs}
    dominated = {a for a, (acc, nfe) in measured.items()
                 if any(acc2 >= acc and nfe2 <= nfe and (acc2, nfe2) != (acc, nfe) for acc2, nfe2 in measured.values())}
    front = pd.read_csv(next((tmp_path / "out").rglob("pareto_val_acc_nfe.csv")))
    assert set(front["run_id"]) == set(measured) - dominated


@pytest.mark.stack
@pytest.mark.ray
def test_a_warm_start_tells_the_searcher_the_earlier_results_and_trains_none_again(searches, tracking_env):
    folder, _, second = searches
    assert f"first told the finished trials of '{FIRST}'" in second.stdout.splitlines()[0]
    (parent,), runs = children(SECOND)
    assert parent.data.params["warm_start_from"] == FIRST
    _, earlier = children(FIRST)
    # the two new trials only: no earlier trial trained again
    assert len(runs) == 2
    assert not {r.data.params["lr"] for r in runs} & {r.data.params["lr"] for r in earlier}

    study = searcher_study(folder, SECOND)
    given = {t.user_attrs["mlflow_run_id"]: t for t in study.trials if "mlflow_run_id" in t.user_attrs}
    assert set(given) == {r.info.run_id for r in earlier}
    for run in earlier:
        trial, metrics = given[run.info.run_id], run.data.metrics
        assert trial.state == TrialState.COMPLETE
        assert trial.values == pytest.approx([metrics["val_acc"], metrics["mean_fnfe"] + metrics["mean_bnfe"]])
        assert float(trial.params["lr"]) == pytest.approx(float(run.data.params["lr"]))
    trained = [t for t in study.trials if "mlflow_run_id" not in t.user_attrs]
    assert len(trained) == 2 and all(t.state == TrialState.COMPLETE for t in trained)


# -- bad flags, in-process: exit 2 with the fix named, and no Ray ------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--searcher", "optuna", "--objectives", "val_acc:max,flops:min"],
     "unknown objective 'flops' in 'val_acc:max,flops:min': expected one of val_acc, nfe, epoch_time, params"),
    (["--searcher", "optuna", "--objectives", "val_acc:up"], "the direction must be max or min, e.g. val_acc:max"),
    (["--objectives", "val_acc:max,nfe:min"], "--objectives val_acc:max,nfe:min: HyperOpt searches val_acc:max "
                                              "only; add --searcher optuna"),
    ([*TWO, "--scheduler", "asha"], "--scheduler asha with 2 objectives (val_acc:max,nfe:min): ASHA stops trials "
                                    "on one objective; use --scheduler fifo"),
    (["--design", "one-at-a-time", *TWO], "--searcher optuna, --objectives: only for --design search"),
])
def test_bad_search_flags_exit_2_before_ray_starts(flags, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/m.db")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(architecture_ablation, ["--smoke", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    _nothing_started(tmp_path)


def test_a_warm_start_from_a_sweep_without_finished_trials_exits_2_before_ray_starts(tmp_path, monkeypatch,
                                                                                    capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/m.db")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    from odenet import tracking

    plant(tracking.client(), "diverged", {"lr": 0.001}, {"val_acc": 0.0}, status="FAILED")
    assert main(architecture_ablation, ["--smoke", *TWO, "--warm-start-from", "diverged"]) == 2
    err = capsys.readouterr().err
    assert "--warm-start-from diverged: the experiment has no finished trial to start from" in err, err
    _nothing_started(tmp_path)
