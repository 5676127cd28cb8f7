"""Pretrained weights: an encoder from torchvision's, and the weights a training run starts from.

ImageNet-trained ResNets give useful features for photos without any training on them; this
wraps such weights in an :class:`~simclr.encoder.Encoder` fed the way they were trained (the
standard 7x7/2 stem with max-pool, width 64, ImageNet's normalisation). Its whitening, which
needs images of the collection, is fit by :func:`retrieval.pretrained.encoder_from_weights`
(streaming files needs :mod:`retrieval.embed`, which this package must not import).
:func:`load_initial_weights` starts a training run (``retrieval train --init``) from such weights
or from an encoder file of this tool, trained earlier on a broader collection.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from simclr.encoder import FORMAT, Encoder, EncoderSpec
from simclr.errors import SimCLRError
from simclr.models import build_backbone, fit_weights, load_imagenet_weights

# The normalisation torchvision's ImageNet weights were trained with (RGB, [0, 1] units).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STEM = "standard"  # 7x7 stride-2 conv and max-pool: what ImageNet weights were trained with
WIDTH = 64  # torchvision's width; ImageNet weights exist at this width only


def imagenet_stats(in_channels: int) -> tuple[list[float], list[float]]:
    """ImageNet's per-channel mean and std for ``in_channels`` channels: as they are for 3, their
    average repeated otherwise (as :func:`~simclr.models.load_imagenet_weights` averages conv1)."""
    return _per_channel(IMAGENET_MEAN, in_channels), _per_channel(IMAGENET_STD, in_channels)


def _per_channel(values: Sequence[float], in_channels: int) -> list[float]:
    """``values`` as they are for as many channels, their average repeated otherwise."""
    return list(values) if len(values) == in_channels else [sum(values) / len(values)] * in_channels


def is_encoder_file(path: Path) -> bool:
    """Whether ``path`` is an encoder file of this tool (not a torchvision state dict). The
    file is memory-mapped: its tensors are not read."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not a zip-format torch file: whoever loads it says why
        return False
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def load_initial_weights(backbone: nn.Module, arch: str, stem: str, width: int, init: str) -> tuple[list[float], list[float]]:
    """Start ``backbone`` (of ``arch``, ``stem`` and ``width``) from the weights ``init`` names.

    ``init`` is ``"imagenet"`` or a torchvision state-dict file (see
    :func:`~simclr.models.load_imagenet_weights`), or an encoder file of this tool: its backbone,
    which must be of the same architecture, stem and width (its first convolution is averaged
    over channels for other input channels; its whitening is not used).

    Returns:
        The per-channel mean and std the weights expect their input normalised with, for the
        backbone's input channels: ImageNet's, or those the encoder file was trained with.

    Raises:
        SimCLRError: weights that cannot be had or do not fit; an encoder file of another
            network (both named, with the options that would build its network).
    """
    channels = backbone.conv1.in_channels
    path = Path(init).expanduser()
    if init != "imagenet" and path.is_file() and is_encoder_file(path):
        encoder = Encoder.load(path)
        spec = encoder.spec
        if (spec.arch, spec.stem, spec.width) != (arch, stem, width):
            raise SimCLRError(
                f"--init {path}: an encoder of {spec.arch}, stem {spec.stem}, width {spec.width}, but this run builds "
                f"{arch}, stem {stem}, width {width} (pass --arch {spec.arch} --stem {spec.stem} --width {spec.width})"
            )
        fit_weights(backbone, arch, dict(encoder.backbone.state_dict()), str(path))
        return _per_channel(spec.mean, channels), _per_channel(spec.std, channels)
    load_imagenet_weights(backbone, arch, init)
    return imagenet_stats(channels)


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
