"""Shared fixtures: small generated image collections and a tiny trained encoder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(min(2, os.cpu_count() or 1))

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


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 labelled 32x32 PNGs in three class subfolders."""
    return make_folder(tmp_path_factory.mktemp("images"))


# A small, quick recipe: a narrow ResNet-18 at 16 px, AdamW (LARS moves weights too slowly
# for a run of a few dozen steps), mild augmentation.
TINY = dict(arch="resnet18", width=8, stem="small", image_size=16, batch_size=16, head_hidden=32,
            head_out=16, epochs=1, knn_every=0, progress=False, log_every=1,
            optimizer="adamw", lr=2e-3, lr_scaling="none", crop_min=0.5, jitter_strength=0.2, temperature=0.5)


@pytest.fixture(scope="session")
def tiny_encoder(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An encoder trained for twelve epochs on :func:`image_folder` (seconds on a CPU)."""
    from simclr.config import TrainConfig
    from simclr.train import train

    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(data=str(image_folder), out=str(out), **{**TINY, "epochs": 12})
    return train(cfg).encoder


@pytest.fixture(scope="session")
def tiny_index(tiny_encoder: Path, image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An index of :func:`image_folder` built with :func:`tiny_encoder`."""
    from retrieval.build import IndexConfig, build_index

    out = tmp_path_factory.mktemp("index") / "idx"
    build_index(IndexConfig(source=str(image_folder), out=str(out), encoder=str(tiny_encoder), workers=0, progress=False))
    return out
