"""An encoder from pretrained torchvision weights, untrained here: to index a collection at once.

ImageNet-trained ResNets give useful features for photos without any training on them; this
wraps such weights in an :class:`~simclr.encoder.Encoder` fed the way they were trained (the
standard 7x7/2 stem with max-pool, width 64, ImageNet's normalisation). Its whitening, which
needs images of the collection, is fit by :func:`retrieval.pretrained.encoder_from_weights`
(streaming files needs :mod:`retrieval.embed`, which this package must not import).
"""

from __future__ import annotations

from pathlib import Path

import torch

from simclr.encoder import Encoder, EncoderSpec
from simclr.errors import SimCLRError
from simclr.models import build_backbone, load_imagenet_weights

# The normalisation torchvision's ImageNet weights were trained with (RGB, [0, 1] units).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STEM = "standard"  # 7x7 stride-2 conv and max-pool: what ImageNet weights were trained with
WIDTH = 64  # torchvision's width; ImageNet weights exist at this width only


def imagenet_stats(in_channels: int) -> tuple[list[float], list[float]]:
    """ImageNet's per-channel mean and std for ``in_channels`` channels: as they are for 3, their
    average repeated otherwise (as :func:`~simclr.models.load_imagenet_weights` averages conv1)."""
    if in_channels == 3:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return [sum(IMAGENET_MEAN) / 3] * in_channels, [sum(IMAGENET_STD) / 3] * in_channels


def weights_name(init: str) -> str:
    """What an encoder records as trained on: ``"imagenet"`` or the weights file's absolute path."""
    return init if init == "imagenet" else str(Path(init).expanduser().resolve())


def pretrained_encoder(init: str, arch: str = "resnet50", image_size: int = 224, in_channels: int = 3) -> Encoder:
    """An unwhitened encoder (on the CPU) holding the ImageNet weights ``init`` names.

    Args:
        init: ``"imagenet"`` (torchvision's download, or its cache) or a local torchvision
            state-dict file (see :func:`~simclr.models.load_imagenet_weights`).
        arch: a ResNet name in :data:`~simclr.models.BACKBONES`; the weights must be of it.
        image_size: the input resolution the encoder resizes images to.
        in_channels: 3, or 1 for grayscale (the first convolution is the RGB average).

    Raises:
        SimCLRError: an unknown architecture, a bad size, or weights that cannot be had or do
            not fit (one line, naming both architectures when the weights are of another).
    """
    if image_size < 1:
        raise SimCLRError(f"image size must be >= 1 pixel, got {image_size}")
    backbone = build_backbone(arch, in_channels, STEM, WIDTH)  # checks the name before any download
    load_imagenet_weights(backbone, arch, init)
    mean, std = imagenet_stats(in_channels)
    trained_on = weights_name(init)
    spec = EncoderSpec(
        arch=arch, stem=STEM, width=WIDTH, in_channels=in_channels, image_size=image_size,
        feature_dim=backbone.feature_dim, mean=mean, std=std, trained_on=trained_on,
        train_config={"init": trained_on, "arch": arch},
    )
    backbone.to(memory_format=torch.channels_last)  # as Encoder.load gives it: faster on a GPU
    return Encoder(spec, backbone).eval()
