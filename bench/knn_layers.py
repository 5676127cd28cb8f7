"""Weighted kNN from more than the last stage: does a multi-scale embedding lift what training adds?

The index embeds an image as the backbone's globally pooled last-stage features, whitened. For
the small-stem network B of BENCHMARKS.md (width 16, 28 px) that is a 128-d vector, against 784
pixels for whitened raw pixels. This study embeds the same encoders with earlier stages'
features too (globally pooled, or pooled to 2 x 2 or 4 x 4 so that layout survives), concatenated,
each block scaled to one variance before a whitening fit on evenly spaced training images
(as ``Encoder.fit_whitening``), then L2-normalised; weighted kNN (k = 200, T = 0.07) of the
Fashion-MNIST test images against the training images (or ``--train``/``--test`` folders), for each encoder and for its
untrained control (the same architecture at the initial weights of the run's seed, read from
the checkpoint beside the encoder; seed 0 without one). ``--train-count N --whiten rule`` asks
what a small collection gets: a gallery of N evenly spaced training images, whitened only
where encoders would whiten::

    .venv/bin/python bench/knn_layers.py --encoder B10=bench/out/budget/run-1795531981-0/encoder.pt \\
        --json bench/out/knn_layers.json
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

from anomaly_layers import one_encoder, run_seed, space, stage_features  # noqa: E402
from harness import write_report  # noqa: E402

from simclr.data import load_images  # noqa: E402
from simclr.knn import knn_evaluate  # noqa: E402
from simclr.training_data import evenly_spaced_positions, subset  # noqa: E402
from simclr.whitening import can_whiten, evenly_spaced, fit_sample_size, fit_whitening  # noqa: E402

VARIANTS: dict[str, list[str]] = {
    "l4 (the index)": ["l4"],
    "l4 2x2": ["l4s"],
    "l3 + l4": ["l3", "l4"],
    "l3 2x2 + l4": ["l3s", "l4"],
    "l2 2x2 + l3 2x2 + l4": ["l2s", "l3s", "l4"],
    "l3 2x2 + l4 2x2": ["l3s", "l4s"],
    "l2 2x2 + l3 2x2 + l4 2x2": ["l2s", "l3s", "l4s"],
    "l3 4x4 + l4": ["l3q", "l4"],
    "l2 4x4 + l3 2x2 + l4": ["l2q", "l3s", "l4"],
    "l2 4x4 + l3 4x4 + l4": ["l2q", "l3q", "l4"],
}


def evaluate(train_f: dict, test_f: dict, train_labels, test_labels, classes: int, blocks: list[str], flip: bool,  # noqa: ANN001
             whiten: str = "always") -> tuple[int, bool, float]:
    """Dimension, whether whitened, and top-1. ``whiten``: ``always``, or ``rule`` (as encoders
    do: only where ``simclr.whitening.can_whiten`` allows, plain features otherwise)."""
    g, q = space(train_f, test_f, blocks, flip)  # each block scaled on the training features
    dim = g.shape[1]
    white = whiten == "always" or can_whiten(g.shape[0], dim)
    if white:
        mean, matrix = fit_whitening(evenly_spaced(g, min(g.shape[0], fit_sample_size(dim))))
        g, q = (g - mean) @ matrix, (q - mean) @ matrix
    gw, qw = F.normalize(g, dim=1), F.normalize(q, dim=1)
    r = knn_evaluate(qw, test_labels, gw, train_labels, classes, 200, 0.07)
    return dim, white, round(100 * r.top1, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoder", action="append", required=True, help="NAME=PATH of an encoder file")
    ap.add_argument("--variant", action="append", default=None, choices=list(VARIANTS), help="only these (default: all)")
    ap.add_argument("--no-flip", action="store_true", help="skip the flip-averaged rows (half the embedding time)")
    ap.add_argument("--size", type=int, default=None, help="embed at this input size instead of the encoder's own")
    ap.add_argument("--train", default="fashion-mnist:train", help="gallery images (a data set or a folder with class subfolders)")
    ap.add_argument("--test", default="fashion-mnist:test", help="query images")
    ap.add_argument("--train-count", type=int, default=None, help="a gallery of this many evenly spaced training images (a small collection)")
    ap.add_argument("--whiten", choices=("always", "rule"), default="always",
                    help="rule: whiten only where encoders would (simclr.whitening.can_whiten), plain features otherwise")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    loaded: dict[int, tuple] = {}
    rows = []
    for text in args.encoder:
        name, _, path = text.partition("=")
        seed = run_seed(Path(path))
        for untrained in (False, True):
            enc = one_encoder(Path(path), untrained)
            if args.size:
                enc.spec.image_size = args.size
            size = enc.spec.image_size
            if size not in loaded:  # (a data set comes at its own size; a folder is decoded at the encoder's)
                loaded[size] = (load_images(args.train, size, enc.spec.in_channels), load_images(args.test, size, enc.spec.in_channels))
            train, test = loaded[size]
            if args.train_count:
                keep = torch.zeros(len(train), dtype=torch.bool)
                keep[evenly_spaced_positions(len(train), args.train_count)] = True
                train = subset(train, keep)
            start = time.perf_counter()
            feats = {}
            for split, data in (("train", train), ("test", test)):
                f = stage_features(enc, data.images)
                if not args.no_flip:
                    f.update({f"{k}_flip": v for k, v in stage_features(enc, data.images, flip=True).items()})
                feats[split] = f
            seconds = time.perf_counter() - start
            for variant in args.variant or VARIANTS:
                blocks = VARIANTS[variant]
                for flip in (False,) if args.no_flip else (False, True):
                    dim, white, top1 = evaluate(feats["train"], feats["test"], train.labels, test.labels, len(train.classes), blocks,
                                                flip, args.whiten)
                    row = {"encoder": name, "seed": seed, "untrained": untrained, "size": enc.spec.image_size, "variant": variant,
                           "flip": flip, "gallery": len(train), "dim": dim, "whitened": white, "knn200": top1,
                           "embed_s": round(seconds, 1)}
                    print(row, flush=True)
                    rows.append(row)
    write_report({"date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, args.json, show=False)


if __name__ == "__main__":
    main()
