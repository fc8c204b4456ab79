"""The searcher of a search: flags checked before Ray starts, a real OptunaSearch asked for trials
in this process (its define-by-run space samples step_size only for fixed-step solvers), and a
warm start that hands an earlier sweep's finished trials, read from a real MLflow store, to the
searcher with their results."""

from __future__ import annotations

import argparse
import math

import pytest
from optuna.trial import TrialState

from odenet.objectives import Objective
from odenet.sweep_record import PARENT, ROLE_TAG
from sweeps import searchers, tuning
from sweeps.space import SweepError, choice, dimension, loguniform

SPACE = {name: dimension(name, spec) for name, spec in {
    "solver": choice("dopri5", "rk4"),
    "step_size": choice(0.25, 0.5, 1.0),
    "lr": loguniform(1e-4, 1e-2),
}.items()}
TWO = searchers.Plan(searchers.OPTUNA, (Objective("val_acc", "max"), Objective("nfe", "min")), searchers.FIFO)


def flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    searchers.add_arguments(parser)
    parser.add_argument("--scheduler", choices=(searchers.ASHA, searchers.FIFO))
    return parser.parse_args(argv)


def plan_from(*argv: str) -> searchers.Plan:
    args = flags(*argv)
    return searchers.plan(args.searcher, args.objectives, args.scheduler, args.warm_start_from)


@pytest.mark.parametrize("argv, fix", [
    (("--searcher", "optuna", "--objectives", "val_acc:max,flops:min"),
     "unknown objective 'flops' in 'val_acc:max,flops:min': expected one of val_acc, nfe, epoch_time, params"),
    (("--searcher", "optuna", "--objectives", "val_acc:max,nfe:down"),
     "objective 'nfe:down': the direction must be max or min, e.g. nfe:min"),
    (("--searcher", "optuna", "--objectives", "nfe"), "objective 'nfe': the direction must be max or min"),
    (("--searcher", "optuna", "--objectives", "nfe:min,nfe:max"), "objective 'nfe' is given twice"),
    (("--objectives", "val_acc:max,nfe:min"), "HyperOpt searches val_acc:max only; add --searcher optuna"),
    (("--warm-start-from", "earlier"), "HyperOptSearch cannot take known results; add --searcher optuna"),
    (("--searcher", "optuna", "--objectives", "val_acc:max,nfe:min", "--scheduler", "asha"),
     "--scheduler asha with 2 objectives (val_acc:max,nfe:min): ASHA stops trials on one objective; "
     "use --scheduler fifo"),
])
def test_bad_flags_exit_2_naming_the_fix(argv, fix, capsys):
    def program(_argv):
        plan_from(*argv)

    assert tuning.main(program, []) == 2
    assert fix in capsys.readouterr().err


def test_the_scheduler_follows_the_number_of_objectives():
    default = plan_from()
    assert (default.searcher, default.metric, default.mode, default.scheduler) == ("hyperopt", "val_acc", "max", "asha")
    two = plan_from("--searcher", "optuna", "--objectives", "val_acc:max,nfe:min")
    assert (two.metric, two.mode, two.scheduler) == (["val_acc", "nfe"], ["max", "min"], "fifo")
    assert two.describe() == ("searcher: Optuna TPE on val_acc:max, nfe:min; scheduler: FIFO: every trial trains "
                              "to early stopping (ASHA ranks trials on one objective only)")
    one = plan_from("--searcher", "optuna", "--objectives", "epoch_time:min", "--scheduler", "fifo")
    assert (one.metric, one.mode, one.scheduler) == ("epoch_time", "min", "fifo")
    assert searchers.scheduler(one, 5, 1, 2) is None
    asha = searchers.scheduler(plan_from("--searcher", "optuna"), 5, 1, 2)
    assert type(asha).__name__ == "AsyncHyperBandScheduler"


