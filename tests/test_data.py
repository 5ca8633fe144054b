"""Datasets: real Fashion-MNIST, CIFAR and ImageFolder through torchvision on small files written here."""

import gzip
import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from continuum.data import DEBIAN_FASHION_MNIST, DataError, load_cifar, load_dataset, load_image_folder, \
    make_synthetic


@pytest.mark.skipif(not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(),
                    reason="Fashion-MNIST absent: apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTINUUM_DATA", str(tmp_path))
    data = load_dataset("fashion-mnist", download=False)
    assert data.train_x.shape == (60_000, 1, 28, 28) and data.val_x.shape == (10_000, 1, 28, 28)
    assert data.train_x.dtype == torch.uint8 and data.num_classes == 10
    assert torch.bincount(data.train_y).tolist() == [6000] * 10
    mean, std = data.mean_std()
    assert abs(mean.item() - 0.2860) < 1e-3 and abs(std.item() - 0.3530) < 1e-3
    assert (tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists()
    small = data.subset(1000, 200, seed=0)
    assert len(small.train_y) == 1000 and len(small.val_y) == 200
    assert torch.equal(small.train_x, data.subset(1000, 200, seed=0).train_x)


def _idx(path: Path, array: np.ndarray) -> None:
    magic = {3: 0x00000803, 1: 0x00000801}[array.ndim]
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_a_folder_of_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 10)):
        _idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    data = load_dataset("fashion-mnist", data_dir=tmp_path, download=False)
    assert data.train_x.shape == (20, 1, 28, 28) and data.val_y.shape == (10,)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr("continuum.data.DEBIAN_FASHION_MNIST", tmp_path / "absent")
    monkeypatch.delenv("CONTINUUM_DATA", raising=False)
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", data_dir=tmp_path, download=False)


def _write_cifar(root: Path, dataset_class, n: int, label_key: str, monkeypatch) -> None:
    folder = root / dataset_class.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lists = {"train_list": [], "test_list": []}
    for list_name in lists:
        for name, _ in getattr(dataset_class, list_name):
            entry = {"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
                     label_key: rng.integers(0, 5, n).tolist()}
            (folder / name).write_bytes(pickle.dumps(entry))
            lists[list_name].append([name, hashlib.md5((folder / name).read_bytes()).hexdigest()])
    meta = dataset_class.meta
    names = [f"class{i}" for i in range(10 if dataset_class is torchvision.datasets.CIFAR10 else 100)]
    (folder / meta["filename"]).write_bytes(pickle.dumps({meta["key"]: names}))
    # the files are ours, so are their checksums
    monkeypatch.setattr(dataset_class, "train_list", lists["train_list"])
    monkeypatch.setattr(dataset_class, "test_list", lists["test_list"])
    monkeypatch.setattr(dataset_class, "meta", meta | {"md5": hashlib.md5((folder / meta["filename"]).read_bytes())
                                                         .hexdigest()})


@pytest.mark.parametrize("name,dataset_class,label_key,classes", [
    ("cifar10", torchvision.datasets.CIFAR10, "labels", 10),
    ("cifar100", torchvision.datasets.CIFAR100, "fine_labels", 100),
])
def test_cifar_through_torchvision(tmp_path, monkeypatch, name, dataset_class, label_key, classes):
    _write_cifar(tmp_path, dataset_class, 4, label_key, monkeypatch)
    data = load_cifar(name, tmp_path, download=False)
    train_batches = len(dataset_class.train_list)
    assert data.train_x.shape == (4 * train_batches, 3, 32, 32) and data.val_x.shape == (4, 3, 32, 32)
    assert data.num_classes == classes and data.hflip


def test_missing_cifar_offline_says_where_to_put_it(tmp_path):
    with pytest.raises(DataError, match="put torchvision's 'cifar-10-batches-py' folder there"):
        load_cifar("cifar10", tmp_path, download=False)


def _write_images(folder: Path, classes: dict[str, int], size=(40, 30)) -> None:
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (folder / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(folder / name / f"{i}.png")


def test_image_folder_split_at_random(tmp_path):
    _write_images(tmp_path, {"cat": 6, "dog": 4})
    data = load_image_folder(tmp_path, image_size=16, val_fraction=0.2)
    assert data.train_x.shape == (8, 3, 16, 16) and data.val_x.shape == (2, 3, 16, 16)
    assert data.num_classes == 2 and data.train_x.dtype == torch.uint8


def test_image_folder_with_train_and_val(tmp_path):
    _write_images(tmp_path / "train", {"a": 3, "b": 3, "c": 3})
    _write_images(tmp_path / "val", {"a": 1, "b": 1, "c": 1})
    data = load_dataset(f"imagefolder:{tmp_path}")
    assert data.train_x.shape == (9, 3, 32, 32) and data.val_y.tolist() == [0, 1, 2]


def test_image_folder_missing_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="expected one sub-folder of images per class"):
        load_dataset(f"imagefolder:{tmp_path / 'none'}")


def test_synthetic_is_seeded():
    a, b = make_synthetic(seed=1), make_synthetic(seed=1)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.val_y, b.val_y)
    assert not torch.equal(a.train_x, make_synthetic(seed=2).train_x)
