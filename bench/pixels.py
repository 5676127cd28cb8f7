"""The raw-pixel references on Fashion-MNIST: kNN on the 784 pixel values, plain and whitened.

    python bench/pixels.py --json bench/out/pixels.json

An encoder is worth indexing only if its embeddings beat the pixels they come from, under the
same treatment: L2 kNN (k = 5, majority vote), weighted cosine kNN (k = 200 and 20, T = 0.07,
as ``retrieval knn-eval``), and the same after the PCA whitening that encoders get
(:func:`simclr.whitening.fit_whitening` on 10,000 evenly spaced training images, shrinkage 1e-4).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from harness import write_report

from simclr.data import load_images
from simclr.knn import knn_evaluate
from simclr.whitening import DEFAULT_SHRINKAGE, evenly_spaced, fit_sample_size, fit_whitening


def l2_majority_top1(q: torch.Tensor, q_labels: torch.Tensor, g: torch.Tensor, g_labels: torch.Tensor, k: int) -> float:
    correct = 0
    g_sq = (g * g).sum(1)
    for i in range(0, len(q), 500):
        d = g_sq[None, :] - 2 * q[i : i + 500] @ g.T  # + |q|^2, the same for every gallery item
        idx = d.topk(k, dim=1, largest=False).indices
        votes = F.one_hot(g_labels[idx], int(g_labels.max()) + 1).sum(1)
        correct += int((votes.argmax(1) == q_labels[i : i + 500]).sum())
    return correct / len(q)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shrinkage", type=float, default=DEFAULT_SHRINKAGE)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    train, test = load_images("fashion-mnist:train"), load_images("fashion-mnist:test")
    g, q = train.images.flatten(1).float() / 255, test.images.flatten(1).float() / 255
    classes = len(train.classes)

    def weighted(gf: torch.Tensor, qf: torch.Tensor) -> dict[str, float]:
        gf, qf = F.normalize(gf, dim=1), F.normalize(qf, dim=1)
        return {f"knn{k}_top1": round(100 * knn_evaluate(qf, test.labels, gf, train.labels, classes, k, 0.07).top1, 2)
                for k in (200, 20)}

    mean, matrix = fit_whitening(evenly_spaced(g, fit_sample_size(g.shape[1])), args.shrinkage)
    gw, qw = (g - mean) @ matrix, (q - mean) @ matrix
    report = {
        "date": time.strftime("%Y-%m-%d"), "data": "fashion-mnist, 60k train gallery, 10k test queries",
        "l2_k5_majority_top1": round(100 * l2_majority_top1(q, test.labels, g, train.labels, 5), 2),
        "plain": weighted(g, q),
        "whitened": {"shrinkage": args.shrinkage, **weighted(gw, qw)},
    }
    write_report(report, args.json)


if __name__ == "__main__":
    main()
