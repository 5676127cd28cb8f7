"""Where the trainer's whitening is centred: training images resized again, or files read as the index reads them.

A training run decodes a folder's files at the *load size* (8/7 of the encoder's size, room
for random crops); the encoder then resizes them to its own size. An index decodes each file
straight to the encoder's size. The two give other pixels (two resamplings, and JPEG's reduced
decoding chosen from the size asked for), so a whitening fit at the end of training on the
training images is centred away from the vectors an index makes. The trainer now fits it on
files read as the index reads them (:meth:`simclr.training_data.TrainingImages.as_indexed`).

For one encoder and a folder with ``train/`` and ``test/`` (class subfolders), this measures,
with the same weights and three whitenings (fit on the same evenly spaced training files, as
the trainer samples them, read at the load size and resized / read as the index reads them /
the one in the encoder file):

- weighted kNN@200 top-1 of the test files against the training files, both read as the index
  reads them (``retrieval knn-eval``'s figure);
- the offset of each split's mean from the whitening's centre
  (the offset of :func:`retrieval.anomaly.place_gallery`: about 1 for a sample of what it was fit on).

    .venv/bin/python bench/whitening_centre.py --encoder RUN/encoder.pt --data bench/out/photos \\
        --json bench/out/whitening_centre.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.anomaly import place_gallery  # noqa: E402
from simclr.data import load_images  # noqa: E402
from simclr.encoder import Encoder, embed_images  # noqa: E402
from simclr.knn import knn_evaluate  # noqa: E402
from simclr.training_data import evenly_spaced_positions, load_size  # noqa: E402
from simclr.whitening import fit_sample_size, fit_whitening  # noqa: E402


def features(enc: Encoder, folder: Path, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw features of ``folder``'s files decoded at ``size`` (resized to the encoder's by the
    encoder), and their labels."""
    data = load_images(str(folder), size=size, channels=enc.spec.in_channels)
    return embed_images(enc, data.images, batch_size=256, features=True), data.labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoder", required=True, type=Path)
    ap.add_argument("--data", required=True, type=Path, help="a folder with train/ and test/, class subfolders")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    enc = Encoder.load(args.encoder, "cpu")
    if not enc.whitened:
        raise SystemExit(f"{args.encoder} has no whitening")
    size = enc.spec.image_size
    start = time.perf_counter()
    train, train_labels = features(enc, args.data / "train", size)
    test, test_labels = features(enc, args.data / "test", size)
    sample = evenly_spaced_positions(len(train), fit_sample_size(enc.dim))
    resized, _ = features(enc, args.data / "train", load_size(size))
    print(f"features in {time.perf_counter() - start:.0f} s ({len(train)} + {len(test)} + {len(train)} files)")

    whitenings = {
        f"fit on the training files at {load_size(size)} px, resized to {size} (the trainer before)":
            (*fit_whitening(resized[sample]), len(sample)),
        f"fit on the training files read at {size} px, as the index reads them (the trainer now)":
            (*fit_whitening(train[sample]), len(sample)),
        "the encoder file's": (enc.white_mean, enc.white_matrix, enc.whitening_fit_count()),
        "none (raw features, L2-normalised)": None,
    }
    classes = int(train_labels.max()) + 1
    rows = []
    for name, w in whitenings.items():
        if w is None:
            g, q = F.normalize(train, dim=1), F.normalize(test, dim=1)
            offsets = {}
        else:
            mean, matrix, count = w
            g, q = (F.normalize((f - mean) @ matrix, dim=1) for f in (train, test))
            m64, w64 = mean.double().numpy(), matrix.double().numpy()
            offsets = {f"offset of {split}": round(place_gallery(f.double().numpy(), m64, w64, count).offset, 2)
                       for split, f in (("train", train), ("test", test))}
            offsets["centre moved (whitened units, per dimension)"] = round(
                float((((resized[sample].mean(0) - train[sample].mean(0)) @ matrix) ** 2).mean().sqrt()), 4)
        r = knn_evaluate(q, test_labels, g, train_labels, classes)
        rows.append({"whitening": name, "knn_top1": round(100 * r.top1, 2), "knn_top5": round(100 * r.top5, 2), **offsets})
        print(rows[-1])
    print("\n| whitening | kNN@200 top-1 | top-5 | offset of train | offset of test |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['whitening']} | {r['knn_top1']:.2f} | {r['knn_top5']:.2f} | "
              f"{r.get('offset of train', '')} | {r.get('offset of test', '')} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"encoder": str(args.encoder), "data": str(args.data), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
