"""Whitening a small collection: how many images a dimension does a whitening need?

Encoders used to whiten their features only when the images the whitening is fit on numbered
at least 10 a feature dimension: the CPU photo profile's pyramid is 1,792-d, so a folder needed
17,920 photos before it was whitened. This benchmark asks what a smaller folder gets: a gallery
of N evenly spaced training photos, the
whitening fit on those N (as training on that folder would fit it), weighted kNN (k = 200,
T = 0.07) of every test photo against the gallery, through the encoder's own embedding
(``Encoder.features``: its pooling and mirror-averaging), for the trained encoder and for its
untrained control (the same architecture at the initial weights of the run's seed): unwhitened,
the plain whitening at several shrinkages, and a whitening whose eigenvalues are floored at the
r-th largest, r = N / 10 (what ``simclr.whitening.fit_whitening`` does now) or N / 2::

    .venv/bin/python bench/small_gallery.py --encoder bench/out/photo_quality/train-10min/encoder.pt \\
        --data bench/out/photos --counts 500,1000,2000,5000,20000 --json bench/out/small_gallery.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import write_report  # noqa: E402
from anomaly_layers import one_encoder  # noqa: E402

from simclr.data import load_folder  # noqa: E402
from simclr.encoder import Encoder  # noqa: E402
from simclr.knn import knn_evaluate  # noqa: E402
from simclr.whitening import evenly_spaced_positions  # noqa: E402
from simclr.whitening import can_whiten, fit_whitening  # noqa: E402


def features(enc: Encoder, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([enc.features(images[i : i + batch]) for i in range(0, len(images), batch)])


def unwhitened(path: Path, untrained: bool) -> Encoder:
    """The encoder at ``path`` without its whitening; with ``untrained``, its control: the same
    architecture at the initial weights of its run's seed."""
    enc = one_encoder(path, untrained)
    enc.set_whitening(None, None)
    return enc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoder", required=True, type=Path)
    ap.add_argument("--data", default="bench/out/photos", type=Path, help="a folder with train/ and test/ class subfolders")
    ap.add_argument("--counts", default="500,1000,2000,5000,20000", help="gallery sizes, comma-separated")
    ap.add_argument("--shrinkages", default="1e-4,1e-3,1e-2", help="whitening shrinkages, comma-separated")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    shrinkages = [float(s) for s in args.shrinkages.split(",")]
    spec = Encoder.load(args.encoder).spec
    train = load_folder(args.data / "train", spec.image_size, spec.in_channels)
    test = load_folder(args.data / "test", spec.image_size, spec.in_channels)
    rows = []
    for untrained in (False, True):
        enc = unwhitened(args.encoder, untrained)
        start = time.perf_counter()
        g_all, q = features(enc, train.images), features(enc, test.images)
        seconds = round(time.perf_counter() - start, 1)
        for n in counts:
            pick = evenly_spaced_positions(len(train), n)
            g, labels = g_all[pick], train.labels[pick]
            row = {"untrained": untrained, "gallery": len(pick), "dim": enc.dim,
                   "images_per_dim": round(len(pick) / enc.dim, 2), "whitened_now": can_whiten(len(pick), enc.dim),
                   "embed_s": seconds}

            def top1(gallery: torch.Tensor, queries: torch.Tensor) -> float:
                r = knn_evaluate(F.normalize(queries, dim=1), test.labels, F.normalize(gallery, dim=1), labels,
                                 len(train.classes), 200, 0.07)
                return round(100 * r.top1, 2)

            row["unwhitened"] = top1(g, q)
            for s in shrinkages:
                mean, matrix = fit_whitening(g, s, images_per_direction=0)  # the plain whitening
                row[f"whitened_{s:g}"] = top1((g - mean) @ matrix, (q - mean) @ matrix)
            for per_dim in (10, 2):
                mean, matrix = fit_whitening(g, 1e-4, images_per_direction=per_dim)
                row[f"floored_rank_n/{per_dim}"] = top1((g - mean) @ matrix, (q - mean) @ matrix)
            print(row, flush=True)
            rows.append(row)
    write_report({"date": time.strftime("%Y-%m-%d %H:%M"), "encoder": str(args.encoder), "data": str(args.data),
                  "pooling": spec.pooling, "flip_average": spec.flip_average, "rows": rows}, args.json, show=False)


if __name__ == "__main__":
    main()
