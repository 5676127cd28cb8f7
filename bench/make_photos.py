"""Generate the photo-collection benchmark: photo-like JPEGs of objects in class subfolders.

The project's photo benchmark needs a labelled collection that looks like a folder of small
photos rather than like Fashion-MNIST: colour JPEGs of mixed, sometimes non-square sizes at
photo resolution, large enough (tens of thousands of images, 200,000 for the memory runs) that
training and embedding at photo resolution, streaming a folder that does not fit in memory, and
the index's memory use all matter. No binaries are stored: everything comes from a seed.

Each image is one object of one of ten classes (bolt, nut, washer, gear, key, ring, star, leaf,
cup, bottle) pasted at a random scale (about 30-80% of the shorter side), position, rotation,
aspect and tint onto a textured background (smooth noise, gradients, stripes, wood grain,
speckle, tiles, in random colours), with a soft shadow, shading, background clutter (small
primitives and now and then a small object of another class), blur, a colour cast and sensor
noise. Every class draws its colours from the same distribution and every shape has random
parameters (number of gear teeth, ring thickness, bottle proportions, key bits ...), so the
classes differ by shape only: colour histograms and plain raw pixels at 32 px classify them at
chance (whitened pixels at 96 px reach 28.5%, BENCHMARKS.md "Photo collections").

Layout (``retrieval``'s folder loader labels each image by its first-level subfolder)::

    OUT/train/<class>/<n>.jpg    OUT/test/<class>/<n>.jpg

Run (from the repository root)::

    .venv/bin/python bench/make_photos.py /data/photos                       # 20,000 + 5,000 images
    .venv/bin/python bench/make_photos.py /data/photos-200k --train 200000 --test 10000
    .venv/bin/python bench/make_photos.py /tmp/photos-small --train 200 --test 50 --workers 1

``--train`` and ``--test`` are the totals per split, spread evenly over the classes (image i of
a split is class i mod K, file i div K). Image i of a split depends only on (seed, split, i)
(and the number of classes), so the output is the same with any number of workers. Files that
already exist are skipped, so an interrupted run continues where it stopped; each file is
written under a hidden temporary name and renamed into place.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

CLASSES = ("bolt", "nut", "washer", "gear", "key", "ring", "star", "leaf", "cup", "bottle")
SPLITS = {"train": 0, "test": 1}  # mixed into the seed: the two splits never share an image
MIN_SIDE, MAX_SIDE = 96, 200
SUPERSAMPLE = 2  # shapes are drawn at twice the size and reduced: antialiased edges
CHUNK = 200  # images per worker task
MIN_CONTRAST = 80  # the object's tint against the mean colour behind it (RGB distance)
NOISE_SIGMAS = (0, 2, 3.5, 5, 7)  # sensor noise levels (grey levels)
NOISE_MEAN, NOISE_TILE = 32, 320

# A shape is a list of operations in its own unit coordinates (x right, y down, roughly within
# [-1, 1]): ("fill", points) adds to the object, ("hole", points) cuts through it, and
# ("shade", points, value) darkens the object's surface there (creases, ribs, labels).


# ----------------------------------------------------------------------------- geometry


def circle(cx: float, cy: float, rx: float, ry: float | None = None, n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + (rx if ry is None else ry) * np.sin(t)], 1)


def rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=float)


def bar(p: tuple[float, float], q: tuple[float, float], half_width: float) -> np.ndarray:
    """A thick line segment from p to q as a quadrilateral."""
    p, q = np.asarray(p, float), np.asarray(q, float)
    d = q - p
    n = np.array([-d[1], d[0]]) / (np.hypot(*d) + 1e-9) * half_width
    return np.stack([p + n, q + n, q - n, p - n])


def regular(n: int, r: float, phase: float = 0.0) -> np.ndarray:
    t = phase + np.arange(n) * 2 * np.pi / n
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


# ----------------------------------------------------------------------------- the classes


def bolt(rng: np.random.Generator) -> list:
    hh, hw = rng.uniform(0.22, 0.42), rng.uniform(0.28, 0.5)  # head height, half-width
    sw = rng.uniform(0.11, 0.2) * (hw / 0.4) ** 0.5  # shaft half-width
    top = -1 + hh
    teeth = int(rng.integers(6, 15))
    thread_from = top + (2 - hh) * rng.uniform(0.0, 0.55)  # the shaft's threaded part ends at the tip
    amp = rng.uniform(0.035, 0.07)
    ys = np.linspace(thread_from, 1 - sw * 0.6, 2 * teeth + 1)
    zig = np.where(np.arange(len(ys)) % 2 == 0, 0.0, amp)
    right = [[sw, top], [sw, thread_from]] + [[sw + z, y] for y, z in zip(ys, zig)] + [[sw * 0.55, 1]]
    left = [[-x, y] for x, y in right[::-1]]
    ops = [("fill", rect(-hw, -1, hw, top + 0.02)), ("fill", np.array(right + left))]
    if rng.random() < 0.7:  # the hexagonal head's faces, seen from the side
        f = hw * rng.uniform(0.3, 0.5)
        ops += [("shade", bar((x, -1), (x, top), 0.018), 150) for x in (-f, f)]
    ops += [("shade", bar((-sw, y), (sw, y + amp), 0.012), 170) for y in ys[1::2]]
    return ops


def nut(rng: np.random.Generator) -> list:
    hole = rng.uniform(0.32, 0.55)
    outer = regular(6, 1.0, rng.uniform(0, np.pi / 3))
    if rng.random() < 0.4:  # chamfered corners
        c = rng.uniform(0.05, 0.15)
        outer = np.concatenate([[p + c * (a - p), p + c * (b - p)] for a, p, b in zip(np.roll(outer, 1, 0), outer, np.roll(outer, -1, 0))])
    ops = [("fill", outer), ("hole", circle(0, 0, hole))]
    ops.append(("shade", circle(0, 0, hole + rng.uniform(0.08, 0.18)), 185))  # the chamfer around the hole
    return ops


def washer(rng: np.random.Generator) -> list:
    hole = rng.uniform(0.28, 0.58)
    ops = [("fill", circle(0, 0, 1.0, n=64)), ("hole", circle(0, 0, hole))]
    if rng.random() < 0.5:  # a bevel ring on the face
        ops.append(("shade", circle(0, 0, rng.uniform(hole + 0.1, 0.9), n=64), 200))
    return ops


def gear(rng: np.random.Generator) -> list:
    n = int(rng.integers(8, 21))
    root = rng.uniform(0.72, 0.88)
    frac = rng.uniform(0.35, 0.55)  # of each pitch taken by the tooth's top
    pts = []
    for k in range(n):
        a = 2 * np.pi * k / n
        w = 2 * np.pi / n
        for da, r in ((0, root), (w * (0.5 - frac) / 2, 1.0), (w * (0.5 + frac) / 2, 1.0), (w * 0.5, root)):
            pts.append([r * np.cos(a + da), r * np.sin(a + da)])
        pts.append([root * np.cos(a + w), root * np.sin(a + w)])
    ops = [("fill", np.array(pts)), ("hole", circle(0, 0, rng.uniform(0.1, 0.3)))]
    spokes = int(rng.choice([0, 0, 3, 4, 5, 6]))
    if spokes:
        r = rng.uniform(0.1, 0.16) * (6 / spokes) ** 0.5
        ops += [("hole", circle(0.5 * root * np.cos(a), 0.5 * root * np.sin(a), r)) for a in np.arange(spokes) * 2 * np.pi / spokes]
    if rng.random() < 0.5:  # the rim of the hub
        ops.append(("shade", circle(0, 0, root * rng.uniform(0.8, 0.9), n=64), 200))
        ops.append(("shade", circle(0, 0, root * rng.uniform(0.7, 0.78), n=64), 255))
    return ops


def key(rng: np.random.Generator) -> list:
    r = rng.uniform(0.3, 0.45)
    bx = -1 + r
    blade_h = rng.uniform(0.08, 0.14)
    if rng.random() < 0.5:
        bow = circle(bx, 0, r)
    else:  # a rounded-square or oval bow
        bow = circle(bx, 0, r, r * rng.uniform(0.7, 1.0), n=8) if rng.random() < 0.5 else circle(bx, 0, r * 0.9, r * 1.15)
    ops = [("fill", bow), ("fill", rect(bx, -blade_h, 1.0, blade_h))]
    ops.append(("fill", np.array([[1.0, -blade_h], [1.0 + blade_h, 0], [1.0, blade_h]])))  # tip
    start = bx + r + rng.uniform(0.15, 0.4)
    bits = int(rng.integers(2, 6))
    xs = np.sort(rng.uniform(start, 0.95, bits))
    for x in xs:
        depth, w = rng.uniform(0.07, 0.2), rng.uniform(0.035, 0.08)
        if rng.random() < 0.5:
            ops.append(("fill", rect(x - w, blade_h - 0.01, x + w, blade_h + depth)))
        else:
            ops.append(("fill", np.array([[x - w, blade_h - 0.01], [x + w, blade_h - 0.01], [x, blade_h + depth]])))
    ops.append(("hole", circle(bx - r * 0.35, 0, r * rng.uniform(0.2, 0.35))))
    if rng.random() < 0.6:  # the groove along the blade
        ops.append(("shade", bar((bx + r, 0), (0.95, 0), blade_h * 0.25), 170))
    return ops


def ring(rng: np.random.Generator) -> list:
    band = rng.uniform(0.06, 0.16)
    ry = rng.uniform(0.85, 1.0)  # slightly oval: seen a little from the side
    ops = [("fill", circle(0, 0.1, 0.8, 0.8 * ry, n=64)), ("hole", circle(0, 0.1, 0.8 - band, (0.8 - band) * ry, n=64))]
    g = rng.uniform(0.16, 0.28)
    gy = 0.1 - 0.8 * ry - g * 0.4
    kind = rng.integers(3)
    if kind == 0:
        stone = circle(0, gy, g)
    elif kind == 1:
        stone = np.array([[0, gy - g * 1.1], [g, gy], [0, gy + g * 1.1], [-g, gy]])
    else:
        stone = regular(int(rng.integers(5, 9)), g) + [0, gy]
    ops += [("fill", rect(-g * 0.6, gy, g * 0.6, gy + g + band)), ("fill", stone)]
    ops.append(("shade", bar((-g * 0.5, gy), (g * 0.5, gy), 0.015), 170))
    return ops


def star(rng: np.random.Generator) -> list:
    n = int(rng.integers(5, 9))
    inner = rng.uniform(0.38, 0.6)
    t = np.arange(2 * n) * np.pi / n - np.pi / 2
    r = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner) * rng.uniform(0.93, 1.07, 2 * n)
    ops = [("fill", np.stack([r * np.cos(t), r * np.sin(t)], 1))]
    if rng.random() < 0.5:  # ridges from the centre to the points
        ops += [("shade", bar((0, 0), (0.85 * np.cos(a), 0.85 * np.sin(a)), 0.015), 175) for a in t[::2]]
    return ops


def leaf(rng: np.random.Generator) -> list:
    w = rng.uniform(0.22, 0.5)
    p = rng.uniform(0.6, 1.3)  # blunt (small p) or pointed ends
    skew = rng.uniform(-0.3, 0.3)
    s = np.linspace(0, 1, 33)
    half = w * np.sin(np.pi * s) ** p * (1 + skew * (s - 0.5))
    if rng.random() < 0.35:  # serrated edge
        half = half * (1 + 0.08 * (np.arange(33) % 2))
    x = -0.8 + 1.8 * s
    outline = np.concatenate([np.stack([x, -half], 1), np.stack([x[::-1], half[::-1]], 1)])
    ops = [("fill", outline), ("fill", bar((-1.05, rng.uniform(-0.08, 0.08)), (-0.75, 0), 0.025))]
    ops.append(("shade", bar((-0.8, 0), (0.95, 0), 0.018), 150))
    veins = int(rng.integers(3, 7))
    for k in range(veins):
        x0 = -0.6 + 1.3 * (k + 0.5) / veins
        reach = w * np.sin(np.pi * (x0 + 0.8) / 1.8) ** p * 0.8
        for sign in (-1, 1):
            ops.append(("shade", bar((x0, 0), (x0 + reach * 0.8, sign * reach), 0.012), 175))
    return ops


def cup(rng: np.random.Generator) -> list:
    h = rng.uniform(0.6, 0.85)  # half-height
    tw = rng.uniform(0.45, 0.65)
    bw = tw * rng.uniform(0.6, 0.95)
    hx = (tw + bw) / 2
    hr = rng.uniform(0.25, 0.42) * h / 0.75
    handle_y = rng.uniform(-0.2, 0.05) * h
    ops = [("fill", circle(hx, handle_y, hr, hr * rng.uniform(1.0, 1.3))), ("hole", circle(hx, handle_y, hr * 0.6, hr * 0.75))]
    ops.append(("fill", np.array([[-tw, -h], [tw, -h], [bw, h], [-bw, h]])))
    ops.append(("shade", circle(0, -h, tw, tw * 0.12, n=32), 160))  # the rim
    if rng.random() < 0.4:  # a saucer
        sw = tw * rng.uniform(1.4, 1.8)
        ops.append(("fill", circle(0, h, sw, sw * 0.13, n=40)))
    if rng.random() < 0.4:  # a band of pattern
        y = rng.uniform(-0.4, 0.3) * h
        ops.append(("shade", rect(-tw, y, tw, y + rng.uniform(0.06, 0.16)), 180))
    return ops


def bottle(rng: np.random.Generator) -> list:
    bw = rng.uniform(0.25, 0.45)
    nw = bw * rng.uniform(0.25, 0.45)
    shoulder = rng.uniform(-0.35, 0.25)
    taper = rng.uniform(0.15, 0.45)
    neck_top = -0.82
    cap = rng.uniform(0.08, 0.18)
    round_b = rng.uniform(0.0, 0.12)
    curve = np.linspace(0, 1, 9)
    ys = shoulder - taper * curve
    xs = nw + (bw - nw) * (1 - curve**2) ** 0.5 if rng.random() < 0.5 else nw + (bw - nw) * (1 - curve)
    right = [[bw - round_b, 1.0], [bw, 1.0 - round_b]] + [[x, y] for x, y in zip(xs, ys)] + [[nw, neck_top]]
    left = [[-x, y] for x, y in right[::-1]]
    ops = [("fill", np.array(right + left)), ("fill", rect(-nw * 1.2, neck_top - cap, nw * 1.2, neck_top + 0.02))]
    if rng.random() < 0.7:  # a label
        top = rng.uniform(shoulder + 0.05, 0.5)
        ops.append(("shade", rect(-bw, top, bw, min(0.95, top + rng.uniform(0.25, 0.6))), int(rng.integers(150, 215))))
    return ops


SHAPES = {"bolt": bolt, "nut": nut, "washer": washer, "gear": gear, "key": key, "ring": ring,
          "star": star, "leaf": leaf, "cup": cup, "bottle": bottle}


# ----------------------------------------------------------------------------- rendering


def random_colour(rng: np.random.Generator, sat: tuple[float, float] = (0.0, 1.0), val: tuple[float, float] = (0.15, 1.0)) -> tuple[int, int, int]:
    """A colour drawn uniformly in hue, saturation and value (one distribution for every class)."""
    h, s, v = rng.random(), rng.uniform(*sat), rng.uniform(*val)
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return tuple(int(255 * c) for c in rgb)


def smooth_noise(rng: np.random.Generator, w: int, h: int, cells: float) -> np.ndarray:
    """Value noise in [0, 1]: a coarse random grid resized bicubically to w x h."""
    gw, gh = max(2, int(round(cells * w / max(w, h))) + 1), max(2, int(round(cells * h / max(w, h))) + 1)
    grid = Image.fromarray((rng.random((gh, gw)) * 255).astype(np.uint8))
    return np.asarray(grid.resize((w, h), Image.BICUBIC), dtype=np.float32) / 255


def texture(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A grey-level background texture in [0, 1] of one of several kinds."""
    y, x = np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]
    a = rng.uniform(0, np.pi)
    u = x * np.cos(a) + y * np.sin(a)
    kind = rng.integers(7)
    if kind == 0:  # smooth blotches, two octaves
        t = 0.65 * smooth_noise(rng, w, h, rng.uniform(2, 6)) + 0.35 * smooth_noise(rng, w, h, rng.uniform(8, 20))
    elif kind == 1:  # a gradient with a little noise
        t = (u - u.min()) / (np.ptp(u) + 1e-6) * 0.8 + 0.2 * smooth_noise(rng, w, h, 6)
    elif kind == 2:  # soft stripes
        t = 0.5 + 0.5 * np.sin(u * 2 * np.pi / rng.uniform(8, 40) + rng.uniform(0, 6.3))
        if rng.random() < 0.5:
            t = (t > 0.5).astype(np.float32) * 0.8 + 0.2 * smooth_noise(rng, w, h, 10)
    elif kind == 3:  # wood grain: stripes bent by noise
        bend = smooth_noise(rng, w, h, rng.uniform(2, 4)) * rng.uniform(20, 60)
        t = 0.5 + 0.5 * np.sin((u + bend) * 2 * np.pi / rng.uniform(6, 18))
        t = 0.7 * t + 0.3 * smooth_noise(rng, w, h, 30)
    elif kind == 4:  # speckle: coarse grain
        t = smooth_noise(rng, w, h, rng.uniform(25, 60)) * 0.7 + 0.3 * smooth_noise(rng, w, h, 4)
    elif kind == 5:  # tiles or a checkerboard
        p = rng.uniform(14, 50)
        v = x * np.cos(a + np.pi / 2) + y * np.sin(a + np.pi / 2)
        grout = (np.minimum(u % p, v % p) < rng.uniform(1, 3)).astype(np.float32)
        t = np.where(rng.random() < 0.5, ((u // p + v // p) % 2) * 0.7, 0.7 * smooth_noise(rng, w, h, 5)) + 0.3 * grout
    else:  # plain with a vignette
        r = np.hypot(x - w / 2, y - h / 2) / (0.7 * max(w, h))
        t = np.clip(1 - r * rng.uniform(0.3, 1.0), 0, 1) + 0.1 * smooth_noise(rng, w, h, 8)
    return np.clip(t, 0, 1)


def background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """The texture coloured through a ramp of two (sometimes three) random colours."""
    grey = Image.fromarray((texture(rng, w, h) * 255).astype(np.uint8))
    c1 = np.array(random_colour(rng), dtype=np.float32)
    c2 = np.array(random_colour(rng), dtype=np.float32)
    if rng.random() < 0.5:  # low-contrast texture: the two colours close together
        c2 = np.clip(c1 + rng.normal(0, 35, 3), 0, 255).astype(np.float32)
    t = np.linspace(0, 1, 256, dtype=np.float32)[:, None]
    if rng.random() < 0.3:
        mid = np.array(random_colour(rng), dtype=np.float32)
        ramp = np.where(t < 0.5, c1 + (mid - c1) * 2 * t, mid + (c2 - mid) * (2 * t - 1))
    else:
        ramp = c1 + (c2 - c1) * t
    return grey.convert("RGB").point(ramp.round().astype(np.uint8).T.ravel().tolist())


def rasterize(pts: list, bw: int, bh: int, off: np.ndarray) -> tuple[Image.Image, Image.Image]:
    """A shape's operations, already in pixels around (0, 0), drawn into a ``bw`` x ``bh`` box
    with the origin at ``off``: its mask (255 inside) and its shading map (255: unshaded),
    antialiased by drawing at SUPERSAMPLE times the size."""
    mask = Image.new("L", (bw * SUPERSAMPLE, bh * SUPERSAMPLE), 0)
    shade = Image.new("L", mask.size, 255)
    dm, ds = ImageDraw.Draw(mask), ImageDraw.Draw(shade)
    for o in pts:
        xy = [tuple(p) for p in ((o[1] + off) * SUPERSAMPLE)]
        if o[0] == "fill":
            dm.polygon(xy, fill=255)
        elif o[0] == "hole":
            dm.polygon(xy, fill=0)
        else:
            ds.polygon(xy, fill=o[2])
    return mask.reduce(SUPERSAMPLE), shade.reduce(SUPERSAMPLE)


def paste_object(img: Image.Image, rng: np.random.Generator, ops: list, size: float, cx: float, cy: float, shadow: bool) -> None:
    """Draw a shape at ``size`` pixels (its longest extent), centred on (cx, cy), randomly rotated,
    stretched, tinted and shaded; antialiased by drawing at SUPERSAMPLE times the size."""
    fills = np.concatenate([o[1] for o in ops if o[0] == "fill"])
    lo, hi = fills.min(0), fills.max(0)
    centre, extent = (lo + hi) / 2, (hi - lo).max() / 2
    a = rng.uniform(0, 2 * np.pi)
    stretch = rng.uniform(0.8, 1.2)
    m = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) @ np.diag([stretch, 1 / stretch])
    m *= size / 2 / extent
    pts = [(o[0], (o[1] - centre) @ m.T, *o[2:]) for o in ops]
    allp = np.concatenate([p[1] for p in pts])
    x0, y0 = np.floor(allp.min(0) + [cx, cy]).astype(int) - 1
    x1, y1 = np.ceil(allp.max(0) + [cx, cy]).astype(int) + 1
    bw, bh = x1 - x0, y1 - y0
    mask, shade = rasterize(pts, bw, bh, np.array([cx - x0, cy - y0]))
    if shadow:
        d = size * rng.uniform(0.02, 0.08)
        sa = rng.uniform(0, 2 * np.pi)
        soft = mask.filter(ImageFilter.BoxBlur(max(1.0, size * 0.03))).point(lambda v, k=rng.uniform(0.3, 0.6): int(v * k))
        img.paste((0, 0, 0), (int(x0 + d * np.cos(sa)), int(y0 + d * np.sin(sa))), soft)
    # Surface: a tint lit from one side (a gradient from dark to light), times the shading map.
    # The tint is redrawn (up to four times) while it is too close to the background behind it.
    behind = np.asarray(img.crop((int(x0), int(y0), int(x1), int(y1))), dtype=np.float32).reshape(-1, 3).mean(0)
    best = None
    for _ in range(4):
        colour = np.array(random_colour(rng, val=(0.25, 1.0)), dtype=np.float32)
        far = float(np.linalg.norm(colour - behind))
        if best is None or far > best[0]:
            best = (far, colour)
        if far >= MIN_CONTRAST:
            break
    colour = best[1]
    yy, xx = np.arange(bh, dtype=np.float32)[:, None], np.arange(bw, dtype=np.float32)[None, :]
    la = rng.uniform(0, 2 * np.pi)
    light = (xx * np.cos(la) + yy * np.sin(la)) / max(bw, bh)
    light = rng.uniform(0.55, 0.8) + rng.uniform(0.3, 0.7) * (light - light.min())
    if rng.random() < 0.3:  # a mottled or brushed surface
        light = light * (0.85 + 0.3 * smooth_noise(rng, int(bw), int(bh), rng.uniform(4, 20)))
    surface = colour * (light * (np.asarray(shade, dtype=np.float32) / 255))[..., None] + rng.uniform(0, 30)
    img.paste(Image.fromarray(np.clip(surface, 0, 255).astype(np.uint8)), (int(x0), int(y0)), mask)


def clutter(img: Image.Image, rng: np.random.Generator, count: int) -> None:
    """Small primitives in random colours: ellipses, boxes, triangles, strokes."""
    w, h = img.size
    draw = ImageDraw.Draw(img)
    for _ in range(count):
        s = rng.uniform(0.06, 0.2) * min(w, h)
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        c = random_colour(rng)
        kind = rng.integers(4)
        if kind == 0:
            draw.ellipse([x - s / 2, y - s / 3, x + s / 2, y + s / 3], fill=c)
        elif kind == 1:
            a = rng.uniform(0, np.pi)
            rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
            draw.polygon([tuple(p) for p in rect(-s / 2, -s / 4, s / 2, s / 4) @ rot.T + [x, y]], fill=c)
        elif kind == 2:
            draw.polygon([tuple(p) for p in regular(3, s / 2, rng.uniform(0, 6.3)) + [x, y]], fill=c)
        else:
            e = regular(1, s, rng.uniform(0, 6.3))[0]
            draw.line([(x, y), (x + e[0], y + e[1])], fill=c, width=max(1, int(s / 8)))


def render(seed: int, split: str, i: int, classes: int = len(CLASSES)) -> tuple[str, Image.Image]:
    """Image ``i`` of ``split``: its class name and the RGB image (a function of its arguments only)."""
    rng = np.random.default_rng([seed, SPLITS[split], i])
    label = CLASSES[i % classes]
    if rng.random() < 0.5:
        w = h = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    else:
        w, h = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, 2))
    img = background(rng, w, h)
    side = min(w, h)
    clutter(img, rng, int(rng.choice([0, 0, 1, 2, 3, 4])))
    size = rng.uniform(0.3, 0.8) * side
    if rng.random() < 0.25:  # a small object of another class, behind the main one
        other = CLASSES[(i + int(rng.integers(1, max(2, classes)))) % classes] if classes > 1 else label
        s = size * rng.uniform(0.25, 0.45)
        paste_object(img, rng, SHAPES[other](rng), s, rng.uniform(s / 2, w - s / 2), rng.uniform(s / 2, h - s / 2), shadow=False)
    r = size / 2 * 0.85  # the centre keeps nearly all of the object in the frame
    cx, cy = rng.uniform(r, max(r, w - r)), rng.uniform(r, max(r, h - r))
    paste_object(img, rng, SHAPES[label](rng), size, cx, cy, shadow=rng.random() < 0.6)
    if rng.random() < 0.4:  # out of focus or moved
        img = img.filter(ImageFilter.BoxBlur(rng.uniform(0.3, 1.0)))
    # Camera: a colour cast and exposure (one lookup table per channel), then sensor noise.
    gain = rng.uniform(0.85, 1.15, 3) * rng.uniform(0.8, 1.2)
    img = img.point(np.clip(np.arange(256)[None, :] * gain[:, None], 0, 255).round().astype(np.uint8).ravel().tolist())
    level = int(rng.integers(len(NOISE_SIGMAS)))
    if NOISE_SIGMAS[level]:
        ox, oy = rng.integers(0, NOISE_TILE - MAX_SIDE + 1, 2)
        grain = noise_tile(level).crop((int(ox), int(oy), int(ox) + w, int(oy) + h))
        img = ImageChops.add(img, grain, 1.0, -NOISE_MEAN)
    return label, img


