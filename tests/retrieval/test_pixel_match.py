"""Aligned pixel scores: the fast factorised correlations against a naive area-averaging
reference, and the alterations they must see through (brightness, contrast, crops)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from retrieval.pixel_match import (CROPS, SIZE, THUMB, TURN_CROPS, TURNS, pair_scores, signatures, thumbnail,
                                   thumbnails_of, turned)

SCALE = 40  # every crop edge and every sample edge falls on a whole pixel of the thumbnail x 40


def naive_signatures(thumb: np.ndarray, crops: tuple = CROPS) -> np.ndarray:
    """Each crop of the thumbnail by plain area averaging: the thumbnail blown up SCALE times
    (each pixel a block), cut at whole pixels, averaged over SIZE x SIZE blocks."""
    big = np.kron(thumb.reshape(THUMB, THUMB).astype(np.float64), np.ones((SCALE, SCALE)))
    side = THUMB * SCALE
    out = []
    for cy, oy in crops:
        for cx, ox in crops:
            top, bottom = round(cy * oy * side), round(side - cy * (1 - oy) * side)
            left, right = round(cx * ox * side), round(side - cx * (1 - ox) * side)
            crop = big[top:bottom, left:right]
            h, w = crop.shape
            assert h % SIZE == 0 and w % SIZE == 0  # exact blocks: no interpolation in the reference
            v = crop.reshape(SIZE, h // SIZE, SIZE, w // SIZE).mean(axis=(1, 3)).ravel()
            v -= v.mean()
            out.append(v / np.linalg.norm(v))
    return np.array(out)


def naive_turn(thumb: np.ndarray, degrees: float) -> np.ndarray:
    """The thumbnail turned counter-clockwise about its centre, one output pixel at a time:
    each samples the input bilinearly where the turn takes it from, clamped to the edges."""
    img = thumb.reshape(THUMB, THUMB).astype(np.float64)
    t, c = np.deg2rad(degrees), (THUMB - 1) / 2
    out = np.empty_like(img)
    for y in range(THUMB):
        for x in range(THUMB):
            sx = min(max(c + np.cos(t) * (x - c) - np.sin(t) * (y - c), 0), THUMB - 1)
            sy = min(max(c + np.sin(t) * (x - c) + np.cos(t) * (y - c), 0), THUMB - 1)
            x0, y0 = min(int(sx), THUMB - 2), min(int(sy), THUMB - 2)
            fx, fy = sx - x0, sy - y0
            out[y, x] = ((1 - fy) * ((1 - fx) * img[y0, x0] + fx * img[y0, x0 + 1])
                         + fy * ((1 - fx) * img[y0 + 1, x0] + fx * img[y0 + 1, x0 + 1]))
    return out.ravel()


def naive_views(thumb: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """The thumbnail's naive signatures: every crop, and the crops of TURN_CROPS of it turned by each of TURNS."""
    return naive_signatures(thumb), [naive_signatures(naive_turn(thumb, d), TURN_CROPS) for d in TURNS]


def naive_score(va: tuple, vb: tuple, turns: bool = True) -> float:
    """The best correlation with the other whole of any crop of either thumbnail, and (with
    ``turns``) of any crop of TURN_CROPS of either turned."""
    (sa, turned_a), (sb, turned_b) = va, vb
    best = max((sa @ sb[0]).max(), (sb @ sa[0]).max())
    if turns:
        best = max([best] + [(t @ sb[0]).max() for t in turned_a] + [(t @ sa[0]).max() for t in turned_b])
    return float(best)


def smooth(rng: np.random.Generator, side: int = 240, cells: int = 5) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (cells, cells, 3)).astype(np.uint8)).resize((side, side), Image.Resampling.BICUBIC)


