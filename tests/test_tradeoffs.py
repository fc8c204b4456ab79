"""Parameter efficiency as a curve: the fitted lines read backwards (planted numbers, computed
here independently), the report's curve section on planted runs, --widths' bad input. A real
--widths sweep (its runs, their counted parameters, its report's curve) runs in the README's
order: tests/test_readme.py."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from odenet import tradeoffs
from odenet.stats import fit_line, x_difference
from sweeps.parameter_efficiency import parameter_efficiency
from sweeps.tuning import main as sweep_main

X = [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
Y = [0.70, 0.72, 0.80, 0.79, 0.90, 0.88]


def by_hand(x, y):
    """OLS by the normal equations: coefficients, their covariance, residual degrees of freedom."""
    design = np.column_stack([np.ones(len(x)), x])
    beta, rss, *_ = np.linalg.lstsq(design, np.array(y), rcond=None)
    dof = len(x) - 2
    return beta, float(rss[0]) / dof * np.linalg.inv(design.T @ design), dof


def test_a_line_is_read_backwards_with_fielders_interval():
    line = fit_line(X, Y)
    beta, cov, dof = by_hand(X, Y)
    assert (line.intercept, line.slope, line.dof) == (pytest.approx(beta[0]), pytest.approx(beta[1]), dof)
    target = 0.85
    assert line.x_at(target) == pytest.approx((target - beta[0]) / beta[1])
    # Fieller: the x where |a + b x - y| = t * sqrt(var(a + b x)), found here by a root search
    t = scipy_stats.t.ppf(0.975, dof)

    def gap(x):
        return abs(beta[0] + beta[1] * x - target) - t * math.sqrt(cov[0, 0] + 2 * x * cov[0, 1] + x * x * cov[1, 1])

    from scipy.optimize import brentq

    centre = (target - beta[0]) / beta[1]
    low, high = brentq(gap, centre - 10, centre), brentq(gap, centre, centre + 10)
    interval = line.x_interval(target)
    assert (interval.low, interval.high) == (pytest.approx(low), pytest.approx(high))
    assert interval.low < interval.mean < interval.high


def test_a_flat_line_has_no_interval():
    line = fit_line([1, 1, 2, 2, 3, 3], [0.80, 0.90, 0.86, 0.84, 0.81, 0.89])
    interval = line.x_interval(0.85)
    assert math.isnan(interval.low) and math.isnan(interval.high)


def test_two_lines_are_compared_where_they_reach_one_accuracy():
    line, base = fit_line(X, Y), fit_line(X, [v - 0.05 for v in Y[::-1]][::-1])  # base 0.05 lower everywhere
    target = 0.8
    beta, cov, dof = by_hand(X, Y)
    beta_base, cov_base, _ = by_hand(X, [v - 0.05 for v in Y])

    def x_and_var(b, c):
        x = (target - b[0]) / b[1]
        return x, (c[0, 0] + 2 * x * c[0, 1] + x * x * c[1, 1]) / b[1] ** 2

    (x1, v1), (x2, v2) = x_and_var(beta, cov), x_and_var(beta_base, cov_base)
    compared = x_difference(line, base, target)
    welch = (v1 + v2) ** 2 / (v1 ** 2 / dof + v2 ** 2 / dof)
    assert compared.mean == pytest.approx(x1 - x2)  # the base needs 0.05 / slope more log10 params
    assert compared.mean == pytest.approx(-0.05 / beta[1])
    assert compared.se == pytest.approx(math.sqrt(v1 + v2))
    assert compared.dof == pytest.approx(welch)
    assert compared.p == pytest.approx(2 * scipy_stats.t.sf(abs(x1 - x2) / math.sqrt(v1 + v2), welch))


def planted_runs(gap: float) -> pd.DataFrame:
    """Two families at widths 8, 16, 32 over 3 seeds; resnet-small `gap` less accurate at each size,
    on the same parameter counts (so its need is 10^(gap / slope) times the ODEnet's)."""
    rows = []
    for model, shift in (("odenet-simple", 0.0), ("resnet-small", -gap)):
        for width, params in ((8, 1_000), (16, 4_000), (32, 16_000)):
            for seed, noise in enumerate((-0.004, 0.0, 0.004)):
                rows.append({"run_id": f"{model}-{width}-{seed}", "status": "FINISHED", "dataset": "fashion-mnist",
                             "model": model, "width": float(width), "seed": seed, "params_trainable": float(params),
                             "test_acc": 0.70 + 0.1 * math.log10(params / 1_000) / math.log10(4) + shift + noise})
    return pd.DataFrame(rows)


def test_the_curve_table_states_the_parameters_each_family_needs(tmp_path):
    section = tradeoffs.parameter_curves(planted_runs(gap=0.05), tmp_path, "odenet-simple", 1 / 10_000)
    points = section.tables["parameter_curve_fashion-mnist"]
    assert points[["model", "width", "params_trainable", "n"]].values.tolist() == [
        ["odenet-simple", 8.0, 1000.0, 3], ["odenet-simple", 16.0, 4000.0, 3], ["odenet-simple", 32.0, 16000.0, 3],
        ["resnet-small", 8.0, 1000.0, 3], ["resnet-small", 16.0, 4000.0, 3], ["resnet-small", 32.0, 16000.0, 3]]
    needs = section.tables["parameters_for_accuracy"]
    # the ODEnet's accuracies at widths 8 and 16 (0.70, 0.80) lie inside resnet-small's range (0.65 to 0.85);
    # at width 32 (0.90) the ResNet's line would have to be extrapolated
    assert needs["accuracy"].tolist() == pytest.approx([0.70, 0.70, 0.80, 0.80])
    assert needs["odenet-simple width"].tolist() == [8.0, 8.0, 16.0, 16.0]
    slope = 0.1 / math.log10(4)  # accuracy per log10 parameter, as planted
    resnet = needs[needs["model"] == "resnet-small"]
    assert resnet["params needed"].tolist() == pytest.approx([1_000 * 10 ** (0.05 / slope),
                                                              4_000 * 10 ** (0.05 / slope)], rel=1e-6)
    assert resnet["ratio to base"].tolist() == pytest.approx([10 ** (0.05 / slope)] * 2, rel=1e-6)  # 2x
    assert resnet["verdict"].str.startswith("resnet-small needs 2x the parameters of odenet-simple").all()
    assert needs.loc[needs["model"] == "odenet-simple", "params needed"].tolist() == pytest.approx([1_000, 4_000])
    assert [p.name for p in section.figures] == ["parameter_curve_fashion-mnist.png"]
    # 3 seeds: each width's accuracy is shown with its range, as the report's other tables show it
    assert (points.loc[0, "test_acc_low"], points.loc[0, "test_acc_high"]) == (pytest.approx(0.696),
                                                                              pytest.approx(0.704))


def test_families_whose_curves_coincide_differ_undetectably(tmp_path):
    needs = tradeoffs.parameter_curves(planted_runs(gap=0.0), tmp_path, "odenet-simple", 1 / 10_000).tables[
        "parameters_for_accuracy"]
    verdicts = needs.loc[needs["model"] == "resnet-small", "verdict"]
    assert len(verdicts) >= 1 and verdicts.str.startswith("difference not detectable").all()


@pytest.mark.parametrize("widths, problem", [("8,x", "'x' is not a width"), ("0,16", "'0' is not a width"),
                                             ("8,8", "8 is given twice")])
def test_bad_widths_are_named_before_ray_starts(widths, problem, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/never.db")
    assert sweep_main(parameter_efficiency, ["--smoke", "--widths", widths]) == 2
    err = capsys.readouterr().err
    assert problem in err and "e.g. --widths 8,16,32,64" in err
    import ray

    assert not ray.is_initialized() and not (tmp_path / "never.db").exists()


def test_the_widths_multiply_the_trials(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--smoke", "--models", "odenet-simple,resnet-small", "--seeds", "2", "--estimate"]
    assert sweep_main(parameter_efficiency, [*argv, "--widths", "8,16,32"]) == 0
    assert "trials: 12\n" in capsys.readouterr().out  # 2 models x 3 widths x 2 seeds


# -- the report's accuracy-against-cost sections, from runs logged to MLflow (no training) --------------------------


def log_sweep(store, experiment: str, design: str, parent_params: dict, trials: list[dict]) -> str:
    """A sweep's parent run with `parent_params`, and one finished (or failed) child run per trial:
    {"params": ..., "metrics": ..., "tags": ..., "status": ...}. Returns the parent's id."""
    from mlflow.entities import Metric, Param

    experiment_id = store.create_experiment(experiment)
    parent = store.create_run(experiment_id, run_name=experiment,
                              tags={"sweep_role": "parent", "sweep_name": experiment, "design": design}).info.run_id
    store.log_batch(parent, params=[Param(k, v) for k, v in parent_params.items()])
    for trial in trials:
        run = store.create_run(experiment_id, tags={"mlflow.parentRunId": parent, "design": design,
                                                    **trial.get("tags", {})}).info.run_id
        store.log_batch(run, params=[Param(k, str(v)) for k, v in trial["params"].items()],
                        metrics=[Metric(k, v, 0, 0) for k, v in trial["metrics"].items()])
        store.set_terminated(run, trial.get("status", "FINISHED"))
    store.set_terminated(parent, "FINISHED")
    return parent


def searched(stride, activation, val_acc, fnfe, seconds, status="FINISHED"):
    from sweeps.architecture_ablation import STUDY_POINTS

    settings = {**STUDY_POINTS[0], "stride": stride, "activation_before": activation, "seed": 0}
    return {"params": settings, "status": status,
            "tags": {"failure_cause": "underflow"} if status == "FAILED" else {},
            "metrics": {} if status == "FAILED" else
            {"val_acc": val_acc, "test_acc": val_acc, "mean_fnfe": fnfe, "mean_bnfe": fnfe,
             "mean_epoch_time_s": seconds, "params_total": 1000.0}}


# The study's own point (stride 2, relu) at NFE 40 and 0.85; a stride-1 trial more accurate and dearer;
# a dominated one; a diverged one.
TRIALS = [searched(2, "relu", 0.85, 20.0, 30.0), searched(1, "relu", 0.90, 40.0, 20.0),
          searched(1, "tanh", 0.80, 30.0, 40.0), searched(1, "softplus", 0.0, 5.0, 1.0, status="FAILED")]


@pytest.mark.parametrize("objectives, fronts", [
    ("val_acc:max,nfe:min", {"pareto_val_acc_nfe": [(0.90, 80.0, False), (0.85, 40.0, True)]}),
    (None, {"pareto_val_acc_nfe": [(0.90, 80.0, False), (0.85, 40.0, True)],
            "pareto_val_acc_epoch_time": [(0.90, 20.0, False)]}),
])
def test_a_searchs_front_is_in_its_report_on_the_objectives_its_parent_run_records(objectives, fronts, tmp_path,
                                                                                     monkeypatch):
    import json

    from mlflow import MlflowClient

    from odenet import report

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    store = MlflowClient(uri)
    space = json.dumps({"stride": "choice", "activation_before": "choice"})
    parent = log_sweep(store, "search", "search", {"search_space": space,
                                                   **({"objectives": objectives} if objectives else {})}, TRIALS)
    text = report.main("search", str(tmp_path / "report"))
    assert "## Accuracy against cost" in text and "3 of 4 trials finished with every objective measured" in text
    for name, expected in fronts.items():
        table = pd.read_csv(tmp_path / "report" / f"{name}.csv")
        cost = name.split("val_acc_")[1]
        assert list(zip(table["val_acc"], table[cost], table["study_setting"])) == expected
    assert sorted(p.name for p in (tmp_path / "report").glob("pareto_*.csv")) == sorted(f"{n}.csv" for n in fronts)
    logged = {a.path for a in store.list_artifacts(parent, "report")}
    assert {f"report/{name}.csv" for name in fronts} | {"report/pareto_val_acc_against_nfe.png"} <= logged


def test_one_at_a_time_cells_are_in_the_report_against_each_cost(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from odenet import report

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    trials = [{"params": {"stride": stride, "seed": seed},
               # a base cell may carry no ablated_value (older sweeps): it is still the base
               "tags": {"ablated_dimension": dimension, **({"ablated_value": value} if value else {})},
               "metrics": {"test_acc": acc, "mean_fnfe": nfe, "mean_bnfe": nfe, "mean_epoch_time_s": seconds}}
              for dimension, value, stride, seed, acc, nfe, seconds in (
                  ("base", "base", 2, 0, 0.90, 20.0, 10.0), ("base", "", 2, 1, 0.92, 22.0, 12.0),
                  ("stride", "1", 1, 0, 0.93, 30.0, 20.0), ("stride", "1", 1, 1, 0.95, 34.0, 22.0))]
    log_sweep(MlflowClient(uri), "effects", "one-at-a-time", {}, trials)
    report.main("effects", str(tmp_path / "report"))
    cells = pd.read_csv(tmp_path / "report" / "cells_test_acc_epoch_time.csv")
    assert list(zip(cells["cell"], cells["n"], cells["test_acc"], cells["epoch_time"])) == [
        ("base", 2, pytest.approx(0.91), pytest.approx(11.0)),
        ("stride=1", 2, pytest.approx(0.94), pytest.approx(21.0))]
    assert "## Accuracy against cost, per cell" in (tmp_path / "report" / "report.md").read_text()


def test_a_cell_against_the_base_reads_as_points_of_accuracy_and_percent_of_cost(tmp_path):
    base_acc, cell_acc = [0.90, 0.92, 0.91], [0.88, 0.91, 0.89]
    base_time, cell_time = [10.0, 12.0, 11.0], [5.0, 6.6, 5.0]
    runs = pd.DataFrame({
        "status": ["FINISHED"] * 6, "seed": [0, 1, 2] * 2,
        "ablated_dimension": ["base"] * 3 + ["stride"] * 3, "ablated_value": ["base"] * 3 + ["2"] * 3,
        "test_acc": base_acc + cell_acc, "mean_fnfe": [20.0] * 6, "mean_bnfe": [30.0] * 3 + [45.0] * 3,
        "mean_epoch_time_s": base_time + cell_time})
    section = tradeoffs.one_at_a_time_cells(runs, tmp_path, resolution=1 / 1000)
    row = section.tables["cells_against_base"].iloc[0]
    assert (row["cell"], row["pairs"]) == ("stride=2", 3)
    d = np.subtract(cell_acc, base_acc)
    half = scipy_stats.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
    assert (row["diff_mean"], row["diff_low"], row["diff_high"]) == (
        pytest.approx(d.mean()), pytest.approx(d.mean() - half), pytest.approx(d.mean() + half))
    logs = np.log(np.divide(cell_time, base_time))
    half = scipy_stats.t.ppf(0.975, 2) * logs.std(ddof=1) / math.sqrt(3)
    assert (row["epoch_time_change"], row["epoch_time_change_low"], row["epoch_time_change_high"]) == (
        pytest.approx((math.exp(logs.mean()) - 1) * 100), pytest.approx((math.exp(logs.mean() - half) - 1) * 100),
        pytest.approx((math.exp(logs.mean() + half) - 1) * 100))
    assert row["nfe_change"] == pytest.approx((65 / 50 - 1) * 100)  # FNFE + BNFE: 50 in the base, 65 here
    assert "Each cell against the base cell, seed by seed" in section.markdown


def test_costs_measured_at_different_batch_sizes_or_on_different_devices_are_flagged():
    runs = pd.DataFrame({"batch_size": ["64", "64", "128"], "device_model": ["AMD EPYC", "NVIDIA H100", ""]})
    warnings = tradeoffs.mixed_costs(runs)
    assert len(warnings) == 2
    assert "different batch_size values (64 (2), 128 (1))" in warnings[0]
    assert "different device_model values (AMD EPYC (1), NVIDIA H100 (1))" in warnings[1]
    assert tradeoffs.mixed_costs(runs.iloc[:1]) == [] and tradeoffs.mixed_costs(pd.DataFrame(index=[0])) == []
