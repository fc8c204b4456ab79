"""`odenet bench`: what a training epoch costs, and what each lever buys.

One command measures, on real FashionMNIST (a subset) on this machine's device:

- every model at its default settings, trained by our loop (`odenet.train.fit`) and by a
  reference loop written the way torchdiffeq's MNIST example trains (a DataLoader over a
  TensorDataset, `odeint_adjoint`, nothing else), with the same model, seed, optimiser,
  batch size, data and epochs;
- the levers, as RunConfig settings on the ODE models (`adjoint`, `solver`/`step_size`
  with `eval_solver`, `kinetic_energy`, `jacobian_norm`) and combinations of them, plus
  batches from a DataLoader instead of the device-resident slices;
- trials sharing the machine: n trials of one model at once as separate processes,
  each with torch threads = cores / n, and their summed throughput;
- the ODEnet / ResNet epoch-time ratio at the defaults and the best one any measured
  combination reaches while validation accuracy stays within 0.5 points of the ResNet's.

Every measurement is a fresh subprocess (clean peak memory, no shared caches); the
repetitions are interleaved (A B C A B C A B C) and the tables report medians, and
ratios are taken within each repetition against the baseline of that repetition.
The tables go to BENCHMARKS.md with the machine, the date and the command.

A lever is a combination of atoms joined by `+`, optionally restricted to one model
with `MODEL:`; atoms:

    direct | seminorm | adjoint          backpropagation (RunConfig.adjoint)
    SOLVER[@STEP]                        training solver (step size for fixed-step
                                         ones), evaluation with dopri5
    kinetic[@W] | jacobian[@W]           regulariser weights (default W = 0.1)
    dataloader                           our loop, training batches from a DataLoader
    channels_last | bf16 | compile       RunConfig channels_last, block_precision=bf16,
                                         compile_block (every model; GPU levers)

Atoms other than `dataloader` and the GPU ones apply to ODE models only; a combination is measured on
every model of --models that all its atoms apply to.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULT_MARK = "BENCH-RESULT "
ODE_MODEL, RESNET_MODEL = "odenet-simple", "resnet-small"
ACCURACY_WINDOW_POINTS = 0.5
DEFAULT_REGULARISER_WEIGHT = 0.1
EVAL_SOLVER = "dopri5"
# Levers of how the block functions run, for every model (they matter on a GPU).
DEVICE_ATOMS = {
    "channels_last": {"channels_last": True},
    "bf16": {"block_precision": "bf16"},
    "compile": {"compile_block": True},
}

DEFAULTS = dict(
    subset=2048, epochs=2, repeats=3, width=64, batch_size=128,
    models="resnet-small,odenet-simple",
    levers=",".join([
        "resnet-small:dataloader",
        "direct", "seminorm",
        "direct+kinetic", "direct+jacobian",
        "direct+bosh3", "direct+rk4@1",
        "direct+rk4@1+dataloader",
        "direct+rk4@1+kinetic", "direct+midpoint@1", "direct+euler@1", "direct+euler@1+kinetic@1",
    ]),
    concurrency="1,2,4", concurrency_epochs=1,
)
# On a GPU the study's width and the full lever list are cheap; the device levers join them.
GPU_LEVERS = ",".join(["channels_last", "bf16", "compile", "channels_last+bf16"])
QUICK = dict(
    subset=320, epochs=1, repeats=3, width=4, batch_size=64,
    models="resnet-small,odenet-simple",
    levers="resnet-small:dataloader,direct+rk4@1+kinetic",
    concurrency="1,2", concurrency_epochs=1,
)
MIN_REPEATS = 3
WARM_UP_FROM_EPOCHS = 3


# -- command line -------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Measure training cost on real FashionMNIST: each model by our loop and by a reference "
        "loop, the levers (adjoint/direct/seminorm backpropagation, training solver with dopri5 "
        "evaluation, kinetic/Jacobian regularisers, DataLoader batches; on a GPU also channels_last, "
        "bf16 and torch.compile) and trials sharing the machine; interleaved repetitions, medians. "
        "Writes the tables into --out, in this device's section (cpu or cuda). The defaults take "
        "about 20 minutes on 2 CPU cores.")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "A lever is" + __doc__.split("A lever is", 1)[1]
    d = DEFAULTS
    parser.add_argument("--subset", type=int, help=f"first N FashionMNIST training images, 80/20 train/validation "
                        f"(default {d['subset']}; --quick {QUICK['subset']})")
    parser.add_argument("--epochs", type=int, help=f"epochs E per run; accuracy is read after E "
                        f"(default {d['epochs']}; --quick {QUICK['epochs']})")
    parser.add_argument("--repeats", type=int, help=f"interleaved repetitions, at least {MIN_REPEATS} "
                        f"(default {d['repeats']})")
    parser.add_argument("--width", type=int, help=f"model width C (default {d['width']}, the study's; "
                        f"--quick {QUICK['width']})")
    parser.add_argument("--batch-size", type=int, help=f"batch size (default {d['batch_size']}; "
                        f"--quick {QUICK['batch_size']})")
    parser.add_argument("--models", help=f"comma-separated models (default {d['models']})")
    parser.add_argument("--levers", help=f"comma-separated lever combinations, '' for none (default {d['levers']})")
    parser.add_argument("--concurrency", help=f"comma-separated numbers of trials sharing the machine, '' for "
                        f"none (default {d['concurrency']})")
    parser.add_argument("--concurrency-epochs", type=int, help=f"epochs per trial in the sharing arrangements "
                        f"(default {d['concurrency_epochs']})")
    parser.add_argument("--out", default="BENCHMARKS.md", help="markdown file the tables go to (default BENCHMARKS.md)")
    parser.add_argument("--data-dir", help="data folder (default $ODENET_DATA_DIR or ~/.cache/odenet/data)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--quick", action="store_true", help="a tiny run for checking the command works "
                        "(numbers meaningless); explicit flags still win")


@dataclass(frozen=True)
class Settings:
    subset: int
    epochs: int
    repeats: int
    width: int
    batch_size: int
    models: tuple[str, ...]
    levers: tuple[str, ...]
    concurrency: tuple[int, ...]
    concurrency_epochs: int
    out: Path
    data_dir: str | None
    device: str
    quick: bool

    def command(self) -> str:
        """The explicit command that reproduces this run."""
        parts = ["odenet", "bench"] + (["--quick"] if self.quick else []) + [
            "--subset", str(self.subset), "--epochs", str(self.epochs), "--repeats", str(self.repeats),
            "--width", str(self.width), "--batch-size", str(self.batch_size),
            "--models", ",".join(self.models), "--levers", ",".join(self.levers),
            "--concurrency", ",".join(map(str, self.concurrency)),
            "--concurrency-epochs", str(self.concurrency_epochs),
            "--device", self.device, "--out", str(self.out)]
        if self.data_dir:
            parts += ["--data-dir", self.data_dir]
        return " ".join(shlex.quote(p) for p in parts)


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def settings_from_args(args: argparse.Namespace) -> Settings:
    from odenet.config import MODELS, ConfigError

    base = QUICK if args.quick else DEFAULTS

    def pick(name: str):
        value = getattr(args, name, None)
        return base[name] if value is None else value

    errors: list[str] = []
    models = tuple(_csv(pick("models")))
    for m in models:
        if m not in MODELS:
            errors.append(f"--models {m!r}: expected some of {', '.join(MODELS)}")
    if not models:
        errors.append("--models: expected at least one model")
    lever_text = pick("levers")
    if args.levers is None and not args.quick and _on_gpu(args.device):
        lever_text = ",".join([lever_text, GPU_LEVERS])
    levers = tuple(_csv(lever_text))
    for lever in levers:
        try:
            parse_lever(lever)
        except ValueError as exc:
            errors.append(f"--levers {lever!r}: {exc}")
    try:
        concurrency = tuple(sorted({int(n) for n in _csv(pick("concurrency"))}))
    except ValueError:
        concurrency = ()
        errors.append(f"--concurrency {pick('concurrency')!r}: expected comma-separated whole numbers")
    if any(n < 1 for n in concurrency):
        errors.append("--concurrency: numbers of trials must be at least 1")
    numbers = dict(subset=(pick("subset"), 10), epochs=(pick("epochs"), 1), width=(pick("width"), 1),
                   batch_size=(pick("batch_size"), 1), concurrency_epochs=(pick("concurrency_epochs"), 1),
                   repeats=(pick("repeats"), MIN_REPEATS))
    for name, (value, low) in numbers.items():
        if value < low:
            errors.append(f"--{name.replace('_', '-')} {value}: expected at least {low}"
                          + (" (medians of at least three interleaved repetitions)" if name == "repeats" else ""))
    if not (args.device in ("auto", "cpu", "cuda") or args.device.startswith("cuda:")):
        errors.append(f"--device {args.device!r}: expected auto, cpu, cuda or cuda:N")
    if errors:
        raise ConfigError(errors)
    return Settings(
        subset=pick("subset"), epochs=pick("epochs"), repeats=pick("repeats"), width=pick("width"),
        batch_size=pick("batch_size"), models=models, levers=levers, concurrency=concurrency,
        concurrency_epochs=pick("concurrency_epochs"), out=Path(args.out), data_dir=args.data_dir,
        device=args.device, quick=args.quick)


def _on_gpu(device: str) -> bool:
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return device.startswith("cuda")


# -- levers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Lever:
    name: str
    changes: dict[str, Any]
    loader: bool
    ode_only: bool
    model: str | None  # restricted to this model


def parse_lever(text: str) -> Lever:
    """'MODEL:atom+atom' -> the RunConfig changes and data source it stands for."""
    from odenet.config import FIXED_STEP_SOLVERS, MODELS, SOLVERS

    model, _, combo = text.rpartition(":")
    if model and model not in MODELS:
        raise ValueError(f"unknown model {model!r}")
    changes: dict[str, Any] = {}
    loader, ode_only = False, False
    atoms = [a.strip() for a in combo.split("+")]
    if not all(atoms):
        raise ValueError("empty atom")
    for atom in atoms:
        name, _, arg = atom.partition("@")
        value: float | None = None
        if arg:
            try:
                value = float(arg)
            except ValueError:
                raise ValueError(f"{atom!r}: expected a number after @") from None
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{atom!r}: expected a number > 0 after @")
        if name == "dataloader" and value is None:
            loader = True
            continue
        if name in DEVICE_ATOMS and value is None:
            changes.update(DEVICE_ATOMS[name])
            continue
        ode_only = True
        if name in ("direct", "seminorm", "adjoint") and value is None:
            changes["adjoint"] = name
        elif name in ("kinetic", "jacobian"):
            changes["kinetic_energy" if name == "kinetic" else "jacobian_norm"] = (
                DEFAULT_REGULARISER_WEIGHT if value is None else value)
        elif name in SOLVERS:
            changes["solver"] = name
            if name != EVAL_SOLVER:
                changes["eval_solver"] = EVAL_SOLVER
            if value is not None:
                if name not in FIXED_STEP_SOLVERS:
                    raise ValueError(f"{atom!r}: a step size is for fixed-step solvers "
                                     f"({', '.join(FIXED_STEP_SOLVERS)})")
                changes["step_size"] = value
        else:
            raise ValueError(f"unknown atom {atom!r}: expected direct, seminorm, adjoint, dataloader, "
                             f"{', '.join(DEVICE_ATOMS)}, "
                             f"kinetic[@W], jacobian[@W] or a solver[@STEP] ({', '.join(SOLVERS)})")
    if model and ode_only and model not in ("odenet-simple", "odenet-complex"):
        raise ValueError(f"{combo!r} changes the ODE solve; {model} has none")
    return Lever(text, changes, loader, ode_only, model or None)


# -- what is measured -------------------------------------------------------------------


@dataclass
class Case:
    """One configuration measured in one process per repetition."""

    key: str
    model: str
    loop: str  # ours | reference
    lever: str  # "default" or the lever's name
    changes: dict[str, Any] = field(default_factory=dict)
    loader: bool = False


@dataclass
class Arrangement:
    """n trials of one model's default settings at once, threads = cores / n each."""

    key: str
    model: str
    trials: int
    threads: int


