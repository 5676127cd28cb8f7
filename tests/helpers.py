"""What several test modules share: generated images and vectors, the tiny training recipe,
a pickle payload, a free port. Fixtures that use them are in conftest.py."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("stripes", "bars", "checks")


def pattern(kind: str, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """An RGB uint8 image of one of three easily told-apart textures, with random colours."""
    y, x = np.mgrid[0:size, 0:size]
    period = rng.integers(size // 8, size // 4 + 1)
    phase = rng.integers(0, period)
    if kind == "stripes":
        mask = ((y + phase) // period) % 2
    elif kind == "bars":
        mask = ((x + phase) // period) % 2
    else:
        mask = (((x + phase) // period) + ((y + phase) // period)) % 2
    fg, bg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    img = np.where(mask[..., None] == 1, fg, bg).astype(np.float64)
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_folder(root: Path, per_class: int = 16, seed: int = 0, size: int = 32) -> Path:
    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(pattern(kind, rng, size)).save(root / kind / f"{kind}_{i:03d}.png")
    return root


# A small, quick recipe: a narrow ResNet-18 at 16 px, AdamW (LARS moves weights too slowly
# for a run of a few dozen steps), mild augmentation.
TINY = dict(arch="resnet18", width=8, stem="small", image_size=16, batch_size=16, head_hidden=32,
            head_out=16, epochs=1, knn_every=0, progress=False, log_every=1,
            optimizer="adamw", lr=2e-3, lr_scaling="none", crop_min=0.5, jitter_strength=0.2, temperature=0.5,
            pooling="global", flip_average=False)
# (a folder's CPU defaults, the pyramid and mirror-averaging, are tested in tests/simclr/test_pooling.py)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int, seed: int = 0, centres: int = 50, queries: int = 0):
    """Unit vectors around random centres: the structure real embeddings have. With
    ``queries``, also that many more vectors from the same centres."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, dim))
    x = unit(c[rng.integers(0, centres, n + queries)] + 0.35 * rng.normal(size=(n + queries, dim)))
    return (x[:n], x[n:]) if queries else x


def brute_force(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = queries @ base.T
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, 1), ids


class Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def one_kind(seed: int = 0, n: int = 400, anomalies: int = 12, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Raw features of a collection of one kind of thing (all near one mean, like pooled ReLU
    features: positive, with a few strong directions) and a few items far from that mean along
    the same directions: only their distance from the mean sets them apart, not their direction."""
    rng = np.random.default_rng(seed)
    scale = np.linspace(3.0, 0.2, dim)
    mean = 10.0 + rng.random(dim)
    normal = mean + rng.normal(size=(n, dim)) * scale
    far = mean + rng.normal(size=(anomalies, dim)) * scale * 4.0
    return np.vstack([normal, far]).astype(np.float32), np.r_[np.zeros(n, bool), np.ones(anomalies, bool)]


def product_range(seed: int = 0, kinds: int = 6, n: int = 400, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Raw features of a collection of several kinds of thing (a product range) and their kind
    labels: each item lies on the ray from the collection's centre through its kind's mean, at a
    distance that varies from item to item by a factor of ten (how pronounced its kind is in it),
    so that the items of every kind that show it least crowd together near the centre. The
    kinds' means are the same for every ``seed``; ``seed`` draws the items."""
    means = np.random.default_rng(0).normal(size=(kinds, dim))
    means -= means.mean(0)
    rng = np.random.default_rng(seed + 1)
    labels = np.repeat(np.arange(kinds), n)
    reach = rng.uniform(0.3, 3.0, size=(len(labels), 1))
    feats = 5.0 + reach * (means[labels] + 0.35 * rng.normal(size=(len(labels), dim)))
    return feats.astype(np.float32), labels


def free_port() -> int:
    """A local TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
