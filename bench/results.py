"""The numbers of a `python -m bench` run: per repetition, then medians over repetitions and
ratios taken within each repetition, as the tables that BENCHMARKS.md shows."""

from __future__ import annotations

import math
import statistics
from typing import Any

import pandas as pd

from bench.plan import Case, SharedMachine
from bench.settings import Settings

ODE_MODEL, RESNET_MODEL = "odenet-simple", "resnet-small"
WARM_UP_FROM_EPOCHS = 3


def summarise(result: dict[str, Any]) -> dict[str, float] | None:
    """One repetition's numbers: epoch time averaged over epochs, accuracy after the last;
    None for a measurement that failed."""
    epochs = result.get("epochs") or []
    if result.get("error") or not epochs:
        return None
    # From three epochs on, the first is a warm-up (CUDA kernel selection, torch.compile)
    # and stays out of the timings; accuracy is still read after the last epoch.
    timed = epochs[1:] if len(epochs) >= WARM_UP_FROM_EPOCHS else epochs
    mean = lambda metric: sum(e[metric] for e in timed) / len(timed)  # noqa: E731
    train_time = mean("epoch_time_s") - mean("val_time_s")
    return dict(
        epoch_time_s=mean("epoch_time_s"),
        images_per_s=result["train_images"] / train_time if train_time > 0 else math.nan,
        fnfe=mean("fnfe"),
        bnfe=mean("bnfe"),
        val_fnfe=mean("val_fnfe"),
        val_acc=epochs[-1]["val_acc"],
        peak_mib=result["peak_mib"],
    )


