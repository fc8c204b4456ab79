"""A measurement's peak memory, above what the process held once imports and data were loaded."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch


class PeakMemory:
    """Peak memory above a baseline taken at construction (after imports and data loading).

    CPU: Linux's VmHWM (peak resident set) after resetting it with /proc/self/clear_refs,
    minus VmRSS at the reset; where the reset is impossible, ru_maxrss minus that RSS
    (an upper bound: it includes the data loading's own peak). CUDA: the allocator's
    max_memory_allocated minus memory_allocated at the baseline.
    """

    def __init__(self, device: torch.device):
        gc.collect()
        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)
            self.method = "cuda max_memory_allocated"
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
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        peak = _proc_status_kib("VmHWM") if self.method.startswith("VmHWM") else None
        if peak is None:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            if sys.platform == "darwin":
                peak //= 1024
        return (peak * 1024 - self.base) / 2**20


def _proc_status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None
