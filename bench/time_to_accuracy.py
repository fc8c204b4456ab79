"""Time to accuracy, over seeds: what each speed lever costs in accuracy and saves in time.

For resnet-small and odenet-simple at the study's settings, and odenet-simple with each
lever, every seed trains to early stopping (odenet.train.fit, the loop every trial runs);
each run records the time until validation accuracy first reaches --target, the total
time to early stop, and test accuracy (validation and test always solved with dopri5 at
the study's tolerance). Time is the CPU time of the run's process, each run in its own
process on one thread (--jobs runs at once): unlike wall time it does not grow when other
work shares the machine. Wall time to early stop is shown beside it.

Everything is paired by seed against the study's odenet-simple. A lever's speed-up is claimed
only when, over at least 3 seeds,
- its accuracy is non-inferior: the one-sided lower bound of the paired test-accuracy
  difference lies above -MARGIN points (one-sided paired t-test, Holm over the levers);
- it is faster: the one-sided lower bound of the paired speed-up to early stop (geometric
  mean of per-seed ratios, t on their logarithms; Holm over the levers) lies above 1;
- every seed reached the target validation accuracy.

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

import numpy as np
import pandas as pd
from scipy import stats

from bench.levers import parse_lever
from bench.markdown import write_section
from odenet.stats import ALPHA, MIN_PAIRS, holm, mean_interval, ratio_interval

BASELINE = "odenet-simple:default"
# bosh3 with direct backpropagation: the combination the epoch benchmark (python -m bench) timed.
# seminorm is left out of the default list: per epoch it costs what the adjoint does (0.97x in
# the epoch benchmark), so it has no time to save that this run could detect, at its full price.
LEVERS = ("direct", "direct+bosh3", "direct+rk4@1", "direct+midpoint@1", "direct+rk4@1+kinetic",
          "direct+euler@1+kinetic@1")
# The non-inferiority margin, in points of test accuracy: a lever whose paired difference could
# be lower than -MARGIN has not been shown to hold accuracy.
MARGIN = 1.0


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


@dataclass(frozen=True)
class OneSided:
    """A one-sided paired test that the mean exceeds `null`: estimate, standard error, dof, p."""

    mean: float
    se: float
    dof: int
    p: float

    def lower(self, level: float) -> float:
        """The one-sided lower confidence bound at `level`."""
        if math.isnan(self.p) or math.isnan(level):
            return math.nan
        return self.mean - stats.t.ppf(level, self.dof) * self.se


def one_sided(values, null: float) -> OneSided:
    """One-sided t-test of mean(values) > null (scipy); NaN with fewer than MIN_PAIRS values."""
    x = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if len(x) < MIN_PAIRS or np.ptp(x) == 0:
        mean = float(x.mean()) if len(x) else math.nan
        return OneSided(mean, math.nan, len(x) - 1, math.nan)
    result = stats.ttest_1samp(x, null, alternative="greater")
    return OneSided(float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))), len(x) - 1, float(result.pvalue))


def compare(results: dict[str, list[SeedResult]], target: float, baseline: str = BASELINE,
            margin: float = MARGIN) -> pd.DataFrame:
    """One row per configuration: test accuracy, time to target and to early stop; against the
    baseline, seed by seed: the accuracy difference with its non-inferiority bound, the speed-up
    to early stop and the ratio of times to target with intervals; and whether a speed-up is
    claimed (the module's rule). Margin in points."""
    base = results[baseline]
    levers = [name for name in results if name != baseline and name.split(":")[0] == baseline.split(":")[0]]
    accuracy, speed = {}, {}
    for name in levers:
        runs = results[name]
        accuracy[name] = one_sided([(r.test_acc - b.test_acc) * 100 for r, b in zip(runs, base)], -margin)
        speed[name] = one_sided([math.log(b.total_s / r.total_s) for r, b in zip(runs, base)], 0.0)
    acc_holm, acc_levels = holm([accuracy[n].p for n in levers])
    speed_holm, speed_levels = holm([speed[n].p for n in levers])
    rows = []
    for name, runs in results.items():
        reached = [t for r in runs if (t := r.time_to(target)) is not None]
        pairs_to_target = [(b.time_to(target), r.time_to(target)) for r, b in zip(runs, base)]
        pairs_to_target = [(b, r) for b, r in pairs_to_target if b is not None and r is not None]
        row = {"configuration": name, "seeds": len(runs), "reached target": f"{len(reached)} of {len(runs)}",
               "test acc %": mean_interval([r.test_acc * 100 for r in runs]).format(),
               "time to target s": mean_interval(reached).format(),
               "time to early stop s": mean_interval([r.total_s for r in runs]).format(),
               "wall s to early stop": mean_interval([r.wall_s for r in runs]).format(),
               "epochs": mean_interval([r.epochs for r in runs]).format(),
               "speed-up to target": ratio_interval(*zip(*pairs_to_target)).format() if pairs_to_target else "",
               "speed-up to early stop": ratio_interval([b.total_s for b in base], [r.total_s for r in runs]).format()}
        if name in levers:
            i = levers.index(name)
            acc, fast = accuracy[name], speed[name]
            acc_bound, speed_bound = acc.lower(acc_levels[i]), math.exp(fast.lower(speed_levels[i]))
            non_inferior = not math.isnan(acc_bound) and acc_bound > -margin
            faster = not math.isnan(speed_bound) and speed_bound > 1
            every_seed = len(reached) == len(runs)
            claimed = non_inferior and faster and every_seed
            row.update({"Δ test acc, points": f"{acc.mean:.2g}", "Δ lower bound": f"{acc_bound:.2g}",
                        "non-inferior": "yes" if non_inferior else "no",
                        "speed-up lower bound": f"{speed_bound:.3g}", "faster": "yes" if faster else "no",
                        "claimed": "yes" if claimed else "no",
                        "claimed_speed_up": math.exp(fast.mean) if claimed else math.nan,
                        "acc_p_holm": acc_holm[i], "acc_level": acc_levels[i], "acc_bound": acc_bound,
                        "speed_p_holm": speed_holm[i], "speed_level": speed_levels[i], "speed_bound": speed_bound,
                        "why not": _why_not(acc, fast, non_inferior, faster, every_seed)})
        else:
            row.update({"claimed": "-", "claimed_speed_up": math.nan})
        rows.append(row)
    return pd.DataFrame(rows)


def _why_not(acc: OneSided, fast: OneSided, non_inferior: bool, faster: bool, every_seed: bool) -> str:
    if math.isnan(acc.p) and acc.dof + 1 < MIN_PAIRS:
        return f"fewer than {MIN_PAIRS} seeds"
    reasons = [] if non_inferior else ["accuracy not shown within the margin"]
    reasons += [] if faster else ["speed-up interval not above 1"]
    reasons += [] if every_seed else ["missed the target in some seed"]
    return "; ".join(reasons)


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
    parser.add_argument("--first-seed", type=int, default=0,
                        help="seeds FIRST..FIRST+SEEDS-1: more seeds for a saved run, merged with --render")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs at once, one thread each")
    parser.add_argument("--max-epochs", type=int, default=5)
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--target", type=float, default=0.82, help="validation accuracy to reach")
    parser.add_argument("--margin", type=float, default=MARGIN, help="non-inferiority margin, points of test accuracy")
    parser.add_argument("--levers", default=",".join(LEVERS), help="odenet-simple levers (bench/levers.py's atoms)")
    parser.add_argument("--out", help="write the section into this BENCHMARKS.md")
    parser.add_argument("--results", help="also write every run's per-epoch numbers to this JSON file")
    parser.add_argument("--render", metavar="JSON", nargs="+",
                        help="write the section from --results files, training nothing; several files (other seeds "
                             "of the same settings) are merged, seed by seed, in the order given")
    args = parser.parse_args(argv)
    if args.margin <= 0:
        parser.error(f"--margin must be a positive number of points, got {args.margin}")
    if args.render:
        results, seeds, wall_s = load_results([Path(p) for p in args.render])
        return publish(results, seeds, args, wall_s)
    configurations = ["resnet-small:default", BASELINE, *[f"odenet-simple:{lever}" for lever in args.levers.split(",")
                                                          if lever]]
    started = time.time()
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    tasks = [(name, seed) for seed in seeds for name in configurations]
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
        Path(args.results).write_text(json.dumps({"wall_s": wall_s, "seeds": seeds, "results": {
            name: [dataclasses.asdict(run) for run in runs] for name, runs in results.items()}}, indent=1))
    return publish(results, seeds, args, wall_s)


def load_results(paths: list[Path]) -> tuple[dict[str, list[SeedResult]], list[int], float]:
    """Runs saved by --results, merged: the configurations every file has, their seeds in file
    order (a file without "seeds" holds 0..n-1), and the files' wall time together."""
    results, seeds, wall_s = {}, [], 0.0
    for path in paths:
        saved = json.loads(path.read_text())
        runs = {name: [SeedResult(**run) for run in found] for name, found in saved["results"].items()}
        new_seeds = saved.get("seeds") or list(range(len(next(iter(runs.values())))))
        if set(new_seeds) & set(seeds):
            raise SystemExit(f"{path} repeats seeds {sorted(set(new_seeds) & set(seeds))} of an earlier file")
        results = runs if not results else {n: results[n] + runs[n] for n in results if n in runs}
        seeds, wall_s = seeds + list(new_seeds), wall_s + saved["wall_s"]
    return results, seeds, wall_s


def publish(results: dict[str, list[SeedResult]], seeds: list[int], args: argparse.Namespace, wall_s: float) -> int:
    text = section(compare(results, args.target, margin=args.margin), seeds, args, wall_s)
    if args.out:
        write_section(Path(args.out), f"tta_{args.device.split(':')[0]}", text)
    print(text)
    return 0


SHOWN = ("configuration", "seeds", "reached target", "test acc %", "Δ test acc, points", "Δ lower bound",
         "non-inferior", "time to target s", "time to early stop s", "wall s to early stop", "epochs",
         "speed-up to target", "speed-up to early stop", "speed-up lower bound", "faster", "claimed", "why not")


def section(table: pd.DataFrame, seeds: list[int], args: argparse.Namespace, seconds: float) -> str:
    shown = table[[c for c in SHOWN if c in table]].fillna("")
    claimed = table.dropna(subset=["claimed_speed_up"])
    best = claimed.loc[claimed["claimed_speed_up"].idxmax()] if not claimed.empty else None
    levers = int((table["claimed"] != "-").sum())
    runs = f"--render {' '.join(args.render)}" if args.render else (
        f"--seeds {args.seeds}" + (f" --first-seed {args.first_seed}" if args.first_seed else ""))
    lines = [f"# Time to accuracy on {args.device}, over seeds",
             "",
             f"- Command: `python -m bench.time_to_accuracy --device {args.device} --subset {args.subset} "
             f"--test-subset {args.test_subset} --width {args.width} {runs} --jobs {args.jobs} "
             f"--max-epochs {args.max_epochs} --patience {args.patience} --target {args.target} "
             f"--margin {args.margin:g}`; {seconds / 60:.0f} min of wall time on {platform.node()}.",
             f"- Real FashionMNIST, the first {args.subset} training images split 80/20 (split seed 0), "
             f"{args.test_subset} test images; width {args.width}; seeds {', '.join(map(str, seeds))} (weights and "
             f"batch order); at most {args.max_epochs} epochs, early stopping after {args.patience} epochs without "
             "a better validation loss. Validation and test always dopri5 at 1e-3. Per configuration: means with "
             "95% t-intervals over seeds (accuracy as a spread over seeds on one test set, not a test).",
             f"- Times are CPU seconds of each run's own process (one thread, {args.jobs} runs at once), from the "
             "first epoch to early stop, validation included; wall seconds beside them. CPU time is the measure "
             "that does not count other work sharing the machine.",
             f"- Paired by seed against odenet-simple at the study's settings, over the {levers} lever(s) compared "
             f"(Holm's method over them, family-wise error {ALPHA:g} for each of the two tests): `Δ test acc` is "
             "the mean paired difference and `Δ lower bound` its one-sided lower confidence bound at the level "
             "Holm used; `speed-up to early stop` is the geometric mean of the per-seed ratios with a 95% "
             "t-interval on their logarithms, and `speed-up lower bound` its one-sided Holm-level bound; "
             "`speed-up to target` is the same paired ratio for the time to the target, over the seeds where "
             "both reached it.",
             f"- **The claim rule.** Equal accuracy is a non-inferiority test with a margin of **{args.margin:g} "
             f"point(s)**: the lever's `Δ lower bound` must lie above -{args.margin:g}. A speed-up is claimed only "
             f"for a non-inferior lever whose `speed-up lower bound` lies above 1, over at least {MIN_PAIRS} seeds, "
             f"every seed having reached the target validation accuracy {args.target}.",
             f"- **Claimed: {best['configuration']} at {best['speed-up to early stop']}x** the study's "
             "odenet-simple to early stop." if best is not None else
             f"- **No speed-up is claimed with these {len(seeds)} seeds**: no lever is both shown non-inferior "
             f"within {args.margin:g} point(s) and shown faster.",
             "",
             shown.to_markdown(index=False, floatfmt=".3g")]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
