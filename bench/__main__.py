"""`python -m bench`: what a training epoch costs, and what each lever buys.

On real FashionMNIST (a subset) on this machine's device it measures every model by our loop
(`odenet.train.fit`) and by a reference loop written like torchdiffeq's MNIST example, the
levers on the ODE models (bench/levers.py), and n trials sharing the machine. Each
measurement is a fresh process; repetitions are interleaved (A B C A B C A B C); the section
of BENCHMARKS.md for this device is rewritten after every repetition.

    python -m bench --quick --out /tmp/BENCHMARKS.md    # a check that it works (about 2 minutes)
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Sequence

from bench import settings as bench_settings
from bench.markdown import clock, section, write_section
from bench.plan import plan, run_config
from bench.results import Measurements, summarise
from bench.worker import collect, spawn
from odenet import data as data_module
from odenet import progress
from odenet.config import ConfigError
from odenet.data import DataError
from odenet.train import resolve_device

EXIT_BAD_INPUT = 2  # as the odenet command


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = bench_settings.parse(argv)
        device = resolve_device(settings.device)  # a CUDA request without CUDA is bad input, before any work
        # Fetch or import the data once, here: workers then only read it.
        data_module.load(run_config(settings, settings.models[0], {}, 1), "cpu")
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    cores = cores_available()
    cases, sharing = plan(settings, cores)
    started = time.time()
    loads: list[float] = []
    runs: dict[str, list[dict[str, Any]]] = {case.key: [] for case in cases}
    shared_runs: dict[str, list[list[dict[str, Any]]]] = {shared.key: [] for shared in sharing}
    steps = len(cases) + len(sharing)
    _log(f"python -m bench: {len(cases)} configurations and {len(sharing)} shared-machine measurements, "
         f"{settings.repeats} interleaved repetitions, {cores} cores, device {device}")
    # The measurements' own lines say what each measured; the bar, on a terminal, how long is left.
    with progress.phase("python -m bench", settings.repeats * steps, "measurements") as advance:
        for repeat in range(1, settings.repeats + 1):
            for step, case in enumerate(cases, start=1):
                config = run_config(settings, case.model, case.changes, settings.epochs)
                result = collect(spawn(dict(loop=case.loop, dataloader=case.dataloader, threads=cores,
                                            config=config.to_dict())))
                loads.append(_load())
                runs[case.key].append(result)
                advance(1)
                _log(f"[{repeat}/{settings.repeats} {step}/{steps} {clock(time.time() - started)}] {case.key}: "
                     + _brief(result))
            for step, shared in enumerate(sharing, start=len(cases) + 1):
                config = run_config(settings, shared.model, {}, settings.concurrency_epochs)
                spec = dict(loop="ours", dataloader=False, threads=shared.threads, config=config.to_dict())
                results = [collect(process) for process in [spawn(spec) for _ in range(shared.trials)]]
                loads.append(_load())
                shared_runs[shared.key].append(results)
                advance(1)
                _log(f"[{repeat}/{settings.repeats} {step}/{steps} {clock(time.time() - started)}] {shared.key}: "
                     + "; ".join(_brief(r) for r in results))
            # Written after every repetition: a run stopped early still leaves its finished ones.
            text = section(Measurements(settings, cases, sharing, runs, shared_runs), device, cores,
                           time.time() - started, loads)
            write_section(settings.out, device.type, text)
    print(text)
    _log(f"wrote {settings.out}")
    return 0


def cores_available() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _log(message: str) -> None:
    progress.say(message)


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


def _brief(result: dict[str, Any]) -> str:
    summary = summarise(result)
    if summary is None:
        return f"FAILED ({result.get('error')})"
    return (f"epoch {summary['epoch_time_s']:.2f}s, {summary['images_per_s']:.0f} img/s, "
            f"fnfe {summary['fnfe']:.1f}, bnfe {summary['bnfe']:.1f}, val_acc {summary['val_acc']:.4f}, "
            f"peak {summary['peak_mib']:.0f} MiB")


if __name__ == "__main__":
    sys.exit(main())
