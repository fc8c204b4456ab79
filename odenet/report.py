"""`odenet report`: what an experiment's runs answer, compared only like with like.

The design tag each child run carries decides what may be compared, and each sweep (parent
run) is reported on its own, so seeds of two sweeps are never pooled:

- one-at-a-time and parameter-efficiency runs differ from their base in one setting (or the
  model), over seeds: per value, accuracy over seeds (range for 3 seeds or fewer, logit-scale
  interval otherwise), FNFE/BNFE at one fixed epoch, and the difference in test accuracy to the
  base paired by seed. Error is controlled over every such comparison in the report (one
  family, Holm; odenet.stats), divergence is compared seed by seed (exact McNemar, its own Holm
  family), and a verdict says in how many finished seeds it rests and how many diverged;
- search runs vary every setting at once where the searcher found promise, and ASHA stops
  them at different epochs: no per-setting means, only the top trials and each dimension's
  out-of-sample importance, at one budget that diverged or unfinished trials never set.

The report (markdown, CSV, PNG) goes to `--out` and onto the experiment's parent run in MLflow.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from odenet import plots, progress, tracking, tradeoffs
from odenet.evaluate import REEVALUATION_SOLVERS
from odenet.failures import Diverged
from odenet.stats import (ALPHA, MIN_PAIRS, RANGE_UP_TO, Interval, Paired, accuracy_interval, holm, mean_interval,
                          paired_outcomes, paired_test, verdict)
from odenet.summary import at_epoch, reevaluation_metric, summarize
from odenet.sweep_record import PARENT, ROLE_TAG, find_parent_run

# The designs a run's `design` tag names, and the `ablated_dimension` of a one-at-a-time base
# cell: the sweeps write them (sweeps/designs.py), the report reads them.
SEARCH, ONE_AT_A_TIME, PARAMETER_EFFICIENCY = "search", "one-at-a-time", "parameter-efficiency"
BASE = tradeoffs.BASE_CELL
# Numbers logged as params, read back as numbers.
NUMERIC_PARAMS = ("stride", "final_time", "augment_dims", "lr", "weight_decay", "width", "seed", "subset",
                  "test_subset")
# Dimensions whose values span decades: analysed and drawn on a log10 scale.
LOG_SCALE = ("lr", "weight_decay")
# Both data sets' full test sets hold 10,000 images; a run with test_subset used fewer.
FULL_TEST_IMAGES = 10_000
# Parameter efficiency compares every model with this one, on each data set.
BASE_MODEL = "odenet-simple"
TOP_TRIALS = 10
MIN_TRIALS_FOR_IMPORTANCE = 5
# The search budget: the largest epoch that at least this share of the eligible trials reached.
BUDGET_SHARE = 0.75
# Below this out-of-bag R² the forest predicts the trials' accuracy too poorly to rank dimensions.
MIN_FIT_R2 = 0.1
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

    def add(self, section: tradeoffs.Section) -> None:
        """A section built elsewhere (odenet.tradeoffs), with its tables and figures."""
        self.sections.append(section.markdown)
        self.tables.update(section.tables)
        self.figures.extend(section.figures)


# -- the runs ------------------------------------------------------------------------------------


def load_runs(experiment: str) -> pd.DataFrame:
    """One row per trial run (sweep parent runs left out): params, final metrics, the tags that
    say how it was designed, and `sweep` (its parent run's name, or id) as plain columns."""
    import mlflow

    tracking.check_server()
    # through the environment, not mlflow.set_tracking_uri: that global outlives the report and
    # would send whatever this process logs next to this store, whatever MLFLOW_TRACKING_URI says
    tracking.pin_embedded_store()
    raw = mlflow.search_runs(experiment_names=[experiment], max_results=50_000)
    if raw.empty:
        raise tracking.TrackingError(f"experiment {experiment!r} has no runs at {tracking.tracking_uri()}")
    names = {}
    if f"tags.{ROLE_TAG}" in raw:
        parents = raw[raw[f"tags.{ROLE_TAG}"] == PARENT]
        names = dict(zip(parents["run_id"], parents.get("tags.mlflow.runName", parents["run_id"])))
        raw = raw[raw[f"tags.{ROLE_TAG}"] != PARENT]
    if raw.empty:
        raise tracking.TrackingError(f"experiment {experiment!r} has no trial runs yet, only its sweep's parent run")
    raw = raw.sort_values("start_time")  # tables list dimensions and values in the order they ran
    frame = pd.DataFrame({"run_id": raw["run_id"], "status": raw["status"]})
    parent_ids = raw.get("tags.mlflow.parentRunId", pd.Series(index=raw.index, dtype=object)).fillna("")
    frame["sweep_id"] = parent_ids
    frame["sweep"] = [str(names.get(p) or p or "(no sweep)") for p in parent_ids]
    for column in raw.columns:
        if column.startswith("params."):
            frame[column[len("params."):]] = raw[column]
        elif column.startswith("metrics."):
            frame[column[len("metrics."):]] = raw[column]
    for tag, default in (("design", SEARCH), ("ablated_dimension", ""), ("ablated_value", ""),
                         ("failure_cause", ""), ("stopped_by", ""), ("device_model", "")):
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


def test_images(frame: pd.DataFrame) -> int:
    """The test set's size N for these runs: accuracies move in steps of 1/N."""
    sizes = frame["test_subset"].dropna() if "test_subset" in frame else pd.Series(dtype=float)
    return int(sizes.min()) if len(sizes) else FULL_TEST_IMAGES


def histories(run_ids, keys=("val_loss", "val_acc", "fnfe", "bnfe", "epoch_time_s")) -> dict[str, pd.DataFrame]:
    """Each run's per-epoch metrics (step = epoch), as logged."""
    c = tracking.client()
    out = {}
    for run_id in progress.tracked(list(run_ids), "fetching per-epoch metrics", "runs"):
        columns = {key: {m.step: m.value for m in c.get_metric_history(run_id, key)} for key in keys}
        if any(columns.values()):
            out[run_id] = pd.DataFrame(columns).rename_axis("epoch").reset_index().sort_values("epoch")
    return out


def numeric_values(values) -> pd.Series | None:
    """The values as numbers when every one is a number, else None (a category)."""
    numbers = pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce")
    return numbers if len(numbers) and numbers.notna().all() else None


def value_order(values) -> list:
    """Values in numeric order when they are all numbers (1, 2, 5, 10, not 1, 10, 2, 5), else as given."""
    values = list(values)
    numbers = numeric_values(values)
    if numbers is None:
        return values
    return [v for _, v in sorted(zip(numbers, values), key=lambda pair: pair[0])]


# -- controlled comparisons: one-at-a-time and parameter efficiency ------------------------------


@dataclass
class Comparison:
    """One table of values compared with one base, computed before the report's family is
    adjusted; `render` writes it once the Holm levels are known."""

    key: str
    heading: str
    dimension: str  # what varies: a setting, or "model"
    base: str
    groups: dict[str, pd.DataFrame]
    table: pd.DataFrame
    curves: dict[str, dict[str, pd.DataFrame]]  # value -> run_id -> per-epoch history
    extra: tuple[str, ...] = ()


DIFF = "Δ test acc vs base, points"


def nfe_epoch(groups: dict[str, pd.DataFrame], curves: dict[str, pd.DataFrame]) -> int | None:
    """The last epoch every finished run of the table reached: FNFE and BNFE compare there."""
    reached = [int(curves[r]["epoch"].max()) for runs in groups.values() for r in finished(runs)["run_id"]
               if r in curves and not curves[r].empty]
    return min(reached) if reached else None


def comparison_table(groups: dict[str, pd.DataFrame], base: str, curves: dict[str, pd.DataFrame] | None = None,
                     extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per value: seeds run, finished and diverged (with causes); test accuracy over the
    finished seeds (accuracy_interval); test loss and epoch time (95% t-interval over seeds); FNFE
    and BNFE at one fixed epoch; and, against `base`, the paired test of the test-accuracy
    difference and the exact test of paired divergence, not yet adjusted (adjust() does that)."""
    curves = curves or {}
    base_runs = groups.get(base)
    epoch = nfe_epoch(groups, curves)
    resolution = 1 / test_images(pd.concat(list(groups.values()))) if groups else 1 / FULL_TEST_IMAGES
    rows = []
    for value, runs in groups.items():
        done, failed = finished(runs), diverged(runs)
        causes = ", ".join(f"{c} x{n}" for c, n in failed["failure_cause"].value_counts().items())
        row = {"value": value, "seeds finished": f"{len(done)} of {runs['seed'].nunique()}",
               "diverged": f"{len(failed)}" + (f" ({causes})" if causes else "")}
        for column in extra:
            row[column] = done[column].mean() if column in done and len(done) else math.nan
        accuracy = accuracy_interval(done["test_acc"].tolist() if "test_acc" in done else [], resolution)
        row["test acc %"] = accuracy.format(100.0)
        row["test_acc_mean"], row["test_acc_low"], row["test_acc_high"] = accuracy.mean, accuracy.low, accuracy.high
        for metric, label in (("test_loss", "test loss"), ("mean_epoch_time_s", "epoch time s"), ("epochs", "epochs")):
            row[label] = mean_interval(done[metric].tolist() if metric in done else []).format()
        if epoch is not None:
            at = [at_epoch(curves[r], epoch) for r in done["run_id"] if r in curves]
            for key in ("fnfe", "bnfe"):
                row[f"{key.upper()} at epoch {epoch}"] = mean_interval([a[key] for a in at]).format()
        row.update(_against_base(runs, base_runs, resolution) if value != base and base_runs is not None
                   else {DIFF: "base" if value == base else ""})
        rows.append(row)
    return pd.DataFrame(rows)


def _against_base(runs: pd.DataFrame, base_runs: pd.DataFrame, resolution: float) -> dict:
    """The seed-by-seed comparison of one value's runs with the base's: both finished for the
    accuracy difference; every seed both ran for divergence."""
    def by_seed(frame):
        return frame.drop_duplicates("seed", keep="last").set_index("seed")

    mine, theirs = by_seed(runs), by_seed(base_runs)
    seeds = mine.index.intersection(theirs.index)
    accuracy = lambda frame: [float(a) if s == "FINISHED" else math.nan  # noqa: E731
                              for a, s in zip(frame.loc[seeds].get("test_acc", pd.Series(math.nan, seeds)),
                                              frame.loc[seeds, "status"])]
    paired = paired_test(accuracy(mine), accuracy(theirs), resolution)
    failed_here = mine.loc[seeds, "failure_cause"].isin(Diverged.CAUSES).to_numpy()
    failed_base = theirs.loc[seeds, "failure_cause"].isin(Diverged.CAUSES).to_numpy()
    return {"pairs": len(seeds), "diff_n": paired.n, "diverged_here": int(failed_here.sum()),
            "diverged_base": int(failed_base.sum()), "diff_mean": paired.mean, "diff_se": paired.se,
            "diff_dof": paired.dof, "diff_p": paired.p, "not_estimable": paired.not_estimable,
            "diverged_p": paired_outcomes(failed_here, failed_base)}


def adjust(comparisons: list[Comparison]) -> int:
    """Holm over every accuracy difference in the report (one family), and separately over every
    paired-divergence test; each row gets its adjusted p, its interval at the level Holm used,
    and its verdict. Returns the family's size (estimable comparisons)."""
    rows = [(c, i) for c in comparisons if "pairs" in c.table for i in c.table.index
            if not pd.isna(c.table.at[i, "pairs"])]
    if not rows:
        return 0
    p = [c.table.at[i, "diff_p"] for c, i in rows]
    adjusted, levels = holm(p)
    diverged_adjusted, _ = holm([c.table.at[i, "diverged_p"] for c, i in rows])
    for (c, i), p_holm, level, p_diverged in zip(rows, adjusted, levels, diverged_adjusted):
        row = c.table.loc[i]
        paired = Paired(row["diff_mean"], row["diff_se"], int(row["diff_dof"]), row["diff_p"], int(row["diff_n"]),
                        row["not_estimable"] or "")
        interval = paired.interval(level)
        said = verdict(paired, p_holm, interval)
        n, k = int(row["pairs"]), int(row["diff_n"])
        said += (f"; in {k} of {n} seeds that finished; {int(row['diverged_here'])} diverged "
                 f"({int(row['diverged_base'])} in the base)")
        for column, value in (("diff_holm_p", p_holm), ("diff_level", level), ("diff_low", interval.low),
                              ("diff_high", interval.high), ("diverged_holm_p", p_diverged), ("verdict", said)):
            c.table.loc[i, column] = value
        c.table.loc[i, DIFF] = interval.format(100.0, 2) if not paired.not_estimable else (
            f"{paired.mean * 100:.2g} (not estimable)" if not math.isnan(paired.mean) else "")
        c.table.loc[i, "divergence vs base (Holm p)"] = f"{p_diverged:.2g}"
    return sum(1 for x in p if not pd.isna(x))


SHOWN = ("value", "seeds finished", "diverged", "test acc %", "test loss", "epoch time s", "epochs")


def _shown(table: pd.DataFrame, extra: tuple[str, ...] = ()) -> str:
    nfe = [c for c in table.columns if c.startswith(("FNFE at", "BNFE at"))]
    columns = [c for c in [*SHOWN[:3], *extra, *SHOWN[3:], *nfe, DIFF, "divergence vs base (Holm p)", "verdict"]
               if c in table]
    return table[columns].fillna("").to_markdown(index=False, floatfmt=".4g")


def render(comparison: Comparison, report: Report, out: Path) -> list[str]:
    """A compared table's markdown and its two figures: the paired effects with the table's
    intervals, and the per-epoch FNFE, BNFE and validation accuracy per value."""
    table = comparison.table
    report.tables[comparison.key] = table
    lines = [comparison.heading, _shown(table, comparison.extra)]
    effects = []
    for row in table.itertuples():
        if row.value == comparison.base:
            continue
        effects.append((row.value, getattr(row, "diff_mean", math.nan), getattr(row, "diff_low", math.nan),
                        getattr(row, "diff_high", math.nan)))
    base_value = comparison.base.removesuffix(" (base)")
    report.figures.append(plots.paired_effects(
        effects, base_value, out / f"effect_{comparison.key}.png", comparison.dimension,
        log=comparison.dimension in LOG_SCALE,
        title="Δ test accuracy vs base: paired by seed, Holm-level interval"))
    if any(comparison.curves.values()):
        diverged_ids = set(pd.concat(list(comparison.groups.values())).pipe(diverged)["run_id"])
        finished_ids = set(pd.concat(list(comparison.groups.values())).pipe(finished)["run_id"])
        report.figures.append(plots.per_epoch_panels(
            comparison.curves, finished_ids, diverged_ids, out / f"per_epoch_{comparison.key}.png",
            f"per epoch by {comparison.dimension}"))
    return lines


def _curves_by_value(groups: dict[str, pd.DataFrame], curves: dict[str, pd.DataFrame]) -> dict:
    return {value: {r: curves[r] for r in runs["run_id"] if r in curves} for value, runs in groups.items()}


def one_at_a_time(runs: pd.DataFrame, scope: str, curves: dict[str, pd.DataFrame]) -> tuple[list[str], list]:
    """The one-at-a-time section's opening lines and its comparisons (one per ablated dimension)."""
    base_runs = runs[runs["ablated_dimension"] == BASE]
    dimensions = [d for d in dict.fromkeys(runs["ablated_dimension"]) if d != BASE]
    lines = [f"## One-at-a-time ablation{scope}",
             f"{len(runs)} runs: a base cell and {len(dimensions)} ablated dimension(s), each cell over "
             f"{runs['seed'].nunique()} seed(s)."]
    if base_runs.empty:
        lines.append("No base cell was logged: the differences cannot be computed.")
    comparisons = []
    for dimension in dimensions:
        cells = runs[runs["ablated_dimension"] == dimension]
        base_value = str(base_runs[dimension].iloc[0]) if not base_runs.empty and dimension in base_runs else BASE
        base_label = f"{base_value} (base)"
        # Values as the runs logged them (params), so the base's and the cells' read alike;
        # numbers in numeric order, the base in its place among them.
        logged = cells[dimension].astype(str) if dimension in cells else cells["ablated_value"]
        values = value_order([*logged.unique(), base_value] if not base_runs.empty else logged.unique())
        groups = {}
        for value in values:
            if value == base_value and not base_runs.empty and value not in set(logged):
                groups[base_label] = base_runs
            elif value in set(logged):
                groups[str(value)] = cells[logged == value]
        table = comparison_table(groups, base_label, curves)
        comparisons.append(Comparison(f"{_key(scope)}one_at_a_time_{dimension}", f"### {dimension}", dimension,
                                      base_label, groups, table, _curves_by_value(groups, curves)))
    return lines, comparisons


def parameter_efficiency(runs: pd.DataFrame, scope: str, curves: dict[str, pd.DataFrame]) -> tuple[list[str], list]:
    extra = ("params_total", "params_outside_head")
    # --widths: models compare with each other at one width; the curve over widths is its own section
    widths = (runs["width"].map(lambda w: "study's" if pd.isna(w) else f"{w:g}") if "width" in runs
              else pd.Series("study's", runs.index))
    several = widths.nunique() > 1
    lines = [f"## Parameter efficiency{scope}",
             f"Each model trained over {runs['seed'].nunique()} seed(s) with the same settings, compared with "
             f"{BASE_MODEL} seed by seed" + (f" at each of {widths.nunique()} widths." if several else ".")]
    comparisons = []
    for (dataset, width), on_dataset in runs.groupby(["dataset", widths], sort=False):
        models = list(dict.fromkeys(on_dataset["model"]))
        base = BASE_MODEL if BASE_MODEL in models else models[0]
        groups = {model: on_dataset[on_dataset["model"] == model] for model in [base] + [m for m in models if m != base]}
        table = comparison_table(groups, base, curves, extra=extra)
        name = f"{dataset}_width{width}" if several else dataset
        heading = f"### {dataset}, width {width}" if several else f"### {dataset}"
        comparisons.append(Comparison(f"{_key(scope)}parameter_efficiency_{name}", heading, "model",
                                      base, groups, table, _curves_by_value(groups, curves), extra))
    return lines, comparisons


def intervals_note(family: int, n_images: int) -> str:
    """What every interval in the controlled tables is, in one paragraph."""
    return (f"How to read these tables. `test acc %`: mean over the seeds that finished, with the range (min, max) "
            f"for {RANGE_UP_TO} seeds or fewer and a 95% t-interval on the logit scale otherwise (so it stays "
            f"inside 0-100). `{DIFF}`: the mean paired difference (same seed) with a paired t-interval (n-1 degrees "
            f"of freedom) at the level Holm's method used for it, the family being all {family} estimable "
            f"accuracy comparisons in this report: a direction is claimed only where the Holm-adjusted p is below "
            f"{ALPHA:g}, which is exactly where that interval excludes 0. No verdict rests on fewer than "
            f"{MIN_PAIRS} seeds where both runs finished, and none where the differences vary by less than one "
            f"test image in {n_images}. Divergence is compared seed by seed (exact McNemar test, Holm over the "
            "same comparisons). FNFE and BNFE are per-batch means at the stated epoch, mean and 95% t-interval "
            f"over finished seeds; test loss and epoch time likewise. Every interval is conditional on one test "
            f"set of {n_images} images: it covers seed-to-seed variation, not a new test set.")


# -- search: where the searcher looked, at one budget ----------------------------------------------


def left_out_reason(run, history: pd.DataFrame | None) -> str:
    """Why a search trial cannot set or take part in the budget, or "" when it can."""
    if run.failure_cause in Diverged.CAUSES:
        return f"diverged ({run.failure_cause})"
    if run.status == "RUNNING":
        return "still running"
    if run.status == "FAILED":
        return f"failed ({run.failure_cause or 'error'})"
    if history is None or history.empty:
        return "no epoch logged"
    return ""


def search_budget(runs: pd.DataFrame, curves: dict[str, pd.DataFrame]) -> tuple[int | None, pd.DataFrame]:
    """The budget (the largest epoch that at least BUDGET_SHARE of the eligible trials reached:
    finished, or stopped by the scheduler) and every trial left out, with why."""
    left, reached = [], {}
    for run in runs.itertuples():
        history = curves.get(run.run_id)
        reason = left_out_reason(run, history)
        if reason:
            epochs = int(history["epoch"].max()) if history is not None and not history.empty else 0
            left.append({"run_id": run.run_id, "status": run.status, "epochs": epochs, "why": reason})
        else:
            reached[run.run_id] = int(history["epoch"].max())
    budget = None
    if reached:
        epochs = np.array(sorted(reached.values()))
        budget = int(max(e for e in epochs if np.mean(epochs >= e) >= BUDGET_SHARE))
        for run_id, epochs_run in reached.items():
            if epochs_run < budget:
                status = runs.loc[runs["run_id"] == run_id, "status"].iloc[0]
                left.append({"run_id": run_id, "status": status, "epochs": epochs_run,
                             "why": f"stopped at epoch {epochs_run}, before the budget"})
    return budget, pd.DataFrame(left, columns=["run_id", "status", "epochs", "why"])


def at_budget(runs: pd.DataFrame, curves: dict[str, pd.DataFrame], budget: int, dimensions: list[str],
              left_out: pd.DataFrame) -> pd.DataFrame:
    """Each compared trial's settings and its summary as if it had stopped at `budget` epochs."""
    rows = []
    for run in runs.itertuples():
        history = curves.get(run.run_id)
        if run.run_id in set(left_out["run_id"]) or history is None or history["epoch"].max() < budget:
            continue
        at = summarize(history, up_to_epoch=budget)
        val_acc = float(history.loc[history["epoch"] == budget, "val_acc"].iloc[0])
        rows.append({"run_id": run.run_id, **{d: getattr(run, d) for d in dimensions},
                     f"val_acc@{budget}": val_acc, f"best_val_acc@{budget}": at["best_val_acc"],
                     "status": run.status, "test_acc (finished only)": getattr(run, "test_acc", math.nan)})
    return pd.DataFrame(rows)


def encode(table: pd.DataFrame, dimensions: list[str]) -> tuple[pd.DataFrame, dict[str, str]]:
    """The searched dimensions that vary, as a forest's inputs: numbers as numbers (log10 for
    LOG_SCALE), true categories as category codes. Returns the inputs and each one's kind:
    "log10", "number" or "category"."""
    X, kinds = pd.DataFrame(index=table.index), {}
    for d in dimensions:
        if table[d].astype(str).nunique() < 2:
            continue
        numbers = numeric_values(table[d])
        if numbers is not None:
            numbers.index = table.index
            log = d in LOG_SCALE and (numbers > 0).all()
            X[d] = np.log10(numbers.astype(float)) if log else numbers.astype(float)
            kinds[d] = "log10" if log else "number"
        else:
            X[d] = pd.Categorical(table[d].astype(str)).codes
            kinds[d] = "category"
    return X, kinds


def importance(table: pd.DataFrame, dimensions: list[str], target: str) -> tuple[pd.DataFrame, dict, float]:
    """Each dimension's importance for `target`, out of sample, and the forest's fit quality.

    A random forest (scikit-learn) is fitted to the trials; its out-of-bag R² says whether it
    predicts the target at all. Importance is permutation importance on held-out folds (5-fold
    cross-validation): the rise in held-out squared error when a dimension is shuffled, as a share
    of the target's variance (a drop in held-out R²). Returns the ranking, each dimension's
    partial dependence with trial counts, and the out-of-bag R²."""
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.inspection import partial_dependence, permutation_importance
    from sklearn.model_selection import KFold

    X, kinds = encode(table, dimensions)
    y = table[target].to_numpy(dtype=float)

    def forest():
        return RandomForestRegressor(n_estimators=200, oob_score=True, random_state=0)

    fitted = forest().fit(X, y)
    variance = float(np.var(y)) or 1.0
    folds = KFold(n_splits=min(5, len(y)), shuffle=True, random_state=0)
    drops = []
    for train, test in folds.split(X):
        model = forest().fit(X.iloc[train], y[train])
        result = permutation_importance(model, X.iloc[test], y[test], n_repeats=10, random_state=0,
                                        scoring="neg_mean_squared_error")
        drops.append(result.importances_mean / variance)
    drops = np.array(drops)
    ranked = pd.DataFrame({"dimension": list(X.columns), "importance": drops.mean(axis=0),
                           "sd over folds": drops.std(axis=0, ddof=1)}).sort_values("importance", ascending=False)
    dependence = {}
    categorical = [kinds[d] == "category" for d in X.columns]
    for i, d in enumerate(X.columns):
        result = partial_dependence(fitted, X, [i], categorical_features=categorical, kind="average",
                                    grid_resolution=100)
        grid = np.asarray(result["grid_values"][0], dtype=float)
        if kinds[d] == "category":
            categories = pd.Categorical(table[d].astype(str)).categories
            labels = [str(categories[int(g)]) for g in grid]
            counts = [int((X[d] == int(g)).sum()) for g in grid]
            x = [str(categories[int(c)]) for c in X[d]]
        else:
            labels = list(10 ** grid if kinds[d] == "log10" else grid)
            counts = [int(np.isclose(X[d], g).sum()) for g in grid]
            x = list(10 ** X[d] if kinds[d] == "log10" else X[d])
        dependence[d] = {"grid": labels, "average": list(result["average"][0]), "counts": counts, "x": x,
                         "y": list(y), "kind": kinds[d]}
    return ranked.reset_index(drop=True), dependence, float(fitted.oob_score_)


def search(runs: pd.DataFrame, report: Report, out: Path, curves: dict[str, pd.DataFrame], dimensions: list[str],
           scope: str = "") -> None:
    searched = [d for d in dimensions if d in runs]
    key = _key(scope)
    budget, left_out = search_budget(runs, curves)
    lines = [f"## Search{scope}",
             "These trials come from a search: every setting varied at once, the searcher sampled where earlier "
             "trials did well, and the scheduler stopped trials at different epochs. So there are no per-setting "
             "means here: they would mix whatever else came with each setting, and budgets. The tables describe "
             "where the searcher looked, compared at one budget; they carry no intervals. For the effect of a "
             "setting with an interval, run `python sweeps/architecture_ablation.py --design one-at-a-time "
             f"--base-from-experiment {report.title}`."]
    if budget is None:
        if not left_out.empty:
            report.tables[f"{key}search_left_out"] = left_out
            lines += ["Trials left out:", left_out.to_markdown(index=False)]
        report.sections.append("\n\n".join(lines + ["No finished or scheduler-stopped trial logged an epoch yet."]))
        return
    compared = at_budget(runs, curves, budget, searched, left_out)
    target = f"val_acc@{budget}"
    eligible = len(compared) + int(left_out["why"].str.startswith("stopped at").sum())
    lines.append(f"Budget: epoch {budget}, the largest epoch that at least {BUDGET_SHARE:.0%} of the {eligible} "
                 f"eligible trials (finished, or stopped by the scheduler) reached; {len(compared)} trials compare "
                 f"there. Diverged, failed and still-running trials never set the budget and are not ranked. Where "
                 "a scheduler (ASHA) promoted trials past a rung, those compared at a later epoch are the ones it "
                 "found promising: a selected subset, not a sample of the space.")
    if not left_out.empty:
        report.tables[f"{key}search_left_out"] = left_out
        lines += [f"{len(left_out)} trial(s) left out, and why:", left_out.to_markdown(index=False)]
    if compared.empty:
        report.sections.append("\n\n".join(lines))
        return
    top = compared.sort_values(target, ascending=False).head(TOP_TRIALS)
    report.tables[f"{key}search_top_trials"] = top
    lines += [f"### Top trials by validation accuracy at epoch {budget}",
              top.drop(columns=["run_id"]).to_markdown(index=False, floatfmt=".4g")]
    heading = f"### Importance of each dimension for validation accuracy at epoch {budget}"
    if len(compared) < MIN_TRIALS_FOR_IMPORTANCE or compared[target].nunique() < 2:
        lines += [heading, f"Too few trials ({len(compared)}) to estimate the importance of the dimensions "
                           f"(at least {MIN_TRIALS_FOR_IMPORTANCE} with different results)."]
        report.sections.append("\n\n".join(lines))
        return
    ranked, dependence, oob_r2 = importance(compared, searched, target)
    fit = (f"Fit quality: a random forest (scikit-learn, 200 trees) on the {len(compared)} trials predicts "
           f"{target} with an out-of-bag R² of {oob_r2:.2f}.")
    lines.append(heading)
    if oob_r2 < MIN_FIT_R2:
        lines.append(f"{fit} Below {MIN_FIT_R2}: the forest predicts these trials no better than their mean, so the "
                     f"trials are too few (or too noisy) to rank the dimensions; no ranking is given.")
    else:
        report.tables[f"{key}search_importance"] = ranked
        lines += [f"{fit} Importance: the drop in held-out R² when a dimension is shuffled (permutation "
                  "importance on 5-fold cross-validation, 10 shuffles each; mean and sd over folds). Numeric "
                  "dimensions enter as numbers (log10 for lr and weight_decay), categories as categories. It "
                  "describes these trials, not an effect under control.",
                  ranked.to_markdown(index=False, floatfmt=".3g")]
        report.figures.append(plots.importance_bars(ranked, out / f"{key}search_importance.png",
                                                    f"importance for val_acc at epoch {budget} "
                                                    f"(out-of-bag R² {oob_r2:.2f})"))
        # Drawn only from a forest that predicts something: otherwise its curves are noise.
        report.figures.append(plots.partial_dependence(dependence, out / f"{key}search_partial_dependence.png",
                                                       f"val accuracy at epoch {budget}", LOG_SCALE))
    report.sections.append("\n\n".join(lines))


# -- the solver re-evaluation ---------------------------------------------------------------------


def solver_reevaluation(frame: pd.DataFrame, report: Report, out: Path, scope: str = "") -> None:
    rows = []
    resolution = 1 / test_images(frame)
    for name, _, _ in REEVALUATION_SOLVERS:
        acc, nfe = reevaluation_metric("acc", name), reevaluation_metric("fnfe", name)
        if acc not in frame or frame[acc].notna().sum() == 0:
            continue
        covered = frame[frame[acc].notna() | frame[nfe].notna()] if nfe in frame else frame[frame[acc].notna()]
        accuracy = accuracy_interval(covered[acc].tolist(), resolution)
        fnfe = mean_interval(covered[nfe].tolist() if nfe in covered else [])
        rows.append({"solver": name, "runs": len(covered), "failed": int(covered[acc].isna().sum()),
                     "test acc %": accuracy.format(100.0), "FNFE": fnfe.format(),
                     "acc_mean": accuracy.mean, "acc_low": accuracy.low, "acc_high": accuracy.high,
                     "fnfe_mean": fnfe.mean, "fnfe_low": fnfe.low, "fnfe_high": fnfe.high})
    if not rows:
        return
    table = pd.DataFrame(rows)
    key = _key(scope)
    report.tables[f"{key}solver_reevaluation"] = table
    report.sections.append("\n\n".join([
        f"## Evaluation solver and tolerance{scope}",
        "Each finished ODE run's best weights evaluated on the test set with each solver. Over runs of "
        f"different settings, not seeds: `test acc %` is the mean with the range for {RANGE_UP_TO} runs or "
        "fewer, else a 95% logit-scale t-interval over runs; FNFE a 95% t-interval over runs. This shows the "
        "spread across the experiment, not an effect of one setting, and no difference is tested.",
        table[["solver", "runs", "failed", "test acc %", "FNFE"]].to_markdown(index=False)]))
    report.figures.append(plots.interval_bars(
        table["solver"].tolist(), [Interval(r.acc_mean * 100, r.acc_low * 100, r.acc_high * 100, 2)
                                   for r in table.itertuples()],
        out / f"{key}test_acc_by_evaluation_solver.png",
        "test accuracy by evaluation solver, over runs of different settings", "test accuracy, %"))


# -- the whole report ---------------------------------------------------------------------------------


def _key(scope: str) -> str:
    """A file-name prefix for a sweep's tables and figures ("" when the experiment holds one sweep)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", scope.removeprefix(" — sweep ").strip()) + "_" if scope else ""


def build(experiment: str, out_dir: Path, parent=None) -> Report:
    """Every section the experiment's designs allow, one sweep at a time, with its tables and
    figures in `out_dir`; `parent` is the most recent sweep's parent run (what was searched)."""
    frame = load_runs(experiment)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = frame["status"].value_counts()
    report = Report(experiment)
    designs = list(dict.fromkeys(frame["design"]))
    sweeps = list(dict.fromkeys(frame["sweep"]))
    report.sections.append(
        f"{len(frame)} runs ({counts.get('FINISHED', 0)} finished, {counts.get('FAILED', 0)} failed, "
        f"{counts.get('KILLED', 0)} stopped early) in {len(sweeps)} sweep(s) ({', '.join(sweeps)}); design(s): "
        f"{', '.join(designs)}." + (" Each sweep is reported on its own: seeds of different sweeps are never "
                                    "pooled or paired." if len(sweeps) > 1 else ""))
    # Sections are written after the whole report's family of comparisons is known and adjusted.
    comparisons, writers = [], []
    for sweep in sweeps:
        runs = frame[frame["sweep"] == sweep]
        scope = f" — sweep {sweep}" if len(sweeps) > 1 else ""
        controlled = runs[runs["design"].isin((ONE_AT_A_TIME, PARAMETER_EFFICIENCY))]
        curves = histories(controlled["run_id"], keys=("val_acc", "fnfe", "bnfe")) if len(controlled) else {}
        for design, section in ((ONE_AT_A_TIME, one_at_a_time), (PARAMETER_EFFICIENCY, parameter_efficiency)):
            if design in set(runs["design"]):
                lines, found = section(runs[runs["design"] == design], scope, curves)
                comparisons += found
                writers.append(lambda lines=lines, found=found: report.sections.append("\n\n".join(
                    lines + [line for c in found for line in render(c, report, out_dir)])))
        efficiency = runs[runs["design"] == PARAMETER_EFFICIENCY]
        if "width" in efficiency and efficiency["width"].nunique() > 1:
            writers.append(lambda efficiency=efficiency, scope=scope: report.add(
                tradeoffs.parameter_curves(efficiency, out_dir, BASE_MODEL, 1 / test_images(efficiency), scope,
                                           _key(scope))))
        if ONE_AT_A_TIME in set(runs["design"]):
            writers.append(lambda cells=runs[runs["design"] == ONE_AT_A_TIME], scope=scope: report.add(
                tradeoffs.one_at_a_time_cells(cells, out_dir, scope, _key(scope), 1 / test_images(cells))))
        if SEARCH in set(runs["design"]):
            searched = runs[runs["design"] == SEARCH]
            sweep_parent = _parent(runs, parent)
            dimensions = searched_dimensions(sweep_parent, frame)
            writers.append(lambda searched=searched, scope=scope, dimensions=dimensions: search(
                searched, report, out_dir, histories(searched["run_id"]), dimensions, scope))
            writers.append(lambda searched=searched, scope=scope, dimensions=dimensions, sweep_parent=sweep_parent:
                           report.add(tradeoffs.search_front(searched, out_dir, dimensions, study_points(),
                                                             tradeoffs.sweep_objectives(sweep_parent), scope,
                                                             _key(scope))))
        writers.append(lambda runs=runs, scope=scope: solver_reevaluation(runs, report, out_dir, scope))
    family = adjust(comparisons)
    if comparisons:
        report.sections.append(intervals_note(family, test_images(frame)))
    for write in writers:
        write()
    return report


def study_points() -> list[dict]:
    """The study's own settings, which a search evaluates first: marked on its Pareto front."""
    from sweeps.architecture_ablation import STUDY_POINTS  # the sweep declares them; imported late (it imports us)

    return STUDY_POINTS


def _parent(runs: pd.DataFrame, fallback):
    """The parent run of the sweep these runs belong to (for its search space)."""
    sweep_id = runs["sweep_id"].iloc[0] if "sweep_id" in runs and len(runs) else ""
    if not sweep_id:
        return fallback
    try:
        return tracking.client().get_run(sweep_id)
    except Exception:  # a parent run deleted since: fall back to the params that vary
        return fallback


def searched_dimensions(parent, frame: pd.DataFrame) -> list[str]:
    """The dimensions the sweep searched (from its parent run), else every param that varies."""
    if parent is not None and "search_space" in parent.data.params:
        try:
            return [d for d in json.loads(parent.data.params["search_space"]) if d in frame]
        except ValueError:
            pass
    constant = {"run_id", "status", "seed", "sweep", "sweep_id"}
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
