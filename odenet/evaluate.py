"""Evaluation: the one loop over a split (validation in training, the test set after it) and
the re-evaluation of ODE models with other solvers."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from odenet import progress
from odenet.data import Split
from odenet.failures import Diverged, solver_failures
from odenet.models import Classifier, SolverSettings, parameter_counts

# The study's check of the accuracy/cost trade-off: (name, method, tolerance).
REEVALUATION_SOLVERS = (
    ("euler", "euler", None),
    ("rk4", "rk4", None),
    ("dopri5_1e-3", "dopri5", 1e-3),
    ("dopri5_1e-2", "dopri5", 1e-2),
    ("dopri5_1e-1", "dopri5", 1e-1),
)


@dataclass
class Predictions:
    probabilities: np.ndarray  # (N, classes)
    labels: np.ndarray  # (N,)
    loss: float
    fnfe: float  # mean function evaluations per batch

    @property
    def predicted(self) -> np.ndarray:
        return self.probabilities.argmax(1)

    @property
    def accuracy(self) -> float:
        return float((self.predicted == self.labels).mean())


@dataclass
class TestReport:
    accuracy: float
    loss: float
    fnfe: float
    confusion: np.ndarray
    report_text: str
    per_class: pd.DataFrame  # precision, recall, f1, support, average precision, ROC AUC
    params_total: int
    params_outside_head: int
    params_trainable: int

    def metrics(self) -> dict[str, float]:
        """The flat final metrics a run logs."""
        return {
            "test_acc": self.accuracy,
            "test_loss": self.loss,
            "test_fnfe": self.fnfe,
            "params_total": self.params_total,
            "params_outside_head": self.params_outside_head,
            "params_trainable": self.params_trainable,
            "test_macro_ap": float(self.per_class["average_precision"].mean()),
            "test_macro_auc": float(self.per_class["roc_auc"].mean()),
        }


@torch.no_grad()
def predict(model: Classifier, split: Split, batch_size: int, phase: str = "evaluation",
            per_epoch: bool = False) -> Predictions:
    """The model's class probabilities, mean loss and FNFE over a split, in eval mode; its
    progress shown as `phase` (see progress.phase for `per_epoch`)."""
    model.eval()
    probabilities, loss_sum, nfe, batches = [], 0.0, 0, 0
    with progress.phase(phase, len(split), per_epoch=per_epoch) as advance:
        for x, y in split.batches(batch_size):
            model.reset_nfe()
            logits = model(x)
            nfe += model.fnfe
            batches += 1
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            probabilities.append(logits.softmax(1).float().cpu())
            advance(len(y))
    model.train()
    return Predictions(
        probabilities=torch.cat(probabilities).numpy(),
        labels=split.labels.cpu().numpy(),
        loss=loss_sum / len(split),
        fnfe=nfe / max(batches, 1),
    )


def evaluate(model: Classifier, split: Split, class_names: tuple[str, ...], batch_size: int) -> TestReport:
    """Accuracy, loss, confusion matrix, classification report, per-class AP and ROC AUC."""
    # Imported here: scikit-learn takes about a second to import, which a process that only
    # trains (a benchmark's measurement, a sweep's driver) need not pay.
    from sklearn.metrics import average_precision_score, classification_report, confusion_matrix, roc_auc_score

    predictions = predict(model, split, batch_size, "test evaluation")
    classes = list(range(len(class_names)))
    scores = classification_report(predictions.labels, predictions.predicted, labels=classes,
                                   target_names=list(class_names), output_dict=True, zero_division=0)
    onehot = np.eye(len(classes))[predictions.labels]
    per_class = pd.DataFrame(
        {
            "class": class_names,
            "precision": [scores[n]["precision"] for n in class_names],
            "recall": [scores[n]["recall"] for n in class_names],
            "f1": [scores[n]["f1-score"] for n in class_names],
            "support": [int(scores[n]["support"]) for n in class_names],
            # AP and AUC are undefined for a class absent from the (sub)set: NaN, not an error.
            "average_precision": [_per_class(average_precision_score, onehot[:, c], predictions.probabilities[:, c])
                                  for c in classes],
            "roc_auc": [_per_class(roc_auc_score, onehot[:, c], predictions.probabilities[:, c]) for c in classes],
        }
    )
    counts = parameter_counts(model)
    return TestReport(
        accuracy=predictions.accuracy,
        loss=predictions.loss,
        fnfe=predictions.fnfe,
        confusion=confusion_matrix(predictions.labels, predictions.predicted, labels=classes),
        report_text=classification_report(predictions.labels, predictions.predicted, labels=classes,
                                          target_names=list(class_names), digits=4, zero_division=0),
        per_class=per_class,
        **counts,
    )


def _per_class(score, truth: np.ndarray, probability: np.ndarray) -> float:
    if truth.min() == truth.max():
        return float("nan")
    return float(score(truth, probability))


def reevaluate(model: Classifier, split: Split, solver: SolverSettings, batch_size: int) -> pd.DataFrame:
    """Accuracy and mean FNFE of an ODE model under each of the study's evaluation solvers,
    each a variation of the run's `solver` (whose tolerances apply where a row names none).

    A solver that fails on this model (underflow, too many steps) is a row with its cause,
    not an exception: it is one of the things this table exists to show.
    """
    rows = []
    for name, method, tol in REEVALUATION_SOLVERS:
        variation = replace(solver, method=method, rtol=tol or solver.rtol, atol=tol or solver.atol)
        try:
            with solver_failures(epoch=0, batch=None), model.solving_with(variation):
                predictions = predict(model, split, batch_size, f"re-evaluation {name}")
            rows.append({"solver": name, "accuracy": predictions.accuracy, "fnfe": predictions.fnfe,
                         "failure_cause": ""})
        except Diverged as exc:
            rows.append({"solver": name, "accuracy": float("nan"), "fnfe": float("nan"),
                         "failure_cause": exc.cause})
    return pd.DataFrame(rows)
