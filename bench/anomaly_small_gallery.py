"""Anomaly scores on a small gallery of one kind of photo: which space should the scores use?

An index's anomaly space is fit on its own gallery (``retrieval.anomaly.AnomalySpace``). A
gallery with fewer than 2 items a feature dimension used to get the *plain* space, the raw
features as they are: with the CPU photo profile's 1,792-d pyramid, every gallery under 3,584
photos, which is most one-kind folders. This benchmark asks what such a gallery would get from
the whitening the encoders use for small folders (``simclr.whitening.fit_whitening`` with
``images_per_direction``: the N / r leading directions whitened, the rest scaled like the last
of them).

For each class of the photo-like set in turn: the gallery is N evenly spaced training photos of
that class, the queries are all test photos, the anomalies those of the other classes; the
score is the mean Euclidean distance to the k = 5 nearest gallery items (the index's score);
mean AUROC over the classes. The same for the encoder's architecture untrained (the initial
weights of its run's seed) and for raw pixels (L2, the issue's control)::

    .venv/bin/python bench/anomaly_small_gallery.py --encoder bench/out/photo_quality/train-10min/encoder.pt \\
        --data bench/out/photos --counts 100,250,500,1000,2000 --json bench/out/anomaly_small_gallery.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import write_report  # noqa: E402
from small_gallery import features, unwhitened  # noqa: E402

from retrieval.anomaly import DEFAULT_K, DEFAULT_SHRINKAGE, MIN_ITEMS_PER_DIM, auroc  # noqa: E402
from simclr.data import load_folder  # noqa: E402
from simclr.encoder import Encoder  # noqa: E402
from simclr.whitening import evenly_spaced_positions  # noqa: E402
from simclr.whitening import fit_whitening  # noqa: E402


def knn_score(gallery: torch.Tensor, queries: torch.Tensor, k: int = DEFAULT_K) -> np.ndarray:
    """Mean Euclidean distance of each query to its k nearest gallery items."""
    out = []
    for start in range(0, len(queries), 1000):
        d = torch.cdist(queries[start : start + 1000], gallery)
        out.append(d.topk(k, dim=1, largest=False).values.mean(1))
    return torch.cat(out).numpy()


def spaces(g: torch.Tensor, q: torch.Tensor, per_dims: list[int]) -> dict[str, float]:
    """Scores in each candidate space: name -> (gallery, queries) transformed."""
    out = {"raw features (the plain space)": (g, q)}
    if len(g) >= MIN_ITEMS_PER_DIM * g.shape[1]:
        mean, matrix = fit_whitening(g, DEFAULT_SHRINKAGE, images_per_direction=0)
        out["plain whitening"] = ((g - mean) @ matrix, (q - mean) @ matrix)
    for per_dim in per_dims:
        mean, matrix = fit_whitening(g, DEFAULT_SHRINKAGE, images_per_direction=per_dim)
        out[f"whitened, N/{per_dim} directions"] = ((g - mean) @ matrix, (q - mean) @ matrix)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoder", required=True, type=Path)
    ap.add_argument("--data", default="bench/out/photos", type=Path, help="a folder with train/ and test/ class subfolders")
    ap.add_argument("--counts", default="100,250,500,1000,2000", help="gallery sizes (photos of the class), comma-separated")
    ap.add_argument("--per-dims", default="10,5,2", help="images a whitened direction, comma-separated")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    per_dims = [int(c) for c in args.per_dims.split(",")]
    spec = Encoder.load(args.encoder).spec
    train = load_folder(args.data / "train", spec.image_size, spec.in_channels)
    test = load_folder(args.data / "test", spec.image_size, spec.in_channels)
    feats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in ("trained", "untrained"):
        enc = unwhitened(args.encoder, name == "untrained")
        start = time.perf_counter()
        feats[name] = features(enc, train.images), features(enc, test.images)
        print(f"{name}: features {tuple(feats[name][0].shape)} in {time.perf_counter() - start:.0f} s", flush=True)
    pixels = train.images.flatten(1).float() / 255, test.images.flatten(1).float() / 255
    rows = []
    for n in counts:
        per_class: dict[str, list[float]] = {}
        for c in range(len(train.classes)):
            mine = (train.labels == c).nonzero().squeeze(1)
            pick = mine[evenly_spaced_positions(len(mine), n)]
            is_anomaly = (test.labels != c).numpy()
            for name, (g_all, q) in feats.items():
                for space, (g, qq) in spaces(g_all[pick], q, per_dims).items():
                    per_class.setdefault(f"{name}: {space}", []).append(auroc(knn_score(g, qq), is_anomaly))
            per_class.setdefault("raw pixels, L2", []).append(auroc(knn_score(pixels[0][pick], pixels[1]), is_anomaly))
        row = {"gallery": len(pick), "images_per_dim": round(len(pick) / feats["trained"][0].shape[1], 3),
               "mean_auroc": {k: round(100 * float(np.mean(v)), 2) for k, v in per_class.items()},
               "per_class": {k: [round(100 * x, 1) for x in v] for k, v in per_class.items()}}
        print(row["gallery"], row["mean_auroc"], flush=True)
        rows.append(row)
    write_report({"date": time.strftime("%Y-%m-%d %H:%M"), "encoder": str(args.encoder), "data": str(args.data),
                  "pooling": spec.pooling, "flip_average": spec.flip_average, "dim": feats["trained"][0].shape[1],
                  "classes": train.classes, "k": DEFAULT_K, "shrinkage": DEFAULT_SHRINKAGE, "rows": rows},
                 args.json, show=False)


if __name__ == "__main__":
    main()
