"""The Pareto front and the one-at-a-time cells on planted trials whose answers are worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from odenet import objectives, pareto, pareto_plot, tradeoffs

ACC_NFE = {"val_acc": "max", "nfe": "min"}


def planted() -> pd.DataFrame:
    """Eight trials on (val_acc up, nfe down). By hand:
    a (0.90, 20) and b (0.90, 20) tie on both: neither dominates the other, both on the front;
    c (0.85, 20) has the same cost as a and less accuracy: dominated by a;
    d (0.80, 10) is the cheapest finished trial: on the front;
    e (0.80, 12) is dominated by d (same accuracy, more NFE);
    f (0.95, 40) is the most accurate: on the front;
    g (0.99, 5) diverged: better than all on paper, never on the front, and dominates no one;
    h (0.97, NaN) finished without a cost: not comparable."""
    return pd.DataFrame({
        "trial": list("abcdefgh"),
        "val_acc": [0.90, 0.90, 0.85, 0.80, 0.80, 0.95, 0.99, 0.97],
        "nfe": [20, 20, 20, 10, 12, 40, 5, math.nan],
        "status": ["FINISHED"] * 6 + ["FAILED", "FINISHED"],
    })


def test_the_front_keeps_ties_drops_equal_cost_losers_and_never_holds_a_diverged_trial():
    trials = planted()
    on = pareto.front(trials, ACC_NFE)
    assert sorted(trials.loc[on, "trial"]) == ["a", "b", "d", "f"]


def test_a_diverged_trial_on_the_front_would_have_hidden_the_others():
    # The same trials with g counted as finished: g dominates every other one. The status rule is
    # what keeps the front above from being just g.
    trials = planted().assign(status="FINISHED")
    assert list(trials.loc[pareto.front(trials, ACC_NFE), "trial"]) == ["g"]


def test_a_single_trial_is_its_own_front():
    one = pd.DataFrame({"val_acc": [0.5], "nfe": [30.0], "status": ["FINISHED"]})
    assert pareto.front(one, ACC_NFE).tolist() == [True]


def test_no_finished_trial_gives_an_empty_front():
    none = pd.DataFrame({"val_acc": [0.5], "nfe": [30.0], "status": ["FAILED"]})
    assert pareto.front(none, ACC_NFE).tolist() == [False]
    assert pareto.front_table(none, ACC_NFE).empty


def test_directions_count_a_cost_to_maximise_the_other_way():
    # With nfe to be maximised (odd, but the rule must follow the direction) f (0.95, 40) is better on
    # both than every other finished trial: it alone is the front.
    trials = planted()
    assert list(trials.loc[pareto.front(trials, {"val_acc": "max", "nfe": "max"}), "trial"]) == ["f"]


def test_three_objectives_keep_a_trial_best_on_the_third():
    trials = planted().assign(params=[100, 100, 100, 100, 50, 100, 10, 10])
    on = pareto.front(trials, {**ACC_NFE, "params": "min"})
    # e (0.80, 12, 50) is no longer dominated by d (0.80, 10, 100): it has fewer parameters.
    assert sorted(trials.loc[on, "trial"]) == ["a", "b", "d", "e", "f"]


def test_the_front_table_lists_the_front_best_accuracy_first():
    table = pareto.front_table(planted(), ACC_NFE, columns=("trial",))
    assert table["trial"].tolist() == ["f", "a", "b", "d"]
    assert list(table.columns) == ["trial", "val_acc", "nfe"]


def test_objectives_are_measured_from_a_runs_final_metrics():
    final = {"val_acc": 0.9, "mean_fnfe": 26.0, "mean_bnfe": 40.0, "mean_epoch_time_s": 12.5, "params_total": 208266}
    assert objectives.values(final) == {"val_acc": 0.9, "nfe": 66.0, "epoch_time": 12.5, "params": 208266.0}
    assert math.isnan(objectives.values({"val_acc": 0.9}, ["nfe"])["nfe"])
    runs = objectives.measured(pd.DataFrame([final, {**final, "mean_bnfe": math.nan}]), ["nfe", "params"])
    assert runs["nfe"].tolist()[0] == 66.0 and math.isnan(runs["nfe"].tolist()[1])
    assert runs["params"].tolist() == [208266.0, 208266.0]


def test_a_trial_reports_its_objectives_so_far_with_every_epoch():
    history = [{"epoch": 1, "val_loss": 0.5, "val_acc": 0.80, "fnfe": 20.0, "bnfe": 30.0, "epoch_time_s": 10.0},
               {"epoch": 2, "val_loss": 0.6, "val_acc": 0.78, "fnfe": 26.0, "bnfe": 40.0, "epoch_time_s": 14.0}]
    assert objectives.so_far(history[:1], 1000) == {"val_acc": 0.80, "nfe": 50.0, "epoch_time": 10.0, "params": 1000}
    # the last epoch's accuracy (as Tune's searchers see it), the mean costs over both epochs
    assert objectives.so_far(history, 1000) == {"val_acc": 0.78, "nfe": 58.0, "epoch_time": 12.0, "params": 1000}


def test_the_study_setting_is_found_among_logged_params():
    logged = pd.DataFrame({"stride": ["2", "1", "2"], "norm": ["groupnorm", "groupnorm", "none"],
                           "lr": ["0.001", "0.001", "0.001"]})
    study = [{"stride": 2, "norm": "groupnorm", "lr": 1e-3}]
    assert pareto.matches(logged, study).tolist() == [True, False, False]
    assert pareto.matches(logged, []).tolist() == [False, False, False]


def test_each_cell_has_its_mean_accuracy_and_cost_with_t_intervals_over_seeds():
    trials = pd.DataFrame({
        "ablated_dimension": ["base"] * 3 + ["stride"] * 3 + ["norm"],
        "ablated_value": ["base"] * 3 + ["1"] * 3 + ["none"],
        "test_acc": [0.90, 0.91, 0.92, 0.88, 0.90, 0.86, 0.5],
        "mean_epoch_time_s": [10.0, 12.0, 11.0, 20.0, 22.0, 24.0, 5.0],
        "status": ["FINISHED"] * 5 + ["FAILED", "FINISHED"],  # one stride seed diverged
    })
    table = pareto.cells(trials, ["ablated_dimension", "ablated_value"], "test_acc", "mean_epoch_time_s")
    assert table["ablated_dimension"].tolist() == ["base", "stride", "norm"]
    assert table["n"].tolist() == [3, 2, 1]
    # Independently: mean ± t(0.975, n-1) * s / sqrt(n).
    for row, acc, cost in ((0, [0.90, 0.91, 0.92], [10.0, 12.0, 11.0]), (1, [0.88, 0.90], [20.0, 22.0])):
        for column, x in (("test_acc", acc), ("mean_epoch_time_s", cost)):
            half = stats.t.ppf(0.975, len(x) - 1) * np.std(x, ddof=1) / math.sqrt(len(x))
            assert table.loc[row, column] == pytest.approx(np.mean(x))
            assert table.loc[row, f"{column}_low"] == pytest.approx(np.mean(x) - half)
            assert table.loc[row, f"{column}_high"] == pytest.approx(np.mean(x) + half)
    assert math.isnan(table.loc[2, "test_acc_low"])  # one seed: no interval


def test_the_figures_are_written(tmp_path):
    trials = planted()
    on = pareto.front(trials, ACC_NFE)
    study = trials["trial"] == "a"
    path = pareto_plot.front_figure(trials, on, "nfe", "val_acc", tmp_path / "front.png", study=study)
    assert path.stat().st_size > 0
    table = pd.DataFrame({"cell": ["base", "stride=1"], "n": [3, 1], "acc": [0.9, 0.88], "acc_low": [0.88, math.nan],
                          "acc_high": [0.92, math.nan], "t": [10.0, 20.0], "t_low": [9.0, math.nan],
                          "t_high": [11.0, math.nan]})
    assert pareto_plot.cells_figure(table, "cell", "t", "acc", tmp_path / "cells.png").stat().st_size > 0


# -- the report's sections, from runs shaped as odenet.report.load_runs gives them --------------------


def logged_search() -> pd.DataFrame:
    """Five trials. NFE = fnfe + bnfe: r1 40, r2 60, r3 60, r4 20 (diverged), r5 80.
    val_acc against nfe, by hand: r1 (0.85, 40) and r5 (0.92, 80) on the front; r2 (0.80, 60) and
    r3 (0.84, 60) dominated by r1; r4 diverged.
    val_acc against epoch_time (r1 30, r2 10, r3 20, r5 40): each faster trial is less accurate, so r5,
    r1, r3 and r2 are all non-dominated."""
    return pd.DataFrame({
        "run_id": ["r1", "r2", "r3", "r4", "r5"],
        "status": ["FINISHED", "FINISHED", "FINISHED", "FAILED", "FINISHED"],
        "stride": ["2", "1", "2", "1", "1"],
        "norm": ["groupnorm"] * 5,
        "val_acc": [0.85, 0.80, 0.84, 0.0, 0.92],
        "mean_fnfe": [16.0, 24.0, 24.0, 8.0, 32.0],
        "mean_bnfe": [24.0, 36.0, 36.0, 12.0, 48.0],
        "mean_epoch_time_s": [30.0, 10.0, 20.0, 5.0, 40.0],
        "params_total": [84_000.0] * 5,
    })


def test_a_hyperopt_search_is_shown_on_accuracy_against_nfe_and_against_epoch_time(tmp_path):
    section = tradeoffs.search_front(logged_search(), tmp_path, settings=["stride"],
                                     study_points=[{"stride": 2, "norm": "groupnorm"}])
    nfe, time = section.tables["pareto_val_acc_nfe"], section.tables["pareto_val_acc_epoch_time"]
    assert nfe["run_id"].tolist() == ["r5", "r1"]
    assert nfe["nfe"].tolist() == [80.0, 40.0]
    assert nfe["study_setting"].tolist() == [False, True]
    assert time["run_id"].tolist() == ["r5", "r1", "r3", "r2"]
    assert "4 of 5 trials finished with every objective measured" in section.markdown
    assert [p.name for p in section.figures] == ["pareto_val_acc_against_nfe.png",
                                                 "pareto_val_acc_against_epoch_time.png"]
    assert all(p.stat().st_size > 0 for p in section.figures)


def test_a_search_on_its_own_objectives_has_one_front(tmp_path):
    section = tradeoffs.search_front(logged_search(), tmp_path, settings=["stride"],
                                     sweep_objectives={"val_acc": "max", "nfe": "min", "epoch_time": "min"})
    assert list(section.tables) == ["pareto_val_acc_nfe_epoch_time"]
    # r2 (0.80, 60, 10) is now the fastest: non-dominated; r3 (0.84, 60, 20) is beaten by r1 on nfe only,
    # by r2 on time only: no one is as good on all three, so it stays too.
    assert section.tables["pareto_val_acc_nfe_epoch_time"]["run_id"].tolist() == ["r5", "r1", "r3", "r2"]
    assert len(section.figures) == 2


def test_one_at_a_time_cells_are_shown_against_each_cost(tmp_path):
    runs = pd.DataFrame({
        "status": ["FINISHED"] * 4,
        "ablated_dimension": ["base", "base", "stride", "stride"],
        "ablated_value": ["base", "base", "1", "1"],
        "test_acc": [0.90, 0.92, 0.88, 0.89],
        "mean_fnfe": [20.0, 22.0, 30.0, 34.0],
        "mean_bnfe": [30.0, 32.0, 40.0, 44.0],
        "mean_epoch_time_s": [10.0, 11.0, 20.0, 21.0],
    })
    section = tradeoffs.one_at_a_time_cells(runs, tmp_path)
    nfe = section.tables["cells_test_acc_nfe"]
    assert nfe["cell"].tolist() == ["base", "stride=1"]
    assert nfe["nfe"].tolist() == [52.0, 74.0]
    assert nfe["n"].tolist() == [2, 2]
    assert section.tables["cells_test_acc_epoch_time"]["epoch_time"].tolist() == [10.5, 20.5]
    assert len(section.figures) == 2 and "95% t-interval" in section.markdown
