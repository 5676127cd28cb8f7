"""When the encoder knows a broader collection than the gallery: which anomaly space then?

The index scores anomalies in a space fit on the gallery alone (variant d of
``bench/anomaly_study.py``: raw features whitened on the gallery). When the encoder was
trained, and its whitening fit, on a collection of many kinds and the gallery is one of them
(a product range, one product indexed as normal: the ``transductive`` protocol of ``retrieval
anomaly-eval``), the encoder's whitening holds what sets the kinds apart, which a whitening fit
on one kind cannot see. Variant i uses it: the stored search vector (the encoder's whitened,
normalised embedding), whitened again on the gallery.

This study measures, for galleries of one class, of two classes, and of every class, with the
encoder's whitening as trained (on the whole collection) and refit on the gallery (what
training on the gallery alone gives: the ``shared-encoder`` protocol):

- the AUROC of d and of i (mean L2 distance to the k nearest, shrinkage 1e-4);
- ``z``: how far the gallery's mean lies from the encoder whitening's centre, in that
  whitening's own units, against what sampling alone would give
  (:func:`retrieval.anomaly.gallery_offset`); about 1 when the gallery is a sample of what the
  whitening was fit on, far above when it is one part of it.

    .venv/bin/python bench/anomaly_context.py --encoder ENC.pt [--json OUT.json]

ENC: an encoder trained on all of Fashion-MNIST's training images (the demo recipe), with its
whitening. Features are cached under bench/out/anomaly_context/.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from retrieval.anomaly import DEFAULT_K, AnomalySpace, auroc, gallery_offset, mean_distance  # noqa: E402
from retrieval.anomaly_eval import _features, knn_l2  # noqa: E402
from simclr.data import load_images  # noqa: E402
from simclr.encoder import Encoder  # noqa: E402
from simclr.whitening import fit_sample_size, fit_whitening  # noqa: E402

OUT = ROOT / "bench" / "out" / "anomaly_context"
log = logging.getLogger("anomaly_context")

PAIRS = [(0, 6), (2, 4), (5, 7), (1, 3), (8, 9)]  # T-shirt+Shirt, Pullover+Coat, Sandal+Sneaker, Trouser+Dress, Bag+Ankle boot


def unit_embedding(f: torch.Tensor, mean: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    return F.normalize((f - mean) @ matrix, dim=1)


def space_auroc(gallery: torch.Tensor, queries: torch.Tensor, is_anomaly: np.ndarray) -> float:
    space = AnomalySpace.fit(gallery.numpy())
    d = knn_l2(space.transform(queries.numpy()), space.transform(gallery.numpy()), DEFAULT_K)
    return 100 * auroc(mean_distance(d, DEFAULT_K), is_anomaly)


def study(name: str, g: torch.Tensor, q: torch.Tensor, is_anomaly: np.ndarray | None,
          enc_whitening: tuple[torch.Tensor, torch.Tensor], fit_count: int) -> dict:
    """d, i (encoder's whitening as trained), i (refit on the gallery), and z for one gallery."""
    mean, matrix = enc_whitening
    row = {"gallery": name, "items": len(g),
           "z": gallery_offset(g.numpy(), mean.numpy(), matrix.numpy(), fit_count)}
    if is_anomaly is not None:
        row["d"] = space_auroc(g, q, is_anomaly)
        row["i (as trained)"] = space_auroc(unit_embedding(g, mean, matrix), unit_embedding(q, mean, matrix), is_anomaly)
        rm, rw = fit_whitening(g)
        row["i (refit on the gallery)"] = space_auroc(unit_embedding(g, rm, rw), unit_embedding(q, rm, rw), is_anomaly)
        row["z (refit)"] = gallery_offset(g.numpy(), rm.numpy(), rw.numpy(), len(g))
    log.info("%s", {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoder", required=True, help="an encoder trained on all of Fashion-MNIST's training images")
    p.add_argument("--json", type=Path, default=OUT / "results.json")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    enc = Encoder.load(args.encoder, "cpu")
    if not enc.whitened:
        sys.exit(f"{args.encoder} has no whitening: nothing to compare the gallery with")
    train, test = load_images("fashion-mnist:train"), load_images("fashion-mnist:test")
    cache = OUT / f"features-{enc.checksum[:12]}.pt"
    if cache.exists():
        ftr, fte = torch.load(cache)
    else:
        start = time.perf_counter()
        ftr, fte = torch.from_numpy(_features(enc, train)), torch.from_numpy(_features(enc, test))
        log.info("features of %d images in %.0f s", len(ftr) + len(fte), time.perf_counter() - start)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save((ftr, fte), cache)
    tr, te = train.labels.numpy(), test.labels.numpy()
    whitening = (enc.white_mean.cpu(), enc.white_matrix.cpu())
    fit_count = fit_sample_size(ftr.shape[1])  # what the trainer fits an encoder's whitening on
    rows = []
    for c, cls in enumerate(train.classes):
        rows.append(study(cls, ftr[tr == c], fte, te != c, whitening, fit_count))
    for a, b in PAIRS:
        rows.append(study(f"{train.classes[a]} + {train.classes[b]}", ftr[(tr == a) | (tr == b)], fte,
                          (te != a) & (te != b), whitening, fit_count))
    rng = np.random.default_rng(0)
    for n in (100, 1000, 10000, 60000):
        sample = torch.from_numpy(rng.choice(len(ftr), n, replace=False))
        rows.append(study(f"every class, {n} items", ftr[sample], fte, None, whitening, fit_count))
    for n in (100, 1000):
        sample = torch.from_numpy(rng.choice(np.flatnonzero(tr == 0), n, replace=False))
        rows.append(study(f"{train.classes[0]}, {n} items", ftr[sample], fte, te != 0, whitening, fit_count))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2))
    keys = ["items", "z", "d", "i (as trained)", "i (refit on the gallery)", "z (refit)"]
    print("| gallery | " + " | ".join(keys) + " |\n|---|" + "---:|" * len(keys))
    for r in rows:
        print(f"| {r['gallery']} | " + " | ".join(
            ("" if k not in r else f"{r[k]:,}" if isinstance(r[k], int) else f"{r[k]:.2f}") for k in keys) + " |")
    one = rows[:10]
    print("\nmean of the ten one-class galleries: " + ", ".join(
        f"{k} {np.mean([r[k] for r in one]):.2f}" for k in ("d", "i (as trained)", "i (refit on the gallery)")))


if __name__ == "__main__":
    main()
