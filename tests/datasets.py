"""Small data files in the real formats, written by tests: IDX .gz for FashionMNIST,
pickled batches for CIFAR-10. Each class gets its own brightness pattern so that a
tiny model can learn them."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

from odenet.data import CIFAR10_FILES, FASHION_MNIST_FILES


def _images(n: int, shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    base = rng.integers(0, 256, size=(10, *shape))
    noise = rng.integers(-40, 41, size=(n, *shape))
    return np.clip(base[labels] + noise, 0, 255).astype(np.uint8), labels.astype(np.uint8)


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.tobytes()


def write_fashion_mnist_idx(folder: Path, n_train: int = 200, n_test: int = 100, seed: int = 0) -> Path:
    """The four original IDX .gz files, with n_train/n_test images."""
    folder.mkdir(parents=True, exist_ok=True)
    train_x, train_y = _images(n_train, (28, 28), seed)
    test_x, test_y = _images(n_test, (28, 28), seed + 1)
    for name, array in zip(FASHION_MNIST_FILES, (train_x, train_y, test_x, test_y)):
        (folder / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))
    return folder


def write_cifar10(root: Path, per_batch: int = 40, n_test: int = 50, seed: int = 0) -> Path:
    """cifar-10-batches-py/ with five training batches and a test batch in CIFAR-10's pickle format."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(CIFAR10_FILES):
        n = n_test if name == "test_batch" else per_batch
        images, labels = _images(n, (3, 32, 32), seed + i)
        entry = {"data": images.reshape(n, -1), "labels": labels.tolist(), "batch_label": name}
        (folder / name).write_bytes(pickle.dumps(entry))
    return folder
