"""BENCHMARKS.md: a run's section (machine, command, tables, how each number was measured),
and the writer that replaces only that section of the file."""

from __future__ import annotations

import datetime
import math
import os
import platform
import re
import statistics
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torchdiffeq
from pandas.api.types import is_numeric_dtype

from bench.levers import DEFAULT_REGULARISER_WEIGHT, EVAL_SOLVER
from bench.results import RESNET_MODEL, WARM_UP_FROM_EPOCHS, Measurements
from odenet.machine import cpu_model


def section(measured: Measurements, device: torch.device, cores: int, wall_s: float, loads: list[float]) -> str:
    """The markdown of one run: header, ratios, tables, failures, provenance."""
    parts = _header(measured, device, cores, wall_s, loads) + ["", "## Ratios", ""] + measured.ratio_lines()
    parts += ["", "## Each model at default settings: our loop and the reference loop", "",
              table(measured.models_table()), "", "## Our loop against the reference loop", "",
              table(measured.loop_table())]
    lever_table = measured.lever_table()
    if len(lever_table):
        parts += ["", "## Levers", "", table(lever_table)]
    if measured.sharing:
        parts += ["", "## Trials sharing the machine", "", table(measured.sharing_table())]
    failures = [f"- {key}: {error}" for key, errors in measured.errors.items() for error in errors]
    if failures:
        parts += ["", "## Failed runs", ""] + failures
    parts += [""] + _provenance(measured, cores)
    return "\n".join(parts) + "\n"


def _markers(key: str) -> tuple[str, str]:
    """The comments around a section: what write_section writes and sections() reads."""
    return f"<!-- odenet bench: {key} -->", f"<!-- odenet bench: {key} end -->"


def write_section(path: Path, key: str, text: str) -> None:
    """Put `text` into `path` between this key's markers: a CPU run and a GPU run share
    one BENCHMARKS.md, each command rewriting only its own section."""
    begin, end = _markers(key)
    new_section = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + new_section + rest.split(end, 1)[1].lstrip("\n")
    else:
        new = (old.rstrip() + "\n\n" if old.strip() else "") + new_section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def clock(seconds: float) -> str:
    """min:s"""
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def _header(measured: Measurements, device: torch.device, cores: int, wall_s: float, loads: list[float]) -> list[str]:
    settings = measured.settings
    loads = [x for x in loads if not math.isnan(x)]
    date = datetime.datetime.now(datetime.timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M %Z")
    gpu = f"; GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    lines = [
        f"# Benchmarks on {'the GPU' if device.type == 'cuda' else 'the CPU'}: what a training epoch costs",
        "",
        f"- Machine: {cpu_model()}, {cores} cores available, {_memory_gib():.0f} GiB RAM{gpu}; "
        f"{platform.system()} {platform.release()}; Python {platform.python_version()}, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads by default), torchdiffeq "
        f"{getattr(torchdiffeq, '__version__', '?')}; device {device}.",
        f"- Date: {date}; the run took {clock(wall_s)} (min:s) of wall time"
        + (f"; 1-minute load average after each measurement: median {statistics.median(loads):.1f}, "
           f"max {max(loads):.1f} (the benchmark keeps about {cores} busy)." if loads else "."),
        f"- Command: `{settings.command()}`",
    ]
    if measured.completed < settings.repeats:
        lines.append(f"- **Incomplete**: {measured.completed} of {settings.repeats} repetitions finished; the "
                     f"medians are over those.")
    lines.append(
        f"- Data: real FashionMNIST, the first {settings.subset} training images, split 80/20 with split seed 0: "
        f"{measured.train_images} training, {measured.val_images} validation images. Models at width "
        f"{settings.width}, batch size {settings.batch_size}, Adam lr 1e-3, seed 0, {settings.epochs} epoch(s) "
        f"per run, {settings.repeats} interleaved repetitions.")
    return lines


