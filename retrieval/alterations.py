"""The alterations that make a near-duplicate of a picture: what the duplicate finder must see
through, and what its threshold is calibrated on.

A copy of a picture that went through a phone, a chat app or an editor: re-encoded as a
low-quality JPEG, resized, cropped by up to 10%, made brighter or darker, given more or less
contrast, turned by a few degrees. :func:`alter` applies one or two of these, picked at random,
with random strengths (Pillow only, on the image at its own size): most copies went through one
or two such steps (a resize and a re-encoding, an edit of the brightness). All six at once are
far harder to see through (BENCHMARKS.md, "Near-duplicates").
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance


KINDS = ("crop", "rotate", "resize", "brightness", "contrast", "jpeg")  # in the order they are applied


@dataclass(frozen=True)
class AlterationRanges:
    """How many alterations a copy goes through (a number drawn evenly from ``count``, the kinds
    at random from ``kinds``), and how strong each may be."""

    count: tuple[int, int] = (1, 2)
    kinds: tuple[str, ...] = KINDS
    jpeg_quality: tuple[int, int] = (15, 50)
    scale: tuple[float, float] = (0.5, 0.9)  # resized to this fraction of each side
    crop: float = 0.10  # up to this fraction of each side cut off, split at random between both ends
    brightness: tuple[float, float] = (0.8, 1.2)
    contrast: tuple[float, float] = (0.8, 1.2)
    rotation: float = 5.0  # degrees, either way

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(KINDS)
        if unknown or not 1 <= self.count[0] <= self.count[1] <= len(self.kinds):
            raise ValueError(f"alterations: unknown kinds {sorted(unknown)} or a count {self.count} outside 1..{len(self.kinds)}")

    def describe(self) -> str:
        lo, hi = self.count
        strength = {"jpeg": f"JPEG quality {self.jpeg_quality[0]}-{self.jpeg_quality[1]}",
                    "resize": f"resize to {self.scale[0]:.0%}-{self.scale[1]:.0%}", "crop": f"crop up to {self.crop:.0%}",
                    "brightness": f"brightness x{self.brightness[0]:g}-{self.brightness[1]:g}",
                    "contrast": f"contrast x{self.contrast[0]:g}-{self.contrast[1]:g}",
                    "rotate": f"rotation up to {self.rotation:g} degrees"}
        return f"{lo if lo == hi else f'{lo}-{hi}'} of: " + ", ".join(strength[k] for k in KINDS if k in self.kinds)


DEFAULT_RANGES = AlterationRanges()
COMPOUND_RANGES = AlterationRanges(count=(1, 6))  # up to all six at once: the hard case


def alter(im: Image.Image, rng: np.random.Generator, ranges: AlterationRanges = DEFAULT_RANGES) -> tuple[Image.Image, list[str]]:
    """A near-duplicate of ``im`` and the names of the alterations it went through (in the order
    of :data:`KINDS`, so that the JPEG re-encoding comes last, as it would)."""
    lo, hi = ranges.count
    picked = rng.choice(len(ranges.kinds), int(rng.integers(lo, hi + 1)), replace=False)
    chosen = [k for k in KINDS if k in {ranges.kinds[i] for i in picked}]
    mode = im.mode
    im = im.convert("L" if mode == "L" else "RGB")
    for kind in chosen:
        im = _apply(kind, im, rng, ranges)
    return im, chosen


def _apply(kind: str, im: Image.Image, rng: np.random.Generator, r: AlterationRanges) -> Image.Image:
    w, h = im.size
    if kind == "crop":
        cw, ch = (int(round(side * rng.uniform(0, r.crop))) for side in (w, h))
        left, top = int(rng.integers(0, cw + 1)), int(rng.integers(0, ch + 1))
        return im.crop((left, top, w - (cw - left), h - (ch - top)))
    if kind == "rotate":
        # Corners are filled with the image's mean border colour, as an editor's straighten tool
        # would leave them after its own crop (near enough for a few degrees).
        arr = np.asarray(im)
        border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]]).reshape(-1, *arr.shape[2:])
        fill = tuple(int(v) for v in np.atleast_1d(border.mean(0).round()))
        angle = rng.uniform(-r.rotation, r.rotation)
        return im.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=fill[0] if im.mode == "L" else fill)
    if kind == "resize":
        s = rng.uniform(*r.scale)
        return im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BICUBIC, reducing_gap=3.0)
    if kind == "brightness":
        return ImageEnhance.Brightness(im).enhance(rng.uniform(*r.brightness))
    if kind == "contrast":
        return ImageEnhance.Contrast(im).enhance(rng.uniform(*r.contrast))
    if kind == "jpeg":
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=int(rng.integers(r.jpeg_quality[0], r.jpeg_quality[1] + 1)))
        buf.seek(0)
        out = Image.open(buf)
        out.load()
        return out
    raise ValueError(f"unknown alteration {kind!r}")
