"""Time to accuracy, over seeds: what each speed lever costs in accuracy and saves in time.

For resnet-small and odenet-simple at the study's settings, and odenet-simple with each
lever, every seed trains to early stopping (odenet.train.fit, the loop every trial runs);
each run records the time until validation accuracy first reaches --target, the total
time to early stop, and test accuracy (validation and test always solved with dopri5 at
the study's tolerance). Time is the CPU time of the run's process, each run in its own
process on one thread (--jobs runs at once): unlike wall time it does not grow when other
work shares the machine. Wall time to early stop is shown beside it. Per configuration: means with 95% t-intervals over
seeds. A lever's speed-up over the study's odenet-simple is claimed at equal accuracy
only where its test-accuracy interval overlaps the baseline's or lies above it.

    python -m bench.time_to_accuracy --device cpu --out BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import pandas as pd

from bench.levers import parse_lever
from bench.markdown import write_section
from odenet.stats import Interval, mean_interval

BASELINE = "odenet-simple:default"
# bosh3 with direct backpropagation: the combination the epoch benchmark (python -m bench) timed.
# seminorm is left out of the default list: per epoch it costs what the adjoint does (0.97x in
# the epoch benchmark), so it has no time to save that this run could detect, at its full price.
LEVERS = ("direct", "direct+bosh3", "direct+rk4@1", "direct+midpoint@1", "direct+rk4@1+kinetic",
          "direct+euler@1+kinetic@1")


@dataclass(frozen=True)
class SeedResult:
    test_acc: float
    val_acc: tuple[float, ...]  # per epoch
    epoch_s: tuple[float, ...]  # CPU seconds per epoch, training and validation
    wall_s: float = math.nan  # wall seconds to early stop

    @property
    def total_s(self) -> float:
        return sum(self.epoch_s)

    @property
    def epochs(self) -> int:
        return len(self.epoch_s)

    def time_to(self, target: float) -> float | None:
        """CPU seconds until validation accuracy first reached `target`; None if it never did."""
        elapsed = 0.0
        for accuracy, seconds in zip(self.val_acc, self.epoch_s):
            elapsed += seconds
            if accuracy >= target:
                return elapsed
        return None


def overlaps_or_above(candidate: Interval, baseline: Interval) -> bool:
    """The overlap rule: equal accuracy is claimed only when the intervals overlap, or the
    candidate's lies wholly above the baseline's."""
    if math.isnan(candidate.low) or math.isnan(baseline.low):
        return False  # one seed: no interval, no claim
    return candidate.high >= baseline.low


def compare(results: dict[str, list[SeedResult]], target: float, baseline: str = BASELINE) -> pd.DataFrame:
    """One row per configuration: test accuracy, time to target and total time with their
    intervals, the ratio of mean times to the baseline's, and whether equal accuracy holds."""
    base = results[baseline]
    base_acc = mean_interval([r.test_acc for r in base])
    base_total = mean_interval([r.total_s for r in base]).mean
    base_reached = [r.time_to(target) for r in base if r.time_to(target) is not None]
    base_target = mean_interval(base_reached).mean if len(base_reached) == len(base) else math.nan
    rows = []
    for name, runs in results.items():
        acc = mean_interval([r.test_acc for r in runs])
        reached = [r.time_to(target) for r in runs if r.time_to(target) is not None]
        to_target = mean_interval(reached)
        total = mean_interval([r.total_s for r in runs])
        equal = overlaps_or_above(acc, base_acc)
        speedup_target = base_target / to_target.mean if reached and len(reached) == len(runs) else math.nan
        rows.append({
            "configuration": name, "seeds": len(runs), "reached target": f"{len(reached)} of {len(runs)}",
            "test acc %": acc.format(100.0), "time to target s": to_target.format(),
            "time to early stop s": total.format(),
            "wall s to early stop": mean_interval([r.wall_s for r in runs]).format(), "epochs": mean_interval([r.epochs for r in runs]).format(),
            "equal accuracy": "yes" if equal else "no",
            "speed-up to target": speedup_target, "speed-up to early stop": base_total / total.mean,
            "claimed speed-up": (base_total / total.mean) if equal and name != baseline else math.nan,
            "acc_mean": acc.mean, "acc_low": acc.low, "acc_high": acc.high,
        })
    return pd.DataFrame(rows)


