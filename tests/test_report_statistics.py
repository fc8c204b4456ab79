"""The report's analyses on planted tables of runs (no server needed: the functions `odenet
report` applies to what it loads from MLflow): numeric dimensions as numbers, importance out of
sample with its fit quality, a search budget no diverged or short trial sets, divergence in the
verdicts, Holm over the whole report, the resolution rule and accuracy inside [0, 100]."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sp

from odenet import report


def run(run_id, seed, accuracy=None, status="FINISHED", cause="", **settings):
    return {"run_id": run_id, "seed": seed, "status": status, "failure_cause": cause, "test_acc": accuracy,
            "test_loss": 0.5, "mean_epoch_time_s": 1.0, "epochs": 3, "test_subset": 2000.0, "stopped_by": "",
            **settings}


def history(values, fnfe=20.0, bnfe=26.0):
    return pd.DataFrame({"epoch": range(1, len(values) + 1), "val_acc": values, "val_loss": [1 - v for v in values],
                         "fnfe": fnfe, "bnfe": bnfe, "epoch_time_s": 1.0})


# -- search ---------------------------------------------------------------------------------------


def planted_search(seed, trials=12, effect=True):
    """`trials` trials where only final_time matters (1 point lost per doubling, 1 point of noise);
    lr and weight_decay are log-uniform noise, norm a category of noise."""
    rng = np.random.default_rng(seed)
    final_time = np.tile([1.0, 2.0, 5.0, 10.0], trials // 4)
    table = pd.DataFrame({"final_time": final_time.astype(str),  # params come back as text
                          "lr": [f"{v:.17g}" for v in 10 ** rng.uniform(-4, -2, trials)],
                          "weight_decay": [f"{v:.17g}" for v in 10 ** rng.uniform(-6, -3, trials)],
                          "norm": rng.choice(["groupnorm", "batchnorm", "none"], trials)})
    signal = -0.01 * np.log2(final_time) if effect else 0.0
    table["val_acc@3"] = 0.8 + signal + rng.normal(0, 0.01, trials)
    return table


def test_numeric_dimensions_are_numbers_in_numeric_order_not_text_order():
    assert report.value_order(["1.0", "10.0", "2.0", "5.0"]) == ["1.0", "2.0", "5.0", "10.0"]
    X, kinds = report.encode(planted_search(0), ["final_time", "lr", "weight_decay", "norm"])
    assert kinds == {"final_time": "number", "lr": "log10", "weight_decay": "log10", "norm": "category"}
    assert sorted(set(X["final_time"])) == [1.0, 2.0, 5.0, 10.0]
    assert X["lr"].between(-4, -2).all()


def test_importance_ranks_the_one_real_effect_first():
    """Text-ordered category codes (1, 10, 2, 5) rank final_time first in only some such searches."""
    for seed in range(5):
        ranked, _, oob_r2 = report.importance(planted_search(seed), ["final_time", "lr", "weight_decay", "norm"],
                                              "val_acc@3")
        assert ranked["dimension"].iloc[0] == "final_time", (seed, ranked)


def search_runs(tables):
    rows, curves = [], {}
    for i, (accuracy_per_epoch, status, cause, settings) in enumerate(tables):
        run_id = f"t{i}"
        rows.append(run(run_id, 0, 0.8 if status == "FINISHED" else None, status, cause, design="search",
                        **settings))
        if accuracy_per_epoch:
            curves[run_id] = history(accuracy_per_epoch)
    return pd.DataFrame(rows), curves


def test_a_forest_that_cannot_predict_ranks_nothing(tmp_path):
    noise = planted_search(1, trials=12, effect=False)
    trials = [([0.5, 0.6, a], "FINISHED", "", {d: noise.at[i, d] for d in ("final_time", "lr", "norm")})
              for i, a in enumerate(noise["val_acc@3"])]
    runs, curves = search_runs(trials)
    _, _, oob_r2 = report.importance(noise, ["final_time", "lr", "norm"], "val_acc@3")
    assert oob_r2 < report.MIN_FIT_R2
    out = report.Report("noise")
    report.search(runs, out, tmp_path, curves, ["final_time", "lr", "norm"])
    text = out.markdown()
    assert f"out-of-bag R² of {oob_r2:.2f}" in text and "too few (or too noisy) to rank" in text
    assert "search_importance" not in out.tables and out.figures == []  # no ranking, no partial dependence


def test_one_short_trial_and_one_diverged_trial_do_not_set_the_budget(tmp_path):
    rng = np.random.default_rng(0)
    trials = [(list(0.6 + 0.01 * np.arange(30) + rng.normal(0, 0.01)), "FINISHED", "",
               {"final_time": str(float(1 + i % 4))}) for i in range(8)]
    trials.append(([0.55], "KILLED", "", {"final_time": "2.0"}))  # stopped after one epoch
    trials.append(([0.99, 0.99, 0.99], "FAILED", "underflow", {"final_time": "10.0"}))  # diverged at epoch 4
    trials.append(([0.7] * 5, "RUNNING", "", {"final_time": "5.0"}))  # still training
    runs, curves = search_runs(trials)
    budget, left_out = report.search_budget(runs, curves)
    assert budget == 30
    why = dict(zip(left_out["run_id"], left_out["why"]))
    assert why == {"t8": "stopped at epoch 1, before the budget", "t9": "diverged (underflow)",
                   "t10": "still running"}
    out = report.Report("budgets")
    report.search(runs, out, tmp_path, curves, ["final_time"])
    top = out.tables["search_top_trials"]
    assert set(top["run_id"]) == {f"t{i}" for i in range(8)} and "val_acc@30" in top
    text = out.markdown()
    assert "Budget: epoch 30" in text and "diverged (underflow)" in text and "still running" in text


# -- controlled comparisons ----------------------------------------------------------------------


def one_at_a_time_runs(cells, seeds=range(4)):
    """cells: {(dimension, value): [accuracy or 'diverged' per seed]}; the base cell is ('base', value)."""
    rows = []
    base_final_time = next(value for (dimension, value) in cells if dimension == "base")
    for (dimension, value), outcomes in cells.items():
        for seed, outcome in zip(seeds, outcomes):
            settings = {"design": "one-at-a-time", "ablated_dimension": dimension, "ablated_value": value,
                        "final_time": base_final_time, "norm": "groupnorm", "width": "8"}
            if dimension != "base":
                settings[dimension] = value
            diverged = outcome == "diverged"
            rows.append(run(f"{dimension}-{value}-{seed}", seed, None if diverged else outcome,
                            "FAILED" if diverged else "FINISHED", "underflow" if diverged else "", **settings))
    return pd.DataFrame(rows)


def compared(cells, seeds=range(4)):
    _, comparisons = report.one_at_a_time(one_at_a_time_runs(cells, seeds), "", {})
    family = report.adjust(comparisons)
    return {c.dimension: c.table.set_index("value") for c in comparisons}, family


def test_a_seed_diverging_in_the_variant_or_in_the_base_is_in_the_verdict():
    base = [0.80, 0.82, 0.84, 0.81]
    tables, _ = compared({("base", "1.0"): base,
                          ("final_time", "2.0"): [0.83, 0.85, "diverged", 0.84],
                          ("final_time", "5.0"): [0.83, 0.851, 0.87, 0.842]})
    table = tables["final_time"]
    assert table.loc["2.0", "verdict"].endswith("in 3 of 4 seeds that finished; 1 diverged (0 in the base)")
    assert table.loc["2.0", "diff_n"] == 3 and table.loc["2.0", "diverged"] == "1 (underflow x1)"
    assert table.loc["2.0", "diverged_p"] == pytest.approx(1.0)  # one seed of four: no evidence either way
    tables, _ = compared({("base", "1.0"): ["diverged", 0.82, 0.84, 0.81],
                          ("final_time", "2.0"): [0.83, 0.85, 0.87, 0.84]})
    row = tables["final_time"].loc["2.0"]
    assert row["verdict"].endswith("in 3 of 4 seeds that finished; 0 diverged (1 in the base)")
    tables, _ = compared({("base", "1.0"): [0.80, 0.82, 0.84, 0.81],
                          ("final_time", "2.0"): [0.83, "diverged", "diverged", 0.84]})
    assert tables["final_time"].loc["2.0", "verdict"].startswith("not estimable: 2 finished pair(s)")


def test_holm_runs_over_the_whole_report_and_can_change_a_verdict():
    """final_time's difference is detectable alone (its table has one comparison: old per-table
    Bonferroni claimed it) and not in a family of 4 comparisons across two tables."""
    base = [0.80, 0.82, 0.79, 0.81]
    up = [b + d for b, d in zip(base, [0.012, 0.004, 0.010, 0.006])]
    same = [b + d for b, d in zip(base, [0.002, -0.003, 0.001, -0.001])]
    d = np.array(up) - np.array(base)
    p = sp.ttest_rel(up, base).pvalue
    assert p < 0.05 and 4 * p > 0.05
    tables, family = compared({("base", "1.0"): base, ("final_time", "2.0"): up,
                               ("norm", "batchnorm"): same, ("norm", "none"): same,
                               ("width", "16"): same})
    assert family == 4
    row = tables["final_time"].loc["2.0"]
    others = [sp.ttest_rel(same, base).pvalue] * 3
    ranked = sorted([p, *others])
    expected = max(min(1, (4 - k) * ranked[k]) for k in range(ranked.index(p) + 1))
    assert row["diff_holm_p"] == pytest.approx(expected)
    assert row["verdict"].startswith("no difference detectable")
    level = 1 - 0.05 * p / expected
    half = sp.t.ppf(1 - (1 - level) / 2, 3) * d.std(ddof=1) / 2  # dof 3: 4 pairs
    assert row["diff_high"] - row["diff_low"] == pytest.approx(2 * half)
    assert row["diff_low"] < 0 < row["diff_high"]
    alone, _ = compared({("base", "1.0"): base, ("final_time", "2.0"): up})
    assert alone["final_time"].loc["2.0", "verdict"].startswith("higher by")


def test_near_zero_spread_is_not_estimable_and_accuracy_stays_inside_100():
    base = [0.97, 0.98, 0.99]
    tables, _ = compared({("base", "1.0"): base, ("final_time", "2.0"): [b - 0.02 + 1e-13 * i for i, b in
                                                                        enumerate(base)]}, seeds=range(3))
    row = tables["final_time"].loc["2.0"]
    assert row["verdict"].startswith("not estimable") and "resolution" in row["verdict"]
    assert "e-1" not in row[report.DIFF]
    base_row = tables["final_time"].loc["1.0 (base)"]
    # 0.97, 0.98, 0.99: a t-interval would end above 100%; the range does not
    assert sp.ttest_1samp(base, 0).confidence_interval().high > 1
    assert (base_row["test_acc_low"], base_row["test_acc_high"]) == pytest.approx((0.97, 0.99))
    assert tables["final_time"]["test_acc_high"].max() <= 1.0


def test_values_are_tabled_in_numeric_order_with_the_base_in_its_place():
    cells = {("base", "2.0"): [0.8, 0.81, 0.82, 0.8]}
    for value in ("1.0", "10.0", "5.0"):
        cells[("final_time", value)] = [0.8, 0.81, 0.82, 0.8]
    tables, _ = compared(cells)
    assert list(tables["final_time"].index) == ["1.0", "2.0 (base)", "5.0", "10.0"]


def test_nfe_compares_at_one_epoch_not_as_a_mean_over_however_many_epochs_a_run_lasted():
    runs = one_at_a_time_runs({("base", "1.0"): [0.8, 0.81, 0.82, 0.8],
                               ("final_time", "2.0"): [0.8, 0.81, 0.82, 0.8]})
    curves = {}
    for r in runs.itertuples():
        long = r.ablated_dimension == "base"
        # NFE grows as the dynamics learn: the longer runs' mean would be higher at equal cost per epoch
        curves[r.run_id] = history([0.7] * (6 if long else 3), fnfe=np.arange(1, 7 if long else 4) * 10.0)
    _, comparisons = report.one_at_a_time(runs, "", curves)
    table = comparisons[0].table.set_index("value")
    assert table.loc["1.0 (base)", "FNFE at epoch 3"] == table.loc["2.0", "FNFE at epoch 3"] == "30 [30, 30]"


def test_the_solver_reevaluation_summary_keeps_accuracy_inside_0_100():
    """Two runs of very different accuracy: a t-interval would run from below 0 to above 100;
    the summary shows the range, as the report does."""
    from sweeps.solver_reevaluation import summary_table

    planted = pd.DataFrame({"solver": ["euler", "euler"], "accuracy": [0.10, 0.74], "fnfe": [10.0, 10.0],
                            "test_images": [100, 100]})
    (row,) = summary_table(planted).to_dict("records")
    assert row["test acc %"] == "42 [10, 74]"
