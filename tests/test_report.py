"""`odenet report` on runs logged through the project's own tracker into a real MLflow server:
a planted effect of known size is found with the right direction, no effect is reported as
none, diverged runs are counted and not averaged, and a search's trials compare at one budget."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from odenet import report
from odenet.failures import Diverged
from odenet.run import execute
from odenet.tracker import MlflowTracker
from odenet.train import EpochMetrics
from odenet.sweep_record import start_parent_run

pytestmark = pytest.mark.stack

SEEDS = range(6)
PLANTED = 0.03  # final_time=2 is 3 points better than the base, seed by seed


@pytest.fixture(scope="module")
def outcome(real_data_dir):
    """One real (tiny) training run whose outcome every logged run reuses, with planted numbers."""
    from odenet.config import RunConfig

    config = RunConfig.from_dict(dict(dataset="fashion-mnist", data_dir=str(real_data_dir), model="odenet-simple",
                                      width=4, subset=320, test_subset=200, batch_size=64, max_epochs=2,
                                      device="cpu", reevaluate=False))
    return execute(config)


def log_run(experiment, parent, outcome, changes, tags, accuracy=None, history=None, diverge=None):
    """One run through MlflowTracker, as a trial logs it: params, epochs, then finish or fail."""
    config = outcome.config.replace(**changes)
    tracker = MlflowTracker(experiment, parent_run_id=parent, extra_tags=tags)
    tracker.start(config, None)
    for metrics in history or outcome.fitted.history:
        tracker.log_epoch(metrics)
    if diverge:
        tracker.fail(Diverged(diverge, 1, 3, "planted"))
    elif accuracy is None:
        tracker.abort()  # stopped from outside, as ASHA does
    else:
        tracker.finish(dataclasses.replace(outcome, config=config,
                                           report=dataclasses.replace(outcome.report, accuracy=accuracy)))
    return tracker.run_id


def test_one_at_a_time_report_finds_the_planted_effect_and_no_effect_where_none(outcome, tracking_env, tmp_path):
    experiment = "planted"
    parent = start_parent_run(experiment, "planted", {"design": "one-at-a-time"}, False, "one-at-a-time")
    rng = np.random.default_rng(7)
    seed_effect = rng.normal(0, 0.02, len(SEEDS))  # what a seed's weights and batch order do to every cell
    def noise():
        return rng.normal(0, 0.002)
    for seed in SEEDS:
        cell = {"design": "one-at-a-time", "seed": str(seed)}
        log_run(experiment, parent, outcome, {"seed": seed}, {**cell, "ablated_dimension": "base"},
                0.80 + seed_effect[seed] + noise())
        log_run(experiment, parent, outcome, {"seed": seed, "final_time": 2},
                {**cell, "ablated_dimension": "final_time", "ablated_value": "2.0"},
                0.80 + PLANTED + seed_effect[seed] + noise())
        # the same setting as the base (batchnorm's runs are given the base's numbers): no effect
        log_run(experiment, parent, outcome, {"seed": seed, "norm": "batchnorm"},
                {**cell, "ablated_dimension": "norm", "ablated_value": "batchnorm"},
                0.80 + seed_effect[seed] + noise())
    log_run(experiment, parent, outcome, {"seed": 6, "norm": "batchnorm"},
            {"design": "one-at-a-time", "seed": "6", "ablated_dimension": "norm", "ablated_value": "batchnorm"},
            diverge="underflow")

    text = report.main(experiment, str(tmp_path / "out"))

    final_time = pd.read_csv(tmp_path / "out" / "one_at_a_time_final_time.csv")
    row = final_time[final_time["value"] == "2.0"].iloc[0]
    assert row["diff_low"] <= PLANTED <= row["diff_high"]
    assert row["diff_low"] > 0 and row["verdict"].startswith("higher by")
    assert row["diff_n"] == len(SEEDS)
    norm = pd.read_csv(tmp_path / "out" / "one_at_a_time_norm.csv")
    row = norm[norm["value"] == "batchnorm"].iloc[0]
    assert row["diff_low"] <= 0 <= row["diff_high"]
    assert row["verdict"].startswith("no difference detectable (Holm p = ")
    assert row["verdict"].endswith(f"in {len(SEEDS)} of {len(SEEDS)} seeds that finished; 0 diverged (0 in the base)")
    # the diverged run is counted with its cause, and its missing accuracy is not a zero in the mean
    assert row["diverged"] == "1 (underflow x1)" and row["seeds finished"] == f"{len(SEEDS)} of {len(SEEDS) + 1}"
    base_mean = norm.iloc[0]["test_acc_mean"]
    assert abs(row["test_acc_mean"] - base_mean) < 0.005
    assert "### final_time" in text and "higher by" in text and "no difference detectable" in text
    assert "the family being all 2 estimable accuracy comparisons in this report" in text
    logged = {a.path for a in MlflowClient().list_artifacts(parent, "report")}
    assert {"report/report.md", "report/one_at_a_time_final_time.csv", "report/effect_one_at_a_time_final_time.png",
            "report/per_epoch_one_at_a_time_final_time.png"} <= logged


def epochs(values):
    """A history whose validation accuracy is `values` per epoch (loss falling alongside)."""
    return [EpochMetrics(epoch=i + 1, train_loss=1.0, train_acc=v, val_loss=1.0 - v, val_acc=v, fnfe=20.0,
                         bnfe=26.0, val_fnfe=20.0, epoch_time_s=1.0, val_time_s=0.1) for i, v in enumerate(values)]


def test_search_report_compares_trials_at_one_budget(outcome, tracking_env, tmp_path):
    experiment = "budgets"
    space = '{"final_time": "1, 2, 5", "norm": "groupnorm, none"}'
    parent = start_parent_run(experiment, "budgets", {"search_space": space}, False, "search")
    rng = np.random.default_rng(3)
    expected = {}
    for i in range(10):
        final_time, norm = (1, 2, 5)[i % 3], ("groupnorm", "none")[i % 2]
        at_one = 0.5 + 0.1 * final_time / 5 + rng.normal(0, 0.005)
        # finished trials trained on to a much higher accuracy; stopped ones ended at epoch 1
        history = epochs([at_one, at_one + 0.2, at_one + 0.3]) if i % 4 == 0 else epochs([at_one])
        run_id = log_run(experiment, parent, outcome, {"final_time": final_time, "norm": norm},
                         {"design": "search"}, accuracy=0.9 if i % 4 == 0 else None, history=history)
        expected[run_id] = at_one

    report.main(experiment, str(tmp_path / "out"))

    top = pd.read_csv(tmp_path / "out" / "search_top_trials.csv")
    assert set(top.columns) >= {"final_time", "norm", "val_acc@1"} and "val_acc@3" not in top
    assert len(top) == 10
    for _, row in top.iterrows():
        assert row["val_acc@1"] == pytest.approx(expected[row["run_id"]])
    assert list(top["val_acc@1"]) == sorted(top["val_acc@1"], reverse=True)
    ranked = pd.read_csv(tmp_path / "out" / "search_importance.csv")
    assert list(ranked["dimension"])[0] == "final_time"
    text = (tmp_path / "out" / "report.md").read_text()
    assert "Budget: epoch 1" in text and "no per-setting means" in text


def test_two_sweeps_in_one_experiment_are_reported_apart(outcome, tracking_env, tmp_path):
    """Seeds 0-2 twice, under two sweeps: never "6 of 3", never paired across sweeps."""
    experiment = "twice"
    for sweep, shift in (("first", 0.0), ("second", 0.05)):
        parent = start_parent_run(experiment, sweep, {"design": "one-at-a-time"}, False, "one-at-a-time")
        for seed in range(3):
            cell = {"design": "one-at-a-time", "seed": str(seed)}
            log_run(experiment, parent, outcome, {"seed": seed}, {**cell, "ablated_dimension": "base"},
                    0.80 + shift + 0.01 * seed)
            log_run(experiment, parent, outcome, {"seed": seed, "final_time": 2},
                    {**cell, "ablated_dimension": "final_time", "ablated_value": "2.0"}, 0.81 + shift + 0.011 * seed)

    text = report.main(experiment, str(tmp_path / "out"))

    assert "## One-at-a-time ablation — sweep first" in text and "## One-at-a-time ablation — sweep second" in text
    for sweep, shift in (("first", 0.0), ("second", 0.05)):
        table = pd.read_csv(tmp_path / "out" / f"{sweep}_one_at_a_time_final_time.csv")
        assert list(table["seeds finished"]) == ["3 of 3", "3 of 3"]
        assert table.iloc[0]["test_acc_mean"] == pytest.approx(0.81 + shift)
        assert table.iloc[1]["diff_n"] == 3
