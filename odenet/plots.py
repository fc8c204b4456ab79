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
    """One marker per value with its interval as an error bar (odenet.stats.Interval)."""
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(labels) + 2), 4))
    means = np.array([i.mean for i in intervals], dtype=float)
    low = np.array([i.low for i in intervals], dtype=float)
    high = np.array([i.high for i in intervals], dtype=float)
    errors = np.nan_to_num(np.vstack([means - low, high - means]), nan=0.0)
    ax.errorbar(range(len(labels)), means, yerr=errors, fmt="o", capsize=4)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set(ylabel=ylabel, title=title)
    return _save(fig, path)


def importance_bars(ranked: pd.DataFrame, path: Path, title: str) -> Path:
    """Permutation importance per dimension, with its standard deviation."""
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(ranked) + 1.5))
    ax.barh(ranked["dimension"], ranked["importance"], xerr=ranked["sd"], capsize=3)
    ax.invert_yaxis()
    ax.set(xlabel="drop in R² when shuffled", title=title)
    return _save(fig, path)


def partial_dependence(dependence: dict, path: Path, target: str) -> Path:
    """Per dimension: the forest's average prediction over its values (line) and the trials (dots)."""
    n = len(dependence)
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, (name, (labels, average, x, y, categorical, categories)) in zip(axes.flat, dependence.items()):
        if categorical:
            positions = range(len(labels))
            ax.plot(positions, average, "o-", label="partial dependence")
            ax.scatter(x, y, alpha=0.4, s=12, label="trials")
            ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
        else:
            grid = [float(v) for v in labels]
            ax.plot(np.log10(grid) if name in ("lr", "weight_decay") else grid, average, "-", label="partial dependence")
            ax.scatter(x, y, alpha=0.4, s=12, label="trials")
        ax.set(title=name, ylabel=target)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    return _save(fig, path)


def per_setting_curves(curves: dict[str, pd.DataFrame], path: Path, title: str) -> Path:
    """FNFE (solid) and BNFE (dashed) per epoch, one colour per setting (e.g. each T_n)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (label, history) in enumerate(curves.items()):
        colour = f"C{i % 10}"
        ax.plot(history["epoch"], history["fnfe"], "o-", color=colour, label=label)
        ax.plot(history["epoch"], history["bnfe"], "s--", color=colour)
    ax.set(xlabel="epoch", ylabel="function evaluations per batch", title=title)
    ax.legend(fontsize=6)
    return _save(fig, path)
