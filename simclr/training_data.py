"""The images a training run draws its batches from: held in memory, or streamed from disk.

Both kinds answer the same question, :meth:`TrainingImages.batches`: "the uint8 images at these
positions, a batch at a time", so the trainer's data order (a function of seed and epoch)
gives the same batches whichever kind holds the data.

- :class:`InMemoryImages`: one uint8 tensor (N, C, H, W), on the GPU when it fits. Data sets
  (Fashion-MNIST, CIFAR-10) and folders whose decoded images fit the memory budget.
- :class:`StreamedImages`: a folder decoded batch by batch by DataLoader workers, for folders
  larger than the budget; resident memory does not grow with the number of images (the file
  list is one NumPy byte array, which forked workers share without copying). The first epoch
  also writes each decoded image to a file on disk (:mod:`simclr.decoded_cache`, within a disk
  budget) that later epochs read instead of decoding again.

A folder's files are decoded the same way on both paths (:func:`simclr.images.read_image`:
shorter side to the *load size*, a little above the training size, then a centre crop), so
that the batched random crops of :mod:`simclr.augment` have some margin to work with. What the
trainer measures on whole images at the end of a run (the whitening of the encoder file it
leaves, its last kNN figure) reads them as an index reads them instead
(:meth:`TrainingImages.as_indexed`: decoded straight to the encoder's size): decoding at the
load size and resizing again gives other pixels, and a whitening fit on those is centred away
from the vectors an index makes. (The saves inside a run use the images as held, which cost no
decoding.)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from common.threads import usable_cpus
from simclr.data import FolderListing, ImageData, decode_listing, load_images, parse_source, scan_folder
from simclr.decoded_cache import MAX_SHARE, DecodedCache, default_budget_bytes, file_key, free_bytes
from simclr.errors import SimCLRError
from simclr.images import ImageReadError, match_channels, read_image
from simclr.whitening import evenly_spaced_positions

log = logging.getLogger(__name__)

LOADERS = ("auto", "memory", "stream")
LOAD_RATIO = 8 / 7  # load side / training side (256 / 224, as ImageNet pipelines do)
STATS_IMAGES = 2000  # images a streamed folder's channel statistics are measured on
WARN_FILES = 5  # unreadable files named one by one; after that, counted


def load_size(image_size: int) -> int:
    """The side a folder's images are decoded to before random crops of ``image_size``."""
    return max(image_size, round(image_size * LOAD_RATIO))


