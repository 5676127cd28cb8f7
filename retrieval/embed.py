"""Embedding image collections with an encoder.

A collection is a data set held in memory (Fashion-MNIST, CIFAR-10) or a folder of files.
Files are read, hashed, decoded and resized by DataLoader workers while the device runs
the model; unreadable files are skipped and reported. Under ``torchrun`` each rank embeds
every ``world``-th item and :func:`merge` joins the shards in item order.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from common.threads import usable_cpus
from index import Items
from retrieval.pixel_match import THUMB, thumbnail, thumbnails_of
from simclr.data import parse_source, scan_folder, load_images
from simclr.encoder import Encoder
from simclr.images import ImageReadError, match_channels, open_image, pil_to_tensor, resize_center_crop

log = logging.getLogger(__name__)


@dataclass
class Collection:
    """Images to embed: in memory (``images``) or as files (``paths``)."""

    source: str
    refs: list[str]
    labels: list[str | None]
    images: torch.Tensor | None = None
    paths: list[Path] | None = None

    def __len__(self) -> int:
        return len(self.refs)

    def select(self, positions: list[int]) -> "Collection":
        """The items at ``positions``, in that order (files are still not read)."""
        return Collection(
            self.source, [self.refs[p] for p in positions], [self.labels[p] for p in positions],
            images=None if self.images is None else self.images[torch.as_tensor(positions, dtype=torch.long)],
            paths=None if self.paths is None else [self.paths[p] for p in positions],
        )


def open_collection(spec: str) -> Collection:
    """The collection a source string names (see :mod:`simclr.data`); files are not read yet."""
    parsed = parse_source(spec)
    if parsed.kind == "folder":
        listing = scan_folder(parsed.path)
        labels = [listing.classes[i] if i >= 0 else None for i in listing.labels]
        # Absolute, but symlinks kept: a link is reported and shown under its own name.
        refs = [os.path.abspath(p) for p in listing.paths]
        return Collection(str(parsed.path.resolve()), refs, labels, paths=[Path(r) for r in refs])
    data = load_images(parsed)
    labels = [data.classes[i] if i >= 0 else None for i in data.labels.tolist()]
    return Collection(str(parsed), data.refs, labels, images=data.images)


@dataclass
class Embedded:
    """Embeddings of the accepted items of a collection, in collection order."""

    vectors: np.ndarray  # (n, d) float32, unit rows: the encoder's embedding
    items: Items
    positions: np.ndarray  # (n,) positions in the collection
    features: np.ndarray  # (n, d) float32: the backbone's raw features (for the anomaly space)
    thumbnails: np.ndarray | None = None  # (n, THUMB * THUMB) uint8: for near-duplicate checks
    failures: list[tuple[str, str]] = field(default_factory=list)  # (ref, reason)
    duplicates: int = 0  # items skipped because their content is already indexed


class _Files(Dataset):
    """Reads, hashes and decodes one file per item into the encoder's input and a thumbnail
    (:func:`retrieval.pixel_match.thumbnail`); failures come back as messages."""

    def __init__(self, paths: list[Path], size: int, channels: int, skip_hashes: frozenset[str]):
        self.paths, self.size, self.channels, self.skip = paths, size, channels, skip_hashes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):  # noqa: ANN204
        path = self.paths[i]
        try:
            data = path.read_bytes()
        except OSError as exc:
            if path.is_symlink() and not path.exists():
                return i, None, None, "", f"{path}: broken symbolic link (to {os.readlink(path)})"
            return i, None, None, "", f"{path}: cannot read file ({exc.strerror or exc})"
        digest = hashlib.sha256(data).hexdigest()
        if digest in self.skip:
            return i, None, None, digest, None
        try:
            im = open_image(data, self.channels, self.size)
            return i, pil_to_tensor(resize_center_crop(im, self.size)), thumbnail(im), digest, None
        except ImageReadError as exc:
            return i, None, None, digest, str(exc).replace("image bytes", str(path), 1)


def _collate(rows: list) -> list:  # noqa: ANN001
    return rows


def embed_collection(
    encoder: Encoder,
    coll: Collection,
    batch_size: int = 256,
    workers: int | None = None,
    skip_hashes: set[str] | frozenset[str] = frozenset(),
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
) -> Embedded:
    """Embed this rank's share of ``coll``; items whose content hash is in ``skip_hashes`` are skipped."""
    positions = list(range(rank, len(coll), world))
    bar = _progress(len(positions), progress)
    try:
        if coll.images is not None:
            return _embed_tensor(encoder, coll, positions, batch_size, frozenset(skip_hashes), bar)
        return _embed_files(encoder, coll, positions, batch_size, workers, frozenset(skip_hashes), bar)
    finally:
        if bar is not None:
            bar.close()


