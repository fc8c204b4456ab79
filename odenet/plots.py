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


def nfe_curves(history: pd.DataFrame, path: Path, label: str = "") -> Path:
    """Mean forward and backward function evaluations per batch, per epoch."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(history["epoch"], history["fnfe"], marker="o", label=f"FNFE {label}".strip())
    ax.plot(history["epoch"], history["bnfe"], marker="s", label=f"BNFE {label}".strip())
    ax.set(xlabel="epoch", ylabel="function evaluations per batch", title="NFE per epoch")
    ax.legend()
    return _save(fig, path)


def scatter(frame: pd.DataFrame, x: str, y: str, group: str, path: Path, title: str) -> Path:
    """One marker per row, coloured by `group`: accuracy against parameters or epoch time."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in frame.groupby(group):
        ax.scatter(rows[x], rows[y], label=str(name))
    ax.set(xlabel=x, ylabel=y, title=title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def per_setting_curves(curves: dict[str, pd.DataFrame], column: str, path: Path, title: str) -> Path:
    """`column` per epoch, one line per setting (e.g. FNFE for each T_n)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, history in curves.items():
        ax.plot(history["epoch"], history[column], marker="o", label=label)
    ax.set(xlabel="epoch", ylabel=column, title=title)
    ax.legend(fontsize=6)
    return _save(fig, path)
