"""Dataset loaders, each on small files written here in the real format, plus the real sets."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from asymprop.harness import data
from asymprop.harness.data import DatasetNotFoundError, list_datasets, load_dataset

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def isolated_search_path(tmp_path_factory, monkeypatch):
    """No test sees the machine's datasets, $ASYMPROP_DATA or ~/.cache unless it asks to."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setattr(data, "SYSTEM_DIR", home / "system")
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "cache"))
    monkeypatch.delenv(data.ENV_VAR, raising=False)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    """IDX: two zero bytes, 0x08 (unsigned byte), ndim, big-endian uint32 dims, then the data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def make_idx_set(folder: Path, n_train: int = 12, n_test: int = 5, compress: bool = True) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng(1).integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng(2).integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) + 3) % 10,
    }
    for stem, array in arrays.items():
        write_idx(folder / (f"{stem}.gz" if compress else stem), array, compress)
    return arrays


# --- registry and errors -------------------------------------------------------------------------


def test_registry_lists_every_dataset():
    expected = {"digits", "mnist1d", "mnist", "fashion-mnist", "cifar10", "cifar100", "svhn"}
    assert expected | {"imagenet"} == set(list_datasets())
    assert list_datasets() == sorted(list_datasets())


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="'nope'") as err:
        load_dataset("nope")
    for name in list_datasets():
        assert name in str(err.value)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10", "cifar100", "svhn"])
def test_missing_dataset_lists_paths_and_fix(tmp_path, monkeypatch, name):
    env = tmp_path / "env"
    monkeypatch.setenv(data.ENV_VAR, str(env))
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset(name, data_dir=tmp_path / "given")
    message = str(err.value)
    searched = [
        tmp_path / "given",
        tmp_path / "given" / name,
        env,
        env / name,
        data.SYSTEM_DIR / name,
        data._cache_root() / name,
    ]
    for folder in searched:
        assert f"  {folder}\n" in message
    assert "--data-dir DIR" in message
    assert "download=True" in message
    assert data._SOURCES[name].mirrors[0] in message
    assert isinstance(err.value, FileNotFoundError)
    if name == "fashion-mnist":
        assert "sudo apt-get install dataset-fashion-mnist" in message


def test_missing_imagenet_says_it_cannot_be_downloaded(tmp_path):
    pytest.importorskip("PIL")
    with pytest.raises(DatasetNotFoundError, match="cannot be downloaded automatically"):
        load_dataset("imagenet", data_dir=tmp_path, download=True)


# --- digits and mnist1d (real, offline) ----------------------------------------------------------


def test_digits_split_normalisation_and_determinism():
    ds = load_dataset("digits", seed=0)
    assert (ds.name, ds.input_shape, ds.num_classes) == ("digits", (1, 8, 8), 10)
    assert isinstance(ds.train, TensorDataset)
    x, y = ds.train.tensors
    x_test, y_test = ds.test.tensors
    assert x.shape == (1437, 1, 8, 8) and x_test.shape == (360, 1, 8, 8)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    # Standardised with the training split's own scalar mean and std.
    assert abs(x.mean().item()) < 1e-5 and abs(x.std(unbiased=False).item() - 1) < 1e-4
    # Stratified: each class keeps its share, 35..37 of the 360 test examples (174..183 of 1797).
    assert set(torch.bincount(y_test).tolist()) <= {35, 36, 37}
    again = load_dataset("digits", seed=0)
    assert torch.equal(again.train.tensors[0], x) and torch.equal(again.test.tensors[1], y_test)
    other = load_dataset("digits", seed=1)
    assert not torch.equal(other.test.tensors[1], y_test)
    raw = load_dataset("digits", normalize=False).train.tensors[0]
    assert raw.min() == 0 and raw.max() == 1


def test_train_size_subset_is_seeded():
    small = load_dataset("digits", train_size=100, seed=3).train.tensors[0]
    assert small.shape == (100, 1, 8, 8)
    assert torch.equal(small, load_dataset("digits", train_size=100, seed=3).train.tensors[0])
    assert not torch.equal(small, load_dataset("digits", train_size=100, seed=4).train.tensors[0])
    with pytest.raises(ValueError, match="train_size"):
        load_dataset("digits", train_size=5000)
    with pytest.raises(ValueError, match="train_size"):
        load_dataset("digits", train_size=0)


def test_test_size_keeps_the_first_test_examples():
    full = load_dataset("digits", seed=3)
    small = load_dataset("digits", seed=3, test_size=50, train_size=100)
    assert len(small.train) == 100
    for a, b in zip(small.test.tensors, full.test.tensors, strict=True):
        assert torch.equal(a, b[:50])
    with pytest.raises(ValueError, match=rf"test_size=0 .*1\.\.{len(full.test)}"):
        load_dataset("digits", test_size=0)


def test_mnist1d_generated_locally_without_touching_global_rng():
    data._mnist1d_arrays.cache_clear()
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    ds = load_dataset("mnist1d")
    assert np.array_equal(np.random.get_state()[1], before)  # make_dataset reseeds; we restore
    assert (ds.input_shape, ds.num_classes) == ((1, 40), 10)
    x, y = ds.train.tensors
    assert x.shape == (4000, 1, 40) and ds.test.tensors[0].shape == (1000, 1, 40)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert set(y.tolist()) == set(range(10))
    assert torch.equal(load_dataset("mnist1d").train.tensors[0], x)


# --- IDX (mnist, fashion-mnist) ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_loader_shapes_labels_and_fixed_normalisation(tmp_path, name):
    arrays = make_idx_set(tmp_path)
    ds = load_dataset(name, data_dir=tmp_path)
    assert (ds.name, ds.input_shape, ds.num_classes) == (name, (1, 28, 28), 10)
    x, y = ds.train.tensors
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.float32
    assert ds.test.tensors[0].shape == (5, 1, 28, 28)
    assert y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert ds.test.tensors[1].tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    (mean,), (std,) = data.NORMALISATION[name]
    pixels = torch.tensor(arrays["train-images-idx3-ubyte"], dtype=torch.float32) / 255
    torch.testing.assert_close(x[:, 0], (pixels - mean) / std)
    raw = load_dataset(name, data_dir=tmp_path, normalize=False).train.tensors[0]
    torch.testing.assert_close(raw[:, 0], pixels)
    assert torch.equal(load_dataset(name, data_dir=tmp_path).train.tensors[0], x)


def test_idx_found_in_subfolder_env_and_uncompressed(tmp_path, monkeypatch):
    make_idx_set(tmp_path / "root" / "mnist", compress=False)
    assert len(load_dataset("mnist", data_dir=tmp_path / "root").train) == 12
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "root"))
    assert len(load_dataset("mnist").train) == 12


def test_idx_bad_magic_is_a_clear_error(tmp_path):
    make_idx_set(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x0d\x01" * 4))
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        load_dataset("mnist", data_dir=tmp_path)


def test_download_fetches_checks_md5_and_loads(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    make_idx_set(mirror)
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in mirror.iterdir()}
    source = data._Source(("file:///nonexistent/", mirror.as_uri() + "/"), md5)
    monkeypatch.setitem(data._SOURCES, "mnist", source)
    ds = load_dataset("mnist", data_dir=tmp_path / "dl", download=True)
    assert len(ds.train) == 12
    assert sorted(p.name for p in (tmp_path / "dl" / "mnist").iterdir()) == sorted(md5)


def test_download_with_wrong_md5_leaves_nothing(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    make_idx_set(mirror)
    md5 = {p.name: "0" * 32 for p in mirror.iterdir()}
    monkeypatch.setitem(data._SOURCES, "mnist", data._Source((mirror.as_uri() + "/",), md5))
    with pytest.raises(DatasetNotFoundError, match="MD5"):
        load_dataset("mnist", data_dir=tmp_path / "dl", download=True)
    assert list((tmp_path / "dl" / "mnist").iterdir()) == []


@pytest.mark.data
@pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_DIR", FASHION_DIR.parent)
    ds = load_dataset("fashion-mnist")
    x, y = ds.train.tensors
    assert x.shape == (60000, 1, 28, 28) and ds.test.tensors[0].shape == (10000, 1, 28, 28)
    assert ds.num_classes == 10
    assert torch.bincount(y).tolist() == [6000] * 10
    assert torch.bincount(ds.test.tensors[1]).tolist() == [1000] * 10
    # The fixed constants are the training split's statistics.
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-3


# --- CIFAR ---------------------------------------------------------------------------------------


def cifar_batch(n: int, seed: int, label_key: bytes, num_classes: int) -> dict:
    batch = {
        b"data": rng(seed).integers(0, 256, (n, 3072)).astype(np.uint8),
        label_key: [int(v) for v in rng(seed + 100).integers(0, num_classes, n)],
        b"batch_label": b"fake",
    }
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [0] * n
    return batch


def write_cifar(folder: Path, folder_name: str, batches: dict[str, dict], tarball: str | None):
    folder.mkdir(parents=True, exist_ok=True)
    if tarball is None:
        (folder / folder_name).mkdir()
        for name, batch in batches.items():
            (folder / folder_name / name).write_bytes(pickle.dumps(batch))
        return
    with tarfile.open(folder / tarball, "w:gz") as tar:
        for name, batch in batches.items():
            raw = pickle.dumps(batch)
            info = tarfile.TarInfo(f"{folder_name}/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


@pytest.mark.parametrize("packed", [True, False], ids=["tarball", "extracted"])
def test_cifar10(tmp_path, packed):
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = {name: cifar_batch(2, i, b"labels", 10) for i, name in enumerate(names)}
    tarball = "cifar-10-python.tar.gz" if packed else None
    write_cifar(tmp_path, "cifar-10-batches-py", batches, tarball)
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert (ds.input_shape, ds.num_classes) == ((3, 32, 32), 10)
    x, y = ds.train.tensors
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert ds.test.tensors[0].shape == (2, 3, 32, 32)
    assert y.tolist() == [label for n in names[:5] for label in batches[n][b"labels"]]
    # Each row holds the 1024 red, then green, then blue pixels, row-major.
    mean, std = data.NORMALISATION["cifar10"]
    row = batches["data_batch_1"][b"data"][1]
    for c, h, w in [(0, 0, 0), (1, 5, 7), (2, 31, 30)]:
        expected = (row[c * 1024 + h * 32 + w] / 255 - mean[c]) / std[c]
        assert x[1, c, h, w].item() == pytest.approx(expected, abs=1e-5)


def test_cifar100_uses_fine_labels(tmp_path):
    batches = {
        "train": cifar_batch(6, 0, b"fine_labels", 100),
        "test": cifar_batch(3, 1, b"fine_labels", 100),
    }
    write_cifar(tmp_path / "cifar100", "cifar-100-python", batches, "cifar-100-python.tar.gz")
    ds = load_dataset("cifar100", data_dir=tmp_path)
    assert (ds.input_shape, ds.num_classes) == ((3, 32, 32), 100)
    assert ds.train.tensors[1].tolist() == batches["train"][b"fine_labels"]
    assert ds.test.tensors[0].shape == (3, 3, 32, 32)


# --- SVHN ----------------------------------------------------------------------------------------


def test_svhn_mat_files(tmp_path):
    from scipy.io import savemat

    sets = {}
    for i, (filename, n) in enumerate([("train_32x32.mat", 7), ("test_32x32.mat", 4)]):
        X = rng(i).integers(0, 256, (32, 32, 3, n)).astype(np.uint8)  # (H, W, C, N)
        y = (np.arange(n).reshape(n, 1) % 10 + 1).astype(np.uint8)  # 1..10, 10 meaning "0"
        savemat(tmp_path / filename, {"X": X, "y": y})
        sets[filename] = (X, y)
    ds = load_dataset("svhn", data_dir=tmp_path, normalize=False)
    assert (ds.input_shape, ds.num_classes) == ((3, 32, 32), 10)
    x, labels = ds.train.tensors
    X, y = sets["train_32x32.mat"]
    assert x.shape == (7, 3, 32, 32) and x.dtype == torch.float32
    assert labels.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert ds.test.tensors[1].tolist() == [1, 2, 3, 4]
    torch.testing.assert_close(x, torch.tensor(X.transpose(3, 2, 0, 1) / 255, dtype=torch.float32))
    X9, y9 = X[..., :1].copy(), np.array([[10]], dtype=np.uint8)
    savemat(tmp_path / "train_32x32.mat", {"X": X9, "y": y9})
    assert load_dataset("svhn", data_dir=tmp_path).train.tensors[1].tolist() == [0]


# --- ImageNet folder tree ------------------------------------------------------------------------


def test_imagenet_folder_tree(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    colours = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for split, n in [("train", 2), ("val", 1)]:
        for name, colour in colours.items():
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40, 30), colour).save(tmp_path / split / name / f"{i}.png")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    ds = load_dataset("imagenet", data_dir=tmp_path)
    assert (ds.input_shape, ds.num_classes) == ((3, 224, 224), 2)
    assert len(ds.train) == 4 and len(ds.test) == 2
    x, label = ds.train[3]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and label == 1  # dog
    mean, std = data.NORMALISATION["imagenet"]
    expected = torch.tensor(
        [(0 - mean[0]) / std[0], (0 - mean[1]) / std[1], (1 - mean[2]) / std[2]]
    )
    torch.testing.assert_close(x[:, 100, 100], expected)
    assert isinstance(load_dataset("imagenet", data_dir=tmp_path, train_size=1).train, Subset)


def test_imagenet_without_pillow_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)  # makes ``from PIL import Image`` fail
    with pytest.raises(ImportError, match=r"pip install asymprop\[imagenet\]"):
        load_dataset("imagenet", data_dir=tmp_path)
