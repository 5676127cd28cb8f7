"""Weighted k-nearest-neighbour classification (Wu et al. 2018, "Unsupervised feature
learning via non-parametric instance discrimination"), in torch alone.

Each of the k nearest gallery items votes for its label with weight exp(s / T), where s is
its cosine similarity to the query. Used by the trainer's kNN monitor and by ``knn-eval``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from simclr.errors import SimCLRError
from simclr.knn_defaults import KNN_K, KNN_TEMPERATURE


def weighted_vote(sims: torch.Tensor, labels: torch.Tensor, num_classes: int, temperature: float) -> torch.Tensor:
    """Class probabilities (Q, num_classes) from neighbour similarities and labels (Q, k).

    Neighbours with a negative label (unknown) do not vote.
    """
    if temperature <= 0:
        raise SimCLRError(f"kNN temperature must be positive, got {temperature}")
    weights = ((sims.float() - sims.float().amax(1, keepdim=True)) / temperature).exp()
    weights = weights * (labels >= 0)
    scores = torch.zeros(sims.shape[0], num_classes, device=sims.device)
    scores.scatter_add_(1, labels.clamp(min=0).long(), weights)
    total = scores.sum(1, keepdim=True)
    return torch.where(total > 0, scores / total.clamp(min=1e-30), torch.full_like(scores, 1.0 / num_classes))


def topk_neighbours(queries: torch.Tensor, gallery: torch.Tensor, k: int, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact cosine top-k of unit vectors: (Q, D) x (N, D) -> similarities, indices (Q, k)."""
    k = min(k, gallery.shape[0])
    sims, idx = [], []
    for start in range(0, queries.shape[0], chunk):
        s = queries[start : start + chunk] @ gallery.T
        top = s.topk(k, dim=1)
        sims.append(top.values)
        idx.append(top.indices)
    return torch.cat(sims), torch.cat(idx)


TIE_MARGIN = 8  # extra candidates re-ranked, so that near-ties at the k-th place are decided exactly


def canonical_topk(queries: torch.Tensor, gallery: torch.Tensor, candidates: torch.Tensor, k: int,
                   chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-rank candidate neighbours (Q, m) in float64, ties to the lower index; keep k.

    Float32 matrix products order near-equal similarities differently from one library (or
    one batch shape) to the next; re-ranking a few more candidates than needed in float64 makes
    the torch path and the FAISS path pick the same k neighbours. Missing candidates are -1.
    """
    k = min(k, candidates.shape[1])
    sims_out, idx_out = [], []
    for start in range(0, queries.shape[0], chunk):
        cand = candidates[start : start + chunk]
        q = queries[start : start + chunk].to(torch.float64)
        g = gallery[cand.clamp(min=0)].to(torch.float64)
        sims = torch.einsum("qd,qmd->qm", q, g)
        sims = torch.where(cand >= 0, sims, torch.full_like(sims, -torch.inf))
        # Sort by index, then stably by similarity: equal similarities keep the lower index first.
        by_index = cand.where(cand >= 0, torch.full_like(cand, torch.iinfo(cand.dtype).max)).argsort(dim=1)
        sims, cand = sims.gather(1, by_index), cand.gather(1, by_index)
        order = sims.argsort(dim=1, descending=True, stable=True)[:, :k]
        sims_out.append(sims.gather(1, order).to(torch.float32))
        idx_out.append(cand.gather(1, order))
    return torch.cat(sims_out), torch.cat(idx_out)


@dataclass
class KNNResult:
    top1: float
    top5: float
    per_class: list[float]
    confusion: torch.Tensor  # (C, C) counts, rows = true label
    predictions: torch.Tensor  # (Q,)


def knn_classify(
    query_feats: torch.Tensor,
    gallery_feats: torch.Tensor,
    gallery_labels: torch.Tensor,
    num_classes: int,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
) -> torch.Tensor:
    """Class probabilities (Q, C) of each query under weighted kNN against the gallery."""
    if gallery_feats.shape[0] == 0:
        raise SimCLRError("the kNN gallery is empty")
    candidates = topk_neighbours(query_feats, gallery_feats, k + TIE_MARGIN)[1]
    sims, idx = canonical_topk(query_feats, gallery_feats, candidates, k)
    return weighted_vote(sims, gallery_labels.to(idx.device)[idx], num_classes, temperature)


def knn_evaluate(
    query_feats: torch.Tensor,
    query_labels: torch.Tensor,
    gallery_feats: torch.Tensor,
    gallery_labels: torch.Tensor,
    num_classes: int,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
) -> KNNResult:
    """Top-1/top-5 accuracy, per-class accuracy and confusion of weighted kNN."""
    probs = knn_classify(query_feats, gallery_feats, gallery_labels, num_classes, k, temperature)
    return score_predictions(probs, query_labels.to(probs.device), num_classes)


def score_predictions(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> KNNResult:
    ranked = probs.argsort(1, descending=True)
    pred = ranked[:, 0]
    top1 = (pred == labels).float().mean().item()
    top5 = (ranked[:, : min(5, num_classes)] == labels[:, None]).any(1).float().mean().item()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((labels.cpu(), pred.cpu()), torch.ones_like(pred.cpu()), accumulate=True)
    support = confusion.sum(1).clamp(min=1)
    per_class = (confusion.diag().float() / support).tolist()
    return KNNResult(top1=top1, top5=top5, per_class=per_class, confusion=confusion, predictions=pred.cpu())
