"""Decoding image files safely into uint8 tensors.

Every image that enters the project, for training, indexing or a query, goes through
:func:`read_image`: it refuses decompression bombs before decoding, applies EXIF rotation,
and maps every Pillow mode (palette, alpha, CMYK, 16-bit ...) onto 8-bit L or RGB.

What counts as an image file when a folder is scanned is what Pillow can decode: every
extension Pillow registers for a format it opens (:func:`image_extensions`), so a folder scan
finds each file that a query by path would accept.
"""

from __future__ import annotations

import functools
import io
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from common.errors import first_line
from simclr.errors import SimCLRError

# Formats Pillow recognises but does not turn into pixels here, left out of folder scans so
# that such files are not counted as broken images: MPEG video (Pillow reads its header only)
# and PostScript documents (rendering them needs Ghostscript). Stub formats (BUFR, GRIB, HDF5,
# WMF: data files that decode only through a handler an application registers) are found by
# their class in :func:`image_extensions`.
NOT_PICTURES = frozenset({"MPEG", "EPS"})
# Larger images are refused before their pixels are decoded (a 30000x30000 PNG of one
# colour is a few kB on disk and 2.7 GB in memory).
MAX_PIXELS = int(os.environ.get("RETRIEVAL_MAX_PIXELS", 80_000_000))


class ImageReadError(SimCLRError):
    """An image that cannot be used; the message says why."""


@functools.cache
def image_extensions() -> frozenset[str]:
    """The file extensions (lower case, with the dot) of every format Pillow can decode here.

    Taken from Pillow's registry, so a folder scan and a direct read agree on what an image
    is; formats in :data:`NOT_PICTURES` and Pillow's stubs are left out.
    """
    registered = Image.registered_extensions()  # (loads every plugin, filling Image.OPEN)
    formats = {
        name for name, (factory, _) in Image.OPEN.items()
        if name not in NOT_PICTURES
        and not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))
    }
    # Multi-picture JPEGs have no opener of their own: the JPEG plugin opens them.
    formats |= {"MPO"} if "JPEG" in formats else set()
    return frozenset(ext for ext, name in registered.items() if name in formats)


def is_image_path(path: Path) -> bool:
    """Whether ``path`` has the extension of a format Pillow decodes (:func:`image_extensions`)."""
    return path.suffix.lower() in image_extensions()


def open_image(source: str | Path | bytes, channels: int = 3, size: int | None = None) -> Image.Image:
    """Open and decode an image as 8-bit ``"L"`` (channels=1) or ``"RGB"`` (channels=3).

    ``size``: the side the caller will shrink the image to. A JPEG at least twice as large is
    then decoded at a reduced scale (1/2, 1/4 or 1/8, in the codec, far faster) that keeps both
    sides at ``size`` or more, so the later resize still only shrinks. Without it, full size.

    Raises:
        ImageReadError: the file is missing (or a symbolic link to nothing), not an image,
            truncated, or too large.
    """
    if channels not in (1, 3):
        raise ImageReadError(f"channels must be 1 or 3, got {channels}")
    name = "image bytes" if isinstance(source, bytes) else str(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        width, height = im.size
        if width * height > MAX_PIXELS:
            raise ImageReadError(
                f"{name}: image is too large ({width}x{height} = {width * height / 1e6:.0f} Mpx; "
                f"the limit is {MAX_PIXELS / 1e6:.0f} Mpx)"
            )
        if width == 0 or height == 0:
            raise ImageReadError(f"{name}: image has no pixels ({width}x{height})")
        if size is not None and im.format == "JPEG":
            im.draft(im.mode, (size, size))  # Pillow keeps each side >= the size it is given
        im.load()
        im = ImageOps.exif_transpose(im)
        return _to_8bit(im, channels)
    except ImageReadError:
        raise
    except FileNotFoundError:
        if not isinstance(source, bytes) and os.path.islink(source):
            # Name the link the user listed, not the missing file it points to.
            raise ImageReadError(f"{name}: broken symbolic link (to {os.readlink(source)})") from None
        raise ImageReadError(f"{name}: file not found") from None
    except IsADirectoryError:
        raise ImageReadError(f"{name}: is a folder, not an image") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{name}: not an image (unrecognised format)") from None
    except Image.DecompressionBombError as exc:
        # Pillow refuses before we can look at the size; its message carries the pixel count.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)) / 1e6:.0f} Mpx" if found else "too many pixels"
        raise ImageReadError(f"{name}: image is too large ({size}; the limit is {MAX_PIXELS / 1e6:.0f} Mpx)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageReadError(f"{name}: cannot decode image ({first_line(exc, type(exc).__name__)})") from None


def _to_8bit(im: Image.Image, channels: int) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float images: scale the full range onto 0..255 rather than clipping.
        arr = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16"):
            arr = arr / 257.0
        else:
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        im = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), mode="L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels become white, as a viewer shows them on a page.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    return im.convert("L" if channels == 1 else "RGB")


def resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (antialiased) and crop the centre square."""
    width, height = im.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        im = im.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return im.crop((left, top, left + size, top + size))


def pil_to_tensor(im: Image.Image) -> torch.Tensor:
    """An ``L`` or ``RGB`` image as a uint8 tensor of shape (C, H, W)."""
    # np.asarray gives a read-only view of Pillow's pixel bytes, which torch must not share (it
    # warns "The given NumPy array is not writable"); one copy makes it writable and puts the
    # channels first.
    arr = np.asarray(im, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr.copy(order="C"))


def read_image(source: str | Path | bytes, size: int, channels: int = 3) -> torch.Tensor:
    """Decode an image file into a uint8 tensor of shape (channels, size, size)."""
    return pil_to_tensor(resize_center_crop(open_image(source, channels, size), size))


def image_to_tensor(im: Image.Image, size: int, channels: int = 3) -> torch.Tensor:
    """Like :func:`read_image` for an image already opened (the web app's uploads)."""
    width, height = im.size
    if width * height > MAX_PIXELS:
        raise ImageReadError(
            f"image is too large ({width}x{height}; the limit is {MAX_PIXELS / 1e6:.0f} Mpx)"
        )
    im = ImageOps.exif_transpose(im)
    return pil_to_tensor(resize_center_crop(_to_8bit(im, channels), size))


def match_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 (N, C, H, W) with C in {1, 3} converted to ``channels`` (luma, or gray repeated)."""
    c = images.shape[1]
    if c == channels:
        return images
    if c == 1:
        return images.expand(-1, channels, -1, -1).contiguous()
    if c == 3 and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise ImageReadError(f"cannot convert {c}-channel images to {channels} channels")
