"""A run's summary, from its per-epoch history: the one place that names the summary metrics.

`odenet train`'s summary, the sweep's results table, the solver re-evaluation and the
report all read a run through these functions, so "best validation accuracy" means the
same everywhere: the validation accuracy of the epoch early stopping kept (lowest
validation loss), the weights the test set is evaluated with.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd

SUMMARY_METRICS = ("best_epoch", "epochs", "best_val_acc", "best_val_loss", "mean_epoch_time_s", "mean_fnfe",
                   "mean_bnfe")


def summarize(history: Sequence[Mapping[str, float]] | pd.DataFrame, up_to_epoch: int | None = None) -> dict[str, float]:
    """Best epoch (first lowest validation loss), epochs trained, the best epoch's validation
    accuracy and loss, and the mean epoch time, FNFE and BNFE; with `up_to_epoch`, as if the
    run had stopped there (a common budget for runs stopped at different epochs)."""
    frame = pd.DataFrame(list(history)) if not isinstance(history, pd.DataFrame) else history
    if frame.empty:
        return {}
    frame = frame.sort_values("epoch")
    if up_to_epoch is not None:
        frame = frame[frame["epoch"] <= up_to_epoch]
        if frame.empty:
            return {}
    best = frame.loc[frame["val_loss"].idxmin()] if frame["val_loss"].notna().any() else frame.iloc[-1]
    return {
        "best_epoch": int(best["epoch"]),
        "epochs": int(frame["epoch"].max()),
        "best_val_acc": float(best["val_acc"]),
        "best_val_loss": float(best["val_loss"]),
        "mean_epoch_time_s": float(frame["epoch_time_s"].mean()),
        "mean_fnfe": float(frame["fnfe"].mean()),
        "mean_bnfe": float(frame["bnfe"].mean()),
    }


def at_epoch(history: pd.DataFrame, epoch: int, keys: Sequence[str] = ("fnfe", "bnfe")) -> dict[str, float]:
    """The run's `keys` at one epoch (NaN where it did not reach it): the way to compare the cost
    of runs that trained for different numbers of epochs, since FNFE and BNFE drift as the
    dynamics learn and a mean over a run's epochs depends on how long it ran."""
    row = history[history["epoch"] == epoch] if not history.empty else history
    return {key: float(row[key].iloc[0]) if len(row) and key in row else float("nan") for key in keys}


def reevaluation_metric(kind: str, solver: str) -> str:
    """The metric a re-evaluation logs: kind 'acc' or 'fnfe', solver a REEVALUATION_SOLVERS name."""
    return f"eval_{kind}_{solver}"


# The images per batch the re-evaluation's eval_fnfe_* are means over: an adaptive solver's
# count grows with the batch (its hardest image sets the steps), so they compare at one size.
REEVALUATION_BATCH_SIZE = "eval_nfe_batch_size"


def reevaluation_metrics(table: pd.DataFrame, batch_size: int) -> dict[str, float]:
    """A re-evaluation table (solver, accuracy, fnfe) at `batch_size` images per batch as the flat
    metrics a run logs."""
    metrics = {REEVALUATION_BATCH_SIZE: batch_size}
    for row in table.itertuples():
        metrics[reevaluation_metric("acc", row.solver)] = float(row.accuracy)
        metrics[reevaluation_metric("fnfe", row.solver)] = float(row.fnfe)
    return metrics
