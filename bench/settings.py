"""`python -m bench`'s flags and the validated settings they make, with the command that repeats a run."""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from bench import levers
from odenet.config import MODELS, ConfigError

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
LOWEST = dict(subset=10, epochs=1, width=1, batch_size=1, concurrency_epochs=1, repeats=MIN_REPEATS)


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
        parts = ["python", "-m", "bench"] + (["--quick"] if self.quick else []) + [
            "--subset", str(self.subset), "--epochs", str(self.epochs), "--repeats", str(self.repeats),
            "--width", str(self.width), "--batch-size", str(self.batch_size),
            "--models", ",".join(self.models), "--levers", ",".join(self.levers),
            "--concurrency", ",".join(map(str, self.concurrency)),
            "--concurrency-epochs", str(self.concurrency_epochs),
            "--device", self.device, "--out", str(self.out)]
        if self.data_dir:
            parts += ["--data-dir", self.data_dir]
        return " ".join(shlex.quote(p) for p in parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Measure training cost on real FashionMNIST: each model by our loop and by a reference "
        "loop, the levers (adjoint/direct/seminorm backpropagation, training solver with dopri5 "
        "evaluation, kinetic/Jacobian regularisers, DataLoader batches; on a GPU also channels_last, "
        "bf16 and torch.compile) and trials sharing the machine; interleaved repetitions, medians. "
        "Writes the tables into --out, in this device's section (cpu or cuda). The defaults take "
        "about 20 minutes on 2 CPU cores.",
        epilog="A lever is" + levers.__doc__.split("A lever is", 1)[1])
    parser.add_argument("--subset", type=int, help=f"first N FashionMNIST training images, 80/20 train/validation "
                        f"(default {DEFAULTS['subset']}; --quick {QUICK['subset']})")
    parser.add_argument("--epochs", type=int, help=f"epochs E per run; accuracy is read after E "
                        f"(default {DEFAULTS['epochs']}; --quick {QUICK['epochs']})")
    parser.add_argument("--repeats", type=int, help=f"interleaved repetitions, at least {MIN_REPEATS} "
                        f"(default {DEFAULTS['repeats']})")
    parser.add_argument("--width", type=int, help=f"model width C (default {DEFAULTS['width']}, the study's; "
                        f"--quick {QUICK['width']})")
    parser.add_argument("--batch-size", type=int, help=f"batch size (default {DEFAULTS['batch_size']}; "
                        f"--quick {QUICK['batch_size']})")
    parser.add_argument("--models", help=f"comma-separated models (default {DEFAULTS['models']})")
    parser.add_argument("--levers", help=f"comma-separated lever combinations, '' for none "
                        f"(default {DEFAULTS['levers']})")
    parser.add_argument("--concurrency", help=f"comma-separated numbers of trials sharing the machine, '' for "
                        f"none (default {DEFAULTS['concurrency']})")
    parser.add_argument("--concurrency-epochs", type=int, help=f"epochs per trial in the sharing measurements "
                        f"(default {DEFAULTS['concurrency_epochs']})")
    parser.add_argument("--out", default="BENCHMARKS.md", help="markdown file the tables go to (default BENCHMARKS.md)")
    parser.add_argument("--data-dir", help="data folder (default $ODENET_DATA_DIR or ~/.cache/odenet/data)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--quick", action="store_true", help="a tiny run for checking the command works "
                        "(numbers meaningless); explicit flags still win")
    return parser


def parse(argv: Sequence[str] | None = None) -> Settings:
    """The flags as validated settings; every bad one is named in one ConfigError."""
    args = build_parser().parse_args(argv)
    base = QUICK if args.quick else DEFAULTS

    def given_or_default(name: str):
        value = getattr(args, name)
        return base[name] if value is None else value

    errors: list[str] = []
    models = tuple(_comma_separated(given_or_default("models")))
    errors += [f"--models {m!r}: expected some of {', '.join(MODELS)}" for m in models if m not in MODELS]
    if not models:
        errors.append("--models: expected at least one model")
    lever_text = given_or_default("levers")
    if args.levers is None and not args.quick and _on_gpu(args.device):
        lever_text = ",".join([lever_text, GPU_LEVERS])
    lever_names = tuple(_comma_separated(lever_text))
    for name in lever_names:
        try:
            levers.parse_lever(name)
        except ValueError as exc:
            errors.append(f"--levers {name!r}: {exc}")
    try:
        concurrency = tuple(sorted({int(n) for n in _comma_separated(given_or_default("concurrency"))}))
    except ValueError:
        concurrency = ()
        errors.append(f"--concurrency {given_or_default('concurrency')!r}: expected comma-separated whole numbers")
    if any(n < 1 for n in concurrency):
        errors.append("--concurrency: numbers of trials must be at least 1")
    for name, lowest in LOWEST.items():
        if given_or_default(name) < lowest:
            errors.append(f"--{name.replace('_', '-')} {given_or_default(name)}: expected at least {lowest}"
                          + (" (medians of at least three interleaved repetitions)" if name == "repeats" else ""))
    if not (args.device in ("auto", "cpu", "cuda") or args.device.startswith("cuda:")):
        errors.append(f"--device {args.device!r}: expected auto, cpu, cuda or cuda:N")
    if errors:
        raise ConfigError(errors)
    return Settings(
        subset=given_or_default("subset"), epochs=given_or_default("epochs"), repeats=given_or_default("repeats"),
        width=given_or_default("width"), batch_size=given_or_default("batch_size"), models=models,
        levers=lever_names, concurrency=concurrency, concurrency_epochs=given_or_default("concurrency_epochs"),
        out=Path(args.out), data_dir=args.data_dir, device=args.device, quick=args.quick)


def _comma_separated(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _on_gpu(device: str) -> bool:
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return device.startswith("cuda")
