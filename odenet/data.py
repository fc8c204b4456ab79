"""Data sets as tensors on the training device, batches as index slices.

FashionMNIST and CIFAR-10 are read with torchvision's dataset classes from a data
folder, downloaded there when the machine is online. Offline, FashionMNIST is
imported from a folder of its original IDX `.gz` files (Debian/Ubuntu package
`dataset-fashion-mnist`). Small images fit on the device whole, so there are no
DataLoader workers: an epoch is a permutation and a batch is a slice of it.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import os
import shutil
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torchvision.datasets import CIFAR10, FashionMNIST

from odenet import envvars
from odenet.config import RunConfig

SYSTEM_FASHION_MNIST_IDX = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
VALIDATION_FRACTION = 0.2
CLASS_NAMES = {
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer",
                "dog", "frog", "horse", "ship", "truck"),
}
IMAGE_SHAPE = {"fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
# Images in each data set's training and test set (a run's subset / test_subset take the first N).
TRAIN_IMAGES = {"fashion-mnist": 60_000, "cifar10": 50_000}
TEST_IMAGES = {"fashion-mnist": 10_000, "cifar10": 10_000}


class DataError(RuntimeError):
    """A data file is missing or unreadable; the message names it and how to get it."""


@dataclass
class Split:
    """Images scaled to [-1, 1] (N, C, H, W) and their labels, on one device."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, generator: torch.Generator | None = None):
        """Yield (images, labels) slices; shuffled when a generator is given."""
        n = len(self)
        if generator is None:
            order = None
        else:
            order = torch.randperm(n, generator=generator).to(self.images.device)
        for start in range(0, n, batch_size):
            if order is None:
                yield self.images[start:start + batch_size], self.labels[start:start + batch_size]
            else:
                index = order[start:start + batch_size]
                yield self.images[index], self.labels[index]


@dataclass
class DataSplits:
    train: Split
    val: Split
    test: Split
    class_names: tuple[str, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])


def default_data_dir() -> Path:
    return Path(os.environ.get(envvars.DATA_DIR) or Path.home() / ".cache" / "odenet" / "data")


def load(config: RunConfig, device: torch.device | str = "cpu") -> DataSplits:
    """Train/validation/test splits for a run, on `device`."""
    root = Path(config.data_dir) if config.data_dir else default_data_dir()
    with _exclusive(root):
        if config.dataset == "fashion-mnist":
            (train_x, train_y), (test_x, test_y) = _fashion_mnist(root)
        else:
            (train_x, train_y), (test_x, test_y) = _cifar10(root)
    if config.subset is not None:
        train_x, train_y = train_x[: config.subset], train_y[: config.subset]
    if config.test_subset is not None:
        test_x, test_y = test_x[: config.test_subset], test_y[: config.test_subset]
    train_idx, val_idx = validation_split(len(train_y), config.split_seed)
    device = torch.device(device)
    return DataSplits(
        train=_to_split(train_x[train_idx], train_y[train_idx], device),
        val=_to_split(train_x[val_idx], train_y[val_idx], device),
        test=_to_split(test_x, test_y, device),
        class_names=CLASS_NAMES[config.dataset],
    )


@contextlib.contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    """One process at a time fetches into a data folder: trials sharing a node start together."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".odenet.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def validation_split(n: int, split_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random 80/20 split of indices 0..n-1: the same for every trial of a sweep."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    n_val = int(round(n * VALIDATION_FRACTION))
    return order[n_val:].sort().values, order[:n_val].sort().values


def _to_split(images_uint8: torch.Tensor, labels: torch.Tensor, device: torch.device) -> Split:
    # uint8 travels to the device (4x less traffic), scaling to [-1, 1] happens there.
    images = images_uint8.to(device).float().div_(127.5).sub_(1.0)
    return Split(images.contiguous(), labels.to(device=device, dtype=torch.long))


# -- FashionMNIST -----------------------------------------------------------------


def fashion_mnist_idx_dir() -> Path | None:
    """The folder of original IDX .gz files: $ODENET_FASHION_MNIST_IDX, else the Debian package's."""
    configured = os.environ.get(envvars.FASHION_MNIST_IDX)
    if configured:
        return Path(configured)
    if all((SYSTEM_FASHION_MNIST_IDX / f"{name}.gz").exists() for name in FASHION_MNIST_FILES):
        return SYSTEM_FASHION_MNIST_IDX
    return None


