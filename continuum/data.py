"""Datasets as tensors: every image decoded once, held as uint8 ``N x C x H x W``, ready to live on the device.

Sources: Fashion-MNIST (``--data-dir``, ``$CONTINUUM_DATA``, Debian's ``dataset-fashion-mnist`` package, or a
torchvision download), CIFAR-10/100 and ImageFolder through torchvision, and a small synthetic set for tests.
The official test split validates, unless a validation split is held out of the training images
(:meth:`TensorData.holdout`): the test split is then kept apart, to be scored once after training.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from torchvision.transforms import v2

from continuum.files import atomic_write, cache_root, made_folder

log = logging.getLogger(__name__)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagefolder:PATH", "synthetic")


class DataError(ValueError):
    """A dataset that cannot be found or read; the message says how to get it."""


@dataclass(frozen=True)
class TensorData:
    """A classification dataset held as tensors.

    Args:
        name: dataset name as given on the command line.
        train_x: uint8 ``N x C x H x W`` training images.
        train_y: int64 ``N`` training labels.
        val_x: uint8 ``M x C x H x W`` validation images.
        val_y: int64 ``M`` validation labels.
        num_classes: number of classes.
        hflip: horizontal flips are a valid augmentation (clothes, objects; not digits or text).
        test_x: uint8 ``T x C x H x W`` test images, kept apart from every choice; ``None``: no test split to score
            (the validation images are the dataset's test split, or the data serves a search: :meth:`without_test`).
        test_y: int64 ``T`` test labels.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    num_classes: int
    hflip: bool = True
    test_x: torch.Tensor | None = None
    test_y: torch.Tensor | None = None

    @property
    def input_size(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.train_x.shape[1:])

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std of the training images, scaled to [0, 1], each of shape ``C``."""
        x = self.train_x.float().div_(255)
        return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))

    def subset(self, train_size: int | None, val_size: int | None, seed: int = 0) -> TensorData:
        """A copy with at most ``train_size`` / ``val_size`` images, drawn class-balanced-at-random with ``seed``.

        Args:
            train_size: training images to keep; ``None`` or 0 keeps all.
            val_size: validation images to keep; ``None`` or 0 keeps all.
            seed: the draw's seed (the same seed gives the same images).
        """
        generator = torch.Generator().manual_seed(seed)

        def pick(x: torch.Tensor, y: torch.Tensor, size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
            if not size or size >= len(y):
                return x, y
            index = torch.randperm(len(y), generator=generator)[:size]
            return x[index], y[index]

        train_x, train_y = pick(self.train_x, self.train_y, train_size)
        val_x, val_y = pick(self.val_x, self.val_y, val_size)
        return dataclasses.replace(self, train_x=train_x, train_y=train_y, val_x=val_x, val_y=val_y)

    def without_test(self) -> TensorData:
        """A copy without the test split, for trials that make a choice (a search's): they never score it."""
        return dataclasses.replace(self, test_x=None, test_y=None)

    def holdout(self, size: int, seed: int = 0) -> TensorData:
        """A copy that validates on ``size`` training images and keeps the current validation images (the
        dataset's test split) apart as its test split.

        The held-out images are drawn class-stratified: each class gives its share of ``size`` (largest remainders
        rounding), drawn at random with ``seed``, so the split is the same in every run.

        Args:
            size: validation images to hold out; 0 returns the data unchanged.
            seed: the draw's seed.

        Raises:
            DataError: a test split is already held apart, or ``size`` leaves no training image of some class.
        """
        if not size:
            return self
        if self.test_x is not None:
            raise DataError(f"{self.name}: a validation split is already held out; hold out once")
        counts = torch.bincount(self.train_y, minlength=self.num_classes)
        share = counts.double() * size / len(self.train_y)
        take = share.floor().long()
        extra = torch.argsort(share - take, descending=True, stable=True)[:size - int(take.sum())]
        take[extra] += 1
        if (take >= counts).any():
            raise DataError(f"holdout={size} is not valid for {self.name}'s {len(self.train_y)} training images; "
                            "hold out fewer so that every class keeps training images")
        generator = torch.Generator().manual_seed(seed)
        held = torch.zeros(len(self.train_y), dtype=torch.bool)
        for label in range(self.num_classes):
            members = torch.nonzero(self.train_y == label).flatten()
            held[members[torch.randperm(len(members), generator=generator)[:int(take[label])]]] = True
        return dataclasses.replace(self, train_x=self.train_x[~held], train_y=self.train_y[~held],
                                   val_x=self.train_x[held], val_y=self.train_y[held], test_x=self.val_x,
                                   test_y=self.val_y)


def _as_nchw_uint8(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    images = torch.as_tensor(np.asarray(images))
    if images.ndim == 3:  # N x H x W grey images
        return images.unsqueeze(1).contiguous()
    return images.permute(0, 3, 1, 2).contiguous()  # N x H x W x C -> N x C x H x W


def fashion_mnist_root(data_dir: Path | None) -> Path:
    """A torchvision root holding ``FashionMNIST/raw`` with the four decompressed IDX files.

    A folder holding the ``.gz`` files (Debian's, or the user's) is decompressed once into the cache root
    (``data_dir``, ``$CONTINUUM_DATA`` or ``~/.cache/continuum``); each file is written under a temporary name
    and renamed, so parallel workers never read a partial file.
    """
    names = [os.path.splitext(name)[0] for name, _ in torchvision.datasets.FashionMNIST.resources]
    cache = data_dir or cache_root("CONTINUUM_DATA")
    for folder in (Path(p) for p in (data_dir, os.environ.get("CONTINUUM_DATA"), DEBIAN_FASHION_MNIST) if p):
        if all((folder / "FashionMNIST" / "raw" / n).exists() for n in names):
            return folder
        if all((folder / f"{n}.gz").exists() for n in names):
            raw = cache / "FashionMNIST" / "raw"
            raw.mkdir(parents=True, exist_ok=True)
            for n in names:
                if not (raw / n).exists():
                    packed = (folder / f"{n}.gz").read_bytes()
                    atomic_write(raw / n, lambda tmp: tmp.write_bytes(gzip.decompress(packed)))
            return cache
    return cache


def load_fashion_mnist(data_dir: Path | None = None, download: bool = True) -> TensorData:
    """Fashion-MNIST, 60,000 training and 10,000 test images of 28 x 28 grey clothes, 10 classes.

    Looked for in ``data_dir``, ``$CONTINUUM_DATA`` and Debian's ``/usr/share/datasets/fashion-mnist`` (IDX files,
    ``.gz`` or not), else downloaded through torchvision into ``data_dir`` (or ``~/.cache/continuum``).

    Args:
        data_dir: folder with the IDX files, or a torchvision root with ``FashionMNIST/raw``.
        download: try torchvision's download when the files are nowhere.

    Raises:
        DataError: not found and not downloadable; the message says how to get it.
    """
    root = fashion_mnist_root(Path(data_dir) if data_dir else None)
    try:
        with made_folder(root):  # a failed download leaves no folder behind
            train = torchvision.datasets.FashionMNIST(str(root), train=True, download=download)
            test = torchvision.datasets.FashionMNIST(str(root), train=False, download=download)
    except (RuntimeError, OSError) as err:
        raise DataError(
            "Fashion-MNIST not found and could not be downloaded "
            f"({type(err).__name__}); install it with 'apt-get install dataset-fashion-mnist', or put the four "
            "IDX files (train-images-idx3-ubyte.gz, ...) in --data-dir or $CONTINUUM_DATA") from None
    return TensorData("fashion-mnist", _as_nchw_uint8(train.data), train.targets.long(), _as_nchw_uint8(test.data),
                      test.targets.long(), 10, hflip=True)


def load_cifar(name: str, data_dir: Path | None = None, download: bool = True) -> TensorData:
    """CIFAR-10 or CIFAR-100 through torchvision (32 x 32 colour images).

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        data_dir: torchvision root holding ``cifar-10-batches-py`` / ``cifar-100-python``
            (default ``$CONTINUUM_DATA`` or ``~/.cache/continuum``).
        download: let torchvision download it when absent.

    Raises:
        DataError: not found and not downloadable.
    """
    dataset_class = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    root = Path(data_dir) if data_dir else cache_root("CONTINUUM_DATA")
    try:
        with made_folder(root):  # a failed download leaves no folder behind
            train = dataset_class(str(root), train=True, download=download)
            test = dataset_class(str(root), train=False, download=download)
    except (RuntimeError, OSError) as err:
        raise DataError(
            f"{name} not found in {root} and could not be downloaded ({type(err).__name__}); put torchvision's "
            f"'{dataset_class.base_folder}' folder there or pass --data-dir") from None
    return TensorData(name, _as_nchw_uint8(train.data), torch.tensor(train.targets), _as_nchw_uint8(test.data),
                      torch.tensor(test.targets), len(train.classes), hflip=True)


def load_image_folder(path: Path, image_size: int = 32, val_fraction: float = 0.1, seed: int = 0) -> TensorData:
    """Images in class folders (torchvision's ``ImageFolder``), resized to ``image_size`` and held as tensors.

    ``path/train`` and ``path/val`` are used as the splits when both exist; else ``val_fraction`` of ``path`` is
    held out at random (with ``seed``).

    Args:
        path: the folder.
        image_size: side of the square the images are resized (shorter side) and center-cropped to.
        val_fraction: share held out for validation when there is no ``val`` folder.
        seed: seed of that split.

    Raises:
        DataError: the folder is missing, holds fewer than 2 classes, an image that cannot be read, or train/val
            folders with different classes.
    """
    path = Path(path)
    transform = v2.Compose([v2.PILToTensor(), v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)])

    def read(folder: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        try:
            dataset = torchvision.datasets.ImageFolder(str(folder), transform=transform)
        except (FileNotFoundError, OSError) as err:
            raise DataError(f"imagefolder:{folder}: {err}; expected one sub-folder of images per class") from None
        if len(dataset.classes) < 2:
            raise DataError(f"imagefolder:{folder}: {len(dataset.classes)} class folder ({dataset.classes[0]}); "
                            "a classifier needs at least 2, one sub-folder of images per class")
        images = []
        for index, (file, _) in enumerate(dataset.samples):
            try:
                images.append(dataset[index][0])
            except (OSError, ValueError, RuntimeError) as err:
                raise DataError(f"imagefolder:{path}: cannot read image {file} ({type(err).__name__}); remove or "
                                "replace it") from None
        return torch.stack(images), torch.tensor(dataset.targets), dataset.classes

    if (path / "train").is_dir() and (path / "val").is_dir():
        train_x, train_y, classes = read(path / "train")
        val_x, val_y, val_classes = read(path / "val")
        if val_classes != classes:
            raise DataError(f"imagefolder:{path}: train/ has classes {classes} but val/ has {val_classes}; give "
                            "both the same class folders")
    else:
        x, y, classes = read(path)
        if len(y) < 2:
            raise DataError(f"imagefolder:{path}: {len(y)} image; a train and a validation split need at least 2")
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        n_val = max(1, int(round(len(y) * val_fraction)))
        train_x, train_y, val_x, val_y = x[order[n_val:]], y[order[n_val:]], x[order[:n_val]], y[order[:n_val]]
    return TensorData(f"imagefolder:{path}", train_x, train_y, val_x, val_y, len(classes), hflip=True)


def make_synthetic(num_classes: int = 10, train_size: int = 512, val_size: int = 256,
                   input_size: tuple[int, int, int] = (1, 28, 28), seed: int = 0) -> TensorData:
    """A learnable synthetic set: one smooth random pattern per class plus noise, as uint8 images.

    Args:
        num_classes: classes.
        train_size: training images.
        val_size: validation images.
        input_size: ``(C, H, W)``.
        seed: seed of patterns, noise and labels.
    """
    generator = torch.Generator().manual_seed(seed)
    c, h, w = input_size
    coarse = torch.rand(num_classes, c, max(2, h // 4), max(2, w // 4), generator=generator)
    patterns = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(num_classes, (n,), generator=generator)
        x = 0.6 * patterns[y] + 0.4 * torch.rand(n, c, h, w, generator=generator)
        return x.mul(255).round().clamp(0, 255).to(torch.uint8), y

    train_x, train_y = draw(train_size)
    val_x, val_y = draw(val_size)
    return TensorData("synthetic", train_x, train_y, val_x, val_y, num_classes, hflip=False)


def load_dataset(name: str, data_dir: str | Path | None = None, download: bool = True) -> TensorData:
    """Load a dataset by its command-line name.

    Args:
        name: ``fashion-mnist``, ``cifar10``, ``cifar100``, ``imagefolder:PATH`` or ``synthetic``.
        data_dir: where to look (and download to).
        download: allow torchvision downloads.

    Raises:
        DataError: unknown name, or data missing (with how to get it).
    """
    data_dir = Path(data_dir) if data_dir else None
    if data_dir is not None and data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"--data-dir {data_dir} is a file, not a folder; give the folder that holds the dataset")
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir, download)
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, data_dir, download)
    if name.startswith("imagefolder:"):
        return load_image_folder(Path(name.split(":", 1)[1]))
    if name == "synthetic":
        return make_synthetic()
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
