"""bench/make_photos.py: the layout, readable JPEGs of mixed sizes, the same files from the same seed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from PIL import Image

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "make_photos.py"


def load_script():
    """bench/ is a folder of scripts, not a package: load the file as a module."""
    spec = importlib.util.spec_from_file_location("make_photos", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_make_photos(tmp_path: Path) -> None:
    mp = load_script()
    run = dict(train=6, test=6, workers=0, classes=2)  # 2 classes x 3 images per split
    report = mp.generate(tmp_path / "a", seed=0, **run)
    assert (report["written"], report["skipped"]) == (12, 0)

    a = files(tmp_path / "a")
    names = [f"{split}/{c}/{n:06d}.jpg" for split in ("train", "test") for c in mp.CLASSES[:2] for n in range(3)]
    assert sorted(a) == sorted(names)  # split/class/file.jpg, no temporary files left
    for name in a:
        with Image.open(tmp_path / "a" / name) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert all(mp.MIN_SIDE <= side <= mp.MAX_SIDE for side in im.size)
    assert a["train/bolt/000000.jpg"] != a["test/bolt/000000.jpg"]  # the splits never share an image

    mp.generate(tmp_path / "b", seed=0, **run)
    assert files(tmp_path / "b") == a  # byte-identical from the same seed
    mp.generate(tmp_path / "c", seed=1, **run)
    c = files(tmp_path / "c")
    assert sorted(c) == sorted(a) and all(c[n] != a[n] for n in a)

    again = mp.generate(tmp_path / "a", seed=0, **run)  # an interrupted run continues: nothing to redo
    assert (again["written"], again["skipped"]) == (0, 12)
