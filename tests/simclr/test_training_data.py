"""Training from folders: streamed and in-memory paths agree, streaming resumes exactly, the
time budget plans its steps, and folders of mixed files train."""

import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import simclr.train as train_module
from simclr.checkpoint import safe_load
from simclr.config import TrainConfig
from simclr.data import scan_folder
from simclr.errors import SimCLRError
from simclr.images import read_image
from simclr.train import CHECKPOINT, DECODED_FILE, Trainer, train
from simclr.training_data import InMemoryImages, Loading, StreamedImages, load_size, open_training_images
from tests.helpers import TINY


def _cfg(folder: Path, out: Path, **changes) -> TrainConfig:
    return TrainConfig(**{"data": str(folder), "out": str(out), **TINY, **changes})


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return safe_load(path)["model"]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_streamed_and_in_memory_folders_give_the_same_batches(image_folder: Path) -> None:
    cpu = torch.device("cpu")
    memory = open_training_images(str(image_folder), Loading("memory", image_size=16), cpu)
    streamed = open_training_images(str(image_folder), Loading("stream", image_size=16, workers=2), cpu)
    assert isinstance(memory, InMemoryImages) and isinstance(streamed, StreamedImages)
    assert torch.equal(memory.labels, streamed.labels) and memory.classes == streamed.classes
    order = torch.randperm(48, generator=torch.Generator().manual_seed(3)).view(3, 16)
    pairs = list(zip(memory.batches(order), streamed.batches(order)))
    assert len(pairs) == 3
    for (pa, xa), (pb, xb) in pairs:
        assert torch.equal(pa, pb) and torch.equal(xa, xb)
        assert xa.dtype == torch.uint8 and xa.shape == (16, 3, load_size(16), load_size(16))
    # The decoding is the one the index and the queries use, at the load size.
    first = scan_folder(image_folder).paths[int(order[0, 0])]
    assert torch.equal(pairs[0][0][1][0], read_image(first, load_size(16)))


