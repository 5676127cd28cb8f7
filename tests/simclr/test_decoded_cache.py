"""A streamed folder's decoded images, kept on disk: later epochs read them instead of decoding,
get exactly what decoding gives, and never get a stale or damaged image."""

import errno
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import simclr.training_data as training_data
from simclr.decoded_cache import HEADER_BYTES, RECORD, DecodedCache, file_key
from simclr.images import read_image
from simclr.training_data import Loading, StreamedImages, load_size, open_training_images

CPU = torch.device("cpu")
SIZE = 16


def _open(folder: Path, cache: Path, gb: float | None = 1.0, workers: int = 0, loader: str = "stream"):
    how = Loading(loader, image_size=SIZE, workers=workers, decoded_file=cache, decoded_gb=gb)
    return open_training_images(str(folder), how, CPU)


def _all(images, order: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(images.batches(order))


def _order(n: int = 48, seed: int = 3) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).view(3, n // 3)


class _CountingDecoder:
    def __init__(self):
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return read_image(*args, **kwargs)


@pytest.fixture
def decoder(monkeypatch: pytest.MonkeyPatch) -> _CountingDecoder:
    counting = _CountingDecoder()
    monkeypatch.setattr(training_data, "read_image", counting)
    return counting


def _assert_same(got: list, want: list) -> None:
    assert len(got) == len(want)
    for (pa, xa), (pb, xb) in zip(got, want):
        assert torch.equal(pa, pb) and torch.equal(xa, xb)


def test_the_epochs_after_the_first_read_the_decoded_images_back(
    image_folder: Path, tmp_path: Path, decoder: _CountingDecoder
) -> None:
    memory = _all(open_training_images(str(image_folder), Loading("memory", image_size=SIZE), CPU), _order())
    streamed = _open(image_folder, tmp_path / "decoded.bin")
    assert isinstance(streamed, StreamedImages) and streamed.cache is not None
    decoder.calls = 0
    _assert_same(_all(streamed, _order()), memory)
    assert decoder.calls == 48
    _assert_same(_all(streamed, _order()), memory)
    assert decoder.calls == 48  # nothing decoded again


def test_workers_write_records_that_the_trainer_reads_back(image_folder: Path, tmp_path: Path) -> None:
    memory = _all(open_training_images(str(image_folder), Loading("memory", image_size=SIZE), CPU), _order())
    streamed = _open(image_folder, tmp_path / "decoded.bin", workers=2)
    _assert_same(_all(streamed, _order()), memory)
    cache = streamed.cache
    side = load_size(SIZE)
    for position, path in enumerate(streamed.files):
        kept = cache.get(position, file_key(path))
        assert kept is not None and torch.equal(kept, read_image(os.fsdecode(path), side))
    _assert_same(_all(streamed, _order(seed=4)), _all(open_training_images(
        str(image_folder), Loading("memory", image_size=SIZE), CPU), _order(seed=4)))


def test_an_image_file_changed_since_it_was_kept_is_decoded_again(image_folder: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(image_folder, tmp_path / "images"))
    streamed = _open(folder, tmp_path / "decoded.bin")
    _all(streamed, _order())
    position = 5
    path = os.fsdecode(streamed.files[position])
    before = read_image(path, load_size(SIZE))
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(path)
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    after = read_image(path, load_size(SIZE))
    assert not torch.equal(before, after)
    row = torch.tensor([position, 0])
    _, images = next(streamed.batches([row]))
    assert torch.equal(images[0], after)


def test_a_damaged_record_is_decoded_again(image_folder: Path, tmp_path: Path, decoder: _CountingDecoder) -> None:
    file = tmp_path / "decoded.bin"
    streamed = _open(image_folder, file)
    want = _all(streamed, _order())
    record = streamed.cache.record
    with open(file, "r+b") as f:  # one pixel of the record at position 7
        f.seek(HEADER_BYTES + 7 * record + RECORD.size + 100)
        value = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([value ^ 0xFF]))
    assert streamed.cache.get(7, file_key(streamed.files[7])) is None
    decoder.calls = 0
    _assert_same(_all(streamed, _order()), want)
    assert decoder.calls == 1


