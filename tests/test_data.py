"""Data: real formats on disk, the seeded split, scaling, subsets, clear errors."""

import gzip

import pytest
import torch

from odenet import data
from odenet.config import RunConfig
from odenet.data import DataError


def config(tmp_path, **changes):
    return RunConfig.from_dict({"data_dir": str(tmp_path / "data"), **changes})


def test_fashion_mnist_loads_from_idx_gz_files(tmp_path, fashion_idx):
    splits = data.load(config(tmp_path))
    assert splits.image_shape == (1, 28, 28)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (160, 40, 100)
    assert splits.train.images.min() >= -1 and splits.train.images.max() <= 1
    assert splits.train.images.dtype == torch.float32 and splits.train.labels.dtype == torch.long
    assert splits.class_names[0] == "T-shirt/top"


def test_cifar10_loads_from_its_own_pickle_format(tmp_path, cifar_root):
    splits = data.load(RunConfig(dataset="cifar10", data_dir=str(cifar_root)))
    assert splits.image_shape == (3, 32, 32)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (160, 40, 50)
    assert splits.train.images.min() >= -1 and splits.train.images.max() <= 1
    assert set(splits.train.labels.tolist()) <= set(range(10))


def test_split_is_deterministic_and_disjoint(tmp_path, fashion_idx):
    a, b = data.load(config(tmp_path)), data.load(config(tmp_path))
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.labels, b.train.labels)
    train_idx, val_idx = data.validation_split(200, split_seed=0)
    assert len(set(train_idx.tolist()) & set(val_idx.tolist())) == 0
    assert len(train_idx) + len(val_idx) == 200
    other_train, _ = data.validation_split(200, split_seed=1)
    assert not torch.equal(train_idx, other_train)


def test_subset_takes_the_first_images(tmp_path, fashion_idx):
    full = data.load(config(tmp_path))
    small = data.load(config(tmp_path, subset=50, test_subset=20))
    assert len(small.train) + len(small.val) == 50 and len(small.test) == 20
    assert torch.equal(small.test.images, full.test.images[:20])


def test_batches_are_slices_and_shuffle_by_generator(tmp_path, fashion_idx):
    split = data.load(config(tmp_path)).train
    sizes = [len(y) for _, y in split.batches(64)]
    assert sizes == [64, 64, 32]
    first = [y for _, y in split.batches(64, torch.Generator().manual_seed(1))]
    again = [y for _, y in split.batches(64, torch.Generator().manual_seed(1))]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert sorted(torch.cat(first).tolist()) == sorted(split.labels.tolist())


def test_a_missing_idx_file_is_named(tmp_path, fashion_idx):
    (fashion_idx / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"missing FashionMNIST file .*t10k-labels-idx1-ubyte\.gz.*dataset-fashion-mnist"):
        data.load(config(tmp_path))


def test_a_truncated_idx_file_is_named(tmp_path, fashion_idx):
    path = fashion_idx / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz is truncated"):
        data.load(config(tmp_path))
    assert not (tmp_path / "data" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists()


def test_a_cut_off_gzip_stream_is_named(tmp_path, fashion_idx):
    path = fashion_idx / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz is truncated or corrupt"):
        data.load(config(tmp_path))


def test_a_corrupt_cifar10_batch_is_named(tmp_path, cifar_root):
    (cifar_root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match=r"CIFAR-10 files in .*cifar-10-batches-py.*cannot be read"):
        data.load(RunConfig(dataset="cifar10", data_dir=str(cifar_root)))


def test_no_data_and_no_network_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("ODENET_FASHION_MNIST_IDX", raising=False)
    monkeypatch.setattr(data, "SYSTEM_FASHION_MNIST_IDX", tmp_path / "nowhere")

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    # The real download path runs; only the network itself is cut.
    monkeypatch.setattr("torchvision.datasets.utils.urllib.request.urlopen", offline)
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        data.load(config(tmp_path))


def test_real_fashion_mnist(real_data_dir):
    splits = data.load(RunConfig(data_dir=str(real_data_dir)))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (48000, 12000, 10000)
    counts = torch.bincount(splits.test.labels, minlength=10)
    assert counts.tolist() == [1000] * 10