def memory_budget_bytes(gb: float | None) -> int:
    """``gb`` GiB, or by default a quarter of this machine's physical memory."""
    if gb is not None:
        return int(gb * 2**30)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def default_workers(device: torch.device) -> int:
    """DataLoader workers for streaming: on a CPU they compete with the model for cores, so
    one per two cores; on a GPU, up to 8."""
    cpus = usable_cpus()
    return min(8, cpus) if device.type == "cuda" else max(1, min(8, cpus // 2))


class TrainingImages:
    """Labelled or unlabelled training images (see the module docstring)."""

    labels: torch.Tensor  # int64 (N,), -1 where unknown
    classes: list[str]
    source: str
    channels: int
    skipped: int  # files that could not be read (found so far, when streaming)
    files: np.ndarray | None = None  # a folder's files, one per position (None: a data set)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def labelled(self) -> bool:
        return len(self.classes) > 0 and bool((self.labels >= 0).all())

    def batches(self, order: Sequence[torch.Tensor], fill: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """For each row of positions in ``order``: (the positions read, their uint8 images).

        Streaming may meet unreadable files: they are dropped, and with ``fill`` their places
        are taken by the batch's other images, so that every batch keeps its size (a
        distributed step needs equal batches on every process).
        """
        raise NotImplementedError

    def as_indexed(self, order: Sequence[torch.Tensor], size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Like :meth:`batches`, with the images as an index of the encoder reads them: a
        folder's files decoded straight to ``size`` (:func:`simclr.images.read_image`, as
        ``retrieval index`` does), not to the load size; a data set's images as held (the
        encoder resizes them itself). Unreadable files are left out."""
        if self.files is None:
            return self.batches(order)
        return decoded_at(self.files, order, size, self.channels)

    def close(self) -> None:
        """Release what the images kept on disk for the run (called when it is over)."""

    def sample(self, count: int) -> torch.Tensor:
        """Up to ``count`` evenly spaced images, in memory (uint8)."""
        positions = evenly_spaced_positions(len(self), count)
        return torch.cat([x.cpu() for _, x in self.batches(positions.split(512))])


class InMemoryImages(TrainingImages):
    """``data``'s images; with ``files``, the files they were decoded from (a folder's)."""

    def __init__(self, data: ImageData, channels: int, files: Sequence[str | Path] | None = None):
        self.images = match_channels(data.images, channels)
        self.labels, self.classes, self.source = data.labels, data.classes, data.source
        self.channels, self.skipped = channels, data.skipped
        self.files = None if files is None else np.array([os.fsencode(p) for p in files])

    def place(self, device: torch.device) -> None:
        """Keep the images on the GPU when they take less than a quarter of its free memory
        (pinned host memory otherwise)."""
        if device.type != "cuda":
            return
        free, _ = torch.cuda.mem_get_info(device)
        self.images = self.images.to(device) if self.images.numel() < free // 4 else self.images.pin_memory()

    def batches(self, order: Sequence[torch.Tensor], fill: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for row in order:
            yield row, self.images[row.to(self.images.device, non_blocking=True)]


class _Decode(Dataset):
    """One file per item, decoded at the load size (or read back from the decoded-image file);
    a failure comes back as its message."""

    def __init__(self, paths: np.ndarray, size: int, channels: int, cache: DecodedCache | None = None):
        self.paths, self.size, self.channels, self.cache = paths, size, channels, cache

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | str]:
        path = self.paths[i]
        key = file_key(path) if self.cache is not None and i < self.cache.capacity else None
        if key is not None:
            kept = self.cache.get(i, key)
            if kept is not None:
                return i, kept
        try:
            image = read_image(os.fsdecode(path), self.size, self.channels)
        except ImageReadError as exc:
            return i, str(exc)
        if key is not None:
            self.cache.put(i, key, image)
        return i, image


def decoded_at(paths: np.ndarray, order: Sequence[torch.Tensor], size: int,
               channels: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """For each row of positions: (the positions read, the files at them decoded to ``size``),
    decoded by a pool of threads (as :class:`_Decode` reads a file); unreadable files are left out."""
    decode = _Decode(paths, size, channels)
    with ThreadPoolExecutor(min(8, usable_cpus())) as pool:
        for row in order:
            kept = [(i, x) for i, x in pool.map(decode.__getitem__, row.tolist()) if isinstance(x, torch.Tensor)]
            if kept:
                yield torch.tensor([i for i, _ in kept], dtype=torch.int64), torch.stack([x for _, x in kept])


def _collate(rows: list[tuple[int, torch.Tensor | str]]) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    good = [(i, x) for i, x in rows if isinstance(x, torch.Tensor)]
    failed = [(i, x) for i, x in rows if not isinstance(x, torch.Tensor)]
    images = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], images, failed


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # a worker decodes; the cores' threads belong to the model


class _Rows:
    """The batch sampler of a streamed folder's DataLoader: the rows of the pass under way."""

    def __init__(self):
        self.rows: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


class StreamedImages(TrainingImages):
    def __init__(self, listing: FolderListing, size: int, channels: int, workers: int, pin_memory: bool = False,
                 cache: DecodedCache | None = None):
        # One byte array, not a list of Path objects: workers forked from this process share
        # it without touching reference counts (which would copy the pages).
        self.files = np.array([os.fsencode(p) for p in listing.paths])
        self.labels = torch.tensor(listing.labels, dtype=torch.int64)
        self.classes, self.source = listing.classes, str(listing.root)
        self.size, self.channels, self.workers, self.pin_memory = size, channels, workers, pin_memory
        self.cache = cache
        self.skipped = 0
        self._bad: set[int] = set()
        # The workers are started by the first pass (the channel statistics, before the model
        # exists) and kept for every later one: a worker forked at each epoch would share the
        # trainer's grown heap, and the trainer's writes to it would copy those pages into the
        # worker (on the photo profile, 400 MB more from the second epoch on).
        self._rows = _Rows()
        self._loader: DataLoader | None = None
        self._passing = False

    def _new_loader(self, sampler: Iterable[list[int]], persistent: bool) -> DataLoader:
        return DataLoader(
            _Decode(self.files, self.size, self.channels, self.cache), batch_sampler=sampler,
            num_workers=self.workers, collate_fn=_collate, pin_memory=self.pin_memory,
            prefetch_factor=4 if self.workers else None, worker_init_fn=_one_thread if self.workers else None,
            persistent_workers=persistent and self.workers > 0,
        )

    def batches(self, order: Sequence[torch.Tensor], fill: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rows = [row.tolist() for row in order]
        nested = self._passing
        if nested:  # a pass inside another: workers of its own
            loader = self._new_loader(rows, persistent=False)
        else:
            if self._loader is None:
                self._loader = self._new_loader(self._rows, persistent=True)
            self._rows.rows, loader, self._passing = rows, self._loader, True
        try:
            for kept, images, failed in loader:
                self._note(failed)
                if images is None:
                    if fill:
                        raise SimCLRError(f"{self.source}: none of the {len(failed)} files of a batch could be read "
                                          f"(e.g. {failed[0][1]})")
                    continue
                positions = torch.tensor(kept, dtype=torch.int64)
                if fill and failed:
                    take = torch.arange(len(kept) + len(failed)) % len(kept)
                    positions, images = positions[take], images[take]
                yield positions, images
        finally:
            if not nested:
                self._passing = False

    def close(self) -> None:
        self._loader = None  # (stops the workers)
        if self.cache is not None:
            self.cache.remove()
            self.cache = None

    def _note(self, failed: list[tuple[int, str]]) -> None:
        for i, message in failed:
            if i in self._bad:
                continue
            self._bad.add(i)
            self.skipped += 1
            if self.skipped <= WARN_FILES:
                log.warning("skipped an unreadable file: %s", message)
            elif self.skipped == WARN_FILES + 1:
                log.warning("more unreadable files: they are counted, not named")


@dataclass(frozen=True)
class Loading:
    """How a training run gets its images (TrainConfig's ``loader`` options)."""

    loader: str = "auto"  # auto | memory | stream
    image_size: int = 32
    channels: int | None = None  # None: the data's own (folders: 3)
    memory_budget_gb: float | None = None
    workers: int | None = None
    classes: tuple[str, ...] = ()
    # Streaming: the file the decoded images are kept in for later epochs (None: decode every
    # epoch), the disk it may take (None: a quarter of the free space; 0: none), and how many
    # processes (torchrun) share that disk, each with a file of its own.
    decoded_file: Path | None = None
    decoded_gb: float | None = None
    decoded_share: int = 1


def open_training_images(data: str, how: Loading, device: torch.device) -> TrainingImages:
    """The training images of source ``data``, in memory or streamed (see :class:`Loading`).

    ``auto`` holds a folder in memory when its images, decoded at the load size, fit the
    memory budget, and streams it otherwise (saying so in the log).

    Raises:
        SimCLRError: an unknown loader, ``stream`` for a data set (they are held in memory), a
            class the data does not have, or nothing readable.
    """
    if how.loader not in LOADERS:
        raise SimCLRError(f"unknown loader {how.loader!r}; known: {', '.join(LOADERS)}")
    spec = parse_source(data)
    if spec.kind != "folder":
        if how.loader == "stream":
            raise SimCLRError(f"--loader stream reads folders of image files; {spec} is a data set, held in memory")
        images = load_images(spec)
        if how.classes:
            images = only_classes(images, list(how.classes))
        return InMemoryImages(images, how.channels or images.images.shape[1])
    listing = scan_folder(spec.path)
    if how.classes:
        listing = listing_classes(listing, list(how.classes))
    channels = how.channels or 3
    size = load_size(how.image_size)
    need = len(listing.paths) * channels * size * size
    budget = memory_budget_bytes(how.memory_budget_gb)
    if how.loader == "memory" or (how.loader == "auto" and need <= budget):
        decoded = decode_listing(listing, size, channels)
        return InMemoryImages(decoded, channels, files=decoded.refs)
    workers = default_workers(device) if how.workers is None else how.workers
    if how.loader == "auto":
        log.info("%s: %d images decoded at %d px take %.1f GiB, more than the memory budget of %.1f GiB "
                 "(--memory-budget-gb): streaming them from disk through %d DataLoader worker(s)",
                 spec.path, len(listing.paths), size, need / 2**30, budget / 2**30, workers)
    return StreamedImages(listing, size, channels, workers, pin_memory=device.type == "cuda",
                          cache=open_decoded_file(how, len(listing.paths), size, channels))


def open_decoded_file(how: Loading, count: int, size: int, channels: int) -> DecodedCache | None:
    """The file that keeps a streamed folder's decoded images (see :class:`Loading`), or None."""
    if how.decoded_file is None or how.decoded_gb == 0:
        return None
    folder = how.decoded_file.parent
    budget = (int(how.decoded_gb * 2**30) if how.decoded_gb is not None else default_budget_bytes(folder)) // how.decoded_share
    capacity = DecodedCache.capacity_for(budget, count, size, channels)
    free = free_bytes(folder)
    room = DecodedCache.capacity_for(int(free * MAX_SHARE), count, size, channels)
    if room < capacity:  # (a budget given by hand) never fills the disk
        log.warning("%d decoded images would take more than half the %.1f GiB free on the disk of %s: keeping %d",
                    capacity, free / 2**30, folder, room)
        capacity = room
    if capacity == 0:
        log.info("no disk for decoded images (budget %.2f GiB, --decoded-cache-gb): every epoch decodes the files",
                 budget / 2**30)
        return None
    cache = DecodedCache.create(how.decoded_file, size, channels, capacity)
    if cache is not None:
        log.info("keeping decoded images in %s for the epochs after the first: %d of %d images, %.2f GiB "
                 "(--decoded-cache-gb; removed when the run ends)", cache.path, capacity, count,
                 capacity * cache.record / 2**30)
    return cache


def listing_classes(listing: FolderListing, names: list[str]) -> FolderListing:
    """The files of ``listing`` in one of the classes ``names``."""
    _check_classes(str(listing.root), listing.classes, names)
    wanted = {listing.classes.index(n) for n in names}
    keep = [i for i, label in enumerate(listing.labels) if label in wanted]
    return FolderListing(listing.root, [listing.paths[i] for i in keep], [listing.labels[i] for i in keep], listing.classes)


def only_classes(data: ImageData, names: list[str]) -> ImageData:
    """The images of ``data`` labelled with one of ``names``.

    Raises:
        SimCLRError: the data has no labels, or a name is not one of its classes (known ones listed).
    """
    _check_classes(data.source, data.classes, names)
    wanted = torch.tensor([data.classes.index(n) for n in names])
    return subset(data, torch.isin(data.labels, wanted))


def _check_classes(source: str, classes: list[str], names: list[str]) -> None:
    if not classes:
        raise SimCLRError(f"{source} has no labels, so it cannot be narrowed to classes {', '.join(names)}")
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise SimCLRError(f"{source} has no class {', '.join(map(repr, unknown))}; known: {', '.join(classes)}")


def subset(data: ImageData, mask: torch.Tensor) -> ImageData:
    keep = mask.nonzero().squeeze(1)
    return ImageData(
        images=data.images[keep], labels=data.labels[keep], classes=data.classes,
        refs=[data.refs[i] for i in keep.tolist()], source=data.source,
    )

