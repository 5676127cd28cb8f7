"""Generate an inspection-line benchmark: photos of one part, good ones and ones with defects.

The users this tool is for often hold photos of one kind of thing (an inspection line) and want
the unusual ones flagged. The photo-like set (``make_photos.py``) varies everything but an
object's shape; here everything is held steady, as a camera over a conveyor holds it, and the
anomalies are small defects of the part. Layout, as in MVTec AD::

    OUT/train/good/<n>.jpg          good parts only (the gallery an index is built from)
    OUT/test/good/<n>.jpg           good parts
    OUT/test/<defect>/<n>.jpg       parts with one defect each

The part is a gear (``--part``: or a nut, or a washer) whose design (teeth, hub, spokes; the
nut's hole and corners) comes from the seed and is the same in every image. Each photo,
128 x 128 px: the belt (one fixed texture, seen through a window that moves with the belt), the
part at the centre give or take 4 px, turned by up to 8 degrees, at 0.62 of the frame give or
take 3%, steel grey under the same light give or take a little, its shadow, then exposure,
sensor noise and JPEG at quality 85-95. The defects:

- ``missing``: a bite out of the rim (a tooth or two gone);
- ``scratch``: a dark thin line across the face;
- ``stain``: a dark blotch on the face;
- ``extra-hole``: a hole drilled where the design has none;
- ``bent``: the part stretched by 12-20% along one axis;
- ``wrong-colour``: a brass tint instead of steel.

Run (from the repository root)::

    .venv/bin/python bench/make_inspection.py bench/out/inspection      # 2,000 + 500 good, 6 x 100 defects
    .venv/bin/python bench/make_inspection.py bench/out/inspection-nut --part nut --seed 1   # a second line

Image i of a split and kind depends only on (seed, split, kind, i), and image i of every kind in
a split is the same photo but for its defect; files already there are skipped.
"""

from __future__ import annotations

import argparse
import io
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageFilter

from make_photos import SPLITS, bar, circle, gear, noise_tile, nut, rasterize, texture, washer

DEFECTS = ("missing", "scratch", "stain", "extra-hole", "bent", "wrong-colour")
KINDS = ("good", *DEFECTS)
SIDE = 128
STEEL = np.array([150, 156, 164], dtype=np.float32)
BRASS = np.array([186, 150, 72], dtype=np.float32)
PARTS = {"gear": gear, "nut": nut, "washer": washer}  # (make_photos' shapes that fill the unit circle)


def part_design(seed: int, part: str = "gear") -> list:
    """The part every image shows (the same operations for one seed)."""
    return PARTS[part](np.random.default_rng([seed, 7]))


def belt(seed: int) -> Image.Image:
    """The conveyor belt: a fixed dark texture, larger than a frame."""
    grey = texture(np.random.default_rng([seed, 8]), 2 * SIDE, 2 * SIDE)
    dark, light = np.array([38, 44, 40], np.float32), np.array([70, 78, 72], np.float32)
    rgb = dark + (light - dark) * grey[..., None]
    return Image.fromarray(rgb.round().astype(np.uint8))


def defect_ops(kind: str, rng: np.random.Generator, hole: float | None = None) -> list:
    """Operations added to the design (in its unit coordinates, the part within radius 1). ``hole``:
    the radius of a part's central hole (a nut, a washer), whose face defects go on the ring
    between the hole and the rim; None: the gear's placements."""
    a = rng.uniform(0, 2 * np.pi)
    if kind == "missing":
        r = rng.uniform(0.18, 0.26)
        return [("hole", circle(np.cos(a) * 1.02, np.sin(a) * 1.02, r))]
    lo, hi = (0.3, 0.62) if hole is None else (hole + 0.08, 0.8)
    if kind == "scratch":
        if hole is None:
            r0, r1 = rng.uniform(0.3, 0.5), rng.uniform(0.3, 0.6)
            b = a + np.pi + rng.uniform(-0.8, 0.8)
        else:  # a chord of the ring, clear of the hole
            r0, r1 = rng.uniform(lo, hi, 2)
            b = a + rng.choice([-1, 1]) * rng.uniform(0.5, 0.9)
        return [("shade", bar((r0 * np.cos(a), r0 * np.sin(a)), (r1 * np.cos(b), r1 * np.sin(b)), 0.022), 70)]
    if kind == "stain":
        r = rng.uniform(0.4, 0.6) if hole is None else (lo + hi) / 2
        return [("shade", circle(r * np.cos(a), r * np.sin(a), rng.uniform(0.1, 0.16), rng.uniform(0.07, 0.12)),
                 int(rng.integers(95, 125)))]
    if kind == "extra-hole":
        r = rng.uniform(0.5, 0.62) if hole is None else rng.uniform(lo + 0.03, hi - 0.03)
        return [("hole", circle(r * np.cos(a), r * np.sin(a), rng.uniform(0.06, 0.09)))]
    return []


