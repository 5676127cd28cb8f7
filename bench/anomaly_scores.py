"""Other scores on the same features: does anything beat the index's kNN distance at 10 minutes?

The index scores an item by its mean Euclidean distance to the k = 5 nearest gallery items in a
whitening fit on the gallery (variant d of ``bench/anomaly_study.py``). This study scores the
features that ``bench/anomaly_layers.py`` cached (its per-class encoders, shared encoders and
untrained controls) three more ways, for each Fashion-MNIST class as the normal one:

- ``gauss S``: the Mahalanobis distance to the gallery's mean, the gallery modelled as one
  Gaussian (the norm of the whitened vector; shrinkage S), as in Rippel et al., arXiv 2005.14140;
- ``pixels``: the index's score on raw pixels (L2, k = 5), the control;
- ``d + pixels``: the two scores each standardised by the gallery's leave-one-out scores (median,
  interquartile range) and summed (variant j of the 3-epoch table, at the 10-minute budget).

Run from the repository root after ``bench/anomaly_layers.py`` has cached the features::

    .venv/bin/python bench/anomaly_scores.py --features b16 --blocks l2q,l3s,l4
    .venv/bin/python bench/anomaly_scores.py --features s2w32:shared --blocks l4

``--features NAME``: per-class features ``NAME_<c>_gallery.pt``/``NAME_<c>_test.pt``, or (a name
with a colon) one set ``NAME_train.pt``/``NAME_test.pt`` for every class.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from anomaly_layers import K, SHRINKAGE, feature_files, space  # noqa: E402
from anomaly_study import l2_knn, whiten  # noqa: E402
from retrieval.anomaly import auroc  # noqa: E402
from simclr.data import load_images  # noqa: E402

GAUSS_SHRINKAGES = (1e-4, 1e-2, 1e-1)


def leave_one_out(gallery: torch.Tensor, k: int = K) -> np.ndarray:
    """Each gallery row's mean distance to its k nearest other rows."""
    d = torch.cdist(gallery, gallery)
    d.fill_diagonal_(float("inf"))
    return d.topk(k, dim=1, largest=False).values.mean(1).numpy()


def standardised(score: np.ndarray, reference: np.ndarray) -> np.ndarray:
    q1, median, q3 = np.percentile(reference, [25, 50, 75])
    return (score - median) / max(q3 - q1, 1e-12)


def score_class(g: torch.Tensor, q: torch.Tensor, pg: torch.Tensor, pq: torch.Tensor, anomalous: np.ndarray) -> dict[str, float]:
    """AUROC (%) of each score; ``g``/``q``: features, ``pg``/``pq``: raw pixels of gallery and queries."""
    gw, qw = whiten(g, g, q, shrinkage=SHRINKAGE)
    d = l2_knn(qw, gw)[K]
    pixels = l2_knn(pq, pg)[K]
    scores = {"d (the index)": d}
    for s in GAUSS_SHRINKAGES:
        qs = qw if s == SHRINKAGE else whiten(g, q, shrinkage=s)[0]
        scores[f"gauss {s:g}"] = qs.norm(dim=1).numpy()
    scores["pixels"] = pixels
    scores["d + pixels"] = standardised(d, leave_one_out(gw)) + standardised(pixels, leave_one_out(pg))
    return {name: 100 * auroc(v, anomalous) for name, v in scores.items()}


def class_features(name: str, labels: np.ndarray, classes: int) -> Iterator[tuple[dict, dict]]:
    """(gallery, query) features of each class in turn, from ``bench/anomaly_layers.py``'s cache:
    one encoder's for every class (a name with a colon), or each class's own encoder's."""
    if ":" not in name:
        for c in range(classes):
            yield tuple(torch.load(f) for f in feature_files(name, c))
        return
    train, test = (torch.load(f) for f in feature_files(name))
    for c in range(classes):
        yield {k: v[labels == c] for k, v in train.items()}, test


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--features", required=True, help="a feature set cached by bench/anomaly_layers.py")
    p.add_argument("--blocks", default="l4", help="comma-separated blocks (l4, l3s, l2q, ...), each scaled, concatenated")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    train, test = load_images("fashion-mnist:train"), load_images("fashion-mnist:test")
    tr_lab, te_lab = train.labels.numpy(), test.labels.numpy()
    px_train, px_test = train.images.flatten(1).float(), test.images.flatten(1).float()
    blocks = args.blocks.split(",")
    per_class: dict[str, dict[str, float]] = {}
    features = class_features(args.features, tr_lab, len(train.classes))
    for c, (name, (gal, qry)) in enumerate(zip(train.classes, features)):
        g, q = space(gal, qry, blocks, flip=False)
        per_class[name] = score_class(g, q, px_train[tr_lab == c], px_test, te_lab != c)
        print(name, {k: round(v, 2) for k, v in per_class[name].items()}, flush=True)
    mean = {k: float(np.mean([r[k] for r in per_class.values()])) for k in next(iter(per_class.values()))}
    print(f"{args.features} {args.blocks} mean:", {k: round(v, 2) for k, v in mean.items()})
    if args.json:
        Path(args.json).write_text(json.dumps({"features": args.features, "blocks": blocks, "mean": mean,
                                               "per_class": per_class}, indent=2))


if __name__ == "__main__":
    main()
