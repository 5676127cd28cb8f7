"""Faults: processes killed mid-way, full disks and read-only folders lose nothing already saved."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from index import IndexStore, IndexStoreError
from simclr.checkpoint import atomic_save, safe_load
from simclr.errors import SimCLRError
from tests.helpers import make_folder

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "retrieval", *map(str, args)]


def _env() -> dict[str, str]:
    # One thread each: the same arithmetic in every process, so that results can be compared bit for bit.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


TRAIN_ARGS = ["--arch", "resnet18", "--width", "8", "--stem", "small", "--image-size", "16", "--batch-size", "8",
              "--epochs", "3", "--knn-every", "0", "--no-progress", "--optimizer", "adamw", "--lr", "0.002",
              "--lr-scaling", "none", "--log-every", "1"]


def _steps_logged(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.strip().endswith("}")]
    return max(steps, default=0)


def test_training_killed_at_a_random_step_resumes_to_the_same_weights(image_folder: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    subprocess.run(_cli("train", "--data", image_folder, "--out", straight, *TRAIN_ARGS), check=True, env=_env(), cwd=ROOT,
                   capture_output=True)
    steps_per_epoch = 48 // 8
    kill_at = random.Random().randint(2, 3 * steps_per_epoch - 2)
    run = tmp_path / "killed"
    proc = subprocess.Popen(_cli("train", "--data", image_folder, "--out", run, *TRAIN_ARGS), env=_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _steps_logged(run) < kill_at and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(_cli("train", "--out", run, "--resume", "--no-progress"), env=_env(), cwd=ROOT,
                             capture_output=True, text=True)
    if not (run / "checkpoint.pt").exists():
        # Killed before the first checkpoint: nothing to resume, so the run starts again.
        assert "checkpoint" in resumed.stderr and "not found" in resumed.stderr
        resumed = subprocess.run(_cli("train", "--data", image_folder, "--out", run, *TRAIN_ARGS), env=_env(), cwd=ROOT,
                                 capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a, b = safe_load(straight / "checkpoint.pt"), safe_load(run / "checkpoint.pt")
    assert b["epoch"] == 3 and b["step"] == a["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k} differs (killed at step {kill_at})"


def _answers(index: Path, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    store = IndexStore.load(index)
    return store.search(queries, 5)


def test_index_build_killed_midway_leaves_the_previous_index(tiny_encoder: Path, image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "idx"
    subprocess.run(_cli("index", "--encoder", tiny_encoder, "--source", image_folder, "--out", out, "--workers", 0, "--no-progress"),
                   check=True, env=_env(), cwd=ROOT, capture_output=True)
    queries = np.asarray(IndexStore.load(out).vectors[:6], dtype=np.float32)
    before = _answers(out, queries)
    bigger = make_folder(tmp_path / "bigger", per_class=100, seed=5)
    cmd = _cli("index", "--encoder", tiny_encoder, "--source", bigger, "--out", out, "--workers", 0, "--no-progress")
    start = time.time()
    subprocess.run(cmd, check=True, env=_env(), cwd=ROOT, capture_output=True)
    duration = time.time() - start
    # Put the 48-item index back, then kill a rebuild at a random moment of its run.
    subprocess.run(_cli("index", "--encoder", tiny_encoder, "--source", image_folder, "--out", out, "--workers", 0, "--no-progress"),
                   check=True, env=_env(), cwd=ROOT, capture_output=True)
    for attempt in range(3):
        proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(random.uniform(0.2, 0.95) * duration)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        store = IndexStore.load(out)
        if store.manifest.count == 48:
            after = store.search(queries, 5)
            np.testing.assert_array_equal(before[1], after[1])
            np.testing.assert_allclose(before[0], after[0])
        else:  # the kill came after the new folder was in place: it must be complete
            assert store.manifest.count == 300
            subprocess.run(_cli("index", "--encoder", tiny_encoder, "--source", image_folder, "--out", out, "--workers", 0,
                                "--no-progress"), check=True, env=_env(), cwd=ROOT, capture_output=True)
    # The next successful run leaves no temporary folders behind.
    subprocess.run(_cli("index", "--encoder", tiny_encoder, "--source", image_folder, "--out", out, "--workers", 0, "--no-progress"),
                   check=True, env=_env(), cwd=ROOT, capture_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bigger", "idx"]


# ---------------------------------------------------------------- full and read-only disks

@pytest.fixture
def small_disk(tmp_path: Path):
    """A 4 MB tmpfs (skipped where mounting is not allowed)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(folder: Path) -> None:
    """Write zeros until the disk is full (the last write or the close fails)."""
    try:
        with open(folder / "filler", "wb") as f:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
    except OSError:
        pass


def test_full_disk_during_a_checkpoint_keeps_the_last_good_one(small_disk: Path) -> None:
    ckpt = small_disk / "checkpoint.pt"
    atomic_save({"w": torch.ones(1000)}, ckpt)
    _fill(small_disk)
    with pytest.raises(SimCLRError, match="No space left on device.*previous file is intact"):
        atomic_save({"w": torch.zeros(400_000)}, ckpt)
    assert torch.equal(safe_load(ckpt)["w"], torch.ones(1000))
    assert sorted(p.name for p in small_disk.iterdir()) == ["checkpoint.pt", "filler"]


def test_full_disk_during_an_index_write_keeps_the_last_good_one(small_disk: Path, tiny_index: Path) -> None:
    out = small_disk / "idx"
    shutil.copytree(tiny_index, out)
    store = IndexStore.load(out)
    before = store.search(np.asarray(store.vectors[:3], np.float32), 4)
    _fill(small_disk)
    with pytest.raises(IndexStoreError, match="No space left on device.*previous index is intact"):
        store.save(out)
    after = IndexStore.load(out).search(np.asarray(store.vectors[:3], np.float32), 4)
    np.testing.assert_array_equal(before[1], after[1])
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "idx"]


def test_read_only_folder(small_disk: Path, tiny_index: Path) -> None:
    out = small_disk / "idx"
    shutil.copytree(tiny_index, out)
    atomic_save({"w": torch.ones(3)}, small_disk / "checkpoint.pt")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(SimCLRError, match="cannot write .*checkpoint.pt: Read-only file system"):
        atomic_save({"w": torch.zeros(3)}, small_disk / "checkpoint.pt")
    store = IndexStore.load(out)
    with pytest.raises(IndexStoreError, match="cannot write index .*Read-only file system"):
        store.save(out)
    assert IndexStore.load(out).manifest.count == 48
    assert torch.equal(safe_load(small_disk / "checkpoint.pt")["w"], torch.ones(3))
