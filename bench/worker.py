"""One measurement in a fresh process: `python -m bench.worker SPEC` trains as SPEC says and
prints what it measured on a line marked RESULT_MARK.

SPEC (JSON): `config` (RunConfig fields), `loop` (ours | reference), `dataloader` (our loop
with training batches from a DataLoader), `threads` (torch threads). A fresh process per
measurement keeps caches, allocator state and peak memory its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from bench.memory import PeakMemory
from bench.reference import train_reference
from odenet import data as data_module
from odenet import envvars, progress
from odenet.config import RunConfig
from odenet.failures import Diverged
from odenet.train import fit, resolve_device

RESULT_MARK = "BENCH-RESULT "


def spawn(spec: dict[str, Any]) -> subprocess.Popen:
    """Start one measurement; `collect` waits for it."""
    env = dict(os.environ)
    threads = str(spec["threads"])
    # No progress output: the measurement times the loop alone, and the driver shows the progress.
    env.update({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1",
                envvars.PROGRESS: progress.OFF})
    return subprocess.Popen([sys.executable, "-m", "bench.worker", json.dumps(spec)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def collect(process: subprocess.Popen) -> dict[str, Any]:
    """What `measure` returned in the process, or an error with the end of its output."""
    out, err = process.communicate()
    lines = [line for line in out.splitlines() if line.startswith(RESULT_MARK)]
    if process.returncode != 0 or not lines:
        tail = (err or out).strip().splitlines()[-3:]
        return dict(epochs=[], error=f"worker exited {process.returncode}: {' | '.join(tail)}")
    return json.loads(lines[-1][len(RESULT_MARK):])


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one configuration and return its epochs as `fit` reports them, and its peak memory."""
    torch.set_num_threads(spec["threads"])
    config = RunConfig.from_dict(spec["config"])
    device = resolve_device(config.device)
    data = data_module.load(config, device)
    memory = PeakMemory(device)
    epochs: list[dict[str, float]] = []
    error = None
    try:
        if spec["loop"] == "reference":
            epochs = train_reference(config, data, device)
        else:
            if spec["dataloader"]:
                data.train = DataLoaderSplit(data.train.images, data.train.labels)
            epochs = [metrics.as_dict() for metrics in fit(config, data).history]
    except Diverged as exc:
        error = f"diverged: {exc}"
    return dict(epochs=epochs, error=error, peak_mib=memory.peak_mib(), memory_method=memory.method,
                train_images=len(data.train), val_images=len(data.val))


class DataLoaderSplit(data_module.Split):
    """The same images, but batches come from a torch DataLoader over a TensorDataset on the host."""

    def batches(self, batch_size, generator=None):
        device = self.images.device
        dataset = TensorDataset(self.images.cpu(), self.labels.cpu())
        for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=generator is not None, generator=generator):
            yield x.to(device), y.to(device)


if __name__ == "__main__":
    print(RESULT_MARK + json.dumps(measure(json.loads(sys.argv[1]))), flush=True)