def run(model_lever: str, seed: int, args: argparse.Namespace) -> SeedResult:
    import torch

    from odenet.config import RunConfig
    from odenet.evaluate import evaluate
    from odenet.models import SolverSettings
    from odenet.train import fit

    torch.set_num_threads(1)

    model, _, lever = model_lever.partition(":")
    changes = {} if lever == "default" else parse_lever(lever).changes
    config = RunConfig.from_dict(dict(model=model, dataset="fashion-mnist", subset=args.subset,
                                      test_subset=args.test_subset, width=args.width, seed=seed,
                                      max_epochs=args.max_epochs, patience=args.patience, device=args.device,
                                      data_dir=args.data_dir, reevaluate=False, **changes))
    epoch_ends = [time.process_time()]  # data loading, before the first epoch, is not counted

    def on_epoch(_metrics) -> None:
        epoch_ends.append(time.process_time())

    fitted = fit(config, on_epoch=on_epoch)
    cpu_s = tuple(end - start for start, end in zip(epoch_ends, epoch_ends[1:]))
    with fitted.model.solving_with(SolverSettings.for_evaluation(config)):
        test = evaluate(fitted.model, fitted.data.test, fitted.data.class_names, config.batch_size)
    return SeedResult(test.accuracy, tuple(m.val_acc for m in fitted.history), cpu_s,
                      sum(m.epoch_time_s for m in fitted.history))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir")
    parser.add_argument("--subset", type=int, default=10_000, help="training images before the 80/20 split")
    parser.add_argument("--test-subset", type=int, default=2_000)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs at once, one thread each")
    parser.add_argument("--max-epochs", type=int, default=5)
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--target", type=float, default=0.82, help="validation accuracy to reach")
    parser.add_argument("--levers", default=",".join(LEVERS), help="odenet-simple levers (bench/levers.py's atoms)")
    parser.add_argument("--out", help="write the section into this BENCHMARKS.md")
    args = parser.parse_args(argv)
    configurations = ["resnet-small:default", BASELINE, *[f"odenet-simple:{lever}" for lever in args.levers.split(",")
                                                          if lever]]
    started = time.time()
    tasks = [(name, seed) for seed in range(args.seeds) for name in configurations]
    # A fresh process per run: no state (threads, caches, allocator) carries from one run to the next.
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                             max_tasks_per_child=1) as pool:
        futures = [pool.submit(run, name, seed, args) for name, seed in tasks]
        results: dict[str, list[SeedResult]] = {name: [] for name in configurations}
        for (name, seed), future in zip(tasks, futures):
            results[name].append(future.result())
            print(f"{name} seed {seed}: {results[name][-1]}", file=sys.stderr, flush=True)
    table = compare(results, args.target)
    text = section(table, args, time.time() - started)
    if args.out:
        from pathlib import Path

        write_section(Path(args.out), f"tta_{args.device.split(':')[0]}", text)
    print(text)
    return 0


def section(table: pd.DataFrame, args: argparse.Namespace, seconds: float) -> str:
    shown = table.drop(columns=["acc_mean", "acc_low", "acc_high"])
    claimed = table.dropna(subset=["claimed speed-up"])
    best = claimed.loc[claimed["claimed speed-up"].idxmax()] if not claimed.empty else None
    lines = [f"# Time to accuracy on {args.device}, over seeds",
             "",
             f"- Command: `python -m bench.time_to_accuracy --device {args.device} --subset {args.subset} "
             f"--test-subset {args.test_subset} --width {args.width} --seeds {args.seeds} --jobs {args.jobs} --max-epochs "
             f"{args.max_epochs} --patience {args.patience} --target {args.target}`; {seconds / 60:.0f} min of wall "
             f"time on {platform.node()}.",
             f"- Real FashionMNIST, the first {args.subset} training images split 80/20 (split seed 0), "
             f"{args.test_subset} test images; width {args.width}; seeds 0..{args.seeds - 1} (weights and batch "
             f"order); early stopping after {args.patience} epochs without a better validation loss. Validation and "
             "test always dopri5 at 1e-3. Intervals: 95% t-intervals over seeds.",
             f"- Times are CPU seconds of each run's own process (one thread, {args.jobs} runs at once), from the "
             "first epoch to early stop; wall seconds beside them. The machine was shared with other work: CPU "
             "time is the measure that does not count that work.",
             "- Equal accuracy: the test-accuracy interval overlaps odenet-simple's at the study's settings, or lies "
             "above it. Speed-ups are ratios of mean times; only those at equal accuracy are claimed.",
             f"- **Best claimed: {best['configuration']} at {best['claimed speed-up']:.2f}x** the study's odenet-simple "
             f"to early stop." if best is not None else "- **No lever is faster at equal accuracy here.**",
             "",
             shown.to_markdown(index=False, floatfmt=".3g")]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
