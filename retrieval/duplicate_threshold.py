"""The near-duplicate threshold, calibrated on the index itself.

How similar is a picture to a re-encoded, resized, cropped or brightened copy of itself? That
depends on the encoder and on the kind of pictures, so it is measured on the index: a sample
of items is read back from the index's sources, each altered at random
(:func:`retrieval.alterations.alter`) and embedded, and its similarity to the item's own
vector taken. The threshold is a low percentile of those similarities: most altered copies
are more similar than it.

Where the encoder puts distinct pictures closer together than altered copies, that
percentile would chain most of the collection into a few huge groups. So the threshold is
raised, if need be, to a high percentile of the items' similarity to their 10th nearest
neighbour: ten or more copies of one picture are rare, so few items should have that many
neighbours above the threshold. The raise trades recall for precision, and the description
of the threshold says when it happened. Where the index stores thumbnails (:mod:`retrieval.pixel_match`), the embedding only proposes
pairs, at a low percentile of the copies' similarity (:data:`CANDIDATE_PERCENTILE`), and
their aligned pixels decide: the pixel threshold is a low percentile of the copies' pixel
score, raised the same way to a high percentile of items' pixel score with their 10th nearest
neighbour. It is measured at build time and kept in the manifest
(:class:`index.manifest.DuplicatesInfo`); an index built before has it measured on demand
(cached nowhere: readers never write into the index folder).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from common.errors import UserError
from retrieval.alterations import DEFAULT_RANGES, AlterationRanges, alter
from retrieval.errors import RetrievalError
from retrieval.item_source import ItemSource
from retrieval.pixel_match import PIXEL_SCORE

if TYPE_CHECKING:
    from index import IndexStore
    from index.manifest import DuplicatesInfo
    from simclr.encoder import Encoder

log = logging.getLogger(__name__)

SAMPLE = 500
PERCENTILE = 5.0  # see BENCHMARKS.md, "Near-duplicates"
CANDIDATE_PERCENTILE = 1.0  # the embedding's bar when pixels decide
PIXEL_PERCENTILE = 1.0
MIN_SAMPLE = 20
BATCH = 256
NEIGHBOUR_K = 10
NEIGHBOUR_PERCENTILE = 99.0
NEIGHBOUR_SAMPLE = 2000


@dataclass
class ThresholdCalibration:
    """The similarities (m,) of ``m`` sampled items to an altered copy of themselves, and of
    other sampled items to their ``NEIGHBOUR_K``-th nearest neighbour; the threshold is the
    ``percentile``th percentile of the first, raised to the ``neighbour_percentile``th of the
    second where that is higher."""

    similarities: np.ndarray
    ids: np.ndarray
    percentile: float
    neighbours: np.ndarray | None = None
    neighbour_percentile: float = NEIGHBOUR_PERCENTILE
    pixel_similarities: np.ndarray | None = None  # the copies' pixel scores (None: no thumbnails)
    pixel_neighbours: np.ndarray | None = None  # the k-th neighbours' pixel scores
    pixel_percentile: float = PIXEL_PERCENTILE
    candidate_percentile: float = CANDIDATE_PERCENTILE

    @property
    def copies_bound(self) -> float:
        return _percentile(self.similarities, self.percentile)

    @property
    def neighbours_bound(self) -> float | None:
        return _percentile(self.neighbours, self.neighbour_percentile)

    @property
    def threshold(self) -> float:
        return _raised(self.copies_bound, self.neighbours_bound)

    @property
    def candidate_threshold(self) -> float:
        """The embedding's bar when pixels decide: most copies are proposed."""
        return _percentile(self.similarities, self.candidate_percentile)

    @property
    def pixel_copies_bound(self) -> float | None:
        return _percentile(self.pixel_similarities, self.pixel_percentile)

    @property
    def pixel_neighbours_bound(self) -> float | None:
        return _percentile(self.pixel_neighbours, self.neighbour_percentile)

    @property
    def pixel_threshold(self) -> float | None:
        return _raised(self.pixel_copies_bound, self.pixel_neighbours_bound)

    def info(self, ranges: AlterationRanges = DEFAULT_RANGES) -> DuplicatesInfo:
        from index.manifest import DuplicatesInfo

        pixels = self.pixel_threshold is not None
        return DuplicatesInfo(threshold=self.threshold, percentile=self.percentile, count=int(self.similarities.size),
                              alterations=ranges.describe(), copies_bound=self.copies_bound,
                              neighbours_bound=self.neighbours_bound, neighbour_k=NEIGHBOUR_K,
                              neighbour_percentile=self.neighbour_percentile,
                              candidate_threshold=self.candidate_threshold if pixels else None,
                              candidate_percentile=self.candidate_percentile if pixels else None,
                              pixel_threshold=self.pixel_threshold, pixel_percentile=self.pixel_percentile if pixels else None,
                              pixel_copies_bound=self.pixel_copies_bound, pixel_neighbours_bound=self.pixel_neighbours_bound,
                              pixel_score=PIXEL_SCORE if pixels else None)


