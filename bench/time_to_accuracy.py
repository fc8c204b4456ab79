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
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bench.levers import parse_lever
from bench.markdown import write_section
from odenet.stats import Interval, mean_interval, paired_difference, ratio_interval

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
    """The overlap rule: equal accuracy only when the intervals overlap, or the candidate's lies
    wholly above the baseline's."""
    if math.isnan(candidate.low) or math.isnan(baseline.low):
        return False  # one seed: no interval, no claim
    return candidate.high >= baseline.low


def compare(results: dict[str, list[SeedResult]], target: float, baseline: str = BASELINE) -> pd.DataFrame:
    """One row per configuration: test accuracy, time to target and to early stop with their
    intervals; the paired (same seed) accuracy difference and speed-up to the baseline; and
    whether a speed-up is claimed. A claim needs the overlap rule and every seed at the target:
    a lever that misses the target in some seed has not reached the baseline's accuracy there,
    whatever its wide interval overlaps."""
    base = results[baseline]
    base_acc = mean_interval([r.test_acc for r in base])
    base_reached = [t for r in base if (t := r.time_to(target)) is not None]
    base_target = mean_interval(base_reached).mean if len(base_reached) == len(base) else math.nan
    levers = [name for name in results if name != baseline and name.split(":")[0] == baseline.split(":")[0]]
    rows = []
    for name, runs in results.items():
        acc = mean_interval([r.test_acc for r in runs])
        reached = [t for r in runs if (t := r.time_to(target)) is not None]
        to_target = mean_interval(reached)
        speed_up = ratio_interval([b.total_s for b in base], [r.total_s for r in runs])
        every_seed = len(reached) == len(runs)
        claimed = name in levers and every_seed and overlaps_or_above(acc, base_acc)
        difference = paired_difference([r.test_acc for r in runs], [b.test_acc for b in base], len(levers))
        rows.append({
            "configuration": name, "seeds": len(runs), "reached target": f"{len(reached)} of {len(runs)}",
            "test acc %": acc.format(100.0),
            "Δ test acc vs odenet-simple, points": "" if name == baseline else difference.format(100.0, 2),
            "time to target s": to_target.format(), "time to early stop s": mean_interval(
                [r.total_s for r in runs]).format(),
            "wall s to early stop": mean_interval([r.wall_s for r in runs]).format(),
            "epochs": mean_interval([r.epochs for r in runs]).format(),
            "speed-up to target": base_target / to_target.mean if every_seed else math.nan,
            "speed-up to early stop": speed_up.format(),
            "claimed": "yes" if claimed else ("-" if name not in levers else "no"),
            "claimed_speed_up": speed_up.mean if claimed else math.nan,
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
    parser.add_argument("--results", help="also write every run's per-epoch numbers to this JSON file")
    parser.add_argument("--render", metavar="JSON", help="write the section from a --results file, training nothing")
    args = parser.parse_args(argv)
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        results = {name: [SeedResult(**run) for run in runs] for name, runs in saved["results"].items()}
        return publish(results, args, saved["wall_s"])
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
    wall_s = time.time() - started
    if args.results:
        Path(args.results).write_text(json.dumps({"wall_s": wall_s, "results": {
            name: [dataclasses.asdict(run) for run in runs] for name, runs in results.items()}}, indent=1))
    return publish(results, args, wall_s)


def publish(results: dict[str, list[SeedResult]], args: argparse.Namespace, wall_s: float) -> int:
    text = section(compare(results, args.target), args, wall_s)
    if args.out:
        write_section(Path(args.out), f"tta_{args.device.split(':')[0]}", text)
    print(text)
    return 0


def section(table: pd.DataFrame, args: argparse.Namespace, seconds: float) -> str:
    shown = table.drop(columns=["claimed_speed_up", "acc_mean", "acc_low", "acc_high"])
    claimed = table.dropna(subset=["claimed_speed_up"])
    best = claimed.loc[claimed["claimed_speed_up"].idxmax()] if not claimed.empty else None
    lines = [f"# Time to accuracy on {args.device}, over seeds",
             "",
             f"- Command: `python -m bench.time_to_accuracy --device {args.device} --subset {args.subset} "
             f"--test-subset {args.test_subset} --width {args.width} --seeds {args.seeds} --jobs {args.jobs} "
             f"--max-epochs {args.max_epochs} --patience {args.patience} --target {args.target}`; "
             f"{seconds / 60:.0f} min of wall time on {platform.node()}.",
             f"- Real FashionMNIST, the first {args.subset} training images split 80/20 (split seed 0), "
             f"{args.test_subset} test images; width {args.width}; seeds 0..{args.seeds - 1} (weights and batch "
             f"order); at most {args.max_epochs} epochs, early stopping after {args.patience} epochs without a better "
             "validation loss. Validation and test always dopri5 at 1e-3. Intervals: 95% t-intervals over seeds.",
             f"- Times are CPU seconds of each run's own process (one thread, {args.jobs} runs at once), from the "
             "first epoch to early stop, validation included; wall seconds beside them. CPU time is the measure "
             "that does not count other work sharing the machine.",
             "- Paired by seed against odenet-simple at the study's settings: the test-accuracy difference "
             "(interval Bonferroni-widened for the levers compared) and the speed-up to early stop (geometric mean "
             "of the per-seed ratios, t-interval on their logarithms).",
             f"- A speed-up is claimed only at equal accuracy: the lever's test-accuracy interval overlaps the "
             f"baseline's (or lies above it) and every seed reached the target validation accuracy {args.target}.",
             f"- **Best claimed: {best['configuration']} at {best['speed-up to early stop']}x** the study's "
             "odenet-simple to early stop." if best is not None else "- **No lever is faster at equal accuracy here.**",
             "",
             shown.to_markdown(index=False, floatfmt=".3g")]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