@functools.lru_cache(maxsize=None)
def noise_tile(level: int) -> Image.Image:
    """A fixed tile of Gaussian sensor noise (mean NOISE_MEAN); images take random crops of it.
    Cheaper than fresh noise per image, and the same in every process."""
    rng = np.random.default_rng(1000 + level)
    grain = rng.normal(NOISE_MEAN, NOISE_SIGMAS[level], (NOISE_TILE, NOISE_TILE, 3))
    return Image.fromarray(np.clip(grain, 0, 255).round().astype(np.uint8))


def encode(seed: int, split: str, i: int, classes: int) -> tuple[str, bytes]:
    label, img = render(seed, split, i, classes)
    quality = int(np.random.default_rng([seed, SPLITS[split], i, 1]).integers(70, 96))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return label, buf.getvalue()


def image_path(out: Path, split: str, i: int, classes: int) -> Path:
    return out / split / CLASSES[i % classes] / f"{i // classes:06d}.jpg"


# ----------------------------------------------------------------------------- the run


def write_range(job: tuple[str, str, int, int, int, int]) -> tuple[int, int, int]:
    """Write images start..stop-1 of a split; (written, skipped, bytes of all of them)."""
    out, split, seed, classes, start, stop = job
    written = skipped = size = 0
    for i in range(start, stop):
        path = image_path(Path(out), split, i, classes)
        if path.exists():
            skipped += 1
            size += path.stat().st_size
            continue
        _, data = encode(seed, split, i, classes)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # hidden: the folder loader skips it
        tmp.write_bytes(data)
        os.replace(tmp, path)
        written += 1
        size += len(data)
    return written, skipped, size