def _fashion_mnist(root: Path):
    raw = root / "FashionMNIST" / "raw"
    if not all((raw / name).exists() for name in FASHION_MNIST_FILES):
        idx_dir = fashion_mnist_idx_dir()
        if idx_dir is not None:
            import_fashion_mnist_idx(idx_dir, root)
        else:
            _download(lambda: FashionMNIST(root, train=True, download=True), "FashionMNIST", raw,
                      "install the Debian/Ubuntu package dataset-fashion-mnist, or set "
                      f"{envvars.FASHION_MNIST_IDX} to a folder of its IDX .gz files")
    splits = []
    for train in (True, False):
        try:
            ds = FashionMNIST(root, train=train, download=False)
        except (RuntimeError, ValueError, OSError, IndexError) as exc:
            files = FASHION_MNIST_FILES[:2] if train else FASHION_MNIST_FILES[2:]
            raise DataError(
                f"FashionMNIST files in {raw} ({', '.join(files)}) cannot be read: {exc}. "
                f"Delete them and run again to import or download a fresh copy."
            ) from exc
        splits.append((ds.data.unsqueeze(1), ds.targets))
    return splits


def import_fashion_mnist_idx(idx_dir: Path, root: Path) -> None:
    """Unpack the original IDX .gz files into torchvision's layout under `root`."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in FASHION_MNIST_FILES:
        source = idx_dir / f"{name}.gz"
        if not source.exists():
            raise DataError(
                f"missing FashionMNIST file {source}: install the Debian/Ubuntu package "
                f"dataset-fashion-mnist or point {envvars.FASHION_MNIST_IDX} at a folder with "
                f"{', '.join(n + '.gz' for n in FASHION_MNIST_FILES)}"
            )
        target = raw / name
        # A unique temporary name: trials on one node may import at the same time.
        partial = raw / f".{name}.{os.getpid()}.{uuid.uuid4().hex}.partial"
        try:
            with gzip.open(source, "rb") as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except (EOFError, OSError, zlib.error) as exc:
            partial.unlink(missing_ok=True)
            raise DataError(
                f"FashionMNIST file {source} is truncated or corrupt ({exc}): reinstall the "
                f"package dataset-fashion-mnist or replace the file with the original"
            ) from exc
        _check_idx(partial, source)
        partial.replace(target)


def _check_idx(path: Path, source: Path) -> None:
    """An IDX file's header promises a size; a shorter file is truncated."""
    data = path.read_bytes()
    if len(data) < 8 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        path.unlink()
        raise DataError(f"FashionMNIST file {source} is not an IDX file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + int(torch.tensor(dims).prod()) if dims else 4
    if len(data) != expected:
        path.unlink()
        raise DataError(
            f"FashionMNIST file {source} is truncated: {len(data)} bytes, its header promises "
            f"{expected}; reinstall dataset-fashion-mnist or replace the file with the original"
        )


# -- CIFAR-10 ----------------------------------------------------------------------


def _cifar10(root: Path):
    folder = root / "cifar-10-batches-py"
    if not all((folder / name).exists() for name in CIFAR10_FILES):
        _download(lambda: CIFAR10(root, train=True, download=True), "CIFAR-10", folder,
                  "download cifar-10-python.tar.gz on a machine with internet and unpack it there")
    splits = []
    for train in (True, False):
        try:
            ds = _CheckedCifar10(root, train=train, download=False)
        except Exception as exc:  # torchvision's unpickling raises many kinds
            names = CIFAR10_FILES[:5] if train else CIFAR10_FILES[5:]
            raise DataError(
                f"CIFAR-10 files in {folder} ({', '.join(names)}) cannot be read: {exc}. "
                f"Delete the folder and run again online, or unpack cifar-10-python.tar.gz there"
            ) from exc
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        splits.append((images, torch.tensor(ds.targets)))
    return splits


class _CheckedCifar10(CIFAR10):
    # torchvision checks the official files' MD5 sums, which rejects any re-packed copy
    # (and the small files tests write); presence is checked here, readability by
    # unpickling them.
    def _check_integrity(self) -> bool:
        return all((Path(self.root) / self.base_folder / name).exists() for name in CIFAR10_FILES)

    def _load_meta(self) -> None:
        self.classes = list(CLASS_NAMES["cifar10"])


def _download(fetch, name: str, where: Path, offline_hint: str) -> None:
    try:
        fetch()
    except Exception as exc:  # urllib/http errors differ by platform; all mean "no data"
        raise DataError(
            f"{name} not found in {where} and the download failed ({exc.__class__.__name__}: "
            f"{exc}); offline: {offline_hint}"
        ) from exc
