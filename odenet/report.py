"""The study's six tables (and figures) from the runs of an MLflow experiment."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from odenet import plots, tracking
from odenet.evaluate import REEVALUATION_SOLVERS
from odenet.failures import Diverged

NUMERIC_PARAMS = ("stride", "final_time", "augment_dims", "lr", "weight_decay", "width", "seed", "subset")
# The settings whose per-epoch FNFE/BNFE the report draws, one figure each.
CURVE_SETTINGS = ("activation_inside", "stride", "norm", "final_time")


def load_runs(experiment: str) -> pd.DataFrame:
    """One row per trial run (sweep parent runs left out), settings and metrics as plain columns."""
    import mlflow

    tracking.check_server()
    mlflow.set_tracking_uri(tracking.tracking_uri())
    raw = mlflow.search_runs(experiment_names=[experiment], max_results=50_000)
    if raw.empty:
        raise tracking.TrackingError(f"experiment {experiment!r} has no runs at {tracking.tracking_uri()}")
    if "tags.sweep_role" in raw:
        raw = raw[raw["tags.sweep_role"] != "parent"]
    frame = pd.DataFrame({"run_id": raw["run_id"], "status": raw["status"],
                          "run_name": raw.get("tags.mlflow.runName")})
    for column in raw.columns:
        if column.startswith("params."):
            frame[column[len("params."):]] = raw[column]
        elif column.startswith("metrics."):
            frame[column[len("metrics."):]] = raw[column]
    frame["failure_cause"] = raw.get("tags.failure_cause", pd.Series(index=raw.index, dtype=object)).fillna("")
    frame["stopped_by"] = raw.get("tags.stopped_by", pd.Series(index=raw.index, dtype=object)).fillna("")
    for name in NUMERIC_PARAMS:
        if name in frame:
            frame[name] = pd.to_numeric(frame[name], errors="coerce")
    # Runs stopped early by ASHA have per-epoch metrics only: their latest values stand in.
    for final, latest in (("best_val_acc", "val_acc"), ("mean_fnfe", "fnfe"), ("mean_bnfe", "bnfe"),
                          ("mean_epoch_time_s", "epoch_time_s")):
        if latest in frame:
            frame[final] = frame[final].fillna(frame[latest]) if final in frame else frame[latest]
    return frame.reset_index(drop=True)


def _aggregate(frame: pd.DataFrame, by: list[str], columns: list[str]) -> pd.DataFrame:
    present = [c for c in columns if c in frame]
    usable = frame.dropna(subset=[b for b in by if b in frame])
    if usable.empty or not all(b in frame for b in by):
        return pd.DataFrame(columns=[*by, "runs", *present])
    grouped = usable.groupby(by, dropna=False)
    table = grouped[present].mean(numeric_only=True) if present else pd.DataFrame(index=grouped.size().index)
    table.insert(0, "runs", grouped.size())
    return table.reset_index()


def tables(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The six questions the sweep answers, each as one table."""
    ok = frame[frame["status"] != "FAILED"]
    diverged = frame["failure_cause"].isin(Diverged.CAUSES)
    norm = _aggregate(frame, ["norm"], ["best_val_acc", "test_acc"])
    if not norm.empty:
        by_norm = frame.assign(diverged=diverged, underflow=frame["failure_cause"] == "underflow").groupby("norm")
        norm["diverged"] = norm["norm"].map(by_norm["diverged"].sum()).astype(int)
        norm["underflow"] = norm["norm"].map(by_norm["underflow"].sum()).astype(int)
        norm["causes"] = norm["norm"].map(by_norm["failure_cause"].agg(lambda c: ", ".join(sorted(set(c) - {""}))))
    solver_rows = []
    for name, _, _ in REEVALUATION_SOLVERS:
        acc, nfe = f"eval_acc_{name}", f"eval_fnfe_{name}"
        if acc in frame and frame[acc].notna().any():
            solver_rows.append({"solver": name, "runs": int(frame[acc].notna().sum()),
                                "accuracy": frame[acc].mean(), "fnfe": frame[nfe].mean()})
    return {
        "1. activation before and inside the block": _aggregate(
            ok, ["activation_before", "activation_inside"], ["best_val_acc", "test_acc", "test_loss", "mean_fnfe", "mean_bnfe"]),
        "2. stride": _aggregate(ok, ["stride"], ["best_val_acc", "test_acc", "mean_bnfe", "mean_epoch_time_s"]),
        "3. norm type (which ones diverge)": norm,
        "4. final time T_n": _aggregate(ok, ["final_time"], ["best_val_acc", "test_acc", "test_loss", "mean_fnfe", "mean_bnfe"]),
        "5. models and data sets": _aggregate(
            ok, ["dataset", "model"], ["test_acc", "test_loss", "params_total", "params_outside_head", "mean_epoch_time_s"]),
        "6. evaluation solver and tolerance": pd.DataFrame(solver_rows, columns=["solver", "runs", "accuracy", "fnfe"]),
    }


def figures(frame: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Accuracy against parameters and epoch time; FNFE/BNFE per epoch for each setting."""
    written = []
    finished = frame.dropna(subset=["test_acc"]) if "test_acc" in frame else frame.iloc[0:0]
    if not finished.empty:
        written.append(plots.scatter(finished, "params_total", "test_acc", "model", out_dir / "accuracy_vs_parameters.png",
                                     "test accuracy against parameters"))
        written.append(plots.scatter(finished, "mean_epoch_time_s", "test_acc", "model",
                                     out_dir / "accuracy_vs_epoch_time.png", "test accuracy against epoch time"))
    histories = _histories(frame)
    if not histories:
        return written
    for setting in CURVE_SETTINGS:
        if setting not in frame:
            continue
        for column in ("fnfe", "bnfe"):
            curves = {}
            for value, runs in frame.groupby(setting):
                per_run = [histories[r] for r in runs["run_id"] if r in histories]
                if per_run:
                    curves[f"{setting}={value}"] = pd.concat(per_run).groupby("epoch", as_index=False)[column].mean()
            if curves:
                written.append(plots.per_setting_curves(curves, column, out_dir / f"{column}_by_{setting}.png",
                                                        f"{column.upper()} per epoch by {setting}"))
    return written


def _histories(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    c = tracking.client()
    out = {}
    for run_id in frame["run_id"]:
        columns = {}
        for key in ("fnfe", "bnfe"):
            columns[key] = {m.step: m.value for m in c.get_metric_history(run_id, key)}
        if columns["fnfe"]:
            history = pd.DataFrame(columns).rename_axis("epoch").reset_index()
            out[run_id] = history
    return out


def main(experiment: str, out_dir: str | None = None) -> str:
    """The tables as markdown; with `out_dir`, also CSV files and PNG figures there."""
    frame = load_runs(experiment)
    result = tables(frame)
    lines = [f"# {experiment}: {len(frame)} runs "
             f"({(frame['status'] == 'FINISHED').sum()} finished, {(frame['status'] == 'FAILED').sum()} failed, "
             f"{(frame['status'] == 'KILLED').sum()} stopped)"]
    for title, table in result.items():
        lines += ["", f"## {title}", ""]
        lines.append(table.to_markdown(index=False, floatfmt=".4g") if not table.empty else "(no runs vary this)")
    if out_dir:
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for title, table in result.items():
            table.to_csv(folder / f"table_{title.split('.')[0]}.csv", index=False)
        frame.to_csv(folder / "runs.csv", index=False)
        written = figures(frame, folder)
        lines += ["", f"CSV tables and {len(written)} figures written to {folder}"]
    return "\n".join(lines)


