"""Do two images show the same picture? Their pixels, aligned, decide.

An embedding proposes near-duplicate pairs, but a network trained for minutes puts a crop of
a few pixels farther from its original than it puts two distinct pictures of one kind from
each other (BENCHMARKS.md, "Near-duplicates"). Pixels do not have that problem, as long as
what the alterations change is taken out: brightness and contrast by comparing zero-mean unit
vectors (a correlation), a resize or a re-encoding by comparing small grayscale thumbnails,
and a crop, a shift or a slight turn by trying the crops and turns of one image against the
other whole.

Every item keeps a ``THUMB`` x ``THUMB`` grayscale thumbnail of its whole image (uint8,
:func:`thumbnail`; 576 bytes an item), made when the index is built. A pair's score is the best
correlation, over :data:`CROPS` x :data:`CROPS` crops of either item's thumbnail (up to 10% off
each axis, at either end or split), and over the :data:`TURN_CROPS` x :data:`TURN_CROPS` crops
of it turned by each angle of :data:`TURNS`, resampled to ``SIZE`` x ``SIZE``, against the
other's whole thumbnail at that size: 1 for the same picture up to a crop, a turn of a few
degrees, brightness and contrast. :data:`PIXEL_SCORE` names this score, so that a threshold
calibrated on an earlier one is not applied to it.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

THUMBNAILS = "thumbnails"  # the index folder's array of them (n, THUMB * THUMB)
THUMB = 24  # side of the stored thumbnails
SIZE = 16  # side of the compared signatures
# Per axis: (share of the side cut off, share of the cut taken from the start).
CROPS = ((0.0, 0.0),) + tuple((c, o) for c in (0.05, 0.10) for o in (0.0, 0.5, 1.0))
# Degrees each thumbnail is also turned by: a copy turned by up to 5 degrees either way is then
# within a degree of one of them (BENCHMARKS.md, "Near-duplicates").
TURNS = (-4.0, -2.0, 2.0, 4.0)
# The most the turns can be needed to lift a pair's score, for scans that only ask whether pairs
# reach a threshold: the most they lifted an altered copy on the constructed sets was 0.41
# (photos; 0.32 copies altered up to six ways, 0.10 Fashion-MNIST), so a pair scoring this much
# under the threshold without them is not turned (``turn_from``).
TURN_MARGIN = 0.5
PIXEL_SCORE = "crops and turns"  # what the score aligns: stored with a calibrated threshold
BATCH = 512  # pairs scored at a time (about 15 MB of factors, which stay in the caches)
FLAT = 1e-5  # a crop whose variance is below this share of its energy is flat


def thumbnail(im: Image.Image) -> np.ndarray:
    """The whole image, grayscale, squeezed to ``THUMB`` x ``THUMB`` (uint8, flat)."""
    gray = im if im.mode == "L" else im.convert("L")
    return np.asarray(gray.resize((THUMB, THUMB), Image.Resampling.BILINEAR), dtype=np.uint8).reshape(-1)


def thumbnails_of(images: np.ndarray) -> np.ndarray:
    """Thumbnails (n, THUMB * THUMB) of uint8 images (n, C, H, W) held in memory."""
    out = np.empty((len(images), THUMB * THUMB), np.uint8)
    for i, img in enumerate(images):
        if img.shape[0] == 1:
            im = Image.fromarray(np.ascontiguousarray(img[0]), "L")
        else:
            im = Image.fromarray(np.ascontiguousarray(img[:3].transpose(1, 2, 0)), "RGB")
        out[i] = thumbnail(im)
    return out


def _resampler(start: float, stop: float, size: int = SIZE, side: int = THUMB) -> np.ndarray:
    """(size, side): the box-filter resampling of pixels [start, stop) of a row into ``size``
    pixels, each output the mean of the input it covers (partial pixels by their share)."""
    edges = start + (stop - start) * np.arange(size + 1) / size
    lo, hi = edges[:-1, None], edges[1:, None]
    pix = np.arange(side)[None, :]
    cover = np.clip(np.minimum(hi, pix + 1) - np.maximum(lo, pix), 0, None)
    return (cover / cover.sum(1, keepdims=True)).astype(np.float32)


class _CropSet:
    """Crops of one axis (as :data:`CROPS`) and the box-filter resampling of each into ``SIZE``
    samples, stacked: ``axis`` (c * SIZE, THUMB); ``weights`` (c, THUMB), what each crop's
    samples add up; ``per_crop`` (c, SIZE, THUMB)."""

    def __init__(self, crops: tuple[tuple[float, float], ...]):
        self.count = len(crops)
        self.axis = np.concatenate([_resampler(c * o * THUMB, THUMB - c * (1 - o) * THUMB) for c, o in crops])
        self.per_crop = self.axis.reshape(self.count, SIZE, THUMB)
        self.weights = self.per_crop.sum(axis=1)


_ALL = _CropSet(CROPS)
# The crops a turned image is tried at, per axis: the whole, 5% off either end or split, 10%
# split (25 instead of 49). On the constructed sets they find what all 49 find, at two thirds of
# the cost (BENCHMARKS.md, "Near-duplicates").
TURN_CROPS = ((0.0, 0.0), (0.05, 0.0), (0.05, 0.5), (0.05, 1.0), (0.10, 0.5))
_TURN_CROPS = _CropSet(TURN_CROPS)


def signatures(thumbs: np.ndarray) -> np.ndarray:
    """(n, 49, SIZE * SIZE) float32: every crop of each thumbnail, as zero-mean unit vectors
    (the first is the whole image). The plain definition; :func:`pair_scores` computes the
    same correlations without materialising these."""
    x = np.asarray(thumbs, dtype=np.float32).reshape(-1, THUMB, THUMB)
    c = len(CROPS)
    # Resampling is linear: all vertical crops by one product, then all horizontal ones.
    grid = np.matmul(np.matmul(_ALL.axis, x), _ALL.axis.T)  # (n, c * SIZE, c * SIZE)
    sig = grid.reshape(len(x), c, SIZE, c, SIZE).transpose(0, 1, 3, 2, 4).reshape(len(x), c * c, SIZE * SIZE)
    sig -= sig.mean(axis=2, keepdims=True)
    sig /= np.maximum(np.linalg.norm(sig, axis=2, keepdims=True), 1e-6)
    return sig


class _Factors:
    """What a pair's correlations are computed from, per item, for the crops of ``crops``:
    ``rows`` (n, c, SIZE * THUMB), the thumbnail resampled along its height for each crop;
    ``spread`` (n, c * c), each crop's norm after removing its mean; ``unit`` (n, SIZE, SIZE),
    the whole image's zero-mean unit signature W, which :func:`_pulled` pulls back through each
    crop's horizontal resampling (W R_x).

    The correlation of crop (y, x) of A with the whole of B is then
    <R_y A R_x^T - mean, W_B> / spread = <R_y A, W_B R_x> / spread (W_B has zero mean), one
    small matrix product per pair for all the crops. The first crop of every set is the whole."""

    def __init__(self, thumbs: np.ndarray, crops: _CropSet = _ALL):
        c = crops.count
        x = np.asarray(thumbs, dtype=np.float32).reshape(-1, THUMB, THUMB)
        n = len(x)
        rows = np.matmul(crops.axis, x)  # (n, c * SIZE, THUMB)
        grid = np.matmul(rows, crops.axis.T).reshape(n, c, SIZE, c, SIZE)
        total = np.matmul(np.matmul(crops.weights, x), crops.weights.T)  # (n, c, c): each crop's sum
        square = np.einsum("nysxt,nysxt->nyx", grid, grid)
        # A crop's spread, floored relative to its energy: float32 rounding leaves a flat crop
        # some noise, which must not be divided by itself into a perfect correlation.
        spread = square - total**2 / SIZE**2
        floor = FLAT * np.maximum(square, 1.0)
        self.spread = np.sqrt(np.maximum(spread, floor)).reshape(n, c * c)
        self.flat = spread[:, 0, 0] <= floor[:, 0, 0]  # the whole image has no contrast at all
        w = grid[:, 0, :, 0, :] - (total[:, 0, 0] / SIZE**2)[:, None, None]
        self.unit = w / np.maximum(np.linalg.norm(w.reshape(n, -1), axis=1), 1e-6)[:, None, None]
        self.rows = rows.reshape(n, c, SIZE * THUMB)


def _pulled(unit: np.ndarray, crops: _CropSet = _ALL) -> np.ndarray:
    """(n, c, SIZE * THUMB): whole signatures ``unit`` (n, SIZE, SIZE) pulled back through each
    crop's horizontal resampling, W R_x: what a crop's ``rows`` meet in a correlation."""
    return np.matmul(unit[:, None], crops.per_crop[None]).reshape(len(unit), crops.count, SIZE * THUMB)


def _best_crop(rows: np.ndarray, spread: np.ndarray, whole: np.ndarray) -> np.ndarray:
    """The best correlation of any crop of each A (its ``rows`` and ``spread``, as in
    :class:`_Factors`) with the ``whole`` of its B (pulled back through the same crops)."""
    num = np.matmul(rows, whole.transpose(0, 2, 1)).reshape(len(rows), -1)  # (p, c * c) as (y, x)
    return (num / spread).max(axis=1)


@functools.lru_cache(maxsize=16)
def _turn_taps(degrees: float, side: int = THUMB) -> tuple[np.ndarray, np.ndarray]:
    """The bilinear turn of a flattened ``side`` x ``side`` image by ``degrees`` (counter-clockwise
    on screen) about its centre, as four taps per output pixel: source indices and weights, each
    (side * side, 4). A sample that falls outside the image takes the nearest edge pixel."""
    t = np.deg2rad(degrees)
    c = (side - 1) / 2
    y, x = np.mgrid[0:side, 0:side].astype(np.float64)
    # The source of each output pixel: the output position turned back by the angle.
    sx = np.clip(c + np.cos(t) * (x - c) - np.sin(t) * (y - c), 0, side - 1).ravel()
    sy = np.clip(c + np.sin(t) * (x - c) + np.cos(t) * (y - c), 0, side - 1).ravel()
    x0, y0 = np.minimum(np.floor(sx), side - 2).astype(int), np.minimum(np.floor(sy), side - 2).astype(int)
    fx, fy = sx - x0, sy - y0
    index = np.stack([y0 * side + x0, y0 * side + x0 + 1, (y0 + 1) * side + x0, (y0 + 1) * side + x0 + 1], axis=1)
    weight = np.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx], axis=1)
    return index, weight.astype(np.float32)


def _turn(pixels: np.ndarray, taps: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    index, weight = taps
    return np.einsum("npk,pk->np", pixels[:, index], weight)


def turned(thumbs: np.ndarray, degrees: float) -> np.ndarray:
    """Thumbnails (n, THUMB * THUMB) turned by ``degrees`` (float32): see :func:`_turn_taps`."""
    return _turn(np.asarray(thumbs, dtype=np.float32).reshape(-1, THUMB * THUMB), _turn_taps(degrees))


def pair_scores(thumbs: np.ndarray, a: np.ndarray, b: np.ndarray, batch: int = BATCH, turns: bool = True,
                turn_from: float | None = None) -> np.ndarray:
    """The aligned correlation (float32, at most 1) of items ``a[i]`` and ``b[i]``, whose
    thumbnails are rows of ``thumbs`` (possibly memory-mapped): the best of its correlation
    with the other whole, over every crop of either (:data:`CROPS`) and every crop of
    :data:`TURN_CROPS` of either turned by each of :data:`TURNS`. A flat image (no contrast
    at all) scores 0 with anything. ``turns=False``: the crops alone (the score before turns).

    With ``turn_from``, a pair whose score without turns is under it keeps that score: a scan
    at a threshold passes ``threshold - TURN_MARGIN``, and the turns, which cost 2.5 times the
    crops, are spent only on pairs they could lift to it."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    out = np.empty(len(a), np.float32)
    for s in range(0, len(a), batch):
        pa, pb = a[s : s + batch], b[s : s + batch]
        ids, inverse = np.unique(np.concatenate([pa, pb]), return_inverse=True)
        x = np.asarray(thumbs[ids])
        f = _Factors(x)
        whole = _pulled(f.unit)
        ia, ib = inverse[: len(pa)], inverse[len(pa) :]
        best = np.maximum(_best_crop(f.rows[ia], f.spread[ia], whole[ib]),
                          _best_crop(f.rows[ib], f.spread[ib], whole[ia]))
        turn = best < 1.0  # a pair at 1 already is as alike as it gets
        if turn_from is not None:
            turn &= best >= turn_from
        if turns and TURNS and turn.any():
            # Only the items of the pairs still open are turned.
            sub, at = np.unique(np.concatenate([ia[turn], ib[turn]]), return_inverse=True)
            ta, tb = at[: int(turn.sum())], at[int(turn.sum()) :]
            pixels = x[sub].reshape(len(sub), -1).astype(np.float32)
            whole_c = _pulled(f.unit[sub], _TURN_CROPS)
            for degrees in TURNS:
                ft = _Factors(_turn(pixels, _turn_taps(degrees)), _TURN_CROPS)
                lift = np.maximum(_best_crop(ft.rows[ta], ft.spread[ta], whole_c[tb]),
                                  _best_crop(ft.rows[tb], ft.spread[tb], whole_c[ta]))
                best[turn] = np.maximum(best[turn], lift)
        out[s : s + len(pa)] = np.where(f.flat[ia] | f.flat[ib], 0.0, np.minimum(best, 1.0))
    return out


def pairs_reaching(thumbs: np.ndarray, a: np.ndarray, b: np.ndarray, threshold: float) -> np.ndarray:
    """Whether each pair's score (:func:`pair_scores`) reaches ``threshold``, turning only the
    pairs that a turn could lift to it (``turn_from``, :data:`TURN_MARGIN` under it)."""
    return pair_scores(thumbs, a, b, turn_from=threshold - TURN_MARGIN) >= threshold


def stored_thumbnails(store) -> np.ndarray | None:  # noqa: ANN001 (an IndexStore)
    """The index's thumbnails, or ``None`` for an index built before they were stored (or one
    appended to since, whose new items have none)."""
    thumbs = store.arrays.get(THUMBNAILS)
    if thumbs is None or thumbs.shape != (store.manifest.count, THUMB * THUMB):
        return None
    return thumbs