def generate(out: str | Path, train: int = 20000, test: int = 5000, seed: int = 0,
             workers: int | None = None, classes: int = len(CLASSES)) -> dict:
    """Write the set under ``out``; workers 0 or 1 renders in this process. Returns the counts."""
    if not 1 <= classes <= len(CLASSES):
        raise ValueError(f"classes must be 1..{len(CLASSES)}")
    if seed < 0 or train < 0 or test < 0:
        raise ValueError("seed and counts must be non-negative")
    out = Path(out)
    workers = (os.cpu_count() or 1) if workers is None else workers
    jobs = []
    for split, n in (("train", train), ("test", test)):
        for c in CLASSES[: min(classes, n)]:
            (out / split / c).mkdir(parents=True, exist_ok=True)
        jobs += [(str(out), split, seed, classes, s, min(n, s + CHUNK)) for s in range(0, n, CHUNK)]
    start = time.perf_counter()
    if workers <= 1:
        results = [write_range(j) for j in jobs]
    else:
        with Pool(workers) as pool:
            results = list(pool.imap_unordered(write_range, jobs))
    written, skipped, size = (sum(r[k] for r in results) for k in range(3))
    return {"train": train, "test": test, "classes": classes, "written": written, "skipped": skipped,
            "bytes": size, "seconds": time.perf_counter() - start, "workers": max(1, workers)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output folder (OUT/train/<class>/, OUT/test/<class>/)")
    parser.add_argument("--train", type=int, default=20000, help="training images in all (default 20000)")
    parser.add_argument("--test", type=int, default=5000, help="test images in all (default 5000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: the number of CPUs; 0 or 1: none)")
    parser.add_argument("--classes", type=int, default=len(CLASSES), help=f"how many of {', '.join(CLASSES)} (default all)")
    args = parser.parse_args()
    r = generate(args.out, args.train, args.test, args.seed, args.workers, args.classes)
    n = r["written"] + r["skipped"]
    rate = r["written"] / max(r["seconds"], 1e-9)
    print(f"{args.out}: {r['train']} train + {r['test']} test images in {r['classes']} classes "
          f"({r['written']} written, {r['skipped']} already there) in {r['seconds']:.1f} s "
          f"({rate:.0f} images/s, {r['workers']} workers); "
          f"{r['bytes'] / 1e6:.1f} MB of JPEG ({r['bytes'] / max(1, n) / 1e3:.1f} kB per image)")


if __name__ == "__main__":
    main()
