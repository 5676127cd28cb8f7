"""bench/make_inspection.py: the MVTec-like layout, the same files from the same seed, and defects
that change the part and nothing else."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
from PIL import Image

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load_script():
    """bench/ is a folder of scripts, not a package: load the file as a module (it imports make_photos)."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("make_inspection", BENCH / "make_inspection.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_make_inspection(tmp_path: Path) -> None:
    mi = load_script()
    report = mi.generate(tmp_path / "a", train=3, test_good=2, per_defect=1)
    a = files(tmp_path / "a")
    want = [f"train/good/{n:05d}.jpg" for n in range(3)] + [f"test/good/{n:05d}.jpg" for n in range(2)]
    want += [f"test/{d}/00000.jpg" for d in mi.DEFECTS]
    assert sorted(a) == sorted(want) and report["written"] == len(want)
    with Image.open(tmp_path / "a" / "train/good/00000.jpg") as im:
        assert im.format == "JPEG" and im.size == (mi.SIDE, mi.SIDE)
    mi.generate(tmp_path / "b", train=3, test_good=2, per_defect=1)
    assert files(tmp_path / "b") == a  # byte-identical from the same seed

    # Image i of every kind is the same photo but for its defect: each defect changes the
    # pixels, and only on or beside the part (the centre of the frame), never the belt around it.
    # The same holds on a line of another part (--part nut).
    yy, xx = np.mgrid[0 : mi.SIDE, 0 : mi.SIDE]
    far = np.hypot(xx - mi.SIDE / 2, yy - mi.SIDE / 2) > 0.45 * mi.SIDE
    for part in ("gear", "nut"):
        def pixels(kind: str, i: int) -> np.ndarray:
            return np.asarray(mi.render(0, "test", kind, i, part), np.float32)

        for i in range(3):
            good = pixels("good", i)
            assert np.array_equal(good, pixels("good", i))
            assert np.abs(pixels("good", i + 3) - good).mean() > 1  # good parts are not all one photo
            for defect in mi.DEFECTS:
                changed = np.abs(pixels(defect, i) - good).max(-1) > 0
                assert changed.sum() >= 20, (part, defect, i)
                assert not (changed & far).any(), (part, defect, i)
    gear, nut = (np.asarray(mi.render(0, "train", "good", 0, p), np.float32) for p in ("gear", "nut"))
    assert (np.abs(gear - nut).max(-1) > 40).sum() > 200  # another part in the same frame
