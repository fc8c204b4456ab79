"""What ran where: the code's commit, library versions, host and device, as run tags."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path

import torch

from odenet import envvars, machine
from odenet.config import RunConfig
from odenet.train import resolve_device


def run_tags(config: RunConfig) -> dict[str, str]:
    """Tags that say what ran where: model, data set, code version, library versions, host."""
    commit = git_commit()
    device = resolve_device(config.device)
    tags = {
        "model": config.model,
        "dataset": config.dataset,
        "git_commit": commit,
        "python_version": platform.python_version(),
        "host": socket.gethostname(),
        "device": str(device),
        # what the epoch times and peak memory were measured on, and how the memory was
        "device_model": machine.device_model(device),
        "peak_memory_of": machine.peak_memory_method(device),
    }
    for package in ("torch", "torchdiffeq", "ray", "mlflow"):
        tags[f"{package}_version"] = package_version(package)
    if torch.cuda.is_available():
        tags["gpu"] = torch.cuda.get_device_name()
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    return tags


def git_commit() -> str:
    """The code's commit: from git where the package is a checkout, else $ODENET_GIT_COMMIT (images)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get(envvars.GIT_COMMIT, "unknown")


def package_version(package: str) -> str:
    """The installed version of `package`, or "not installed"."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def installed_packages() -> str:
    """Every installed distribution as `name==version`, one a line, sorted."""
    return "\n".join(sorted(f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions())) + "\n"