def test_scores_equal_a_naive_area_averaging_reference() -> None:
    rng = np.random.default_rng(0)
    thumbs = np.stack([thumbnail(smooth(rng)) for _ in range(6)] + [rng.integers(0, 256, THUMB * THUMB).astype(np.uint8)
                                                                    for _ in range(4)])
    a, b = np.triu_indices(len(thumbs), 1)
    got = pair_scores(thumbs, a, b, batch=7)  # batches that cut the pairs unevenly
    views = [naive_views(t) for t in thumbs]
    want = np.array([naive_score(views[i], views[j]) for i, j in zip(a, b)])
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(signatures(thumbs[:3]), np.stack([v[0] for v in views[:3]]), atol=2e-5)
    for d in (TURNS[0], 3.3):
        np.testing.assert_allclose(turned(thumbs[:2], d), np.stack([naive_turn(t, d) for t in thumbs[:2]]), atol=1e-3)
    crops = np.array([naive_score(views[i], views[j], turns=False) for i, j in zip(a, b)])
    np.testing.assert_allclose(pair_scores(thumbs, a, b, batch=5, turns=False), crops, atol=2e-5)
    assert (want > crops + 1e-3).sum() >= 3  # the turns do lift some pairs: the reference tells them apart
    # A scan's shortcut: pairs under turn_from keep the crops' score, the rest get the full one.
    cut = float(np.median(crops))
    np.testing.assert_allclose(pair_scores(thumbs, a, b, batch=5, turn_from=cut), np.where(crops >= cut, want, crops),
                               atol=2e-5)


def test_brightness_contrast_and_crops_are_seen_through_and_distinct_pictures_are_not() -> None:
    rng = np.random.default_rng(1)
    pics = [smooth(rng) for _ in range(12)]
    base = np.stack([thumbnail(p) for p in pics])
    arr = np.asarray(pics[0], np.float32)
    relit = Image.fromarray(np.clip(0.7 * arr + 40, 0, 255).astype(np.uint8))
    cropped = pics[0].crop((24, 0, 240, 228))  # 10% off the left, 5% off the bottom
    copies = np.stack([thumbnail(pics[0]), thumbnail(relit), thumbnail(cropped)])
    thumbs = np.concatenate([base, copies])
    n = len(base)
    same = pair_scores(thumbs, [0, 0, 0], [n, n + 1, n + 2])
    assert same[0] == pytest.approx(1.0, abs=1e-5) and same[1] > 0.999 and same[2] > 0.98
    # Unaligned, the crop correlates visibly less: the alignment is what recovers it.
    whole = signatures(thumbs[[0, n + 2]])[:, 0]
    assert float(whole[0] @ whole[1]) < same[2] - 0.02
    a, b = np.triu_indices(n, 1)
    assert pair_scores(thumbs, a, b).max() < 0.9


def test_a_copy_turned_by_a_few_degrees_is_seen_through_and_distinct_pictures_are_not() -> None:
    rng = np.random.default_rng(4)
    pics = [smooth(rng, cells=8) for _ in range(12)]
    base = np.stack([thumbnail(p) for p in pics])
    copies = np.stack([thumbnail(pics[0].rotate(d, resample=Image.Resampling.BICUBIC, fillcolor=(128, 128, 128)))
                       for d in (-4.5, -2.5, 1.5, 3.5)])
    thumbs = np.concatenate([base, copies])
    n = len(base)
    copy_pairs = (np.zeros(4, int), n + np.arange(4))
    now, before = pair_scores(thumbs, *copy_pairs), pair_scores(thumbs, *copy_pairs, turns=False)
    assert now.min() > 0.98 and before.min() < 0.95, (now, before)
    a, b = np.triu_indices(n, 1)
    assert pair_scores(thumbs, a, b).max() < 0.9


def test_a_flat_image_scores_zero_even_against_itself() -> None:
    flat = np.full((2, THUMB * THUMB), 117, np.uint8)
    edge = flat[0].copy().reshape(THUMB, THUMB)
    edge[0] = 200  # contrast only in a row that most crops cut away
    rng = np.random.default_rng(2)
    thumbs = np.stack([flat[0], flat[1], edge.ravel(), rng.integers(0, 256, THUMB * THUMB).astype(np.uint8)])
    got = pair_scores(thumbs, [0, 0, 2], [1, 3, 3])
    assert got[0] == 0 and got[1] == 0 and abs(got[2]) < 0.5


def test_thumbnails_of_arrays_equal_those_of_images() -> None:
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (3, 1, 28, 28)).astype(np.uint8)
    rgb = rng.integers(0, 256, (2, 3, 32, 32)).astype(np.uint8)
    np.testing.assert_array_equal(thumbnails_of(gray), np.stack([thumbnail(Image.fromarray(g[0])) for g in gray]))
    np.testing.assert_array_equal(thumbnails_of(rgb), np.stack([thumbnail(Image.fromarray(c.transpose(1, 2, 0))) for c in rgb]))
    assert thumbnails_of(gray).shape == (3, THUMB * THUMB) and thumbnails_of(gray).dtype == np.uint8