def test_optuna_cannot_sample_a_grid():
    problems = searchers.optuna_space_problems({"final_time": dimension("final_time", ("grid", (1, 2)))})
    assert problems == ["final_time: a grid lists every value for a comparison; with --searcher optuna give a "
                        "choice instead (e.g. --space final_time=1,2)"]


def test_optuna_samples_step_size_only_for_fixed_step_solvers():
    study_point = {"solver": "dopri5", "step_size": 0.25, "lr": 1e-3}
    searcher = searchers.searcher(TWO, SPACE, "dopri5", seed=0, points=[study_point])
    configs = {f"t{i}": searcher.suggest(f"t{i}") for i in range(16)}
    # The study's point first, without the step size its adaptive solver ignores.
    assert configs["t0"] == {"solver": "dopri5", "lr": 1e-3}
    fixed = [c for c in configs.values() if c["solver"] == "rk4"]
    adaptive = [c for c in configs.values() if c["solver"] == "dopri5"]
    assert fixed and adaptive
    assert all(c["step_size"] in (0.25, 0.5, 1.0) for c in fixed)
    assert all("step_size" not in c for c in adaptive)
    assert all(1e-4 <= c["lr"] <= 1e-2 for c in configs.values())

    # Results go back as Tune hands them over; a diverged trial reports each objective's worst value.
    searcher.on_trial_complete("t0", {"val_acc": 0.8, "nfe": 26.0})
    searcher.on_trial_complete("t1", {o.name: o.worst for o in TWO.objectives})
    told = {t.number: (t.state, t.values) for t in searcher._ot_study.trials}
    assert told[0] == (TrialState.COMPLETE, [0.8, 26.0])
    assert told[1] == (TrialState.COMPLETE, [0.0, math.inf])
    assert [t.number for t in searcher._ot_study.best_trials] == [0]


def test_the_searcher_survives_tunes_checkpoint(tmp_path):
    searcher = searchers.searcher(TWO, SPACE, "dopri5", seed=0)
    first = searcher.suggest("a")
    searcher.on_trial_complete("a", {"val_acc": 0.8, "nfe": 26.0})
    searcher.save(str(tmp_path / "searcher.pkl"))  # what Tune does with a sweep's searcher state
    restored = searchers.searcher(TWO, SPACE, "dopri5", seed=0)
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert [(t.params, t.values) for t in restored._ot_study.trials] == [(first, [0.8, 26.0])]
    assert set(restored.suggest("b")) >= {"solver", "lr"}


def test_a_base_solver_with_fixed_steps_samples_step_size_when_the_solver_is_not_searched():
    space = {k: v for k, v in SPACE.items() if k != "solver"}
    fixed = searchers.searcher(TWO, space, "euler", seed=1)
    adaptive = searchers.searcher(TWO, space, "bosh3", seed=1)
    assert "step_size" in fixed.suggest("a")
    assert set(adaptive.suggest("a")) == {"lr"}


# -- the warm start from an earlier sweep, in a real MLflow store -------------------------------------


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    from odenet import tracking

    return tracking.client()


def plant(client, experiment: str, params: dict, metrics: dict, status: str = "FINISHED", tags: dict | None = None):
    from odenet import tracking

    run = client.create_run(tracking.experiment_id(experiment), tags=tags or {})
    for key, value in params.items():
        client.log_param(run.info.run_id, key, str(value))
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


COSTS = {"mean_epoch_time_s": 9.0, "params_total": 84_000}


