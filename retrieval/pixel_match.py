"""Do two images show the same picture? Their pixels, aligned, decide.

An embedding proposes near-duplicate pairs, but a network trained for minutes puts a crop of
a few pixels farther from its original than it puts two distinct pictures of one kind from
each other (BENCHMARKS.md, "Near-duplicates"). Pixels do not have that problem, as long as
what the alterations change is taken out: brightness and contrast by comparing zero-mean unit
vectors (a correlation), a resize or a re-encoding by comparing small grayscale thumbnails,
and a crop or a shift by trying the crops of one image against the other whole.

Every item keeps a ``THUMB`` x ``THUMB`` grayscale thumbnail of its whole image (uint8,
:func:`thumbnail`; 576 bytes an item), made when the index is built. A pair's score is the best
correlation, over :data:`CROPS` x :data:`CROPS` crops of either item's thumbnail (up to 10% off
each axis, at either end or split) resampled to ``SIZE`` x ``SIZE``, against the other's whole
thumbnail at that size: 1 for the same picture up to a crop, brightness and contrast.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

THUMBNAILS = "thumbnails"  # the index folder's array of them (n, THUMB * THUMB)
THUMB = 24  # side of the stored thumbnails
SIZE = 16  # side of the compared signatures
# Per axis: (share of the side cut off, share of the cut taken from the start).
CROPS = ((0.0, 0.0),) + tuple((c, o) for c in (0.05, 0.10) for o in (0.0, 0.5, 1.0))
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


# Every crop of one axis, stacked: (len(CROPS) * SIZE, THUMB).
_AXIS = np.concatenate([_resampler(c * o * THUMB, THUMB - c * (1 - o) * THUMB) for c, o in CROPS])
_WEIGHTS = _AXIS.reshape(len(CROPS), SIZE, THUMB).sum(axis=1)  # (c, THUMB): what each crop's samples add up


def signatures(thumbs: np.ndarray) -> np.ndarray:
    """(n, 49, SIZE * SIZE) float32: every crop of each thumbnail, as zero-mean unit vectors
    (the first is the whole image). The plain definition; :func:`pair_scores` computes the
    same correlations without materialising these."""
    x = np.asarray(thumbs, dtype=np.float32).reshape(-1, THUMB, THUMB)
    c = len(CROPS)
    # Resampling is linear: all vertical crops by one product, then all horizontal ones.
    grid = np.matmul(np.matmul(_AXIS, x), _AXIS.T)  # (n, c * SIZE, c * SIZE)
    sig = grid.reshape(len(x), c, SIZE, c, SIZE).transpose(0, 1, 3, 2, 4).reshape(len(x), c * c, SIZE * SIZE)
    sig -= sig.mean(axis=2, keepdims=True)
    sig /= np.maximum(np.linalg.norm(sig, axis=2, keepdims=True), 1e-6)
    return sig


class _Factors:
    """What a pair's correlations are computed from, per item: ``rows`` (n, c, SIZE * THUMB),
    the thumbnail resampled along its height for each crop; ``spread`` (n, c * c), each crop's
    norm after removing its mean; ``whole`` (n, c, SIZE * THUMB), the whole image's zero-mean
    unit signature W pulled back through each crop's horizontal resampling (W R_x).

    The correlation of crop (y, x) of A with the whole of B is then
    <R_y A R_x^T - mean, W_B> / spread = <R_y A, W_B R_x> / spread (W_B has zero mean), one
    small matrix product per pair for all 49 crops."""

    def __init__(self, thumbs: np.ndarray):
        c = len(CROPS)
        x = np.asarray(thumbs, dtype=np.float32).reshape(-1, THUMB, THUMB)
        n = len(x)
        rows = np.matmul(_AXIS, x)  # (n, c * SIZE, THUMB)
        grid = np.matmul(rows, _AXIS.T).reshape(n, c, SIZE, c, SIZE)
        total = np.matmul(np.matmul(_WEIGHTS, x), _WEIGHTS.T)  # (n, c, c): each crop's sum
        square = np.einsum("nysxt,nysxt->nyx", grid, grid)
        # A crop's spread, floored relative to its energy: float32 rounding leaves a flat crop
        # some noise, which must not be divided by itself into a perfect correlation.
        spread = square - total**2 / SIZE**2
        floor = FLAT * np.maximum(square, 1.0)
        self.spread = np.sqrt(np.maximum(spread, floor)).reshape(n, c * c)
        self.flat = spread[:, 0, 0] <= floor[:, 0, 0]  # the whole image has no contrast at all
        w = grid[:, 0, :, 0, :] - (total[:, 0, 0] / SIZE**2)[:, None, None]
        w /= np.maximum(np.linalg.norm(w.reshape(n, -1), axis=1), 1e-6)[:, None, None]
        self.whole = np.matmul(w[:, None], _AXIS.reshape(c, SIZE, THUMB)[None]).reshape(n, c, SIZE * THUMB)
        self.rows = rows.reshape(n, c, SIZE * THUMB)


def _crops_against(fa: _Factors, ia: np.ndarray, fb: _Factors, ib: np.ndarray) -> np.ndarray:
    """The best correlation of any crop of each A with the whole of its B."""
    num = np.matmul(fa.rows[ia], fb.whole[ib].transpose(0, 2, 1)).reshape(len(ia), -1)  # (p, c * c) as (y, x)
    return (num / fa.spread[ia]).max(axis=1)


def pair_scores(thumbs: np.ndarray, a: np.ndarray, b: np.ndarray, batch: int = BATCH) -> np.ndarray:
    """The aligned correlation (float32, at most 1) of items ``a[i]`` and ``b[i]``, whose
    thumbnails are rows of ``thumbs`` (possibly memory-mapped): the best, over every crop of
    either, of its correlation with the other whole. A flat image (no contrast at all)
    scores 0 with anything."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    out = np.empty(len(a), np.float32)
    for s in range(0, len(a), batch):
        pa, pb = a[s : s + batch], b[s : s + batch]
        ids, inverse = np.unique(np.concatenate([pa, pb]), return_inverse=True)
        f = _Factors(np.asarray(thumbs[ids]))
        ia, ib = inverse[: len(pa)], inverse[len(pa) :]
        best = np.maximum(_crops_against(f, ia, f, ib), _crops_against(f, ib, f, ia))
        out[s : s + len(pa)] = np.where(f.flat[ia] | f.flat[ib], 0.0, np.minimum(best, 1.0))
    return out


def stored_thumbnails(store) -> np.ndarray | None:  # noqa: ANN001 (an IndexStore)
    """The index's thumbnails, or ``None`` for an index built before they were stored (or one
    appended to since, whose new items have none)."""
    thumbs = store.arrays.get(THUMBNAILS)
    if thumbs is None or thumbs.shape != (store.manifest.count, THUMB * THUMB):
        return None
    return thumbs
