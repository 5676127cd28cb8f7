"""A corpus of hostile and odd image files, generated (nothing binary is stored in the repo).

``build(folder)`` writes the files and returns the names expected to be accepted and refused.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

BOMB_SIDE = 30000


def base_image(size: tuple[int, int] = (48, 32)) -> Image.Image:
    """An asymmetric RGB image, so that every rotation and flip looks different."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1), ((x // 8 + y // 8) % 2) * 255], -1)
    arr[: h // 4, : w // 4] = (255, 0, 0)  # a red top-left corner
    return Image.fromarray(arr.astype(np.uint8))


# For EXIF orientation o, the stored pixels are the upright image transformed by the inverse
# of the operation a viewer applies; reading must give the upright image back.
_STORE_FOR_ORIENTATION = {
    1: [],
    2: [Image.Transpose.FLIP_LEFT_RIGHT],
    3: [Image.Transpose.ROTATE_180],
    4: [Image.Transpose.FLIP_TOP_BOTTOM],
    5: [Image.Transpose.TRANSPOSE],
    6: [Image.Transpose.ROTATE_90],
    7: [Image.Transpose.TRANSVERSE],
    8: [Image.Transpose.ROTATE_270],
}


def png_bomb(path: Path, side: int = BOMB_SIDE) -> None:
    """A valid one-colour grayscale PNG of side x side pixels (about 1 MB on disk, 900 MB decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(1)
    row = b"\0" * (side + 1)  # filter byte + pixels
    rows_per_block = 256
    parts = []
    for start in range(0, side, rows_per_block):
        parts.append(comp.compress(row * min(rows_per_block, side - start)))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))


def build(folder: Path, bomb: Path | None = None) -> tuple[list[str], list[str]]:
    """Write the corpus into ``folder``; returns (accepted names, refused names)."""
    folder.mkdir(parents=True, exist_ok=True)
    ok: list[str] = []
    bad: list[str] = []
    base = base_image()

    def save(name: str, im: Image.Image, accepted: bool = True, **kw) -> None:  # noqa: ANN003
        im.save(folder / name, **kw)
        (ok if accepted else bad).append(name)

    def write(name: str, data: bytes, accepted: bool = False) -> None:
        (folder / name).write_bytes(data)
        (ok if accepted else bad).append(name)

    # Refused: not images, or broken ones.
    write("zero-bytes.jpg", b"")
    write("text-renamed.jpg", b"this is a text file, not a JPEG\n" * 4)
    buf = io.BytesIO()
    base.save(buf, "PNG")
    write("truncated.png", buf.getvalue()[: len(buf.getvalue()) // 2])
    buf = io.BytesIO()
    base_image((400, 300)).save(buf, "JPEG", quality=90)
    write("truncated.jpg", buf.getvalue()[: len(buf.getvalue()) // 2])
    write("html-as.png", b"<html><body>hello</body></html>")
    if bomb is not None:
        (folder / "bomb.png").symlink_to(bomb)
        bad.append("bomb.png")

    # Accepted: every odd but valid kind of image.
    save("one-pixel.png", Image.new("RGB", (1, 1), (10, 200, 30)))
    save("cmyk.jpg", base.convert("CMYK"), quality=90)
    arr16 = (np.linspace(0, 65535, 40 * 30).reshape(30, 40)).astype(np.uint16)
    save("sixteen-bit.png", Image.fromarray(arr16))
    pal = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    save("palette-transparent.png", pal, transparency=0)
    frames = [Image.new("RGB", (20, 20), c) for c in ("red", "green", "blue")]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    ok.append("animated.gif")
    for o, ops in _STORE_FOR_ORIENTATION.items():
        im = base
        for op in ops:
            im = im.transpose(op)
        exif = Image.Exif()
        exif[0x0112] = o
        save(f"exif-orientation-{o}.jpg", im, quality=98, subsampling=0, exif=exif.tobytes())
    save("webp.webp", base, quality=90)
    pages = [base, base.rotate(180), Image.new("RGB", base.size, "white")]
    pages[0].save(folder / "multipage.tiff", save_all=True, append_images=pages[1:])
    ok.append("multipage.tiff")
    save("wide-1x1000.png", Image.new("L", (1000, 1), 128))
    save("tall-1000x1.png", Image.new("L", (1, 1000), 64))
    save("very-wide.jpg", base_image((2000, 20)), quality=85)
    save("rgba.png", base.convert("RGBA"))
    save("gray-alpha.png", base.convert("LA"))
    save("gray.jpg", base.convert("L"), quality=90)
    save("bitmap.bmp", base)
    save("one-bit.png", base.convert("1"))
    save("float.tiff", Image.fromarray(np.linspace(-1, 1, 30 * 40, dtype=np.float32).reshape(30, 40), mode="F"))
    save("png-named.jpg", base, format="PNG")
    save("big-photo.jpg", base_image((3000, 2000)), quality=80)
    save("ünïcødé 画像.png", base)
    save("gray16-tiff.tif", Image.fromarray(arr16))
    # Not image files at all, by name: skipped without being counted as failures.
    (folder / "notes.txt").write_text("ignored")
    (folder / ".hidden.png").write_bytes(b"hidden files are skipped")
    (folder / "looks-like-an-image.png").mkdir()
    # A symlink loop: the folder scan must not run forever.
    (folder / "loop").mkdir()
    (folder / "loop" / "again").symlink_to(folder)
    return ok, bad
