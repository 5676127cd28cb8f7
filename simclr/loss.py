"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (arXiv 2002.05709, eq. 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from simclr import dist
from simclr.errors import SimCLRError


class NTXentLoss(nn.Module):
    """NT-Xent over the two views of a batch, with negatives from every process.

    For 2N views, each view's positive is the other view of its image and its negatives are
    the 2N - 2 other views; with several processes, the views of all processes (global
    negatives). Gradients flow through the gather (:class:`simclr.dist.GatherLayer`); the
    loss is the mean over this process's 2N views, so that DDP's gradient averaging gives
    the gradient of the mean over the global batch.

    Args:
        temperature: tau > 0.
    """

    def __init__(self, temperature: float = 0.5):
        super().__init__()
        if not temperature > 0:
            raise SimCLRError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """Loss of projections ``z1``, ``z2`` of shape (N, D): view 1 and view 2 of N images."""
        if z1.shape != z2.shape or z1.dim() != 2:
            raise SimCLRError(f"expected two (N, D) views of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
        n = z1.shape[0]
        z1 = F.normalize(z1.float(), dim=1)
        z2 = F.normalize(z2.float(), dim=1)
        all1, all2 = dist.gather(z1), dist.gather(z2)
        offset = dist.rank() * n
        # Rows: this rank's 2N views; columns: all 2 * world * N views.
        keys = torch.cat([all1, all2], 0)
        queries = torch.cat([z1, z2], 0)
        logits = queries @ keys.T / self.temperature
        total = all1.shape[0]
        idx = torch.arange(n, device=z1.device) + offset
        self_cols = torch.cat([idx, idx + total])
        pos_cols = torch.cat([idx + total, idx])
        rows = torch.arange(2 * n, device=z1.device)
        logits[rows, self_cols] = float("-inf")
        return F.cross_entropy(logits, pos_cols)