def test_a_warm_start_hands_the_searcher_the_finished_trials_with_their_results(store):
    fixed = plant(store, "earlier", {"solver": "rk4", "step_size": 0.5, "lr": 0.001},
                  {"val_acc": 0.80, "mean_fnfe": 4.0, "mean_bnfe": 4.0, **COSTS})
    # an adaptive solver's step size (the config's default 0.1) is not a searched value: it is dropped
    adaptive = plant(store, "earlier", {"solver": "dopri5", "step_size": 0.1, "lr": 0.002},
                     {"val_acc": 0.85, "mean_fnfe": 30.0, "mean_bnfe": 40.0, **COSTS})
    plant(store, "earlier", {"solver": "rk4", "step_size": 0.5, "lr": 0.003}, {"val_acc": 0.0}, status="FAILED",
          tags={"failure_cause": "underflow"})
    plant(store, "earlier", {}, {}, tags={ROLE_TAG: PARENT})
    plant(store, "earlier", {"solver": "rk4", "step_size": 0.5, "lr": 0.5},  # lr outside the space
          {"val_acc": 0.7, "mean_fnfe": 4.0, "mean_bnfe": 4.0, **COSTS})
    plant(store, "earlier", {"solver": "rk4", "step_size": 1.0, "lr": 0.001},  # logged no bnfe
          {"val_acc": 0.7, "mean_fnfe": 4.0, **COSTS})

    warm = searchers.warm_trials("earlier", SPACE, "dopri5", TWO.objectives)
    again = {"solver": "rk4", "step_size": 0.5, "lr": 0.001}  # an earlier trial's point: not trained again
    new = {"solver": "rk4", "step_size": 1.0, "lr": 0.001}
    searcher = searchers.searcher(TWO, SPACE, "dopri5", seed=0, points=[again, new], warm=warm)

    trials = searcher._ot_study.trials
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "COMPLETE", "WAITING"]  # WAITING: `new`, queued
    given = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.values[0])
    assert [(t.state, t.params, t.values) for t in given] == [
        (TrialState.COMPLETE, {"solver": "rk4", "step_size": 0.5, "lr": 0.001}, [0.80, 8.0]),
        (TrialState.COMPLETE, {"solver": "dopri5", "lr": 0.002}, [0.85, 70.0]),
    ]
    assert [t.user_attrs["mlflow_run_id"] for t in given] == [fixed, adaptive]
    assert searcher.suggest("first") == new  # the earlier point is not evaluated again
    assert [t.state.name for t in searcher._ot_study.trials if t.params == new] == ["RUNNING"]


def test_a_warm_start_needs_finished_trials(store, capsys):
    plant(store, "diverged-only", {"solver": "rk4", "step_size": 0.5, "lr": 0.001}, {"val_acc": 0.0},
          status="FAILED")
    plant(store, "diverged-only", {}, {}, tags={ROLE_TAG: PARENT})

    def program(_argv):
        searchers.warm_trials("diverged-only", SPACE, "dopri5", TWO.objectives)

    assert tuning.main(program, []) == 2
    assert "--warm-start-from diverged-only: the experiment has no finished trial to start from" in \
           capsys.readouterr().err
    with pytest.raises(SweepError, match="no such MLflow experiment"):
        searchers.warm_trials("never-ran", SPACE, "dopri5", TWO.objectives)


def test_a_warm_start_from_another_space_says_so(store):
    plant(store, "other", {"solver": "rk4", "step_size": 0.5, "lr": 0.5},
          {"val_acc": 0.7, "mean_fnfe": 4.0, "mean_bnfe": 4.0, **COSTS})
    with pytest.raises(SweepError, match=r"none of its 1 finished trials can start this search \(1 lie outside"):
        searchers.warm_trials("other", SPACE, "dopri5", TWO.objectives)


def test_a_warm_started_searcher_does_not_replay_the_earlier_searchers_draws():
    """TPE's first proposals are random draws from its seed, whatever the study holds: with the same
    --searcher-seed, a warm start would propose the earlier sweep's points again and train them twice."""
    import optuna

    earlier = searchers.searcher(TWO, SPACE, "dopri5", seed=0)
    points = [earlier.suggest(f"e{i}") for i in range(3)]
    warm = [optuna.trial.create_trial(params=point, distributions={n: d for n, d in searchers.distributions(SPACE)
                                                                   .items() if n in point}, values=[0.8, 10.0])
            for point in points]
    later = searchers.searcher(TWO, SPACE, "dopri5", seed=0, warm=warm)
    proposed = [later.suggest(f"l{i}") for i in range(3)]
    assert not [point for point in proposed if point in points]
