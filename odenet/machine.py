"""The machine a run used, in the terms its cost columns need: the device's model and the run's
peak memory, so FNFE, epoch time and memory compare across runs and machines."""

from __future__ import annotations

import platform
import resource
import sys
from pathlib import Path

import torch

# How peak memory was measured, by device type: the tag beside the metric says which.
CUDA_PEAK = "cuda max_memory_allocated (tensors on the GPU, since the run started)"
CPU_PEAK = "peak resident set of the run's process (ru_maxrss, since the process started)"


def cpu_model() -> str:
    """The CPU's model name as Linux reports it, else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_model(device: torch.device) -> str:
    """The GPU's name for a CUDA device, else the CPU's model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def reset_peak_memory(device: torch.device) -> None:
    """Start a run's peak from here on a GPU; a process's resident peak cannot be reset (so a
    CPU run's peak includes what its process held before)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float:
    """The peak memory on `device`, in MiB, measured as CUDA_PEAK or CPU_PEAK says."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def peak_memory_method(device: torch.device) -> str:
    return CUDA_PEAK if device.type == "cuda" else CPU_PEAK
