"""One measurement in a fresh process: `spawn(SPEC)` trains as SPEC says in a process of its
own and `collect` returns what it measured.

SPEC: `config` (RunConfig fields), `loop` (ours | reference), `dataloader` (our loop with
training batches from a DataLoader), `threads` (torch threads). A fresh process per measurement
keeps caches, allocator state and peak memory its own. The processes are forked from a server
(multiprocessing's forkserver) that has imported this module and done nothing else: importing
torch, torchdiffeq and the models took about 4 s of CPU per measurement, most of a --quick run.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
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

@dataclass
class Running:
    """A measurement under way: its process and the end of the pipe its result comes from."""

    process: multiprocessing.process.BaseProcess
    results: Connection


@functools.cache
def _forkserver() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])  # the server imports torch and the models once
    return context


def spawn(spec: dict[str, Any]) -> Running:
    """Start one measurement; `collect` waits for it."""
    context = _forkserver()
    results, sending = context.Pipe(duplex=False)
    process = context.Process(target=_measure_in_child, args=(spec, sending), daemon=True)
    process.start()
    sending.close()  # the child holds the only sending end: its exit is our end of file
    return Running(process, results)


def collect(running: Running) -> dict[str, Any]:
    """What `measure` returned in the process, or an error saying how the process ended."""
    try:
        result = running.results.recv()
    except EOFError:  # it died before sending (killed, out of memory, a crash in native code)
        result = None
    running.process.join()
    running.results.close()
    if result is None:
        return dict(epochs=[], error=f"worker exited {running.process.exitcode} without a result")
    return result


def _measure_in_child(spec: dict[str, Any], sending: Connection) -> None:
    # No progress output and nothing on the driver's terminal: the measurement times the loop
    # alone, and the driver shows the progress. Torch's thread count is set in measure().
    os.environ[envvars.PROGRESS] = progress.OFF
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        result = measure(spec)
    except BaseException as exc:  # the driver reports it as this repetition's failure
        last = traceback.format_exception_only(exc)[-1].strip()
        result = dict(epochs=[], error=f"worker failed: {last}")
    sending.send(result)
    sending.close()


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

