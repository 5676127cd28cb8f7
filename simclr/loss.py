"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (arXiv 2002.05709, eq. 1)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from simclr import dist
from simclr.errors import SimCLRError

# A loss within this share of chance level counts as at chance (a run that learns is 3-5% under
# it by step 40-60: BENCHMARKS.md, "One kind of thing held steady").
AT_CHANCE_SHARE = 0.99


def chance_loss(images: int, views: int = 2) -> float:
    """NT-Xent when every view is as similar to every other as to its positives: ``views *
    images`` views in the loss (all processes), each anchor's positives one or more among its
    ``views * images - 1`` candidates, so the loss is ``ln(views * images - 1)``. A run whose loss
    stays there has found nothing that tells its images apart under the augmentations (the
    projections have collapsed)."""
    if images < 2 or views < 2:
        raise SimCLRError(f"chance level needs at least 2 images and 2 views, got {images} and {views}")
    return math.log(views * images - 1)


class NTXentLoss(nn.Module):
    """NT-Xent over the two views of a batch, with negatives from every process.

    For 2N views, each view's positive is the other view of its image and its negatives are
    the 2N - 2 other views; with several processes, the views of all processes (global
    negatives). Gradients flow through the gather (:class:`simclr.dist.GatherLayer`); the
    loss is the mean over this process's 2N views, so that DDP's gradient averaging gives
    the gradient of the mean over the global batch.

    With more than two views of each image (multi-crop: two full views and several small
    crops, as in SwAV, arXiv 2006.09882), every view is an anchor, its positives are the other
    views of its image and its negatives the views of other images; its term is the mean over
    its positives of -log(softmax over everything but itself), which for two views is NT-Xent.

    Args:
        temperature: tau > 0.
    """

    def __init__(self, temperature: float = 0.5):
        super().__init__()
        if not temperature > 0:
            raise SimCLRError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, *more: torch.Tensor) -> torch.Tensor:
        """Loss of projections ``z1``, ``z2`` (and any ``more``) of shape (N, D): view 1,
        view 2, ... of N images."""
        views = (z1, z2, *more)
        if any(z.shape != z1.shape for z in views) or z1.dim() != 2:
            shapes = " and ".join(str(tuple(z.shape)) for z in views)
            raise SimCLRError(f"expected (N, D) views of one shape, got {shapes}")
        if more:
            return self._multi_view(views)
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

    def _multi_view(self, views: tuple[torch.Tensor, ...]) -> torch.Tensor:
        n, v = views[0].shape[0], len(views)
        local = [F.normalize(z.float(), dim=1) for z in views]
        gathered = [dist.gather(z) for z in local]
        total = gathered[0].shape[0]
        keys = torch.cat(gathered, 0)  # view-major: column j is view j // total of image j % total
        queries = torch.cat(local, 0)  # view-major: row r is view r // n of image offset + r % n
        logits = queries @ keys.T / self.temperature
        device = queries.device
        image = (torch.arange(n, device=device) + dist.rank() * n).repeat(v)
        view = torch.arange(v, device=device).repeat_interleave(n)
        self_cols = view * total + image
        rows = torch.arange(v * n, device=device)
        logits[rows, self_cols] = float("-inf")
        log_prob = logits.log_softmax(dim=1)
        # The other v - 1 views of each row's image.
        pos_cols = image[:, None] + total * torch.arange(v, device=device)[None, :]  # (v n, v)
        pos = log_prob.gather(1, pos_cols)
        pos = pos.masked_fill(pos_cols == self_cols[:, None], 0.0)
        return -(pos.sum(1) / (v - 1)).mean()

