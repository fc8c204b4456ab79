"""`odenet report`: what an experiment's runs answer, compared only like with like.

The design tag each child run carries decides what may be compared:

- one-at-a-time and parameter-efficiency runs differ from their base in one setting
  (or the model), over seeds: per value, mean and 95% interval over seeds, and the
  difference to the base paired by seed, its interval widened for the comparisons in
  the table (Bonferroni) and put in words;
- search runs vary every setting at once where the searcher found promise, and ASHA
  stops them at different epochs: no per-setting means, only the top trials and each
  dimension's importance, both at one common budget (the same epoch for every trial).

Diverged runs are counted with their causes, never averaged in. The report (markdown,
CSV, PNG) goes to `--out` and onto the experiment's parent run in MLflow.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from odenet import plots, progress, tracking
from odenet.evaluate import REEVALUATION_SOLVERS
from odenet.failures import Diverged
from odenet.stats import Interval, mean_interval, paired_difference, verdict
from odenet.summary import reevaluation_metric, summarize
from odenet.sweep_record import PARENT, ROLE_TAG, find_parent_run

# The designs a run's `design` tag names, and the `ablated_dimension` of a one-at-a-time base
# cell: the sweeps write them (sweeps/designs.py), the report reads them.
SEARCH, ONE_AT_A_TIME, PARAMETER_EFFICIENCY = "search", "one-at-a-time", "parameter-efficiency"
BASE = "base"
# Numbers logged as params, read back as numbers.
NUMERIC_PARAMS = ("stride", "final_time", "augment_dims", "lr", "weight_decay", "width", "seed", "subset")
# Parameter efficiency compares every model with this one, on each data set.
BASE_MODEL = "odenet-simple"
TOP_TRIALS = 10
MIN_TRIALS_FOR_IMPORTANCE = 5
ARTIFACT_PATH = "report"


@dataclass
class Report:
    """The report's sections (markdown), its tables (CSV) and figures, as written to --out."""

    title: str
    sections: list[str] = field(default_factory=list)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: list[Path] = field(default_factory=list)

    def markdown(self) -> str:
        return "\n\n".join([f"# {self.title}", *self.sections]) + "\n"


# -- the runs ------------------------------------------------------------------------------------


def load_runs(experiment: str) -> pd.DataFrame:
    """One row per trial run (sweep parent runs left out): params, final metrics and the tags
    that say how it was designed, as plain columns."""
    import mlflow

    tracking.check_server()
    mlflow.set_tracking_uri(tracking.tracking_uri())
    raw = mlflow.search_runs(experiment_names=[experiment], max_results=50_000)
    if raw.empty:
        raise tracking.TrackingError(f"experiment {experiment!r} has no runs at {tracking.tracking_uri()}")
    if f"tags.{ROLE_TAG}" in raw:
        raw = raw[raw[f"tags.{ROLE_TAG}"] != PARENT]
    if raw.empty:
        raise tracking.TrackingError(f"experiment {experiment!r} has no trial runs yet, only its sweep's parent run")
    raw = raw.sort_values("start_time")  # tables list dimensions and values in the order they ran
    frame = pd.DataFrame({"run_id": raw["run_id"], "status": raw["status"]})
    for column in raw.columns:
        if column.startswith("params."):
            frame[column[len("params."):]] = raw[column]
        elif column.startswith("metrics."):
            frame[column[len("metrics."):]] = raw[column]
    for tag, default in (("design", SEARCH), ("ablated_dimension", ""), ("ablated_value", ""),
                         ("failure_cause", ""), ("stopped_by", "")):
        values = raw.get(f"tags.{tag}", pd.Series(index=raw.index, dtype=object))
        frame[tag] = values.fillna(default).replace("", default)
    for name in NUMERIC_PARAMS:
        if name in frame:
            frame[name] = pd.to_numeric(frame[name], errors="coerce")
    return frame.reset_index(drop=True)