def _provenance(measured: Measurements, cores: int) -> list[str]:
    sharing = [f"- **Sharing**: n processes at once, torch threads = {cores} cores / n each, "
               f"{measured.settings.concurrency_epochs} epoch(s) each; img/s summed over the trials."]
    return [
        "## How it was measured",
        "",
        "- Each configuration trains in a fresh process (forked from a server that has only imported the code: "
        "`bench/worker.py`); repetitions interleave "
        "(A B C A B C ...); tables show medians over repetitions, ratios the median of within-repetition ratios.",
        "- **epoch s**: `fit`'s `epoch_time_s` (training + validation), mean over epochs, the first left out "
        f"from {WARM_UP_FROM_EPOCHS} epochs on; **spread %**: (max - min) / median over repetitions; "
        "**train img/s**: training images / (`epoch_time_s` - `val_time_s`).",
        "- **FNFE / BNFE**: `fit`'s means per training batch; **val FNFE**: its `val_fnfe`, per validation "
        "batch with the evaluation solver; **val acc**: after the last epoch.",
        f"- **peak MiB**: {'; '.join(measured.memory_methods) or 'n/a'}, above the process's memory after "
        "imports and data loading.",
        "- **Reference loop** (`bench/reference.py`): torchdiffeq's MNIST example loop, a DataLoader over a "
        "TensorDataset on the host and `odeint_adjoint` with torchdiffeq's dopri5; same model, seed, "
        "optimiser, batch size, data and epochs as ours (`odenet.train.fit`).",
        f"- **Levers**: RunConfig settings (`settings`) on the defaults (dopri5 at 1e-3, adjoint); solver "
        f"levers validate with {EVAL_SOLVER}; regulariser weight {DEFAULT_REGULARISER_WEIGHT} unless given "
        f"after `@`; `acc gap`: val acc minus {RESNET_MODEL}'s default, in points.",
    ] + (sharing if measured.sharing else []) + [
        "- A measurement, not a test: nothing here passes or fails on a time.",
    ]


def table(frame: pd.DataFrame) -> str:
    """Markdown; accuracies with 4 decimals, other numbers to about 3 significant digits,
    a value that was not measured as '-'."""
    numeric = [is_numeric_dtype(frame[c]) or frame[c].map(lambda v: isinstance(v, (int, float))).all()
               for c in frame]
    cells = frame.astype(object).copy()
    for column in cells:
        cells[column] = [_cell(v, accuracy=column.endswith("acc")) for v in frame[column]]
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


def _memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return math.nan


# -- reading it back ------------------------------------------------------------------------------------------------

# The BENCHMARKS.md of this checkout: what `--estimate` (sweeps/estimate.py) costs sweeps from.
BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def sections(text: str) -> dict[str, str]:
    """{key: body} of every section write_section wrote into a BENCHMARKS.md's text."""
    begin, end = (re.escape(marker).replace("KEY", placeholder)
                  for marker, placeholder in zip(_markers("KEY"), (r"(\w+)", r"\1")))
    return dict(re.findall(begin + "(.*?)" + end, text, re.S))


def our_epoch_s(text: str) -> dict[str, dict[str, float]]:
    """{device: {model: seconds per epoch}}: the "our loop" rows of each section's model table."""
    found: dict[str, dict[str, float]] = {}
    for device, body in sections(text).items():
        for model, seconds in re.findall(r"^\| (\S+)\s+\| ours\s+\|\s+([\d.]+) \|", body, re.M):
            found.setdefault(device, {})[model] = float(seconds)
    return found


def lever_epoch_s(text: str, model: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """{device: [(settings, seconds per epoch)]}: the rows of each section's lever table for `model`,
    in table order, settings as written (e.g. {"adjoint": "direct", "solver": "rk4"}; {} for defaults)."""
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for device, body in sections(text).items():
        lever_table = body.split("## Levers", 1)[1] if "## Levers" in body else ""
        for settings, seconds in re.findall(rf"^\| {re.escape(model)}\s+\| \S+\s+\| ([^|]+?)\s+\|\s+([\d.]+) \|",
                                            lever_table.split("\n## ", 1)[0], re.M):
            pairs = dict(item.split("=", 1) for item in settings.split(", ") if "=" in item)
            found.setdefault(device, []).append((pairs, float(seconds)))
    return found
