"""What an encoder's neighbours share on the photo-like set: the object's class (what a user
wants), or a nuisance drawn independently of the class: the background's texture, or the
image's overall colour.

For index folders of bench/make_photos.py's train and test splits, weighted kNN (k=200, T=0.07)
of the test vectors against the train vectors, with the class labels, the background-texture
kind (7 kinds, recovered by replaying the generator's seeded draws) and the hue of the image's
mean colour (6 bins of 60 degrees; grey images, saturation under 0.1, a seventh).

    python bench/photo_nuisance.py bench/out/photo_quality/index-untrained-96 bench/out/photo_quality/index-10min

(each argument is a prefix: PREFIX-train and PREFIX-test are the two index folders).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from harness import write_report
from simclr.knn import knn_evaluate

sys.path.insert(0, str(Path(__file__).parent))
from make_photos import CLASSES, MAX_SIDE, MIN_SIDE, SPLITS  # noqa: E402

TEXTURES = ("blotches", "gradient", "stripes", "wood", "speckle", "tiles", "vignette")


def texture_kind(seed: int, split: str, i: int) -> int:
    """The background texture of image ``i``: the generator's first draws, replayed."""
    rng = np.random.default_rng([seed, SPLITS[split], i])
    if rng.random() < 0.5:
        rng.integers(MIN_SIDE, MAX_SIDE + 1)
    else:
        rng.integers(MIN_SIDE, MAX_SIDE + 1, 2)
    rng.uniform(0, np.pi)  # texture(): the stripes' angle, then the kind
    return int(rng.integers(7))


def hue_bin(path: Path) -> int:
    """The hue of the image's mean colour in 6 bins; 6 for an image whose mean is nearly grey."""
    from PIL import Image

    r, g, b = np.asarray(Image.open(path).convert("RGB").resize((16, 16)), dtype=np.float64).reshape(-1, 3).mean(0) / 255
    hi, lo = max(r, g, b), min(r, g, b)
    if hi - lo < 0.1 * max(hi, 1e-6):
        return 6
    h = (g - b) / (hi - lo) % 6 if hi == r else (b - r) / (hi - lo) + 2 if hi == g else (r - g) / (hi - lo) + 4
    return int(h) % 6


def labelled(folder: Path, split: str, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    rows = [json.loads(line) for line in (folder / "items.jsonl").read_text().splitlines()]
    vectors = torch.from_numpy(np.load(folder / "vectors.npy").astype(np.float32))
    labels: dict[str, list[int]] = {"class": [], "texture": [], "hue": []}
    for r in rows:
        path = Path(r["ref"])
        c = CLASSES.index(path.parent.name)
        labels["class"].append(c)
        labels["texture"].append(texture_kind(seed, split, int(path.stem) * len(CLASSES) + c))
        labels["hue"].append(hue_bin(path))
    return vectors, {k: torch.tensor(v) for k, v in labels.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("prefixes", nargs="+")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for prefix in args.prefixes:
        g, g_labels = labelled(Path(f"{prefix}-train"), "train", args.seed)
        q, q_labels = labelled(Path(f"{prefix}-test"), "test", args.seed)
        row: dict = {"index": prefix}
        for name, count in (("class", len(CLASSES)), ("texture", len(TEXTURES)), ("hue", 7)):
            top1 = knn_evaluate(q, q_labels[name], g, g_labels[name], count, 200, 0.07).top1
            row[f"{name}_top1"] = round(100 * top1, 2)
            row[f"{name}_majority"] = round(100 * float(torch.bincount(q_labels[name]).max()) / len(q), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_report({"rows": rows}, args.json, show=False)


if __name__ == "__main__":
    main()