def finished(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[(frame["status"] == "FINISHED") & frame.get("test_acc", pd.Series(index=frame.index)).notna()]


def diverged(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["failure_cause"].isin(Diverged.CAUSES)]


def histories(run_ids, keys=("val_loss", "val_acc", "fnfe", "bnfe", "epoch_time_s")) -> dict[str, pd.DataFrame]:
    """Each run's per-epoch metrics (step = epoch), as logged."""
    c = tracking.client()
    out = {}
    for run_id in progress.tracked(list(run_ids), "fetching per-epoch metrics", "runs"):
        columns = {key: {m.step: m.value for m in c.get_metric_history(run_id, key)} for key in keys}
        if any(columns.values()):
            out[run_id] = pd.DataFrame(columns).rename_axis("epoch").reset_index().sort_values("epoch")
    return out


# -- controlled comparisons: one-at-a-time and parameter efficiency ------------------------------


COMPARED = (("test_acc", "test acc %", 100.0), ("test_loss", "test loss", 1.0), ("mean_fnfe", "FNFE", 1.0),
            ("mean_bnfe", "BNFE", 1.0), ("mean_epoch_time_s", "epoch time s", 1.0), ("epochs", "epochs", 1.0))


def comparison_table(groups: dict[str, pd.DataFrame], base: str, extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per value: seeds finished, diverged runs and their causes, mean and 95% interval
    of each compared metric over seeds, and the paired difference in test accuracy to `base`
    (Bonferroni-adjusted over the table's comparisons) with its verdict."""
    comparisons = max(1, len(groups) - 1)
    base_runs = finished(groups[base]) if base in groups else None
    rows = []
    for value, runs in groups.items():
        done, failed = finished(runs), diverged(runs)
        causes = ", ".join(f"{c} x{n}" for c, n in failed["failure_cause"].value_counts().items())
        row = {"value": value, "seeds finished": f"{len(done)} of {runs['seed'].nunique()}",
               "diverged": f"{len(failed)}" + (f" ({causes})" if causes else "")}
        for column in extra:
            row[column] = done[column].mean() if column in done and len(done) else math.nan
        for metric, label, scale in COMPARED:
            interval = mean_interval(done[metric].tolist() if metric in done else [])
            row[label] = interval.format(scale)
            row[f"{metric}_mean"], row[f"{metric}_low"], row[f"{metric}_high"] = (
                interval.mean, interval.low, interval.high)
        if value == base or base_runs is None:
            row["Δ test acc vs base, points"], row["verdict"] = ("base" if value == base else ""), ""
        else:
            paired = pd.merge(done[["seed", "test_acc"]], base_runs[["seed", "test_acc"]], on="seed",
                              suffixes=("", "_base"))
            diff = paired_difference(paired["test_acc"].tolist(), paired["test_acc_base"].tolist(), comparisons)
            row["Δ test acc vs base, points"] = diff.format(100.0, 2)
            row["diff_mean"], row["diff_low"], row["diff_high"], row["diff_n"] = (
                diff.mean, diff.low, diff.high, diff.n)
            row["verdict"] = verdict(diff)
        rows.append(row)
    return pd.DataFrame(rows)


SHOWN = ["value", "seeds finished", "diverged", *[label for _, label, _ in COMPARED], "Δ test acc vs base, points",
         "verdict"]


def _shown(table: pd.DataFrame, extra: tuple[str, ...] = ()) -> str:
    columns = [c for c in SHOWN[:3] + list(extra) + SHOWN[3:] if c in table]
    return table[columns].to_markdown(index=False, floatfmt=".4g")


def _value_order(values) -> list:
    numbers = pd.to_numeric(pd.Series(list(values)), errors="coerce")
    if numbers.notna().all():
        return [v for _, v in sorted(zip(numbers, values))]
    return list(values)


def one_at_a_time(frame: pd.DataFrame, report: Report, out: Path, nfe: dict[str, pd.DataFrame]) -> None:
    runs = frame[frame["design"] == ONE_AT_A_TIME]
    base_runs = runs[runs["ablated_dimension"] == BASE]
    dimensions = [d for d in dict.fromkeys(runs["ablated_dimension"]) if d != BASE]
    lines = ["## One-at-a-time ablation",
             f"{len(runs)} runs: a base cell and {len(dimensions)} ablated dimension(s), each cell over "
             f"{runs['seed'].nunique()} seed(s). Each row: mean and 95% t-interval over seeds; the difference to the "
             "base is paired by seed, its interval adjusted for the comparisons in its table (Bonferroni), and a "
             "direction is claimed only when that interval excludes 0."]
    if base_runs.empty:
        lines.append("No base cell was logged: the differences cannot be computed.")
    for dimension in dimensions:
        cells = runs[runs["ablated_dimension"] == dimension]
        base_value = str(base_runs[dimension].iloc[0]) if not base_runs.empty and dimension in base_runs else BASE
        groups = {f"{base_value} (base)": base_runs} if not base_runs.empty else {}
        # Values as the runs logged them (params), so the base's and the cells' read alike.
        logged = cells[dimension].astype(str) if dimension in cells else cells["ablated_value"]
        for value in _value_order(logged.unique()):
            groups[str(value)] = cells[logged == value]
        table = comparison_table(groups, f"{base_value} (base)")
        report.tables[f"one_at_a_time_{dimension}"] = table
        lines += [f"### {dimension}", _shown(table)]
        report.figures.append(plots.interval_bars(
            table["value"].tolist(), [Interval(r.test_acc_mean, r.test_acc_low, r.test_acc_high, 2)
                                      for r in table.itertuples()],
            out / f"test_acc_by_{dimension}.png", f"test accuracy by {dimension} (mean, 95% interval)",
            "test accuracy"))
        curves = _nfe_curves(groups, nfe)
        if curves:
            report.figures.append(plots.per_setting_curves(curves, out / f"nfe_by_{dimension}.png",
                                                           f"FNFE (solid) and BNFE (dashed) per epoch by {dimension}"))
    report.sections.append("\n\n".join(lines))


def _nfe_curves(groups: dict[str, pd.DataFrame], nfe: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    curves = {}
    for value, runs in groups.items():
        per_run = [nfe[r] for r in runs["run_id"] if r in nfe]
        if per_run:
            curves[value] = pd.concat(per_run).groupby("epoch", as_index=False)[["fnfe", "bnfe"]].mean()
    return curves


def parameter_efficiency(frame: pd.DataFrame, report: Report, out: Path) -> None:
    runs = frame[frame["design"] == PARAMETER_EFFICIENCY]
    lines = ["## Parameter efficiency",
             f"Each model trained over {runs['seed'].nunique()} seed(s) with the same settings; mean and 95% "
             f"t-interval over seeds, and the difference to {BASE_MODEL} paired by seed (Bonferroni-adjusted)."]
    for dataset, on_dataset in runs.groupby("dataset"):
        models = list(dict.fromkeys(on_dataset["model"]))
        base = BASE_MODEL if BASE_MODEL in models else models[0]
        groups = {model: on_dataset[on_dataset["model"] == model] for model in [base] + [m for m in models if m != base]}
        table = comparison_table(groups, base, extra=("params_total", "params_outside_head"))
        report.tables[f"parameter_efficiency_{dataset}"] = table
        lines += [f"### {dataset}", _shown(table, extra=("params_total", "params_outside_head"))]
        report.figures.append(plots.interval_bars(
            table["value"].tolist(), [Interval(r.test_acc_mean, r.test_acc_low, r.test_acc_high, 2)
                                      for r in table.itertuples()],
            out / f"test_acc_by_model_{dataset}.png", f"test accuracy by model on {dataset} (mean, 95% interval)",
            "test accuracy"))
    report.sections.append("\n\n".join(lines))


# -- search: where the searcher looked, at one budget ----------------------------------------------


def common_budget(curves: dict[str, pd.DataFrame]) -> int | None:
    """The epoch every trial with a history reached: the budget at which they all compare."""
    reached = [int(h["epoch"].max()) for h in curves.values() if not h.empty]
    return min(reached) if reached else None


def at_budget(runs: pd.DataFrame, curves: dict[str, pd.DataFrame], budget: int, dimensions: list[str]) -> pd.DataFrame:
    """Each trial's settings and its summary as if it had stopped at `budget` epochs."""
    rows = []
    for run in runs.itertuples():
        history = curves.get(run.run_id)
        if history is None or history["epoch"].max() < budget:
            continue
        at = summarize(history, up_to_epoch=budget)
        val_acc = float(history.loc[history["epoch"] == budget, "val_acc"].iloc[0])
        rows.append({"run_id": run.run_id, **{d: getattr(run, d) for d in dimensions},
                     f"val_acc@{budget}": val_acc, f"best_val_acc@{budget}": at["best_val_acc"],
                     "status": run.status, "test_acc (finished only)": getattr(run, "test_acc", math.nan)})
    return pd.DataFrame(rows)


def importance(table: pd.DataFrame, dimensions: list[str], target: str) -> tuple[pd.DataFrame, dict]:
    """Permutation importance of each dimension for `target`, from a random forest fitted to the
    trials (scikit-learn), and each dimension's partial dependence."""
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.inspection import partial_dependence, permutation_importance

    varying = [d for d in dimensions if table[d].astype(str).nunique() > 1]
    X = pd.DataFrame(index=table.index)
    categorical = []
    for d in varying:
        numbers = pd.to_numeric(table[d], errors="coerce")
        if numbers.notna().all() and table[d].astype(str).nunique() > 6:
            X[d] = np.log10(numbers) if d in ("lr", "weight_decay") and (numbers > 0).all() else numbers
            categorical.append(False)
        else:
            X[d] = pd.Categorical(table[d].astype(str)).codes
            categorical.append(True)
    y = table[target].to_numpy()
    forest = RandomForestRegressor(n_estimators=300, random_state=0).fit(X, y)
    result = permutation_importance(forest, X, y, n_repeats=30, random_state=0)
    ranked = pd.DataFrame({"dimension": varying, "importance": result.importances_mean,
                           "sd": result.importances_std}).sort_values("importance", ascending=False)
    dependence = {}
    for i, d in enumerate(varying):
        pd_result = partial_dependence(forest, X, [i], categorical_features=categorical, kind="average")
        grid = pd_result["grid_values"][0]
        labels = (list(pd.Categorical(table[d].astype(str)).categories[grid.astype(int)]) if categorical[i]
                  else [f"{10 ** g:.2g}" if d in ("lr", "weight_decay") else f"{g:.3g}" for g in grid])
        dependence[d] = (labels, pd_result["average"][0], X[d].to_numpy(), y, categorical[i],
                         list(pd.Categorical(table[d].astype(str)).categories) if categorical[i] else None)
    return ranked.reset_index(drop=True), dependence


def search(frame: pd.DataFrame, report: Report, out: Path, curves: dict[str, pd.DataFrame],
           dimensions: list[str]) -> None:
    runs = frame[frame["design"] == SEARCH]
    searched = [d for d in dimensions if d in runs]
    budget = common_budget({r: curves[r] for r in runs["run_id"] if r in curves})
    lines = ["## Search",
             "These trials come from a search: every setting varied at once, the searcher sampled where earlier "
             "trials did well, and the scheduler stopped trials at different epochs. So there are no per-setting "
             "means here: they would mix whatever else came with each setting, and budgets. The tables describe "
             "where the searcher looked, compared at one common budget. For the effect of a setting with an "
             "interval, run `python sweeps/architecture_ablation.py --design one-at-a-time "
             f"--base-from-experiment {report.title}`."]
    if budget is None:
        report.sections.append("\n\n".join(lines + ["No trial logged an epoch yet."]))
        return
    compared = at_budget(runs, curves, budget, searched)
    target = f"val_acc@{budget}"
    left_out = len(runs) - len(compared)
    lines.append(f"Common budget: epoch {budget}, the epoch every trial with a logged epoch reached "
                 f"({len(compared)} trials; {left_out} left out: diverged or ended before their first epoch).")
    if compared.empty:
        report.sections.append("\n\n".join(lines))
        return
    top = compared.sort_values(target, ascending=False).head(TOP_TRIALS)
    report.tables["search_top_trials"] = top
    lines += [f"### Top trials by validation accuracy at epoch {budget}",
              top.drop(columns=["run_id"]).to_markdown(index=False, floatfmt=".4g")]
    if len(compared) < MIN_TRIALS_FOR_IMPORTANCE or compared[target].nunique() < 2:
        lines.append(f"Too few trials ({len(compared)}) to estimate the importance of the dimensions "
                     f"(at least {MIN_TRIALS_FOR_IMPORTANCE} with different results).")
    else:
        ranked, dependence = importance(compared, searched, target)
        report.tables["search_importance"] = ranked
        lines += [f"### Importance of each dimension for validation accuracy at epoch {budget}",
                  f"Permutation importance (scikit-learn; mean and sd over 30 permutations) in a random forest "
                  f"fitted to the {len(compared)} trials: how much the fit's R² drops when a dimension is shuffled. "
                  "It describes these trials, not an effect under control; with few trials it is noisy.",
                  ranked.to_markdown(index=False, floatfmt=".3g")]
        report.figures.append(plots.importance_bars(ranked, out / "search_importance.png",
                                                    f"importance for val_acc at epoch {budget}"))
        report.figures.append(plots.partial_dependence(dependence, out / "search_partial_dependence.png", target))
    report.sections.append("\n\n".join(lines))


# -- the solver re-evaluation ---------------------------------------------------------------------


def solver_reevaluation(frame: pd.DataFrame, report: Report, out: Path) -> None:
    rows = []
    for name, _, _ in REEVALUATION_SOLVERS:
        acc, nfe = reevaluation_metric("acc", name), reevaluation_metric("fnfe", name)
        if acc not in frame or frame[acc].notna().sum() == 0:
            continue
        covered = frame[frame[acc].notna() | frame[nfe].notna()] if nfe in frame else frame[frame[acc].notna()]
        accuracy, fnfe = mean_interval(covered[acc].tolist()), mean_interval(covered[nfe].tolist() if nfe in covered else [])
        rows.append({"solver": name, "runs": len(covered), "failed": int(covered[acc].isna().sum()),
                     "test acc %": accuracy.format(100.0), "FNFE": fnfe.format(),
                     "acc_mean": accuracy.mean, "acc_low": accuracy.low, "acc_high": accuracy.high,
                     "fnfe_mean": fnfe.mean, "fnfe_low": fnfe.low, "fnfe_high": fnfe.high})
    if not rows:
        return
    table = pd.DataFrame(rows)
    report.tables["solver_reevaluation"] = table
    report.sections.append("\n\n".join([
        "## Evaluation solver and tolerance",
        "Each finished ODE run's best weights evaluated on the test set with each solver; mean and 95% "
        "t-interval over the runs (different settings: this shows the spread across the experiment, not an "
        "effect of one setting).",
        table[["solver", "runs", "failed", "test acc %", "FNFE"]].to_markdown(index=False)]))
    report.figures.append(plots.interval_bars(
        table["solver"].tolist(), [Interval(r.acc_mean, r.acc_low, r.acc_high, 2) for r in table.itertuples()],
        out / "test_acc_by_evaluation_solver.png", "test accuracy by evaluation solver (mean, 95% interval)",
        "test accuracy"))


# -- the whole report ---------------------------------------------------------------------------------


def build(experiment: str, out_dir: Path, parent=None) -> Report:
    """Every section the experiment's designs allow, with its tables and figures in `out_dir`;
    `parent` is the sweep's parent run (parent_run), which says what was searched."""
    frame = load_runs(experiment)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = frame["status"].value_counts()
    report = Report(experiment)
    designs = list(dict.fromkeys(frame["design"]))
    report.sections.append(
        f"{len(frame)} runs ({counts.get('FINISHED', 0)} finished, {counts.get('FAILED', 0)} failed, "
        f"{counts.get('KILLED', 0)} stopped early); design(s): {', '.join(designs)}. An interval [low, high] is a "
        "95% confidence interval over seeds: with few seeds it is wide, and a difference whose interval includes 0 "
        "is reported as not detectable, whatever its mean.")
    if ONE_AT_A_TIME in designs:
        oat = frame[frame["design"] == ONE_AT_A_TIME]
        one_at_a_time(frame, report, out_dir, histories(oat["run_id"], keys=("fnfe", "bnfe")))
    if PARAMETER_EFFICIENCY in designs:
        parameter_efficiency(frame, report, out_dir)
    if SEARCH in designs:
        runs = frame[frame["design"] == SEARCH]
        search(frame, report, out_dir, histories(runs["run_id"]), searched_dimensions(parent, frame))
    solver_reevaluation(frame, report, out_dir)
    return report


def searched_dimensions(parent, frame: pd.DataFrame) -> list[str]:
    """The dimensions the sweep searched (from its parent run), else every param that varies."""
    if parent is not None and "search_space" in parent.data.params:
        try:
            return [d for d in json.loads(parent.data.params["search_space"]) if d in frame]
        except ValueError:
            pass
    constant = {"run_id", "status", "seed"}
    return [c for c in frame.columns if c not in constant and frame[c].dtype == object and frame[c].nunique() > 1
            and c not in ("design", "ablated_dimension", "ablated_value", "failure_cause", "stopped_by")]


def main(experiment: str, out_dir: str | None = None) -> str:
    """Write the report to `out_dir` (default reports/EXPERIMENT), log it to the experiment's parent
    run, and return its markdown."""
    folder = Path(out_dir or Path("reports") / experiment)
    parent = find_parent_run(experiment)
    report = build(experiment, folder, parent)
    text = report.markdown()
    (folder / "report.md").write_text(text)
    for name, table in report.tables.items():
        table.to_csv(folder / f"{name}.csv", index=False)
    where = f"written to {folder}/ (report.md, {len(report.tables)} CSV tables, {len(report.figures)} figures)"
    if parent is not None:
        tracking.client().log_artifacts(parent.info.run_id, str(folder), artifact_path=ARTIFACT_PATH)
        where += f"; logged to the parent run {parent.info.run_id} under {ARTIFACT_PATH}/"
    return text + "\n" + where