def plan(s: Settings, cores: int) -> tuple[list[Case], list[Arrangement]]:
    from odenet.config import ODE_MODELS

    cases: list[Case] = []
    for model in s.models:
        cases.append(Case(f"{model}/ours", model, "ours", "default"))
        cases.append(Case(f"{model}/reference", model, "reference", "default"))
    for text in s.levers:
        lever = parse_lever(text)
        for model in s.models:
            if lever.model not in (None, model) or (lever.ode_only and model not in ODE_MODELS):
                continue
            name = text.rpartition(":")[2]
            cases.append(Case(f"{model}/{name}", model, "ours", name, lever.changes, lever.loader))
    seen: set[str] = set()
    unique = [c for c in cases if not (c.key in seen or seen.add(c.key))]
    arrangements = [Arrangement(f"{model}/x{n}", model, n, max(1, cores // n))
                    for model in s.models for n in s.concurrency]
    return unique, arrangements


def run_config(s: Settings, model: str, changes: dict[str, Any], epochs: int):
    from odenet.config import RunConfig

    values = dict(dataset="fashion-mnist", data_dir=s.data_dir, subset=s.subset, test_subset=10, model=model,
                  width=s.width, batch_size=s.batch_size, max_epochs=epochs, patience=epochs + 1,
                  device=s.device, reevaluate=False, seed=0, split_seed=0)
    values.update(changes)
    return RunConfig.from_dict(values)


# -- the worker: one measurement in a fresh process -------------------------------------


def _proc_status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory above a baseline taken after imports and data loading.

    CPU: Linux's VmHWM (peak resident set) after resetting it with /proc/self/clear_refs,
    minus VmRSS at the reset; where the reset is impossible, ru_maxrss minus that RSS
    (an upper bound: it includes the data loading's own peak). CUDA: the allocator's
    max_memory_allocated minus memory_allocated at the baseline.
    """

    def __init__(self, device):
        import gc

        import torch

        gc.collect()
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)
            self.method = "cuda max_memory_allocated"
            self.device = device
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.method = "VmHWM after clear_refs"
        except OSError:
            self.method = "ru_maxrss (upper bound)"
        rss = _proc_status_kib("VmRSS")
        if rss is None:
            import psutil  # non-Linux

            rss = psutil.Process().memory_info().rss // 1024
        self.base = rss * 1024

    def peak_mib(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        peak = _proc_status_kib("VmHWM") if self.method.startswith("VmHWM") else None
        if peak is None:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            if sys.platform == "darwin":
                peak //= 1024
        return (peak * 1024 - self.base) / 2**20


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one configuration as `spec` says and return what it measured."""
    import torch

    torch.set_num_threads(spec["threads"])
    from odenet import data as data_module
    from odenet import train
    from odenet.config import RunConfig
    from odenet.failures import Diverged

    config = RunConfig.from_dict(spec["config"])
    device = train.resolve_device(config.device)
    data = data_module.load(config, device)
    val_batches = math.ceil(len(data.val) / config.batch_size)
    memory = PeakMemory(device)
    epochs: list[dict[str, float]] = []
    try:
        if spec["loop"] == "reference":
            epochs = _reference_loop(config, data, device, val_batches)
        else:
            epochs = _our_loop(config, data, device, val_batches, loader=spec["loader"])
        error = None
    except Diverged as exc:
        error = f"diverged: {exc}"
    return dict(epochs=epochs, error=error, peak_mib=memory.peak_mib(), memory_method=memory.method,
                train_images=len(data.train), val_images=len(data.val), threads=torch.get_num_threads(),
                device=str(device))


def _our_loop(config, data, device, val_batches: int, loader: bool) -> list[dict[str, float]]:
    """odenet.train.fit as a trial runs it; validation is timed apart by wrapping its one call."""
    from odenet import train

    validation = {"time": 0.0, "fnfe": 0}
    evaluate = train.loss_and_accuracy

    def timed_evaluation(model, split, batch_size):
        _sync(device)
        start = time.perf_counter()
        model.reset_nfe()
        result = evaluate(model, split, batch_size)
        validation["fnfe"] = model.fnfe
        _sync(device)
        validation["time"] = time.perf_counter() - start
        return result

    if loader:
        data.train = loader_split(data.train.images, data.train.labels)
    epochs: list[dict[str, float]] = []

    def on_epoch(m, _path) -> None:
        epochs.append(dict(epoch_time_s=m.epoch_time_s, train_time_s=m.epoch_time_s - validation["time"],
                           val_acc=m.val_acc, fnfe=m.fnfe, bnfe=m.bnfe, val_fnfe=validation["fnfe"] / val_batches))

    train.loss_and_accuracy = timed_evaluation
    try:
        train.fit(config, data, on_epoch=on_epoch)
    finally:
        train.loss_and_accuracy = evaluate
    return epochs


def loader_split(images, labels):
    """The same images, but batches come from a torch DataLoader over a TensorDataset on the host."""
    from torch.utils.data import DataLoader, TensorDataset

    from odenet.data import Split

    class LoaderSplit(Split):
        def batches(self, batch_size, generator=None):
            device = self.images.device
            dataset = TensorDataset(self.images.cpu(), self.labels.cpu())
            for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=generator is not None,
                                   generator=generator):
                yield x.to(device), y.to(device)

    return LoaderSplit(images, labels)


def _reference_loop(config, data, device, val_batches: int) -> list[dict[str, float]]:
    """Training as torchdiffeq's MNIST example does it: DataLoader, odeint_adjoint, a plain loop.

    The same model (odenet.models.build, whose ODE block calls odeint_adjoint when
    config.adjoint is 'adjoint', the default), the same initial weights, optimiser, batch
    size, data and epochs as our loop; no loss bookkeeping, NFE is read once an epoch.
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from odenet import models
    from odenet.reference import use_reference_blocks
    from odenet.train import make_optimizer

    torch.manual_seed(config.seed)
    model = models.build(config).to(device)
    optimizer = make_optimizer(config, model)
    counters = [block.dynamics for block in model.ode_blocks]
    use_reference_blocks(model)
    train_set = TensorDataset(data.train.images.cpu(), data.train.labels.cpu())
    val_set = TensorDataset(data.val.images.cpu(), data.val.labels.cpu())
    train_loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(config.seed))
    val_loader = DataLoader(val_set, batch_size=config.batch_size)
    epochs = []
    for _ in range(config.max_epochs):
        _sync(device)
        start = time.perf_counter()
        model.train()
        _reset(counters)
        batches, forward_nfe = 0, 0
        for x, y in train_loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            before = _total(counters, "fnfe")  # the adjoint's backward solve evaluates f too: count the forward alone
            logits = model(x)
            forward_nfe += _total(counters, "fnfe") - before
            loss = F.cross_entropy(logits, y)
            loss.backward()
            optimizer.step()
            batches += 1
        fnfe, bnfe = forward_nfe / batches, _total(counters, "bnfe") / batches
        _sync(device)
        train_time = time.perf_counter() - start
        model.eval()
        _reset(counters)
        correct = 0
        with torch.no_grad():
            for x, y in val_loader:
                x, y = x.to(device), y.to(device)
                correct += int((model(x).argmax(1) == y).sum())
        _sync(device)
        epochs.append(dict(epoch_time_s=time.perf_counter() - start, train_time_s=train_time,
                           val_acc=correct / len(val_set), fnfe=fnfe, bnfe=bnfe,
                           val_fnfe=_total(counters, "fnfe") / val_batches))
    return epochs


def _total(counters, kind: str) -> int:
    """Summed NFE (kind: fnfe or bnfe) of the reference model's ODE-function counters."""
    return sum(getattr(c, kind) for c in counters)


def _reset(counters) -> None:
    for c in counters:
        c.reset()


def _worker_main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    result = worker(spec)
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


# -- the driver -------------------------------------------------------------------------


def _spawn(spec: dict[str, Any]) -> subprocess.Popen:
    env = dict(os.environ)
    threads = str(spec["threads"])
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "odenet.bench", json.dumps(spec)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _collect(proc: subprocess.Popen) -> dict[str, Any]:
    out, err = proc.communicate()
    lines = [line for line in out.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        tail = (err or out).strip().splitlines()[-3:]
        return dict(epochs=[], error=f"worker exited {proc.returncode}: {' | '.join(tail)}")
    return json.loads(lines[-1][len(RESULT_MARK):])


def summarise(result: dict[str, Any]) -> dict[str, float] | None:
    """One repetition's numbers: epoch time averaged over epochs, accuracy after the last."""
    epochs = result.get("epochs") or []
    if result.get("error") or not epochs:
        return None
    # From three epochs on, the first is a warm-up (CUDA kernel selection, torch.compile)
    # and stays out of the timings; accuracy is still read after the last epoch.
    timed = epochs[1:] if len(epochs) >= WARM_UP_FROM_EPOCHS else epochs
    n = len(timed)
    train_time = sum(e["train_time_s"] for e in timed)
    return dict(
        epoch_time_s=sum(e["epoch_time_s"] for e in timed) / n,
        train_time_s=train_time / n,
        images_per_s=result["train_images"] * n / train_time if train_time > 0 else math.nan,
        fnfe=sum(e["fnfe"] for e in timed) / n,
        bnfe=sum(e["bnfe"] for e in timed) / n,
        val_fnfe=sum(e["val_fnfe"] for e in timed) / n,
        val_acc=epochs[-1]["val_acc"],
        peak_mib=result["peak_mib"],
    )


def cores_available() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def main(args: argparse.Namespace) -> int:
    from odenet import data as data_module
    from odenet.train import resolve_device

    s = settings_from_args(args)
    device = resolve_device(s.device)  # a CUDA request without CUDA is bad input, before any work
    cores = cores_available()
    cases, arrangements = plan(s, cores)
    # Fetch or import the data once, here: workers then only read it.
    data_module.load(run_config(s, s.models[0], {}, 1), "cpu")

    started = time.time()
    loads: list[float] = []
    runs: dict[str, list[dict[str, Any]]] = {c.key: [] for c in cases}
    sharing: dict[str, list[list[dict[str, Any]]]] = {a.key: [] for a in arrangements}
    units = len(cases) + len(arrangements)
    _log(f"odenet bench: {len(cases)} configurations and {len(arrangements)} sharing arrangements, "
         f"{s.repeats} interleaved repetitions, {cores} cores, device {device}")
    for repeat in range(1, s.repeats + 1):
        for i, case in enumerate(cases, start=1):
            spec = dict(loop=case.loop, loader=case.loader, threads=cores,
                        config=run_config(s, case.model, case.changes, s.epochs).to_dict())
            result = _collect(_spawn(spec))
            loads.append(_load())
            runs[case.key].append(result)
            _log(f"[{repeat}/{s.repeats} {i}/{units} {_clock(time.time() - started)}] {case.key}: "
                 + _brief(result))
        for j, arrangement in enumerate(arrangements, start=len(cases) + 1):
            spec = dict(loop="ours", loader=False, threads=arrangement.threads,
                        config=run_config(s, arrangement.model, {}, s.concurrency_epochs).to_dict())
            procs = [_spawn(spec) for _ in range(arrangement.trials)]
            results = [_collect(p) for p in procs]
            loads.append(_load())
            sharing[arrangement.key].append(results)
            _log(f"[{repeat}/{s.repeats} {j}/{units} {_clock(time.time() - started)}] {arrangement.key}: "
                 + "; ".join(_brief(r) for r in results))
        # Written after every repetition: a run stopped early still leaves its finished ones.
        report = Report(s, cases, arrangements, runs, sharing, cores, device, time.time() - started, loads)
        text = report.markdown()
        s.out.parent.mkdir(parents=True, exist_ok=True)
        write_section(s.out, device.type, text)
    print(text)
    _log(f"wrote {s.out}")
    return 0


def write_section(path: Path, key: str, text: str) -> None:
    """Put `text` into `path` between this key's markers: a CPU run and a GPU run share
    one BENCHMARKS.md, each command rewriting only its own section."""
    begin, end = f"<!-- odenet bench: {key} -->", f"<!-- odenet bench: {key} end -->"
    section = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + section + rest.split(end, 1)[1].lstrip("\n")
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + section
    path.write_text(new)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return math.nan


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def _brief(result: dict[str, Any]) -> str:
    summary = summarise(result)
    if summary is None:
        return f"FAILED ({result.get('error')})"
    return (f"epoch {summary['epoch_time_s']:.2f}s, {summary['images_per_s']:.0f} img/s, "
            f"fnfe {summary['fnfe']:.1f}, bnfe {summary['bnfe']:.1f}, val_acc {summary['val_acc']:.4f}, "
            f"peak {summary['peak_mib']:.0f} MiB")


# -- the report ---------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else math.nan


class Report:
    def __init__(self, s, cases, arrangements, runs, sharing, cores, device, wall_s, loads=()):
        self.s, self.cases, self.arrangements = s, cases, arrangements
        self.loads = [x for x in loads if not math.isnan(x)]
        self.completed = min((len(v) for v in runs.values()), default=0)
        self.cores, self.device, self.wall_s = cores, device, wall_s
        self.per_repeat = {k: [summarise(r) for r in v] for k, v in runs.items()}
        self.errors = {k: [r.get("error") for r in v if r.get("error")] for k, v in runs.items()}
        self.sharing = sharing
        self.methods = sorted({r.get("memory_method") for v in runs.values() for r in v if r.get("memory_method")})
        self.train_images = next((r["train_images"] for v in runs.values() for r in v if "train_images" in r), None)
        self.val_images = next((r["val_images"] for v in runs.values() for r in v if "val_images" in r), None)

    # medians and within-repetition ratios
    def median(self, key: str, metric: str) -> float:
        return _median([r[metric] for r in self.per_repeat.get(key, []) if r is not None])

    def ratio(self, key: str, base: str, metric: str = "epoch_time_s") -> float:
        """Median over repetitions of key/base, each pair from the same repetition."""
        pairs = zip(self.per_repeat.get(key, []), self.per_repeat.get(base, []))
        return _median([a[metric] / b[metric] for a, b in pairs if a and b and b[metric] > 0])

    def spread(self, key: str) -> float:
        times = [r["epoch_time_s"] for r in self.per_repeat.get(key, []) if r is not None]
        if len(times) < 2:
            return math.nan
        return 100 * (max(times) - min(times)) / statistics.median(times)

    def ok(self, key: str) -> bool:
        return any(r is not None for r in self.per_repeat.get(key, []))

    # tables
    def _row(self, case: Case) -> dict[str, Any]:
        if not self.ok(case.key):
            return {"epoch s": "failed: " + "; ".join(self.errors.get(case.key, [])[:1])}
        m = lambda metric: self.median(case.key, metric)  # noqa: E731
        return {
            "epoch s": m("epoch_time_s"),
            "spread %": self.spread(case.key),
            "train img/s": m("images_per_s"),
            "FNFE": m("fnfe"),
            "BNFE": m("bnfe"),
            "val FNFE": m("val_fnfe"),
            "peak MiB": m("peak_mib"),
            "val acc": m("val_acc"),
        }

    def models_table(self):
        import pandas as pd

        rows = []
        for case in self.cases:
            if case.lever == "default":
                rows.append({"model": case.model, "loop": case.loop, **self._row(case)})
        return pd.DataFrame(rows)

    def loop_table(self):
        import pandas as pd

        rows = []
        for model in self.s.models:
            ours, ref = f"{model}/ours", f"{model}/reference"
            rows.append({
                "model": model,
                "ours epoch s": self.median(ours, "epoch_time_s"),
                "reference epoch s": self.median(ref, "epoch_time_s"),
                "speed-up (reference / ours)": self.ratio(ref, ours),
                "train speed-up (img/s ours / reference)": self.ratio(ours, ref, "images_per_s"),
                "ours val acc": self.median(ours, "val_acc"),
                "reference val acc": self.median(ref, "val_acc"),
            })
        return pd.DataFrame(rows)

    def lever_table(self):
        import pandas as pd

        rows = []
        resnet = f"{RESNET_MODEL}/ours" if RESNET_MODEL in self.s.models else None
        for model in self.s.models:
            levers = [c for c in self.cases if c.model == model and c.lever != "default"]
            if not levers:
                continue
            for case in [c for c in self.cases if c.key == f"{model}/ours"] + levers:
                row = {"model": case.model, "levers": case.lever, "settings": _settings_text(case),
                       **self._row(case)}
                if self.ok(case.key):
                    row["x default"] = self.ratio(case.key, f"{case.model}/ours")
                    if resnet and self.ok(resnet) and case.model != RESNET_MODEL:
                        row[f"x {RESNET_MODEL}"] = self.ratio(case.key, resnet)
                        row[f"acc gap vs {RESNET_MODEL} (points)"] = 100 * (
                            self.median(case.key, "val_acc") - self.median(resnet, "val_acc"))
                rows.append(row)
        return pd.DataFrame(rows)

    def sharing_table(self):
        import pandas as pd

        rows = []
        for a in self.arrangements:
            per_repeat = []
            trial_times = []
            for results in self.sharing[a.key]:
                summaries = [summarise(r) for r in results]
                if all(x is not None for x in summaries):
                    per_repeat.append(sum(x["images_per_s"] for x in summaries))
                    trial_times.append(statistics.mean(x["epoch_time_s"] for x in summaries))
            base = f"{a.model}/x{min(self.s.concurrency)}"
            rows.append({
                "model": a.model, "trials at once": a.trials, "threads each": a.threads,
                "epoch s per trial": _median(trial_times),
                "train img/s summed": _median(per_repeat),
                f"x {min(self.s.concurrency)} trial(s)": self._sharing_ratio(a.key, base),
            })
        return pd.DataFrame(rows)

    def _sharing_ratio(self, key: str, base: str) -> float:
        ratios = []
        for results, base_results in zip(self.sharing[key], self.sharing[base]):
            a = [summarise(r) for r in results]
            b = [summarise(r) for r in base_results]
            if all(a) and all(b):
                ratios.append(sum(x["images_per_s"] for x in a) / sum(x["images_per_s"] for x in b))
        return _median(ratios)

    def ratio_lines(self) -> list[str]:
        ode, resnet = f"{ODE_MODEL}/ours", f"{RESNET_MODEL}/ours"
        if not (self.ok(ode) and self.ok(resnet)):
            return [f"- The {ODE_MODEL} / {RESNET_MODEL} ratio needs both models measured (--models)."]
        resnet_acc = self.median(resnet, "val_acc")
        lines = [
            f"- **{ODE_MODEL} / {RESNET_MODEL} epoch time at default settings: {self.ratio(ode, resnet):.1f}x** "
            f"(val acc {self.median(ode, 'val_acc'):.4f} vs {resnet_acc:.4f}).",
        ]
        candidates = []
        for case in self.cases:
            if case.model == ODE_MODEL and case.loop == "ours" and self.ok(case.key):
                gap = 100 * (self.median(case.key, "val_acc") - resnet_acc)
                candidates.append((self.ratio(case.key, resnet), gap, case))
        within = [c for c in candidates if c[1] >= -ACCURACY_WINDOW_POINTS - 1e-9]
        if within:
            r, gap, case = min(within, key=lambda c: c[0])
            lines.append(
                f"- **Best with levers, validation accuracy within {ACCURACY_WINDOW_POINTS} points of "
                f"{RESNET_MODEL}'s (or above it): {r:.1f}x with `{case.lever}`** ({_settings_text(case)}; "
                f"val acc {self.median(case.key, 'val_acc'):.4f}, gap {gap:+.2f} points)."
                + (" Target (5 or less) reached." if r <= 5 else " Target (5 or less) not reached."))
        else:
            lines.append(f"- No measured combination kept validation accuracy within {ACCURACY_WINDOW_POINTS} "
                         f"points of {RESNET_MODEL}'s.")
        if candidates:
            r, gap, case = min(candidates, key=lambda c: c[0])
            lines.append(f"- Lowest ratio at any accuracy: {r:.1f}x with `{case.lever}` (gap {gap:+.2f} points).")
        for model in self.s.models:
            ours, ref = f"{model}/ours", f"{model}/reference"
            if self.ok(ours) and self.ok(ref):
                sp = self.ratio(ref, ours)
                lines.append(f"- Our loop against the reference loop, {model}: {sp:.2f}x "
                             f"({'at least as fast' if sp >= 1 else 'slower'}; target 1.5x).")
        return lines

    def header(self) -> list[str]:
        import torch
        import torchdiffeq

        s = self.s
        date = datetime.datetime.now(datetime.timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M %Z")
        gpu = ""
        if self.device.type == "cuda":
            gpu = f"; GPU {torch.cuda.get_device_name(self.device)}"
        return [
            f"# Benchmarks on {'the GPU' if self.device.type == 'cuda' else 'the CPU'}: what a training epoch costs",
            "",
            f"- Machine: {_cpu_model()}, {self.cores} cores available, {_memory_gib():.0f} GiB RAM{gpu}; "
            f"{platform.system()} {platform.release()}; Python {platform.python_version()}, torch "
            f"{torch.__version__} ({torch.get_num_threads()} threads by default), torchdiffeq "
            f"{getattr(torchdiffeq, '__version__', '?')}; device {self.device}.",
            f"- Date: {date}; the run took {_clock(self.wall_s)} (min:s) of wall time"
            + (f"; 1-minute load average after each measurement: median {statistics.median(self.loads):.1f}, "
               f"max {max(self.loads):.1f} (the benchmark itself keeps about {self.cores} busy; more means "
               f"other work shared the machine)." if self.loads else "."),
            f"- Command: `{s.command()}`",
        ] + ([f"- **Incomplete**: {self.completed} of {s.repeats} repetitions finished; the medians are "
              f"over those."] if self.completed < s.repeats else []) + [
            f"- Data: real FashionMNIST, the first {s.subset} training images, split 80/20 with split seed 0: "
            f"{self.train_images} training, {self.val_images} validation images. Models at width {s.width}, "
            f"batch size {s.batch_size}, Adam lr 1e-3, seed 0, {s.epochs} epoch(s) per run, "
            f"{s.repeats} interleaved repetitions.",
        ]

    def notes(self) -> list[str]:
        s = self.s
        return [
            "## How it was measured",
            "",
            "- Every configuration trains in a fresh Python process (`python -m odenet.bench SPEC`), so caches, "
            "allocator state and peak memory are its own. One repetition runs every configuration once, in the "
            "order of the tables, then the sharing arrangements; the repetitions follow each other "
            "(A B C A B C A B C), so slow phases of this shared machine hit all configurations alike. Tables "
            "show medians over the repetitions; every ratio (`x ...`, speed-ups) is the median of the ratios "
            "taken within each repetition, against the baseline measured in that same repetition.",
            "- **epoch s**: wall time of one epoch as `odenet.train.fit` reports it (`epoch_time_s`: training "
            f"plus validation), averaged over the run's epochs, the first left out from {WARM_UP_FROM_EPOCHS} "
            "epochs on (warm-up: CUDA kernel selection, torch.compile). **spread %**: (max - min) / median of it over "
            "the repetitions, the noise of this machine. **train img/s**: training images / training time, "
            "validation excluded (our loop's validation call is timed apart by wrapping "
            "`odenet.train.loss_and_accuracy` in the worker process).",
            "- **FNFE / BNFE**: mean ODE-function evaluations per training batch in the forward / backward "
            "pass (the library's counters), averaged over epochs; **val FNFE**: per validation batch, with the "
            "evaluation solver. **val acc**: validation accuracy after the last epoch (not the best epoch).",
            f"- **peak MiB**: {'; '.join(self.methods) or 'n/a'} — the process's peak memory during training "
            "and validation minus its resident memory after imports and data loading (the Linux peak "
            "resident set, reset through /proc/self/clear_refs at that point; on CUDA the allocator's peak).",
            "- **Our loop**: `odenet.train.fit` with the run configuration, batches as device-resident index "
            "slices (`odenet.data.Split.batches`). **Reference loop**: written the way torchdiffeq's MNIST "
            "example trains: a `DataLoader(TensorDataset(images, labels), batch_size, shuffle=True)` over "
            "the same scaled images on the host, each batch moved to the device, `zero_grad`, cross-entropy, "
            "`backward`, `step`, nothing else; validation accuracy through a DataLoader under `no_grad`. "
            "Same model (`odenet.models.build`), except that its ODE block is the example's "
            "(`odenet.reference`: `odeint_adjoint` with torchdiffeq's own dopri5, where ours uses "
            "`odenet.solvers`, the same algorithm with less arithmetic); same seed and so the same initial "
            "weights, same optimiser, batch size, data and epochs. The batch order differs (each loop's own "
            "shuffling), so accuracies differ a little.",
            "- **Levers** are RunConfig settings (the `settings` column) on top of the defaults (dopri5, "
            "rtol = atol = 1e-3, adjoint); `x default` compares with the same model's default row. Solver "
            f"levers train with the named solver and validate with {EVAL_SOLVER} at the run's tolerances "
            "(`eval_solver`), so validation accuracy stays the dopri5 one. `dataloader`: our loop, but the "
            "training batches come from a DataLoader over a TensorDataset on the host. Regulariser weights "
            "are the numbers after `@` (`kinetic`/`jacobian` alone: "
            f"{DEFAULT_REGULARISER_WEIGHT}). `acc gap` is val acc minus {RESNET_MODEL}'s default, in points.",
            f"- **Trials sharing the machine**: n processes of one model's default settings started together, "
            f"each with torch threads = {self.cores} cores / n, {s.concurrency_epochs} epoch(s) each; "
            "`train img/s summed` adds the trials' training throughputs.",
            "- This is a measurement, not a test: nothing here passes or fails on a time.",
        ]

    def markdown(self) -> str:
        parts = self.header() + ["", "## Ratios", ""] + self.ratio_lines()
        parts += ["", "## Each model at default settings: our loop and the reference loop", "",
                  _table(self.models_table()), "", "## Our loop against the reference loop", "",
                  _table(self.loop_table())]
        levers = self.lever_table()
        if len(levers):
            parts += ["", "## Levers", "", _table(levers)]
        if self.arrangements:
            parts += ["", "## Trials sharing the machine", "", _table(self.sharing_table())]
        failures = [f"- {k}: {e}" for k, errs in self.errors.items() for e in errs]
        if failures:
            parts += ["", "## Failed runs", ""] + failures
        parts += [""] + self.notes()
        return "\n".join(parts) + "\n"


def _settings_text(case: Case) -> str:
    text = ", ".join(f"{k}={_number(v)}" for k, v in case.changes.items())
    if case.loader:
        text = (text + ", " if text else "") + "batches from a DataLoader"
    return text or "defaults"


def _number(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _table(df) -> str:
    """Markdown; accuracies with 4 decimals, other numbers to about 3 significant digits,
    a value that was not measured as '-'."""
    from pandas.api.types import is_numeric_dtype

    numeric = [is_numeric_dtype(df[c]) or df[c].map(lambda v: isinstance(v, (int, float))).all() for c in df]
    cells = df.astype(object).copy()
    for column in cells:
        accuracy = column.endswith("acc")
        cells[column] = [_cell(v, accuracy) for v in df[column]]
    return cells.to_markdown(index=False, disable_numparse=True,
                             colalign=["right" if n else "left" for n in numeric])


def _cell(v: Any, accuracy: bool = False) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if math.isnan(v):
        return "-"
    if isinstance(v, int):
        return str(v)
    if accuracy:
        return f"{v:.4f}"
    magnitude = abs(v)
    if magnitude >= 100 or v == 0:
        return f"{v:,.0f}"
    if magnitude >= 10:
        return f"{v:.1f}"
    if magnitude >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return math.nan


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
