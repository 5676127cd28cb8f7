"""Weighted kNN (Wu et al. 2018) against a brute-force loop."""

import math

import pytest
import torch

from simclr.knn import knn_evaluate


def test_knn_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(200, 16, generator=g), dim=1)
    labels = torch.randint(0, 4, (200,), generator=g)
    queries = torch.nn.functional.normalize(torch.randn(30, 16, generator=g), dim=1)
    q_labels = torch.randint(0, 4, (30,), generator=g)
    k, t = 7, 0.1
    result = knn_evaluate(queries, q_labels, gallery, labels, 4, k, t)
    correct = 0
    for i in range(30):
        sims = [(float(queries[i] @ gallery[j]), j) for j in range(200)]
        sims.sort(reverse=True)
        votes = [0.0] * 4
        for s, j in sims[:k]:
            votes[int(labels[j])] += math.exp(s / t)
        correct += int(max(range(4), key=lambda c: votes[c]) == int(q_labels[i]))
    assert result.top1 == pytest.approx(correct / 30)
