"""torchrun on the CPU (gloo): training with global negatives and sharded embedding."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from index import IndexStore
from simclr.checkpoint import safe_load

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _torchrun(*args: str, procs: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m", "retrieval", *map(str, args)]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_two_process_training_saves_once_and_resumes(image_folder: Path, tmp_path: Path) -> None:
    args = ["train", "--data", image_folder, "--out", tmp_path, "--arch", "resnet18", "--width", "8", "--stem", "small",
            "--image-size", "16", "--batch-size", "16", "--epochs", "2", "--knn-every", "1", "--knn-k", "5", "--no-progress",
            "--optimizer", "adamw", "--lr", "0.002", "--lr-scaling", "none", "--sync-bn"]
    r = _torchrun(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("trained 2 epochs") == 1  # only rank 0 prints
    state = safe_load(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 2 and state["step"] == 2 * (48 // 16)
    assert not any("SyncBatchNorm" in k for k in state["model"])  # plain BatchNorm weights, loadable anywhere
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]
    again = _torchrun("train", "--out", tmp_path, "--resume", "--no-progress")
    assert again.returncode == 0, again.stderr[-3000:]


def test_two_processes_at_chance_level_narrow_their_crops_together(tmp_path: Path) -> None:
    """48 copies of one picture keep the loss at chance level: both processes judge the same
    all-reduced loss, so the run narrows its crops once, past step 100, says so once, and ends
    without hanging."""
    from PIL import Image

    from tests.helpers import pattern

    one = Image.fromarray(pattern("checks", np.random.default_rng(0)))
    (tmp_path / "same" / "part").mkdir(parents=True)
    for i in range(48):
        one.save(tmp_path / "same" / "part" / f"{i:02d}.png")
    r = _torchrun("train", "--data", tmp_path / "same", "--out", tmp_path / "run", "--width", "8", "--stem", "small",
                  "--image-size", "16", "--batch-size", "16", "--epochs", "40", "--knn-every", "0", "--no-progress",
                  "--optimizer", "adamw", "--lr", "0.002", "--lr-scaling", "none", "--head-hidden", "32", "--head-out", "16",
                  "--pooling", "global", "--no-flip-average")
    assert r.returncode == 0, r.stderr[-3000:]
    (step,) = re.findall(r"note: the NT-Xent loss was at chance level at step (\d+) ", r.stdout)  # (once)
    assert 100 <= int(step) <= 120
    assert r.stderr.count("crops keep at least 90%") == 1  # (the log line, from rank 0 only)
    assert safe_load(tmp_path / "run" / "checkpoint.pt")["crops_narrowed"]["step"] == int(step)


def test_two_processes_stream_a_folder_each_with_its_own_decoded_images(image_folder: Path, tmp_path: Path) -> None:
    args = ["--verbose", "train", "--data", image_folder, "--out", tmp_path, "--arch", "resnet18", "--width", "8",
            "--stem", "small", "--image-size", "16", "--batch-size", "16", "--epochs", "2", "--knn-every", "0",
            "--no-progress", "--optimizer", "adamw", "--lr", "0.002", "--lr-scaling", "none", "--loader", "stream",
            "--loader-workers", "1"]
    r = _torchrun(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    kept = [line for line in r.stderr.splitlines() if "keeping decoded images in" in line]
    assert len(kept) == 2 and any("decoded-images.bin.rank0" in k for k in kept) and any("decoded-images.bin.rank1" in k for k in kept)
    assert safe_load(tmp_path / "checkpoint.pt")["step"] == 2 * (48 // 16)
    assert not list(tmp_path.glob("decoded-images*"))  # removed when the run ended


def test_sharded_embedding_merges_into_the_same_index(tiny_encoder: Path, image_folder: Path, tiny_index: Path, tmp_path: Path) -> None:
    out = tmp_path / "idx"
    r = _torchrun("index", "--encoder", tiny_encoder, "--source", image_folder, "--out", out, "--workers", "0", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("indexed 48 images") == 1
    sharded, single = IndexStore.load(out), IndexStore.load(tiny_index)
    assert sharded.items.refs == single.items.refs and sharded.items.hashes == single.items.hashes
    np.testing.assert_allclose(np.asarray(sharded.vectors, np.float32), np.asarray(single.vectors, np.float32), atol=2e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no shard folders left
