import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simclr import data as data_mod
from simclr.data import load_cifar10, load_fashion_mnist, load_folder, load_images, parse_source, scan_folder
from simclr.errors import SimCLRError


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 28, 28))
    labels = rng.integers(0, 10, 20)
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    return tmp_path, images, labels


def test_fashion_mnist_idx_files_are_read_exactly(fake_fashion) -> None:
    _, images, labels = fake_fashion
    data = load_fashion_mnist("test")
    assert data.images.shape == (20, 1, 28, 28) and data.images.dtype == torch.uint8
    assert np.array_equal(data.images[:, 0].numpy(), images)
    assert np.array_equal(data.labels.numpy(), labels)
    assert data.refs[3] == "fashion-mnist:test:3" and data.classes[9] == "Ankle boot"


def test_truncated_idx_file_is_named(fake_fashion) -> None:
    root, images, _ = fake_fashion
    with gzip.open(root / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">III", 20, 28, 28) + b"\0" * 100)
    with pytest.raises(SimCLRError, match="train-images-idx3-ubyte.gz.*truncated"):
        load_fashion_mnist("train")


def test_missing_fashion_mnist_names_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setattr(data_mod, "FASHION_MNIST_DIRS", ())
    monkeypatch.setenv("RETRIEVAL_CACHE", str(tmp_path / "cache"))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    import torchvision.datasets

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(SimCLRError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train")


def test_cifar10_batches(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    train = load_images(f"cifar10:{tmp_path}:train")
    assert train.images.shape == (20, 3, 32, 32) and train.labels.tolist()[:4] == [0, 1, 2, 3]
    assert load_cifar10(folder, "test").images.shape == (4, 3, 32, 32)
    with pytest.raises(SimCLRError, match="missing data_batch_1"):
        load_cifar10(tmp_path / "empty", "train")


def test_folder_labels_from_subfolders_and_skips_unreadable(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for cls in ("cats", "dogs"):
        (tmp_path / cls / "deeper").mkdir(parents=True)
        Image.new("RGB", (40, 20), "red").save(tmp_path / cls / "a.png")
        Image.new("L", (20, 40), 128).save(tmp_path / cls / "deeper" / "b.jpg")
    (tmp_path / "dogs" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "notes.txt").write_text("ignored")
    listing = scan_folder(tmp_path)
    assert listing.classes == ["cats", "dogs"]
    assert len(listing.paths) == 5
    data = load_folder(tmp_path, size=16)
    assert data.images.shape == (4, 3, 16, 16)
    assert sorted(data.labels.tolist()) == [0, 0, 1, 1]
    assert data.skipped == 1
    assert "skipped 1 unreadable file(s) of 5" in caplog.text


def test_symlink_loops_are_not_followed_forever(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.png")
    (tmp_path / "a" / "loop").symlink_to(tmp_path / "a")
    # The loop leads back to a folder already listed: its image is listed once.
    assert scan_folder(tmp_path).paths == [tmp_path / "a" / "x.png"]


@pytest.mark.parametrize("spec,message", [
    ("mnist:train", "unknown data set 'mnist'"),
    ("fashion-mnist:valid", "unknown split 'valid'"),
    ("cifar10:train", "cifar10:PATH:train"),
    ("/no/such/folder", "neither a folder nor a known data set"),
])
def test_bad_sources(spec: str, message: str) -> None:
    with pytest.raises(SimCLRError, match=message):
        parse_source(spec)


def test_empty_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(SimCLRError, match="no image files"):
        scan_folder(tmp_path)
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.raises(SimCLRError, match="none of the 1 image files could be read"):
        load_folder(tmp_path)
