"""Decoding image files: no warnings, the same notion of "image" for scans and direct reads,
and errors that name the file the user gave."""

import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simclr.data import load_folder, scan_folder
from simclr.images import ImageReadError, image_extensions, open_image, pil_to_tensor, read_image, resize_center_crop


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("mode", ["L", "RGB"])
@pytest.mark.parametrize("channels", [1, 3])
def test_decoding_gives_torch_writable_pixels_and_warns_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, mode: str, channels: int
) -> None:
    path = tmp_path / f"x.{fmt.lower()}"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)).convert(mode).save(path, fmt)
    # PyTorch warns about a read-only array only once a process, so a warning filter alone
    # passes whenever an earlier test has already triggered it: look at the arrays too.
    seen: list[bool] = []
    from_numpy = torch.from_numpy

    def spy(arr: np.ndarray) -> torch.Tensor:
        seen.append(arr.flags.writeable)
        return from_numpy(arr)

    monkeypatch.setattr(torch, "from_numpy", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_file = read_image(path, 16, channels)
        from_bytes = read_image(path.read_bytes(), 16, channels)
    assert seen and all(seen), "torch was given a read-only array"
    assert from_file.shape == (channels, 16, 16) and from_file.dtype == torch.uint8
    assert torch.equal(from_file, from_bytes)


def _write_every_format(folder: Path) -> list[Path]:
    """One small picture in each format Pillow can both write and read here."""
    im = Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    written = []
    for ext in sorted(image_extensions() - {".icns"}):  # (ICNS writes sizes up to 1024 px: slow)
        path = folder / f"pic{ext}"
        try:
            im.save(path)
        except (OSError, KeyError, ValueError):  # a format Pillow reads but cannot write in this mode
            path.unlink(missing_ok=True)
            continue
        written.append(path)
    return written


def test_a_folder_scan_lists_every_file_a_direct_read_accepts(tmp_path: Path) -> None:
    written = _write_every_format(tmp_path)
    names = {p.suffix for p in written}
    assert {".ico", ".tga", ".png", ".jpg"} <= names  # formats the old fixed list left out, and the usual ones
    for path in written:
        open_image(path)  # each one a direct read accepts ...
    assert scan_folder(tmp_path).paths == sorted(written)  # ... a folder scan lists
    data = load_folder(tmp_path, size=8)
    assert data.skipped == 0 and sorted(data.refs) == sorted(map(str, written))
    ico = data.refs.index(str(tmp_path / "pic.ico"))
    assert torch.equal(data.images[ico], read_image(tmp_path / "pic.ico", 8))


def test_data_files_pillow_only_recognises_are_not_counted_as_images(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    for name in ("weather.h5", "clip.mpg", "doc.eps", "forecast.grib", "drawing.wmf", "notes.txt"):
        (tmp_path / name).write_bytes(b"\0" * 64)
    assert scan_folder(tmp_path).paths == [tmp_path / "a.png"]
    assert load_folder(tmp_path, size=8).skipped == 0


def test_a_dangling_symbolic_link_is_named_by_the_link(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8), "red").save(tmp_path / "good.png")
    link = tmp_path / "gone.png"
    link.symlink_to(tmp_path / "elsewhere" / "moved.png")
    with pytest.raises(ImageReadError) as err:
        open_image(link)
    assert str(err.value) == f"{link}: broken symbolic link (to {tmp_path / 'elsewhere' / 'moved.png'})"
    relative = tmp_path / "rel.png"
    os.symlink("moved.png", relative)
    with pytest.raises(ImageReadError, match=r"rel\.png: broken symbolic link \(to moved\.png\)$"):
        read_image(relative, 8)
    # A missing file that is not a link keeps its plain message.
    with pytest.raises(ImageReadError, match=r"nothing\.png: file not found$"):
        open_image(tmp_path / "nothing.png")
    data = load_folder(tmp_path, size=8)
    assert data.refs == [str(tmp_path / "good.png")] and data.skipped == 2


def test_bytes_and_a_file_decode_alike(tmp_path: Path) -> None:
    im = Image.fromarray(np.random.default_rng(2).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    (tmp_path / "x.png").write_bytes(buf.getvalue())
    t = read_image(tmp_path / "x.png", 24)
    assert torch.equal(t, read_image(buf.getvalue(), 24))
    # Shorter side to 24, centre crop: columns 8..32 of the original.
    assert torch.equal(t, torch.from_numpy(np.asarray(im)[:, 8:32].transpose(2, 0, 1).copy()))


def _smooth_jpeg(width: int, height: int) -> bytes:
    noise = np.random.default_rng(3).integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    im = Image.fromarray(noise).resize((width, height), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.mark.parametrize(("width", "height", "size"), [(1024, 768, 256), (640, 480, 224), (1600, 1200, 96), (130, 130, 73)])
def test_a_large_jpeg_is_decoded_small_but_never_below_the_size_asked_for(width: int, height: int, size: int) -> None:
    # The codec's reduced-scale decode is a shortcut for the shrink that follows: the result must
    # stay the full decode's, shrunk (a decode below the size, then enlarged, is blurred).
    data = _smooth_jpeg(width, height)
    reference = pil_to_tensor(resize_center_crop(Image.open(io.BytesIO(data)).convert("RGB"), size)).float()
    assert (read_image(data, size).float() - reference).abs().mean() < 2.5  # the codec filters a little differently
    opened = open_image(data, size=size)
    assert min(opened.size) >= size
    if min(width, height) >= 2 * size:
        assert min(opened.size) < min(width, height)  # the shortcut was taken
    assert open_image(data).size == (width, height)  # no size asked for: full size