def _percentile(values: np.ndarray | None, q: float) -> float | None:
    """The ``q``-th percentile of the finite ``values``; ``None`` without any."""
    if values is None or not np.isfinite(values).any():
        return None
    return float(np.nanpercentile(values, q))


def _raised(copies: float | None, neighbours: float | None) -> float | None:
    """A bound on the copies' scores, raised to the neighbours' bound where that is higher."""
    if copies is None or neighbours is None:
        return copies
    return max(copies, neighbours)


def neighbour_similarities(store: IndexStore, k: int = NEIGHBOUR_K, sample: int = NEIGHBOUR_SAMPLE,
                           seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each of ``sample`` random items' similarity to its ``k``-th nearest other content, through
    the index's search (NaN where the index returns fewer); with the items and those
    neighbours (-1 where missing)."""
    from retrieval.duplicates import content_firsts

    n = store.manifest.count
    first = content_firsts(store.items.hashes)
    rows = np.sort(np.random.default_rng(seed).choice(n, min(sample, n), replace=False))
    x = np.asarray(store.vectors[rows], dtype=np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sims, ids = store.search(x, 2 * k + 1)
    other = (ids >= 0) & (first[np.maximum(ids, 0)] != first[rows][:, None])
    at = np.argmax(np.cumsum(other, axis=1) >= k, axis=1)
    found = other.sum(1) >= k
    picked = np.arange(len(rows))
    return (np.where(found, sims[picked, at], np.nan).astype(np.float32), rows,
            np.where(found, ids[picked, at], -1).astype(np.int64))


def calibrate_threshold(store: IndexStore, encoder: Encoder, sample: int = SAMPLE, percentile: float = PERCENTILE,
                        seed: int = 0, ranges: AlterationRanges = DEFAULT_RANGES) -> ThresholdCalibration:
    """Measure the similarity of ``sample`` random items to an altered copy of themselves.

    Items whose image cannot be read back (moved files, files outside the index's folders) are
    passed over for others.

    Raises:
        RetrievalError: fewer than :data:`MIN_SAMPLE` items could be read.
    """
    import torch

    from retrieval.pixel_match import pair_scores, stored_thumbnails, thumbnail
    from simclr.images import image_to_tensor, match_channels, pil_to_tensor

    if not 0 < percentile < 100:
        raise RetrievalError(f"threshold percentile must lie in (0, 100), got {percentile}")
    n = store.manifest.count
    want = min(sample, n)
    rng = np.random.default_rng(seed)
    source = ItemSource(store.items.refs, store.manifest.sources)
    spec = encoder.spec
    ids, tensors, thumbs, failures = [], [], [], []
    for i in rng.permutation(n):
        if len(ids) == want or len(failures) > max(want, 100):
            break
        try:
            # Twice the embedding's size keeps a large JPEG's decode fast and leaves every
            # alteration (a resize to half at the least) no smaller than the embedding sees.
            im = source.open(int(i), size=2 * spec.image_size)
        except UserError as exc:
            failures.append(str(exc))
            continue
        altered, _ = alter(im, rng, ranges)
        thumbs.append(thumbnail(altered))
        if source.in_dataset(int(i)):
            # Data-set items were embedded from their pixels at the data set's size (the encoder
            # resizes them): the copy goes the same way, so that an unaltered one matches exactly.
            altered = altered.resize(im.size, Image.Resampling.BICUBIC).convert(im.mode)
            tensors.append(match_channels(pil_to_tensor(altered)[None], spec.in_channels)[0])
        else:  # files were read with read_image: decoded, resized and centre-cropped
            tensors.append(image_to_tensor(altered, spec.image_size, spec.in_channels))
        ids.append(int(i))
    if len(ids) < min(MIN_SAMPLE, n):
        reason = f" ({failures[0]})" if failures else ""
        raise RetrievalError(f"cannot calibrate the duplicate threshold: only {len(ids)} of the {len(ids) + len(failures)} "
                             f"items tried could be read back{reason}; pass --threshold (and --pixel-threshold, or --no-pixels)")
    if failures:
        log.warning("duplicate calibration: %d items could not be read back and were passed over (%s)",
                    len(failures), failures[0])
    copies = np.zeros((len(ids), encoder.dim), np.float32)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for row, t in enumerate(tensors):
        by_shape.setdefault(tuple(t.shape), []).append(row)
    for rows in by_shape.values():
        for s in range(0, len(rows), BATCH):
            chunk = rows[s : s + BATCH]
            copies[chunk] = encoder.embed(torch.stack([tensors[r] for r in chunk])).cpu().numpy()
    ids_arr = np.asarray(ids, dtype=np.int64)
    own = np.asarray(store.vectors[np.sort(ids_arr)], dtype=np.float32)[np.argsort(np.argsort(ids_arr))]
    own /= np.maximum(np.linalg.norm(own, axis=1, keepdims=True), 1e-12)
    neighbours, rows, kth = neighbour_similarities(store, seed=seed)
    pixel_copies = pixel_neighbours = None
    stored = stored_thumbnails(store)
    if stored is not None:
        both = np.concatenate([np.asarray(stored[ids_arr]), np.stack(thumbs)])
        pixel_copies = pair_scores(both, np.arange(len(ids)), len(ids) + np.arange(len(ids)))
        found = kth >= 0
        pixel_neighbours = np.full(len(rows), np.nan, np.float32)
        pixel_neighbours[found] = pair_scores(stored, rows[found], kth[found])
    return ThresholdCalibration((copies * own).sum(1).astype(np.float32), ids_arr, percentile, neighbours,
                                pixel_similarities=pixel_copies, pixel_neighbours=pixel_neighbours)


@dataclass(frozen=True)
class DuplicateThreshold:
    """What makes two items near duplicates in a scan: an embedding similarity of at least
    ``similarity`` and, when ``pixels`` is set, an aligned pixel score of at least that
    (:func:`retrieval.pixel_match.pair_scores`); ``source`` says where they come from."""

    similarity: float
    pixels: float | None
    source: str


def resolve_threshold(store: IndexStore, threshold: float | None = None, pixel_threshold: float | None = None,
                      pixels: bool = True, device: str = "auto",
                      measure: Callable[[], DuplicatesInfo] | None = None) -> DuplicateThreshold:
    """The thresholds of a scan and where they come from, in words: those given, else the
    index's stored calibration, else one measured now with the index's encoder.

    With ``pixels`` (the default) and thumbnails in the index, the aligned pixels decide what
    the embedding proposes; without thumbnails (an index built before they were stored) the
    embedding alone decides, and the source says so. An index without a stored calibration
    is calibrated now, by ``measure`` when given (a caller that keeps the result), else with the
    index's own encoder loaded on ``device``; only when a threshold it needs is not given.

    Raises:
        RetrievalError: ``pixel_threshold`` with ``pixels`` off, or on an index without thumbnails.
    """
    from retrieval.pixel_match import stored_thumbnails

    if pixel_threshold is not None and not pixels:
        raise RetrievalError("--pixel-threshold and --no-pixels contradict each other: leave out one")
    has_thumbs = stored_thumbnails(store) is not None
    if pixel_threshold is not None and not has_thumbs:
        raise RetrievalError(f"{store.path} stores no thumbnails (it was built before they were, or appended to "
                             f"since): rebuild it for a pixel check, or leave out --pixel-threshold")
    use_pixels = pixels and has_thumbs
    info, when = store.manifest.duplicates, "at build time"
    needs = (threshold is None) or (use_pixels and pixel_threshold is None)
    # A pixel threshold calibrated on an earlier score would let through what this one lifts.
    stale = (info is not None and use_pixels and pixel_threshold is None and info.pixel_threshold is not None
             and info.pixel_score != PIXEL_SCORE)
    if needs and (info is None or (use_pixels and info.pixel_threshold is None) or stale):
        info = measure() if measure is not None else _calibrate_now(store, device).info()
        when = ("now (the index's stored pixel threshold is of an earlier pixel score)" if stale
                else "now (the index has no stored calibration)")
    notes = [] if has_thumbs or not pixels else [
        "the embedding alone decides: the index stores no thumbnails for a pixel check (rebuild it for one)"]
    if not use_pixels:
        source = "given" if threshold is not None else info.describe(when)
        return DuplicateThreshold(float(threshold if threshold is not None else info.threshold), None,
                                  "; ".join([source, *notes]))
    if threshold is None and pixel_threshold is None:
        source = info.describe_pixels(when)
    elif threshold is not None and pixel_threshold is not None:
        source = "given"
    else:
        source = f"{'similarity' if threshold is not None else 'pixels'} given; the other {info.describe_pixels(when)}"
    return DuplicateThreshold(float(threshold if threshold is not None else info.candidate_threshold),
                              float(pixel_threshold if pixel_threshold is not None else info.pixel_threshold), source)


def _calibrate_now(store: IndexStore, device: str) -> ThresholdCalibration:
    from retrieval.service import check_encoder
    from simclr.device import pick_device
    from simclr.encoder import Encoder

    encoder = Encoder.load(store.encoder_path, pick_device(device))
    check_encoder(store, encoder)
    return calibrate_threshold(store, encoder)