def test_passes_over_a_stream_abandoned_or_nested_give_the_right_batches(image_folder: Path, tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    memory = open_training_images(str(image_folder), Loading("memory", image_size=16), cpu)
    streamed = open_training_images(str(image_folder), Loading("stream", image_size=16, workers=1), cpu)
    orders = [torch.randperm(48, generator=torch.Generator().manual_seed(s)).view(6, 8) for s in range(3)]

    def same(a, b) -> None:
        assert len(a) == len(b) and all(torch.equal(pa, pb) and torch.equal(xa, xb) for (pa, xa), (pb, xb) in zip(a, b))

    abandoned = streamed.batches(orders[0])
    next(abandoned)
    del abandoned  # a pass left after one batch (the workers had prefetched more)
    same(list(streamed.batches(orders[1])), list(memory.batches(orders[1])))
    outer = []
    for position, images in streamed.batches(orders[2]):
        outer.append((position, images))
        if len(outer) == 2:  # a pass inside a pass (its workers are its own)
            assert torch.equal(streamed.sample(10), memory.sample(10))
    same(outer, list(memory.batches(orders[2])))
    streamed.close()


def test_training_streamed_equals_training_in_memory(image_folder: Path, tmp_path: Path) -> None:
    a = train(_cfg(image_folder, tmp_path / "memory", loader="memory", epochs=2))
    b = train(_cfg(image_folder, tmp_path / "stream", loader="stream", loader_workers=1, epochs=2))
    assert a.steps == b.steps == 6
    _assert_same_weights(a.checkpoint, b.checkpoint)


def test_streamed_training_resumes_exactly(image_folder: Path, tmp_path: Path) -> None:
    cfg = _cfg(image_folder, tmp_path / "run", loader="stream", loader_workers=0, epochs=2)
    Trainer(cfg).fit(until_epoch=1)
    resumed = train(cfg, resume=True)
    straight = train(cfg.replace(out=str(tmp_path / "straight")))
    assert resumed.steps == straight.steps == 6
    _assert_same_weights(resumed.checkpoint, straight.checkpoint)


def test_a_streamed_run_keeps_its_decoded_images_until_it_ends(image_folder: Path, tmp_path: Path) -> None:
    cfg = _cfg(image_folder, tmp_path / "run", loader="stream", loader_workers=0, epochs=2)
    kept = cfg.out_dir / DECODED_FILE
    Trainer(cfg).fit(until_epoch=1)
    assert kept.stat().st_size > 48 * 3 * load_size(16) ** 2  # every image, for --resume
    train(cfg, resume=True)
    assert not kept.exists()
    train(cfg.replace(out=str(tmp_path / "none"), decoded_cache_gb=0))
    assert not (tmp_path / "none" / DECODED_FILE).exists()
    with pytest.raises(SimCLRError, match="decoded-image cache must be >= 0 GB, got -1"):
        Trainer(cfg.replace(out=str(tmp_path / "bad"), decoded_cache_gb=-1))


def test_a_folder_over_the_memory_budget_is_streamed_with_a_log_line(
    image_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="simclr.training_data"):
        trainer = Trainer(_cfg(image_folder, tmp_path, memory_budget_gb=1e-5))
    assert isinstance(trainer.source, StreamedImages)
    assert "more than the memory budget" in caplog.text and "streaming them from disk" in caplog.text
    assert isinstance(Trainer(_cfg(image_folder, tmp_path / "b")).source, InMemoryImages)


def test_streaming_skips_and_counts_unreadable_files(image_folder: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(image_folder, tmp_path / "images"))
    (folder / "bars" / "bars_000.png").write_bytes(b"not a png")
    (folder / "checks" / "checks_001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = train(_cfg(folder, tmp_path / "run", loader="stream", loader_workers=0, epochs=2))
    assert result.skipped == 2 and result.steps == 6 and math.isfinite(result.final_loss)


def test_streaming_refuses_data_sets_by_name(tmp_path: Path) -> None:
    with pytest.raises(SimCLRError, match="--loader stream reads folders of image files; fashion-mnist:train is a data set"):
        open_training_images("fashion-mnist:train", Loading("stream"), torch.device("cpu"))


def test_a_folder_of_mixed_sizes_and_modes_trains(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    folder = tmp_path / "mixed"
    makers = {
        "rgb.jpg": lambda a: Image.fromarray(a),
        "gray.png": lambda a: Image.fromarray(a[..., 0]),
        "alpha.png": lambda a: Image.fromarray(np.dstack([a, a[..., :1]])),
        "palette.gif": lambda a: Image.fromarray(a).convert("P"),
        "cmyk.jpg": lambda a: Image.fromarray(a).convert("CMYK"),
        "sixteen.png": lambda a: Image.fromarray(a[..., 0].astype(np.uint16) * 257),
    }
    for kind in ("a", "b"):
        (folder / kind).mkdir(parents=True)
        for i in range(12):
            name, make = list(makers.items())[i % len(makers)]
            h, w = rng.integers(20, 90, 2)
            make(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / kind / f"{i}-{name}")
    for loader in ("memory", "stream"):
        result = train(_cfg(folder, tmp_path / loader, loader=loader, loader_workers=0, batch_size=8))
        assert result.steps == 3 and result.skipped == 0 and math.isfinite(result.final_loss)


# ----------------------------------------------------------------------------- time budget

class _Clock:
    """A clock that moves only when a step runs: each step takes ``step`` seconds."""

    def __init__(self, step: float):
        self.now, self.step = 1000.0, step

    def __call__(self) -> float:
        return self.now


def test_the_time_budget_plans_its_steps_from_the_first_ones(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = _Clock(step=0.5)
    monkeypatch.setattr(train_module.time, "perf_counter", clock)
    real_step = Trainer.train_step

    def timed_step(self: Trainer, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        clock.now += clock.step
        return real_step(self, x, g)

    monkeypatch.setattr(Trainer, "train_step", timed_step)
    cfg = _cfg(image_folder, tmp_path, epochs=None, minutes=0.25, warmup_epochs=1.0)  # 15 s, 0.5 s a step
    trainer = Trainer(cfg)
    result = trainer.fit()
    assert result.steps == trainer.total_steps == 30  # 15 s / 0.5 s
    assert result.epochs == 10  # 3 steps an epoch
    assert result.train_seconds == pytest.approx(15.0)
    # Warm-up (one epoch: 3 steps) and the cosine decay end with the run.
    assert trainer.schedule.warmup_steps == 3
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    # The plan is in the checkpoint: a resumed run keeps it.
    resumed = Trainer(cfg, resume=True)
    assert resumed.total_steps == 30 and resumed.step == 30


def test_a_time_budget_ends_when_an_epoch_is_one_step(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """48 images at batch 48 (a folder of a few hundred images at the default batch is the
    same): the first steps are timed across epochs, and the run ends on time."""
    clock = _Clock(step=0.5)
    monkeypatch.setattr(train_module.time, "perf_counter", clock)
    real_step = Trainer.train_step

    def timed_step(self: Trainer, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        clock.now += clock.step
        if self.step > 100:
            raise AssertionError("the budget was never planned")
        return real_step(self, x, g)

    monkeypatch.setattr(Trainer, "train_step", timed_step)
    trainer = Trainer(_cfg(image_folder, tmp_path, epochs=None, minutes=0.25, batch_size=48))
    assert trainer.steps_per_epoch == 1
    result = trainer.fit()
    assert result.steps == result.epochs == 30 and result.train_seconds == pytest.approx(15.0)


def test_a_run_that_slows_down_still_ends_on_time(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps take 0.5 s, then 1 s from the eleventh on: planned at 30 steps from the first
    ones, the run would take 25 s of a 15 s budget; the re-checks shorten it."""
    clock = _Clock(step=0.5)
    monkeypatch.setattr(train_module.time, "perf_counter", clock)
    real_step = Trainer.train_step

    def slowing_step(self: Trainer, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        clock.now += 0.5 if self.step < 10 else 1.0
        return real_step(self, x, g)

    monkeypatch.setattr(Trainer, "train_step", slowing_step)
    result = Trainer(_cfg(image_folder, tmp_path, epochs=None, minutes=0.25)).fit()
    assert result.train_seconds == pytest.approx(15.0, abs=1.0)
    assert result.steps == 20


def test_a_budget_ending_inside_an_epoch_resumes_to_the_same_weights(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run planned at 7 steps (epochs of 3) once it has timed its third: interrupted after
    epoch 1, resumed, it ends where an uninterrupted run ends."""
    monkeypatch.setattr(train_module, "_probe_done", lambda steps, seconds, minutes: True)
    monkeypatch.setattr(Trainer, "plan_budget", _fixed_plan(7))
    cfg = _cfg(image_folder, tmp_path / "run", epochs=None, minutes=1.0)
    Trainer(cfg).fit(until_epoch=1)
    resumed = train(cfg, resume=True)
    straight = train(cfg.replace(out=str(tmp_path / "straight")))
    assert resumed.steps == straight.steps == 7
    _assert_same_weights(resumed.checkpoint, straight.checkpoint)
    assert safe_load(straight.checkpoint)["record"]["epoch"] == pytest.approx(7 / 3, abs=1e-3)


def _fixed_plan(total: int):  # noqa: ANN202
    def plan(self: Trainer, steps_done: int, seconds: float, elapsed: float) -> int:
        self.schedule.total_steps = total
        return total

    return plan


def test_minutes_and_epochs_together_are_refused(image_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(SimCLRError, match=r"--epochs 2 and --minutes 1.0 both set: give one"):
        Trainer(_cfg(image_folder, tmp_path, epochs=2, minutes=1.0))
    assert not (tmp_path / CHECKPOINT).exists()


def test_folders_default_to_the_photo_resolution_and_data_sets_to_theirs(image_folder: Path) -> None:
    cpu = torch.device("cpu")
    photos = TrainConfig(data=str(image_folder)).resolve(cpu)
    assert (photos.image_size, photos.stem, photos.width, photos.pooling, photos.flip_average, photos.minutes,
            photos.epochs) == (64, "standard", 32, "pyramid", True, 10.0, None)
    small = TrainConfig(data="fashion-mnist:train").resolve(cpu)
    assert (small.image_size, small.pooling, small.flip_average) == (32, "global", False)
    assert TrainConfig(data=str(image_folder), pooling="global").resolve(cpu).pooling == "global"  # given, kept
    assert TrainConfig(data=str(image_folder), epochs=2).resolve(cpu).minutes is None


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_the_trainers_whitening_is_fit_on_images_read_as_the_index_reads_them(tmp_path: Path, loader: str) -> None:
    """Training decodes a folder at the load size, a little larger than the encoder's; the
    whitening fit at the end must be centred on what an index of the encoder embeds (files
    decoded straight to the encoder's size), not on the training images resized again."""
    from simclr.encoder import Encoder
    from simclr.whitening import fit_whitening
    from tests.helpers import make_folder

    folder = make_folder(tmp_path / "images", per_class=170, size=24)  # 510 images: enough to whiten
    cfg = _cfg(folder, tmp_path / "run", loader=loader, loader_workers=1, batch_size=64)
    enc = Encoder.load(train(cfg).encoder, "cpu")
    assert enc.whitened and enc.white_count == 510
    paths = scan_folder(folder).paths

    def features(size: int) -> torch.Tensor:
        with torch.no_grad():
            return enc.features(torch.stack([read_image(p, size) for p in paths]))

    mean, matrix = fit_whitening(features(16))  # what an index embeds
    torch.testing.assert_close(enc.white_mean, mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(enc.white_matrix, matrix, rtol=1e-3, atol=1e-4)
    # (the training images, resized by the encoder, give another centre: the test can tell)
    assert (features(load_size(16)).mean(0) - mean).abs().max() > 100 * 1e-5


def test_only_the_runs_last_save_decodes_the_files_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The saves inside a run fit their whitening on the images as training holds them (no
    decoding); the last one reads the files as the index does (the test above)."""
    import simclr.training_data as training_data
    from tests.helpers import make_folder

    folder = make_folder(tmp_path / "images", per_class=170, size=24)
    passes = []
    decoded_at = training_data.decoded_at
    monkeypatch.setattr(training_data, "decoded_at", lambda *a: passes.append(1) or decoded_at(*a))
    train(_cfg(folder, tmp_path / "run", loader="memory", batch_size=64, epochs=3, save_minutes=0))
    assert len(passes) == 1
