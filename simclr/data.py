"""Image collections: Fashion-MNIST, CIFAR-10 and folders of image files.

A *source* is named by a string:

- ``fashion-mnist:train`` / ``fashion-mnist:test``: the idx files of Debian's
  ``dataset-fashion-mnist`` package (or torchvision's download when online);
- ``cifar10:PATH:train`` / ``cifar10:PATH:test``: a local ``cifar-10-batches-py`` folder;
- any other string: a folder of images, searched recursively, labelled by its first-level
  subfolders when it has them.

Small collections are held as one uint8 tensor (N, C, H, W) so that they can live on the GPU.
"""

from __future__ import annotations

import gzip
import logging
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.errors import first_line
from common.threads import usable_cpus
from simclr.errors import SimCLRError
from simclr.images import ImageReadError, is_image_path, read_image

log = logging.getLogger(__name__)

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]
DATASETS = ("fashion-mnist", "cifar10")
SPLITS = ("train", "test")


@dataclass
class ImageData:
    """A labelled (or unlabelled) image collection held in memory.

    Attributes:
        images: uint8 tensor (N, C, H, W).
        labels: int64 tensor (N,); -1 where the label is unknown.
        classes: class names, indexed by label.
        refs: one reference per image: a file path or ``dataset:split:n``.
        source: the source string the collection was loaded from.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    refs: list[str]
    source: str
    skipped: int = 0

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def labelled(self) -> bool:
        return bool((self.labels >= 0).all()) and len(self.classes) > 0


@dataclass
class FolderListing:
    """The image files under a folder, with labels from first-level subfolders."""

    root: Path
    paths: list[Path]
    labels: list[int]
    classes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SourceSpec:
    kind: str  # "fashion-mnist" | "cifar10" | "folder"
    split: str | None = None
    path: Path | None = None

    def __str__(self) -> str:
        if self.kind == "fashion-mnist":
            return f"fashion-mnist:{self.split}"
        if self.kind == "cifar10":
            return f"cifar10:{self.path}:{self.split}"
        return str(self.path)


def parse_source(spec: str) -> SourceSpec:
    """Parse a source string (see the module docstring).

    Raises:
        SimCLRError: an unknown data set or split, or a folder that does not exist.
    """
    head, _, rest = spec.partition(":")
    if head == "fashion-mnist":
        split = rest or "train"
        _check_split(spec, split)
        return SourceSpec("fashion-mnist", split)
    if head == "cifar10":
        path, _, split = rest.rpartition(":")
        if not path:
            raise SimCLRError(f"data source {spec!r}: expected cifar10:PATH:train or cifar10:PATH:test")
        _check_split(spec, split)
        return SourceSpec("cifar10", split, Path(path))
    folder = Path(spec).expanduser()
    if folder.is_dir():
        return SourceSpec("folder", None, folder)
    if ":" in spec and not folder.exists() and len(head) > 1:
        raise SimCLRError(
            f"unknown data set {head!r} in {spec!r}; known data sets: {', '.join(DATASETS)} "
            "(or give a folder of images)"
        )
    if folder.exists():
        raise SimCLRError(f"data source {spec!r} is a file, not a folder of images")
    raise SimCLRError(
        f"data source {spec!r} is neither a folder nor a known data set "
        f"({', '.join(d + ':train' for d in DATASETS[:1])}, cifar10:PATH:train)"
    )


def _check_split(spec: str, split: str) -> None:
    if split not in SPLITS:
        raise SimCLRError(f"data source {spec!r}: unknown split {split!r}; use one of {', '.join(SPLITS)}")


def load_images(spec: str | SourceSpec, size: int = 32, channels: int | None = None) -> ImageData:
    """Load a whole source into memory as uint8 (N, C, H, W).

    Data sets keep their native size and channels; image files are decoded, resized (shorter
    side) and centre-cropped to ``size``, with ``channels`` (default 3) channels.
    """
    spec = parse_source(spec) if isinstance(spec, str) else spec
    if spec.kind == "fashion-mnist":
        return load_fashion_mnist(spec.split or "train")
    if spec.kind == "cifar10":
        return load_cifar10(spec.path, spec.split or "train")
    return load_folder(spec.path, size, channels or 3)


# ----------------------------------------------------------------------------- Fashion-MNIST

def _read_idx(path: Path) -> np.ndarray:
    """Read an idx file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise SimCLRError(f"{path}: cannot read idx file ({first_line(exc, type(exc).__name__)})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise SimCLRError(f"{path}: not an idx file of unsigned bytes")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    expected = int(np.prod(dims))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != expected:
        raise SimCLRError(f"{path}: idx file is truncated ({body.size} of {expected} bytes)")
    return body.reshape(tuple(dims))


def _fashion_mnist_dir() -> Path | None:
    candidates = [os.environ.get("FASHION_MNIST_DIR"), *FASHION_MNIST_DIRS]
    for candidate in candidates:
        if candidate and (Path(candidate) / "train-images-idx3-ubyte.gz").exists():
            return Path(candidate)
    return None


def _download_fashion_mnist() -> Path:
    """torchvision's download, for machines without the Debian package."""
    cache = Path(os.environ.get("RETRIEVAL_CACHE", Path.home() / ".cache" / "retrieval"))
    try:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(root=str(cache), train=True, download=True)
        FashionMNIST(root=str(cache), train=False, download=True)
    except Exception as exc:  # noqa: BLE001 - any failure means: offline or blocked
        raise SimCLRError(
            "Fashion-MNIST not found in /usr/share/datasets/fashion-mnist and the download "
            f"failed ({type(exc).__name__}). Install it with "
            "`apt-get install dataset-fashion-mnist`, set FASHION_MNIST_DIR to a folder "
            "holding the idx .gz files, or connect to the internet."
        ) from None
    return cache / "FashionMNIST" / "raw"


def load_fashion_mnist(split: str = "train") -> ImageData:
    """Fashion-MNIST (60k train, 10k test, 28x28 grayscale, 10 classes)."""
    _check_split(f"fashion-mnist:{split}", split)
    root = _fashion_mnist_dir() or _download_fashion_mnist()
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(_pick(root, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_pick(root, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise SimCLRError(f"{root}: Fashion-MNIST {split} images and labels do not match")
    n = images.shape[0]
    return ImageData(
        images=torch.from_numpy(images.copy()).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        classes=list(FASHION_MNIST_CLASSES),
        refs=[f"fashion-mnist:{split}:{i}" for i in range(n)],
        source=f"fashion-mnist:{split}",
    )


def _pick(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).exists():
            return root / name
    raise SimCLRError(f"{root}: missing {stem}.gz")


# ----------------------------------------------------------------------------- CIFAR-10

def load_cifar10(path: Path, split: str = "train") -> ImageData:
    """CIFAR-10 from a local ``cifar-10-batches-py`` folder (the python pickle batches)."""
    path = Path(path).expanduser()
    if (path / "cifar-10-batches-py").is_dir():
        path = path / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names if not (path / n).exists()]
    if missing:
        raise SimCLRError(f"{path}: not a cifar-10-batches-py folder (missing {', '.join(missing)})")
    images, labels = [], []
    for name in names:
        # The official CIFAR-10 distribution is a pickle; only load folders you trust.
        with open(path / name, "rb") as f:
            try:
                batch = pickle.load(f, encoding="bytes")
            except Exception as exc:  # noqa: BLE001
                raise SimCLRError(f"{path / name}: cannot read CIFAR-10 batch ({first_line(exc, type(exc).__name__)})") from None
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(batch[b"labels"])
    data = np.concatenate(images)
    return ImageData(
        images=torch.from_numpy(data),
        labels=torch.tensor(labels, dtype=torch.int64),
        classes=list(CIFAR10_CLASSES),
        refs=[f"cifar10:{split}:{i}" for i in range(len(data))],
        source=f"cifar10:{path}:{split}",
    )


# ----------------------------------------------------------------------------- folders

def scan_folder(root: Path) -> FolderListing:
    """List the image files under ``root`` recursively, in a stable order.

    Labels come from first-level subfolder names when there are subfolders holding images;
    images directly under ``root`` are then unlabelled (-1). Symlinked folders are followed
    once; symlink loops are skipped.

    Raises:
        SimCLRError: the folder does not exist or holds no image files.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise SimCLRError(f"{root}: not a folder")
    seen: set[str] = set()
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(Path(dirpath) / n for n in sorted(filenames) if not n.startswith("."))
    images = [p for p in files if is_image_path(p)]
    if not images:
        raise SimCLRError(f"{root}: no image files found (looked for {', '.join(sorted({'.jpg', '.png', '.webp', '.bmp', '.gif', '.tif'}))} ...)")
    top = [p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else None for p in images]
    classes = sorted({t for t in top if t is not None})
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[t] if t is not None else -1 for t in top]
    return FolderListing(root=root, paths=images, labels=labels, classes=classes)


def load_folder(root: Path, size: int = 32, channels: int = 3, workers: int | None = None) -> ImageData:
    """Decode every image under ``root`` into memory; unreadable files are skipped and counted."""
    return decode_listing(scan_folder(root), size, channels, workers)


def decode_listing(listing: FolderListing, size: int = 32, channels: int = 3, workers: int | None = None) -> ImageData:
    """Decode the files of ``listing`` into memory at ``size``; unreadable ones are skipped and counted."""
    root = listing.root
    workers = workers or min(8, usable_cpus())

    # Decoded straight into one preallocated tensor: no second copy at the end.
    images = torch.empty((len(listing.paths), channels, size, size), dtype=torch.uint8)

    def decode(i: int) -> bool:
        try:
            images[i] = read_image(listing.paths[i], size, channels)
            return True
        except ImageReadError as exc:
            log.debug("skipped %s", exc)
            return False

    with ThreadPoolExecutor(workers) as pool:
        ok = list(pool.map(decode, range(len(listing.paths))))
    keep = [i for i, good in enumerate(ok) if good]
    skipped = len(ok) - len(keep)
    if skipped:
        log.warning("%s: skipped %d unreadable file(s) of %d", root, skipped, len(ok))
        images = images[torch.tensor(keep, dtype=torch.int64)]
    if not keep:
        raise SimCLRError(f"{root}: none of the {len(ok)} image files could be read")
    return ImageData(
        images=images,
        labels=torch.tensor([listing.labels[i] for i in keep], dtype=torch.int64),
        classes=listing.classes,
        refs=[str(listing.paths[i]) for i in keep],
        source=str(root),
        skipped=skipped,
    )


def default_eval_split(spec: str | SourceSpec) -> tuple[str, str] | None:
    """The labelled (gallery, queries) pair a kNN monitor uses for a training source, if any."""
    spec = parse_source(spec) if isinstance(spec, str) else spec
    if spec.kind == "fashion-mnist":
        return "fashion-mnist:train", "fashion-mnist:test"
    if spec.kind == "cifar10":
        return f"cifar10:{spec.path}:train", f"cifar10:{spec.path}:test"
    return None
