"""When the encoder knows a broader collection than the gallery: which anomaly space then?

The index scores anomalies in a space fit on the gallery alone (variant d of
``bench/anomaly_study.py``: raw features whitened on the gallery). When the encoder was
trained, and its whitening fit, on a collection of many kinds and the gallery is one of them
(a product range, one product indexed as normal: the ``transductive`` protocol of ``retrieval
anomaly-eval``), the encoder's whitening holds what sets the kinds apart, which a whitening fit
on one kind cannot see. Variant i uses it: the stored search vector (the encoder's whitened,
normalised embedding), whitened again on the gallery. (``retrieval index --anomaly-space joined``
joins i to d; ``auto``, the default, where the gallery is one part of the whitening's
collection, by the offset and reach below: ``retrieval.anomaly.fit_space``.)

This study measures, for galleries of one class, of two classes, and of every class, with the
encoder's whitening as trained (on the whole collection) and refit on the gallery (what
training on the gallery alone gives: the ``shared-encoder`` protocol):

- the AUROC of d and of i (mean L2 distance to the k nearest, shrinkage 1e-4);
- ``z``: how far the gallery's mean lies from the encoder whitening's centre, in that
  whitening's own units, against what sampling alone would give
  (:func:`retrieval.anomaly.place_gallery`); about 1 when the gallery is a sample of what the
  whitening was fit on, far above when it is one part of it;
- ``reach``: the gallery's mean squared distance from that centre along the direction its mean
  moved, in those units: at most 1 / p for a part making up a share p of the collection, far
  beyond for a gallery shifted off it (other light);
- ``auto``: the AUROC of the space ``retrieval index`` makes by default (joined where z and
  reach say the gallery is a part: :attr:`retrieval.anomaly.Placement.part`; d otherwise).

    .venv/bin/python bench/anomaly_context.py --encoder ENC.pt [--json OUT.json]
    .venv/bin/python bench/anomaly_context.py --encoder RANGE.pt --lines GEAR/train:GEAR/test NUT/train:NUT/test
    .venv/bin/python bench/anomaly_context.py --encoder LINE.pt --lines GEAR/train:GEAR/test --brightness 0.8

``--refit`` fits the encoder's whitening again on the lines' training images at their own light,
read as an index reads them, instead of using the one in the encoder file: what the trainer fits
since 2026-12-07 (files trained before fit it on the training images decoded at the load size
and resized again, ``bench/whitening_centre.py``).

ENC: an encoder trained on all of Fashion-MNIST's training images (the demo recipe), with its
whitening; RANGE: one trained on the good parts of several inspection lines
(``bench/make_inspection.py``), each line then scored alone, its defects the anomalies; LINE:
one trained on a line's good parts alone, its images read at another brightness. Also
measured: the ways of combining d and i (their scores standardised by the gallery's
leave-one-out scores and summed, or the larger taken; the two spaces joined, as the index joins
them). Features are cached under bench/out/anomaly_context/.
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

from retrieval.anomaly import DEFAULT_K, AnomalySpace, auroc, mean_distance, place_gallery  # noqa: E402
from retrieval.anomaly_eval import _features, _slug, knn_l2  # noqa: E402
from simclr.data import load_images  # noqa: E402
from simclr.encoder import Encoder  # noqa: E402
from simclr.whitening import fit_whitening  # noqa: E402

OUT = ROOT / "bench" / "out" / "anomaly_context"
log = logging.getLogger("anomaly_context")

PAIRS = [(0, 6), (2, 4), (5, 7), (1, 3), (8, 9)]  # T-shirt+Shirt, Pullover+Coat, Sandal+Sneaker, Trouser+Dress, Bag+Ankle boot


def unit_embedding(f: torch.Tensor, mean: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    return F.normalize((f - mean) @ matrix, dim=1)


def gallery_whitened(gallery: torch.Tensor, queries: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gallery and query vectors in a space fit on the gallery (as the index fits one), and the
    gallery's leave-one-out scores in it."""
    space = AnomalySpace.fit(gallery.numpy())
    g, q = space.transform(gallery.numpy()), space.transform(queries.numpy())
    return g, q, mean_distance(knn_l2(g, g, DEFAULT_K + 1)[:, 1:], DEFAULT_K)


def score(g: np.ndarray, q: np.ndarray) -> np.ndarray:
    return mean_distance(knn_l2(q, g, DEFAULT_K), DEFAULT_K)


def standardised(scores: np.ndarray, loo: np.ndarray) -> np.ndarray:
    """Scores in units of the gallery's own leave-one-out scores (median, interquartile range)."""
    q75, q25 = np.percentile(loo, [75, 25])
    return (scores - np.median(loo)) / max(q75 - q25, 1e-12)


