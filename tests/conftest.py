"""Shared fixtures: small data files in real formats, the real FashionMNIST, tiny configs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from odenet.config import RunConfig
from odenet.data import SYSTEM_FASHION_MNIST_IDX, import_fashion_mnist_idx
from tests.datasets import write_cifar10, write_fashion_mnist_idx

pytest_plugins = ["tests.stack", "tests.sweep_fixtures"]

REPO = Path(__file__).resolve().parents[1]


def table_rows(stdout):
    """The rows of the results table printed at the end (not those of Tune's live progress table)."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("| trial "))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        rows.append(line)
    return rows


def isolation(net: bool = True) -> list[str]:
    """A command prefix for a PID (and, with net, network) namespace of the test's own where the
    machine allows it (root): `ray stop` then stops only this test's Ray, killing the namespace's
    first process ends all of it, and with net Ray's default ports are free."""
    if shutil.which("unshare") and (shutil.which("ip") or not net):
        command = ["unshare", "--pid", "--fork", "--mount-proc", *(["--net"] if net else [])]
        if subprocess.run([*command, "true"], capture_output=True).returncode == 0:
            return command
    return []


@pytest.fixture(scope="session")
def real_data_dir(tmp_path_factory) -> Path:
    """A data folder holding the real FashionMNIST, imported from the Debian package's IDX files."""
    if not (SYSTEM_FASHION_MNIST_IDX / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"real FashionMNIST missing at {SYSTEM_FASHION_MNIST_IDX}: "
                    "apt-get install dataset-fashion-mnist (make test does this)")
    root = tmp_path_factory.mktemp("data")
    import_fashion_mnist_idx(SYSTEM_FASHION_MNIST_IDX, root)
    return root


@pytest.fixture
def fashion_idx(tmp_path, monkeypatch) -> Path:
    """Small FashionMNIST IDX .gz files, found through $ODENET_FASHION_MNIST_IDX."""
    folder = write_fashion_mnist_idx(tmp_path / "idx")
    monkeypatch.setenv("ODENET_FASHION_MNIST_IDX", str(folder))
    return folder


@pytest.fixture
def cifar_root(tmp_path) -> Path:
    root = tmp_path / "cifar"
    write_cifar10(root)
    return root


@pytest.fixture
def tiny(real_data_dir):
    """A factory of small, fast configs on real FashionMNIST."""

    def make(**changes) -> RunConfig:
        values = dict(dataset="fashion-mnist", data_dir=str(real_data_dir), model="resnet-small", width=4,
                      subset=320, test_subset=200, batch_size=64, max_epochs=2, device="cpu",
                      reevaluate=False)
        values.update(changes)
        return RunConfig.from_dict(values)

    return make