def median(values: list[float]) -> float:
    """The median of the values measured (NaN and None left out); NaN when there are none."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else math.nan


class Measurements:
    """Every repetition's results of the cases and the shared-machine trials."""

    def __init__(self, settings: Settings, cases: list[Case], sharing: list[SharedMachine],
                 runs: dict[str, list[dict[str, Any]]], shared_runs: dict[str, list[list[dict[str, Any]]]]):
        self.settings, self.cases, self.sharing = settings, cases, sharing
        self.completed = min((len(v) for v in runs.values()), default=0)
        self.per_repeat = {key: [summarise(r) for r in results] for key, results in runs.items()}
        self.errors = {key: [r["error"] for r in results if r.get("error")] for key, results in runs.items()}
        self.shared_runs = shared_runs
        every = [r for results in runs.values() for r in results]
        self.memory_methods = sorted({r["memory_method"] for r in every if r.get("memory_method")})
        self.train_images = next((r["train_images"] for r in every if "train_images" in r), None)
        self.val_images = next((r["val_images"] for r in every if "val_images" in r), None)

    def median(self, key: str, metric: str) -> float:
        return median([r[metric] for r in self.per_repeat.get(key, []) if r is not None])

    def ratio(self, key: str, base: str, metric: str = "epoch_time_s") -> float:
        """Median over repetitions of key/base, each pair from the same repetition."""
        pairs = zip(self.per_repeat.get(key, []), self.per_repeat.get(base, []))
        return median([a[metric] / b[metric] for a, b in pairs if a and b and b[metric] > 0])

    def spread(self, key: str) -> float:
        """(max - min) / median of the epoch time over repetitions, in percent."""
        times = [r["epoch_time_s"] for r in self.per_repeat.get(key, []) if r is not None]
        if len(times) < 2:
            return math.nan
        return 100 * (max(times) - min(times)) / statistics.median(times)

    def measured(self, key: str) -> bool:
        return any(r is not None for r in self.per_repeat.get(key, []))

    # -- tables --------------------------------------------------------------------------

    def _row(self, case: Case) -> dict[str, Any]:
        if not self.measured(case.key):
            return {"epoch s": "failed: " + "; ".join(self.errors.get(case.key, [])[:1])}
        return {
            "epoch s": self.median(case.key, "epoch_time_s"),
            "spread %": self.spread(case.key),
            "train img/s": self.median(case.key, "images_per_s"),
            "FNFE": self.median(case.key, "fnfe"),
            "BNFE": self.median(case.key, "bnfe"),
            "val FNFE": self.median(case.key, "val_fnfe"),
            "peak MiB": self.median(case.key, "peak_mib"),
            "val acc": self.median(case.key, "val_acc"),
        }

    def models_table(self) -> pd.DataFrame:
        return pd.DataFrame([{"model": case.model, "loop": case.loop, **self._row(case)}
                             for case in self.cases if case.lever == "default"])

    def loop_table(self) -> pd.DataFrame:
        rows = []
        for model in self.settings.models:
            ours, reference = f"{model}/ours", f"{model}/reference"
            rows.append({
                "model": model,
                "ours epoch s": self.median(ours, "epoch_time_s"),
                "reference epoch s": self.median(reference, "epoch_time_s"),
                "speed-up (reference / ours)": self.ratio(reference, ours),
                "train speed-up (img/s ours / reference)": self.ratio(ours, reference, "images_per_s"),
                "ours val acc": self.median(ours, "val_acc"),
                "reference val acc": self.median(reference, "val_acc"),
            })
        return pd.DataFrame(rows)

    def lever_table(self) -> pd.DataFrame:
        rows = []
        resnet = f"{RESNET_MODEL}/ours" if RESNET_MODEL in self.settings.models else None
        for model in self.settings.models:
            with_levers = [c for c in self.cases if c.model == model and c.lever != "default"]
            if not with_levers:
                continue
            for case in [c for c in self.cases if c.key == f"{model}/ours"] + with_levers:
                row = {"model": case.model, "levers": case.lever, "settings": settings_text(case), **self._row(case)}
                if self.measured(case.key):
                    row["x default"] = self.ratio(case.key, f"{case.model}/ours")
                    if resnet and self.measured(resnet) and case.model != RESNET_MODEL:
                        row[f"x {RESNET_MODEL}"] = self.ratio(case.key, resnet)
                        row[f"acc gap vs {RESNET_MODEL} (points)"] = 100 * (
                            self.median(case.key, "val_acc") - self.median(resnet, "val_acc"))
                rows.append(row)
        return pd.DataFrame(rows)

    def sharing_table(self) -> pd.DataFrame:
        fewest = min(self.settings.concurrency, default=1)
        rows = []
        for shared in self.sharing:
            summed, per_trial = [], []
            for results in self.shared_runs[shared.key]:
                summaries = [summarise(r) for r in results]
                if all(summaries):
                    summed.append(sum(x["images_per_s"] for x in summaries))
                    per_trial.append(statistics.mean(x["epoch_time_s"] for x in summaries))
            rows.append({
                "model": shared.model, "trials at once": shared.trials, "threads each": shared.threads,
                "epoch s per trial": median(per_trial),
                "train img/s summed": median(summed),
                f"x {fewest} trial(s)": self._sharing_ratio(shared.key, f"{shared.model}/x{fewest}"),
            })
        return pd.DataFrame(rows)

    def _sharing_ratio(self, key: str, base: str) -> float:
        ratios = []
        for results, base_results in zip(self.shared_runs[key], self.shared_runs[base]):
            these = [summarise(r) for r in results]
            baseline = [summarise(r) for r in base_results]
            if all(these) and all(baseline):
                ratios.append(sum(x["images_per_s"] for x in these) / sum(x["images_per_s"] for x in baseline))
        return median(ratios)

    def ratio_lines(self) -> list[str]:
        """The headline: the ODEnet / ResNet epoch-time ratio at the defaults and the best one a
        lever reaches; our loop against the reference loop."""
        ode, resnet = f"{ODE_MODEL}/ours", f"{RESNET_MODEL}/ours"
        if not (self.measured(ode) and self.measured(resnet)):
            return [f"- The {ODE_MODEL} / {RESNET_MODEL} ratio needs both models measured (--models)."]
        resnet_acc = self.median(resnet, "val_acc")
        lines = [
            f"- **{ODE_MODEL} / {RESNET_MODEL} epoch time at default settings: {self.ratio(ode, resnet):.1f}x** "
            f"(val acc {self.median(ode, 'val_acc'):.4f} vs {resnet_acc:.4f}).",
        ]
        candidates = []  # (ratio to the ResNet, accuracy gap in points, case)
        for case in self.cases:
            if case.model == ODE_MODEL and case.loop == "ours" and self.measured(case.key):
                gap = 100 * (self.median(case.key, "val_acc") - resnet_acc)
                candidates.append((self.ratio(case.key, resnet), gap, case))
        if candidates:
            # One seed and a few hundred validation images cannot tell accuracies apart: the
            # accuracy a lever costs is measured over seeds by bench/time_to_accuracy.py.
            ratio, gap, case = min(candidates, key=lambda c: c[0])
            lines.append(f"- Lowest epoch-time ratio with levers: {ratio:.1f}x with `{case.lever}` "
                         f"({settings_text(case)}). What a lever costs in accuracy is not measured here "
                         "(one seed, a few hundred validation images): see the time-to-accuracy section.")
        for model in self.settings.models:
            ours, reference = f"{model}/ours", f"{model}/reference"
            if self.measured(ours) and self.measured(reference):
                speed_up = self.ratio(reference, ours)
                lines.append(f"- Our loop against the reference loop, {model}: {speed_up:.2f}x "
                             f"({'at least as fast' if speed_up >= 1 else 'slower'}; target 1.5x).")
        return lines


def settings_text(case: Case) -> str:
    """A case's RunConfig changes as `field=value`, and its data source."""
    text = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in case.changes.items())
    if case.dataloader:
        text = (text + ", " if text else "") + "batches from a DataLoader"
    return text or "defaults"
