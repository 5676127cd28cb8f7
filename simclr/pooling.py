"""How the encoder pools a ResNet's feature maps into its embedding.

- ``global``: the last stage's map averaged over its positions (torchvision's ``avgpool``; what
  the projection head sees in training and SimCLR's evaluation uses).
- ``multiscale``: stages 2 and 3 averaged to a 2 x 2 grid each, beside the last stage averaged
  globally, concatenated. A narrow network at a small image size has a short last-stage vector
  (128-d for width 16) that has pooled away where things are; the earlier stages keep coarse
  layout and finer parts, and the whitening fit on top weighs every direction by its variance.
  On Fashion-MNIST it lifts the whitened kNN of a width-16 small-stem network trained for 10
  CPU minutes from 86.5 to 89.1 (untrained: 82.9 to 85.8), but lowers its one-class anomaly
  AUROC against the default recipe's (BENCHMARKS.md, "Multi-scale pooling"): an option, not
  the default.
- ``pyramid``: the same with stage 2 on a 4 x 4 grid (a spatial pyramid over the stages: 4 x 4,
  2 x 2, 1 x 1). For photos of objects at any place and scale, at the CPU photo profile's 64 px,
  the finer layout of stage 2 is what whitened raw pixels use; it lifts a width-32 network
  trained for 10 CPU minutes from 24.2 to 27.7 (BENCHMARKS.md, "Photo collections").

Training is unchanged: the projection head always sees the global pooling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from simclr.errors import SimCLRError

# The grid side each of stages 2 and 3 is averaged over (cells overlap where a side does not
# divide: adaptive average pooling); stage 4 is always averaged globally.
GRIDS: dict[str, tuple[int, int]] = {"multiscale": (2, 2), "pyramid": (4, 2)}
POOLINGS = ("global", *GRIDS)


def check_pooling(pooling: str) -> None:
    if pooling not in POOLINGS:
        raise SimCLRError(f"unknown pooling {pooling!r}; known: {', '.join(POOLINGS)}")


def stage_channels(backbone: nn.Module) -> list[int]:
    """Output channels of each of a torchvision ResNet's four stages."""
    out = []
    for i in range(1, 5):
        norms = [m for m in getattr(backbone, f"layer{i}")[-1].modules() if isinstance(m, nn.BatchNorm2d)]
        out.append(norms[-1].num_features)
    return out


def pooled_dim(backbone: nn.Module, pooling: str) -> int:
    """Length of the pooled feature vector of ``backbone`` under ``pooling``."""
    check_pooling(pooling)
    c = stage_channels(backbone)
    if pooling == "global":
        return c[3]
    g2, g3 = GRIDS[pooling]
    return g2 * g2 * c[1] + g3 * g3 * c[2] + c[3]


def stage_maps(backbone: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The feature maps of a torchvision ResNet's stages 2, 3 and 4 for normalised images ``x``."""
    b = backbone
    x2 = b.layer2(b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x))))))
    x3 = b.layer3(x2)
    return x2, x3, b.layer4(x3)


def pooled_features(backbone: nn.Module, x: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, D) features of normalised images ``x`` (B, C, H, W) under ``pooling``."""
    if pooling == "global":
        return backbone(x)
    check_pooling(pooling)
    x2, x3, x4 = stage_maps(backbone, x)
    g2, g3 = GRIDS[pooling]
    return torch.cat(
        [F.adaptive_avg_pool2d(x2, g2).flatten(1), F.adaptive_avg_pool2d(x3, g3).flatten(1), x4.mean((2, 3))], 1
    )