def _progress(total: int, enabled: bool):  # noqa: ANN202
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc="embed", dynamic_ncols=True)


def _embed_tensor(encoder, coll, positions, batch_size, skip, bar) -> Embedded:  # noqa: ANN001
    images = match_channels(coll.images, encoder.spec.in_channels)
    flat = coll.images.numpy().reshape(len(coll), -1)
    hashes = {p: hashlib.sha256(flat[p].tobytes()).hexdigest() for p in positions}
    keep = [p for p in positions if hashes[p] not in skip]
    # Whole runs of consecutive items are sliced, not gathered.
    contiguous = len(keep) > 0 and keep[-1] - keep[0] == len(keep) - 1
    out = []
    for start in range(0, len(keep), batch_size):
        if contiguous:
            rows = slice(keep[start], keep[start] + min(batch_size, len(keep) - start))
        else:
            rows = torch.tensor(keep[start : start + batch_size])
        batch = images[rows]
        # Thumbnails from the data set's own pixels (not the encoder's channels).
        out.append((*_embed_batch(encoder, batch), thumbnails_of(coll.images[rows].numpy())))
        if bar is not None:
            bar.update(len(batch))
    return _result(encoder, coll, keep, out, [hashes[p] for p in keep], [], len(positions) - len(keep))


def _embed_files(encoder, coll, positions, batch_size, workers, skip, bar) -> Embedded:  # noqa: ANN001
    paths = [coll.paths[p] for p in positions]
    dataset = _Files(paths, encoder.spec.image_size, encoder.spec.in_channels, skip)
    workers = min(usable_cpus(), 8) if workers is None else workers
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
        pin_memory=encoder.device.type == "cuda", persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )
    keep, out, hashes, failures, duplicates = [], [], [], [], 0
    for rows in loader:
        ok = [r for r in rows if r[1] is not None]
        for i, _, _, digest, err in rows:
            if err is not None:
                failures.append((coll.refs[positions[i]], err))
            elif digest in skip:
                duplicates += 1
        if ok:
            batch = torch.stack([r[1] for r in ok])
            out.append((*_embed_batch(encoder, batch), np.stack([r[2] for r in ok])))
            keep.extend(positions[r[0]] for r in ok)
            hashes.extend(r[3] for r in ok)
        if bar is not None:
            bar.update(len(rows))
    for ref, err in failures:
        log.debug("skipped %s: %s", ref, err)
    return _result(encoder, coll, keep, out, hashes, failures, duplicates)


def _embed_batch(encoder: Encoder, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw features and embeddings (B, D) of one batch, on the CPU (one backbone pass)."""
    feats = encoder.features(batch)
    return feats.cpu(), encoder.from_features(feats).cpu()


def _result(encoder, coll, keep, out, hashes, failures, duplicates) -> Embedded:  # noqa: ANN001
    features = torch.cat([f for f, _, _ in out]).numpy() if out else np.zeros((0, encoder.dim), np.float32)
    vectors = torch.cat([v for _, v, _ in out]).numpy() if out else np.zeros((0, encoder.dim), np.float32)
    thumbs = np.concatenate([t for _, _, t in out]) if out else np.zeros((0, THUMB * THUMB), np.uint8)
    items = Items([coll.refs[p] for p in keep], [coll.labels[p] for p in keep], list(hashes))
    return Embedded(vectors, items, np.asarray(keep, dtype=np.int64), features, thumbs, failures, duplicates)


def skipped_lines(failures: list[tuple[str, str]], limit: int = 20) -> list[str]:
    """One line per unreadable file of :attr:`Embedded.failures` (the first ``limit``)."""
    out = [f"skipped: {reason}" for _, reason in failures[:limit]]
    if len(failures) > limit:
        out.append(f"skipped: ... and {len(failures) - limit} more")
    return out


def merge(parts: list[Embedded]) -> Embedded:
    """Join the shards of several ranks back into collection order."""
    positions = np.concatenate([p.positions for p in parts])
    order = np.argsort(positions, kind="stable")
    vectors = np.concatenate([p.vectors for p in parts])[order]
    features = np.concatenate([p.features for p in parts])[order]
    thumbs = np.concatenate([p.thumbnails for p in parts])[order]
    items = Items()
    for p in parts:
        items.extend(p.items)
    return Embedded(
        vectors=vectors, items=items.select(order.tolist()), positions=positions[order], features=features,
        thumbnails=thumbs, failures=[f for p in parts for f in p.failures], duplicates=sum(p.duplicates for p in parts),
    )