def test_the_disk_budget_caps_the_images_kept(image_folder: Path, tmp_path: Path, decoder: _CountingDecoder) -> None:
    record = RECORD.size + 3 * load_size(SIZE) ** 2
    file = tmp_path / "decoded.bin"
    streamed = _open(image_folder, file, gb=(HEADER_BYTES + 10 * record + 5) / 2**30)
    assert streamed.cache.capacity == 10
    want = _all(streamed, _order())
    assert file.stat().st_size == HEADER_BYTES + 10 * record
    decoder.calls = 0
    _assert_same(_all(streamed, _order()), want)
    assert decoder.calls == 48 - 10


def test_processes_sharing_a_disk_split_its_budget(image_folder: Path, tmp_path: Path) -> None:
    record = RECORD.size + 3 * load_size(SIZE) ** 2
    how = Loading("stream", image_size=SIZE, workers=0, decoded_file=tmp_path / "decoded.bin",
                  decoded_gb=2 * (HEADER_BYTES + 10 * record) / 2**30, decoded_share=2)
    assert open_training_images(str(image_folder), how, CPU).cache.capacity == 10


def test_no_budget_means_no_file(image_folder: Path, tmp_path: Path) -> None:
    assert _open(image_folder, tmp_path / "decoded.bin", gb=0).cache is None
    assert _open(image_folder, tmp_path / "decoded.bin", gb=1e-9).cache is None
    assert not (tmp_path / "decoded.bin").exists()


def test_a_file_kept_for_another_image_size_is_started_afresh(tmp_path: Path) -> None:
    file = tmp_path / "decoded.bin"
    image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    small = DecodedCache.create(file, 8, 3, capacity=4)
    small.put(2, key=99, image=image)
    assert torch.equal(DecodedCache.create(file, 8, 3, capacity=4).get(2, key=99), image)  # a resumed run keeps it
    assert DecodedCache.create(file, 8, 3, capacity=4).get(2, key=98) is None  # another file at that position
    other = DecodedCache.create(file, 8, 1, capacity=4)
    assert other.get(2, key=99) is None
    assert file.stat().st_size == HEADER_BYTES + 4 * (RECORD.size + 64)


def test_a_full_disk_leaves_the_images_decoded(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    want = _all(open_training_images(str(image_folder), Loading("memory", image_size=SIZE), CPU), _order())

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    streamed = _open(image_folder, tmp_path / "decoded.bin")
    with caplog.at_level(logging.WARNING, logger="simclr.decoded_cache"):
        _assert_same(_all(streamed, _order()), want)
        _assert_same(_all(streamed, _order()), want)
    assert "No space left on device" in caplog.text and caplog.text.count("cannot write decoded images") == 1


def test_an_unwritable_place_leaves_the_images_decoded(
    image_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "taken").mkdir()  # a folder where the file would go
    with caplog.at_level(logging.WARNING, logger="simclr.decoded_cache"):
        streamed = _open(image_folder, tmp_path / "taken")
    assert streamed.cache is None and "cannot write decoded images to" in caplog.text
    assert len(_all(streamed, _order())) == 3


def test_a_budget_beyond_the_free_disk_keeps_to_half_of_it(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    record = RECORD.size + 3 * load_size(SIZE) ** 2
    free = 4 * (HEADER_BYTES + 10 * record)  # half of it holds 20 images, a quarter 10
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10 * free, 9 * free, free))
    with caplog.at_level(logging.WARNING, logger="simclr.training_data"):
        streamed = _open(image_folder, tmp_path / "decoded.bin", gb=1.0)
    assert streamed.cache.capacity == 20
    assert "48 decoded images would take more than half the" in caplog.text and "keeping 20" in caplog.text
    assert _open(image_folder, tmp_path / "other.bin", gb=None).cache.capacity == 10  # the default: a quarter
