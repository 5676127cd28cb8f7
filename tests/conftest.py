"""Shared fixtures: small generated image collections and a tiny trained encoder (helpers in tests/helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import TINY, make_folder

torch.set_num_threads(min(2, os.cpu_count() or 1))

@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 labelled 32x32 PNGs in three class subfolders."""
    return make_folder(tmp_path_factory.mktemp("images"))


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
