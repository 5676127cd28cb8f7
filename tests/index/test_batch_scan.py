"""One-pass batch scans give the exact index's answers, and say when they cannot prove them."""

from __future__ import annotations

import numpy as np
import pytest

from index.batch_scan import BatchScan
from tests.helpers import clustered


def _brute(stored: np.ndarray, queries: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    x = stored.astype(np.float64)
    q = queries.astype(np.float64)
    if metric == "ip":
        s = q @ x.T
        ids = np.argsort(-s, axis=1, kind="stable")[:, :k]
    else:
        s = np.sqrt(np.maximum(((q[:, None, :] - x[None]) ** 2).sum(-1), 0))
        ids = np.argsort(s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, ids, 1), ids


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_batch_scan_equals_brute_force(metric: str) -> None:
    base, queries = clustered(6000, 32, 0, queries=24)
    stored = (base * (1 if metric == "ip" else 7)).astype(np.float16)  # as an index folder keeps them
    q = queries if metric == "ip" else queries * 7
    scan = BatchScan(stored, metric)
    for k in (1, 10, 120):
        scores, ids, redo = scan.search(q, k)
        ref_scores, ref_ids = _brute(stored.astype(np.float32), q, k, metric)
        assert not redo.any()
        np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
        assert (ids == ref_ids).mean() > 0.999  # ties aside


def test_a_crowd_at_the_kth_place_is_sent_back() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:4].copy()
    # 500 items whose similarity to query 0 differs by less than bfloat16 can tell apart
    other = rng.normal(size=16)
    other -= (other @ q[0]) * q[0]
    crowd = 0.9 * q[0] + 0.436 * other / np.linalg.norm(other)
    x[100:600] = crowd + rng.normal(size=(500, 16)) * 1e-4
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    stored = x.astype(np.float16)
    scores, ids, redo = BatchScan(stored, "ip").search(q, 50)
    assert redo[0]  # cannot prove which 50 of the crowd are nearest: the exact index must answer
    ref_scores, ref_ids = _brute(stored.astype(np.float32), q, 50, "ip")
    np.testing.assert_allclose(scores[~redo], ref_scores[~redo], atol=1e-5)


def test_k_beyond_the_collection_and_empty_batches() -> None:
    stored = np.eye(5, 8, dtype=np.float16)
    scores, ids, redo = BatchScan(stored).search(np.eye(3, 8, dtype=np.float32), 9)
    assert ids.shape == (3, 5) and not redo.any() and ids[:, 0].tolist() == [0, 1, 2]
    scores, ids, redo = BatchScan(stored).search(np.zeros((0, 8), np.float32), 3)
    assert ids.shape == (0, 0)
