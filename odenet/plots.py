"""Figures a run and a report log as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: cluster pods and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, int(count), ha="center", va="center", fontsize=7,
                color="white" if count > matrix.max() / 2 else "black")
    fig.colorbar(im, ax=ax)
    ax.set_title("test confusion matrix")
    return _save(fig, path)


def learning_curves(history: pd.DataFrame, path: Path) -> Path:
    """Train/validation loss and accuracy per epoch."""
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for split in ("train", "val"):
        loss_ax.plot(history["epoch"], history[f"{split}_loss"], marker="o", label=split)
        acc_ax.plot(history["epoch"], history[f"{split}_acc"], marker="o", label=split)
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    loss_ax.legend()
    acc_ax.legend()
    return _save(fig, path)


def nfe_curves(history: pd.DataFrame, path: Path) -> Path:
    """Mean forward and backward function evaluations per batch, per epoch."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(history["epoch"], history["fnfe"], marker="o", label="FNFE")
    ax.plot(history["epoch"], history["bnfe"], marker="s", label="BNFE")
    ax.set(xlabel="epoch", ylabel="function evaluations per batch", title="NFE per epoch")
    ax.legend()
    return _save(fig, path)


def interval_bars(labels: Sequence[str], intervals: Sequence, path: Path, title: str, ylabel: str) -> Path:
    """One marker per label with its interval as an error bar (odenet.stats.Interval), in the
    intervals' own units."""
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(labels) + 2), 4))
    means = np.array([i.mean for i in intervals], dtype=float)
    low = np.array([i.low for i in intervals], dtype=float)
    high = np.array([i.high for i in intervals], dtype=float)
    errors = np.nan_to_num(np.vstack([means - low, high - means]), nan=0.0)
    ax.errorbar(range(len(labels)), means, yerr=errors, fmt="o", capsize=4)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set(ylabel=ylabel, title=title)
    return _save(fig, path)


def _positions(values: Sequence[str], log: bool) -> tuple[np.ndarray, bool]:
    """x positions for values: the numbers themselves when all are numbers (numeric order and
    spacing), else 0, 1, 2, ... for categories. Returns them and whether the axis is numeric."""
    numbers = pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce")
    if len(numbers) and numbers.notna().all() and (not log or (numbers > 0).all()):
        return numbers.to_numpy(dtype=float), True
    return np.arange(len(values), dtype=float), False


def paired_effects(effects: Sequence[tuple[str, float, float, float]], base: str, path: Path, dimension: str,
                   log: bool, title: str) -> Path:
    """Each value's paired difference in test accuracy to the base (points), with the same
    interval as the table (NaN ends: not estimable, drawn as an open marker), a zero line, and
    the base at its own place on a numeric axis (log scale for `log`)."""
    labels = [base, *[e[0] for e in effects]]
    x, numeric = _positions(labels, log)
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(labels) + 2), 4))
    ax.axhline(0, color="grey", lw=1)
    ax.plot([x[0]], [0], "D", color="black", label=f"base ({base})")
    for xi, (_, mean, low, high) in zip(x[1:], effects):
        if np.isnan(low):
            ax.plot([xi], [mean * 100], "o", mfc="none", color="C0")
        else:
            ax.errorbar([xi], [mean * 100], yerr=[[(mean - low) * 100], [(high - mean) * 100]], fmt="o", color="C0",
                        capsize=4)
    ax.plot([], [], "o", mfc="none", color="C0", label="not estimable (no interval)")
    if numeric:
        if log:
            ax.set_xscale("log")
    else:
        ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set(xlabel=dimension, ylabel="Δ test accuracy vs base, points", title=title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def per_epoch_panels(curves: dict[str, dict[str, pd.DataFrame]], finished: set, diverged: set, path: Path,
                     title: str) -> Path:
    """Per value: FNFE, BNFE and validation accuracy (%) per epoch, in separate panels, as the mean
    over finished seeds with a band from their min to max, and the number of finished seeds per
    epoch; diverged runs drawn apart as thin dotted lines."""
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    panels = (("fnfe", "FNFE per batch", 1.0), ("bnfe", "BNFE per batch", 1.0), ("val_acc", "validation accuracy, %",
                                                                                 100.0))
    for i, (value, runs) in enumerate(curves.items()):
        colour = f"C{i % 10}"
        done = [h for r, h in runs.items() if r in finished]
        for ax, (key, label, scale) in zip(axes, panels):
            if done and all(key in h for h in done):
                stacked = pd.concat(done).groupby("epoch")[key]
                mean, low, high = stacked.mean() * scale, stacked.min() * scale, stacked.max() * scale
                ax.plot(mean.index, mean, "o-", color=colour, label=value, ms=3)
                ax.fill_between(mean.index, low, high, color=colour, alpha=0.2)
            for r, h in runs.items():
                if r in diverged and key in h:
                    ax.plot(h["epoch"], h[key] * scale, ":", color=colour, lw=1)
            ax.set(xlabel="epoch", ylabel=label)
        if done:
            n = pd.concat(done).groupby("epoch")["epoch"].count()
            axes[3].step(n.index, n, where="mid", color=colour, label=value)
    axes[3].set(xlabel="epoch", ylabel="finished seeds", title="seeds per epoch")
    axes[0].plot([], [], ":", color="grey", label="diverged run")
    axes[0].legend(fontsize=6)
    for ax, (_, label, _) in zip(axes, panels):
        ax.set_title(f"{label}: mean, band min-max")
    fig.suptitle(title)
    return _save(fig, path)


def importance_bars(ranked: pd.DataFrame, path: Path, title: str) -> Path:
    """Held-out permutation importance per dimension, with its sd over folds."""
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(ranked) + 1.5))
    ax.barh(ranked["dimension"], ranked["importance"], xerr=ranked["sd over folds"].fillna(0), capsize=3)
    ax.axvline(0, color="grey", lw=1)
    ax.invert_yaxis()
    ax.set(xlabel="drop in held-out R² when shuffled", title=title)
    return _save(fig, path)


def partial_dependence(dependence: dict, path: Path, target: str, log_scale: Sequence[str] = ()) -> Path:
    """Per dimension: the forest's average prediction (partial dependence) and the trials (dots).
    Numbers on a numeric axis (log for `log_scale`) joined by a line; categories as separate
    markers, never joined; each tick or point labelled with its number of trials."""
    n = len(dependence)
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, (name, d) in zip(axes.flat, dependence.items()):
        if d["kind"] == "category":
            position = {label: i for i, label in enumerate(d["grid"])}
            ax.plot(range(len(d["grid"])), d["average"], "D", color="C1", label="partial dependence")
            ax.scatter([position[x] for x in d["x"]], d["y"], alpha=0.4, s=12, label="trials")
            ax.set_xticks(range(len(d["grid"])), [f"{g}\n(n={c})" for g, c in zip(d["grid"], d["counts"])])
        else:
            ax.plot(d["grid"], d["average"], "-", color="C1", label="partial dependence")
            ax.scatter(d["x"], d["y"], alpha=0.4, s=12, label="trials")
            if name in log_scale:
                ax.set_xscale("log")
            if len(d["grid"]) <= 8:
                for g, a, c in zip(d["grid"], d["average"], d["counts"]):
                    ax.annotate(f"n={c}", (g, a), fontsize=6, textcoords="offset points", xytext=(0, 4))
        ax.set(title=name, xlabel=name, ylabel=target)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    return _save(fig, path)