def study(name: str, g: torch.Tensor, q: torch.Tensor, is_anomaly: np.ndarray | None,
          enc_whitening: tuple[torch.Tensor, torch.Tensor], fit_count: int) -> dict:
    """d, i (the encoder's whitening as trained), i (refit on the gallery), their combinations,
    and z for one gallery."""
    mean, matrix = enc_whitening
    placed = place_gallery(g.numpy(), mean.double().numpy(), matrix.double().numpy(), fit_count)
    row = {"gallery": name, "items": len(g), "z": placed.offset, "reach": placed.reach, "part": placed.part}
    if is_anomaly is not None:
        a = lambda s: 100 * auroc(s, is_anomaly)  # noqa: E731
        gd, qd, ld = gallery_whitened(g, q)
        gi, qi, li = gallery_whitened(unit_embedding(g, mean, matrix), unit_embedding(q, mean, matrix))
        sd, si = score(gd, qd), score(gi, qi)
        row["d"], row["i (as trained)"] = a(sd), a(si)
        row["max of the standardised scores"] = a(np.maximum(standardised(sd, ld), standardised(si, li)))
        row["standardised scores summed"] = a(standardised(sd, ld) + standardised(si, li))
        scale_d, scale_i = np.median(ld), np.median(li)
        row["joined, parts scaled"] = a(score(np.hstack([gd / scale_d, gi / scale_i]), np.hstack([qd / scale_d, qi / scale_i])))
        row["joined (the index)"] = a(score(np.hstack([gd, gi]), np.hstack([qd, qi])))
        row["auto (the index's default)"] = row["joined (the index)"] if placed.part else row["d"]
        rm, rw = fit_whitening(g)
        gr, qr, _ = gallery_whitened(unit_embedding(g, rm, rw), unit_embedding(q, rm, rw))
        row["i (refit on the gallery)"] = a(score(gr, qr))
        row["z (refit)"] = place_gallery(g.numpy(), rm.double().numpy(), rw.double().numpy(), len(g)).offset
    log.info("%s", {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    return row


def features_of(enc: Encoder, source: str, size: int | None = None, brightness: float = 1.0):
    """``source``'s raw features (cached by encoder, source and brightness) and labels; with
    ``brightness``, of its images with every pixel scaled by it (a batch under other light)."""
    data = load_images(source, size=size) if size else load_images(source)
    cache = OUT / f"features-{enc.checksum[:12]}-{_slug(source)}{'' if brightness == 1 else f'-x{brightness:g}'}.pt"
    if cache.exists():
        return torch.load(cache), data
    start = time.perf_counter()
    if brightness != 1:
        data.images = (data.images.float() * brightness).round().clamp(0, 255).to(torch.uint8)
    feats = torch.from_numpy(_features(enc, data))
    log.info("features of %d images of %s in %.0f s", len(feats), source, time.perf_counter() - start)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(feats, cache)
    return feats, data


KEYS = ["items", "z", "reach", "d", "i (as trained)", "max of the standardised scores", "standardised scores summed",
        "joined, parts scaled", "joined (the index)", "auto (the index's default)", "i (refit on the gallery)", "z (refit)"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoder", required=True,
                   help="an encoder trained on all of Fashion-MNIST's training images, or on all the lines of --lines")
    p.add_argument("--lines", nargs="+", metavar="TRAIN:TEST",
                   help="instead of Fashion-MNIST: inspection lines in MVTec's layout (TRAIN/good, TEST/good, "
                        "TEST/<defect>), each line's good training parts the gallery, its defects the anomalies")
    p.add_argument("--brightness", type=float, default=1.0,
                   help="with --lines: scale every pixel of the lines' images by this (a batch under other light "
                        "than the encoder's training images)")
    p.add_argument("--refit", action="store_true",
                   help="with --lines: fit the encoder's whitening again on all the lines' training images, read as "
                        "an index reads them (as the trainer does now), instead of the encoder file's")
    p.add_argument("--json", type=Path, default=OUT / "results.json")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    enc = Encoder.load(args.encoder, "cpu")
    if not enc.whitened:
        sys.exit(f"{args.encoder} has no whitening: nothing to compare the gallery with")
    whitening = (enc.white_mean.cpu(), enc.white_matrix.cpu())
    fit_count = enc.whitening_fit_count()
    rows = []
    if args.lines:
        if args.refit:
            feats = torch.cat([features_of(enc, line.partition(":")[0], enc.spec.image_size)[0] for line in args.lines])
            whitening, fit_count = fit_whitening(feats), len(feats)
        for line in args.lines:
            train, _, test = line.partition(":")
            gallery, _ = features_of(enc, train, enc.spec.image_size, args.brightness)
            queries, data = features_of(enc, test, enc.spec.image_size, args.brightness)
            rows.append(study(train, gallery, queries, data.labels.numpy() != data.classes.index("good"),
                              whitening, fit_count))
    else:
        ftr, train = features_of(enc, "fashion-mnist:train")
        fte, test = features_of(enc, "fashion-mnist:test")
        tr, te = train.labels.numpy(), test.labels.numpy()
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
    print("| gallery | " + " | ".join(KEYS) + " |\n|---|" + "---:|" * len(KEYS))
    for r in rows:
        print(f"| {r['gallery']} | " + " | ".join(
            ("" if k not in r else f"{r[k]:,}" if isinstance(r[k], int) else f"{r[k]:.2f}") for k in KEYS) + " |")
    if not args.lines:
        one = rows[:10]
        print("\nmean of the ten one-class galleries: " + ", ".join(
            f"{k} {np.mean([r[k] for r in one]):.2f}" for k in KEYS[2:-1]))


if __name__ == "__main__":
    main()
