"""The encoder whitening's sample from a collection read class by class: its first rows (the
sampling before 2026-12-07, the control) against rows spread over all of it (today's).

A folder of class subfolders is read class by class. Between ``count`` and ``2 count`` images
(``count``: the whitening's sample, 10,000 for 512-d features), a whole step of ``n // count``
is 1, so the sample was the folder's first ``count`` images: its first classes alone. This
study builds such a collection from Fashion-MNIST's training features (``--per-class`` images
of each class, in class order), fits the encoder's whitening on each sample, and then, for each
class in turn as a one-kind gallery (the ``transductive`` setting of ``retrieval anomaly-eval``:
the gallery a part of the encoder's collection), reports its placement, the space ``auto``
picks, and the AUROC of that space against the test images of the other classes.

    python bench/whitening_sample.py --encoder OUT/demo3/encoder.pt --json bench/out/whitening_sample.json

Features come from the cache of ``bench/anomaly_context.py`` (computed there when missing).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from anomaly_context import features_of  # noqa: E402
from retrieval.anomaly import DEFAULT_K, DEFAULT_SHRINKAGE, EncoderWhitening  # noqa: E402
from retrieval.anomaly_eval import class_auroc  # noqa: E402
from simclr.encoder import Encoder  # noqa: E402
from simclr.whitening import evenly_spaced_positions, fit_sample_size, fit_whitening  # noqa: E402

log = logging.getLogger("whitening_sample")


def first_rows(n: int, count: int) -> torch.Tensor:
    """The sampling before 2026-12-07: a whole step, ``n // count``, then the first ``count``."""
    return torch.arange(0, n, max(1, n // max(1, count)))[:count]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoder", required=True, help="an encoder trained on Fashion-MNIST's training images")
    p.add_argument("--per-class", type=int, default=1500, help="images of each class in the collection")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(2)
    enc = Encoder.load(args.encoder, "cpu")
    train, train_data = features_of(enc, "fashion-mnist:train")
    test, test_data = features_of(enc, "fashion-mnist:test")
    labels, test_labels = train_data.labels.numpy(), test_data.labels.numpy()
    classes = train_data.classes
    # The collection, class by class: the first --per-class images of each class, in class order.
    rows = np.concatenate([np.flatnonzero(labels == c)[: args.per_class] for c in range(len(classes))])
    collection, kinds = train[rows], labels[rows]
    count = fit_sample_size(collection.shape[1])
    report = {"encoder": str(args.encoder), "collection": len(rows), "sample": count, "samplings": {}}
    for name, pick in (("first rows (before)", first_rows), ("spread (today)", evenly_spaced_positions)):
        sample = pick(len(collection), count)
        mean, matrix = fit_whitening(collection[sample])
        whitening = EncoderWhitening(mean.double().numpy(), matrix.double().numpy(), len(sample))
        per_class = {}
        for c, cls in enumerate(classes):
            gallery = collection[kinds == c].numpy()
            value, why = class_auroc(gallery, test.numpy(), test_labels != c, DEFAULT_K, DEFAULT_SHRINKAGE, whitening)
            per_class[cls] = {"auroc": round(100 * value, 2), "space": why}
            log.info("%s, %s: %.2f, %s", name, cls, 100 * value, why)
        report["samplings"][name] = {
            "classes in the sample": sorted({classes[k] for k in kinds[sample.numpy()].tolist()}, key=classes.index),
            "mean auroc": round(float(np.mean([v["auroc"] for v in per_class.values()])), 2),
            "per class": per_class,
        }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)


if __name__ == "__main__":
    main()
