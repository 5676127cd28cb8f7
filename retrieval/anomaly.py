"""kNN-distance anomaly scoring (as in Bergman et al. 2020, "Deep nearest neighbor anomaly
detection"): an item is as unusual as it is far from its k nearest normal items.

The score is the mean cosine distance (1 - cosine similarity) to the k nearest gallery
items. A calibration, the leave-one-out scores of gallery items, turns a score into a
percentile among normal items and a verdict at a threshold percentile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retrieval.errors import RetrievalError

DEFAULT_K = 5
DEFAULT_PERCENTILE = 99.0
CALIBRATION_SAMPLE = 10_000


def knn_distance(sims: np.ndarray, k: int) -> np.ndarray:
    """Scores (q,) from similarities (q, >=k) sorted in decreasing order (unfilled slots -inf)."""
    top = sims[:, :k].astype(np.float64)
    valid = np.isfinite(top)
    dist = np.where(valid, 1.0 - top, 0.0).sum(1) / np.maximum(valid.sum(1), 1)
    return dist.astype(np.float32)


def leave_one_out(sims: np.ndarray, ids: np.ndarray, own_ids: np.ndarray, k: int) -> np.ndarray:
    """Scores of gallery items against the rest of the gallery.

    ``sims``/``ids`` (n, k + 1) are the neighbours of the items ``own_ids`` (n,); each item's
    own entry is dropped (or the last neighbour, if the index did not return it).
    """
    is_self = ids == own_ids[:, None]
    drop = np.where(is_self.any(1), is_self.argmax(1), sims.shape[1] - 1)
    keep = np.ones_like(is_self)
    keep[np.arange(len(drop)), drop] = False
    rest = sims[keep].reshape(sims.shape[0], sims.shape[1] - 1)
    return knn_distance(rest, k)


@dataclass
class Calibration:
    """Sorted leave-one-out scores of normal items, for percentiles and the threshold."""

    k: int
    scores: np.ndarray  # (m,) sorted ascending
    percentile: float = DEFAULT_PERCENTILE

    def __post_init__(self) -> None:
        if not 0 < self.percentile < 100:
            raise RetrievalError(f"threshold percentile must lie in (0, 100), got {self.percentile}")
        self.scores = np.sort(np.asarray(self.scores, dtype=np.float32))

    @property
    def threshold(self) -> float:
        if self.scores.size == 0:
            return float("inf")
        return float(np.percentile(self.scores, self.percentile))

    def percentile_of(self, scores: np.ndarray) -> np.ndarray:
        """Percent of normal items scoring at most each score (0..100)."""
        if self.scores.size == 0:
            return np.full(len(scores), np.nan)
        return 100.0 * np.searchsorted(self.scores, scores, side="right") / self.scores.size


def auroc(scores: np.ndarray, is_anomaly: np.ndarray) -> float:
    """Area under the ROC curve: the probability that an anomaly outscores a normal item
    (ties count half), computed from ranks (Mann-Whitney U)."""
    scores = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(is_anomaly, dtype=bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise RetrievalError("AUROC needs both normal and anomalous items")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # Average ranks over ties.
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))