def central_hole(ops: list) -> float:
    """The radius of a nut's or washer's central hole: its design's first hole about the centre."""
    for op in ops:
        if op[0] == "hole" and np.abs(op[1].mean(0)).max() < 1e-6:
            return float(np.hypot(*op[1].T).max())
    raise ValueError("the design has no hole at its centre")


def render(seed: int, split: str, kind: str, i: int, part: str = "gear") -> Image.Image:
    """Image ``i`` of ``kind`` in ``split`` (a function of its arguments only)."""
    # Belt, pose, light and camera come from one stream, the defect from another: image i of
    # every kind in a split is the same photo but for its defect.
    rng = np.random.default_rng([seed, SPLITS[split], i])
    flaw = np.random.default_rng([seed, SPLITS[split], i, KINDS.index(kind)])
    ox, oy = rng.integers(0, SIDE + 1, 2)  # the belt has moved on
    img = belt(seed).crop((int(ox), int(oy), int(ox) + SIDE, int(oy) + SIDE))
    design = part_design(seed, part)
    ops = design + defect_ops(kind, flaw, None if part == "gear" else central_hole(design))
    angle = np.deg2rad(rng.uniform(-8, 8))
    stretch = flaw.uniform(1.12, 1.2) if kind == "bent" else 1.0
    axis = flaw.uniform(0, np.pi)
    turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    along = np.array([[np.cos(axis), -np.sin(axis)], [np.sin(axis), np.cos(axis)]])
    m = turn @ along @ np.diag([stretch, 1.0]) @ along.T * (0.62 * SIDE / 2 * rng.uniform(0.97, 1.03))
    cx, cy = SIDE / 2 + rng.uniform(-4, 4, 2)
    pts = [(o[0], o[1] @ m.T, *o[2:]) for o in ops]
    mask, shade = rasterize(pts, SIDE, SIDE, np.array([cx, cy]))
    shadow = mask.filter(ImageFilter.BoxBlur(3)).point(lambda v: int(v * 0.5))
    img.paste((0, 0, 0), (3, 4), shadow)
    colour = (BRASS if kind == "wrong-colour" else STEEL) * rng.uniform(0.96, 1.04)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) / SIDE
    la = np.deg2rad(225 + rng.uniform(-10, 10))  # lit from the upper left
    light = 0.8 + 0.3 * (xx * np.cos(la) + yy * np.sin(la) + 1) / 2
    surface = colour * (light * np.asarray(shade, np.float32) / 255)[..., None]
    img.paste(Image.fromarray(np.clip(surface, 0, 255).astype(np.uint8)), (0, 0), mask)
    gain = rng.uniform(0.95, 1.05)
    img = img.point(np.clip(np.arange(256) * gain, 0, 255).round().astype(np.uint8).tolist() * 3)
    ox, oy = rng.integers(0, 320 - SIDE + 1, 2)
    grain = noise_tile(2).crop((int(ox), int(oy), int(ox) + SIDE, int(oy) + SIDE))
    return ImageChops.add(img, grain, 1.0, -32)


def generate(out: str | Path, train: int = 2000, test_good: int = 500, per_defect: int = 100, seed: int = 0,
             part: str = "gear") -> dict:
    """Write the set under ``out``; returns the counts."""
    out = Path(out)
    jobs = [("train", "good", train), ("test", "good", test_good)] + [("test", d, per_defect) for d in DEFECTS]
    written = skipped = 0
    start = time.perf_counter()
    for split, kind, n in jobs:
        folder = out / split / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            path = folder / f"{i:05d}.jpg"
            if path.exists():
                skipped += 1
                continue
            buf = io.BytesIO()
            quality = int(np.random.default_rng([seed, SPLITS[split], i, 1]).integers(85, 96))
            render(seed, split, kind, i, part).save(buf, "JPEG", quality=quality)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(buf.getvalue())
            os.replace(tmp, path)
            written += 1
    return {"written": written, "skipped": skipped, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--train", type=int, default=2000, help="good parts to train on and index (default 2000)")
    parser.add_argument("--test-good", type=int, default=500)
    parser.add_argument("--per-defect", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--part", choices=sorted(PARTS), default="gear", help="the part on the line (default gear)")
    args = parser.parse_args()
    r = generate(args.out, args.train, args.test_good, args.per_defect, args.seed, args.part)
    print(f"{args.out}: {r['written']} written, {r['skipped']} already there, in {r['seconds']:.1f} s")


if __name__ == "__main__":
    main()
