"""Backbones by name, projection heads, and the SimCLR model that joins them."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

from simclr.errors import SimCLRError

log = logging.getLogger(__name__)

BACKBONES: dict[str, Callable[..., torchvision.models.ResNet]] = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
}
IMAGENET_WEIGHTS = {
    "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
    "resnet34": "ResNet34_Weights.IMAGENET1K_V1",
    "resnet50": "ResNet50_Weights.IMAGENET1K_V2",
}
STEMS = ("standard", "small")
HEADS = ("mlp", "linear", "none")


def build_backbone(arch: str, in_channels: int = 3, stem: str = "standard", width: int = 64) -> nn.Module:
    """A torchvision ResNet without its classifier: (B, C, H, W) -> pooled features (B, D).

    Args:
        arch: a name in :data:`BACKBONES`.
        in_channels: channels of the input images (1 for grayscale).
        stem: ``"standard"`` (7x7 stride-2 conv and max-pool) or ``"small"`` (3x3 stride-1 conv,
            no max-pool; the SimCLR paper's choice for 32 px CIFAR images).
        width: channels of the first stage (64 in torchvision); other stages scale with it.
    """
    if arch not in BACKBONES:
        raise SimCLRError(f"unknown architecture {arch!r}; known: {', '.join(BACKBONES)}")
    if stem not in STEMS:
        raise SimCLRError(f"unknown stem {stem!r}; known: {', '.join(STEMS)}")
    if in_channels < 1:
        raise SimCLRError(f"in_channels must be positive, got {in_channels}")
    if width < 8 or width % 8:
        raise SimCLRError(f"width must be a positive multiple of 8, got {width}")
    model = BACKBONES[arch]() if width == 64 else _scaled_resnet(arch, width)
    if stem == "small":
        model.conv1 = nn.Conv2d(in_channels, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, model.conv1.out_channels, 7, 2, 3, bias=False)
    model.feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    return model


def _scaled_resnet(arch: str, width: int) -> torchvision.models.ResNet:
    """A ResNet whose four stages have ``width * (1, 2, 4, 8)`` channels (torchvision: 64 * ...)."""
    model = BACKBONES[arch]()
    block = type(model.layer1[0])
    depths = [len(model.layer1), len(model.layer2), len(model.layer3), len(model.layer4)]
    model.inplanes = width
    model.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    for i, (depth, stride) in enumerate(zip(depths, (1, 2, 2, 2))):
        setattr(model, f"layer{i + 1}", model._make_layer(block, width * 2**i, depth, stride=stride))
    model.fc = nn.Linear(width * 8 * block.expansion, 1000)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def load_imagenet_weights(backbone: nn.Module, arch: str, init: str) -> None:
    """Start ``backbone`` from ImageNet weights: torchvision's download, or a local file.

    ``init`` is ``"imagenet"`` (download when online) or a path to a state dict saved from
    torchvision's model (as downloaded into ``~/.cache/torch/hub/checkpoints``). The first
    convolution is averaged over RGB for grayscale input and dropped when its shape differs
    (small stem); the classifier is dropped.
    """
    if init == "imagenet":
        try:
            weights = torchvision.models.get_weight(IMAGENET_WEIGHTS[arch])
            state = weights.get_state_dict(progress=False)
        except Exception as exc:  # noqa: BLE001 - offline, blocked, or a corrupt cache
            raise SimCLRError(
                f"cannot download ImageNet weights for {arch} ({type(exc).__name__}); "
                "pass --init PATH with a local torchvision weights file"
            ) from None
    else:
        path = Path(init).expanduser()
        if not path.is_file():
            raise SimCLRError(f"--init {init!r}: neither 'imagenet' nor a weights file")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise SimCLRError(f"{path}: not a torch weights file ({str(exc).splitlines()[0]})") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise SimCLRError(f"{path}: expected a state dict of {arch} weights")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    conv = backbone.conv1.weight
    if "conv1.weight" in state:
        w = state["conv1.weight"]
        if w.shape[1] != conv.shape[1] and w.shape[2:] == conv.shape[2:]:
            w = w.mean(1, keepdim=True).repeat(1, conv.shape[1], 1, 1)
        if w.shape == conv.shape:
            state["conv1.weight"] = w
        else:
            del state["conv1.weight"]
    own = backbone.state_dict()
    bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    unknown = [k for k in state if k not in own]
    if bad or unknown or not state:
        raise SimCLRError(
            f"ImageNet weights do not fit {arch}: "
            f"{len(bad)} tensors of another shape, {len(unknown)} unknown (e.g. {(bad + unknown)[:3]})"
        )
    missing = backbone.load_state_dict(state, strict=False).missing_keys
    log.info("loaded ImageNet weights into %s (%d tensors left at random: %s)", arch, len(missing), missing[:4])


def build_head(kind: str, in_dim: int, hidden_dim: int = 512, out_dim: int = 128, depth: int = 2) -> nn.Module:
    """The projection head g(.) of SimCLR.

    ``"mlp"``: ``depth`` linear layers, with BatchNorm and ReLU between them (the paper's
    nonlinear head, depth 2); ``"linear"``: one linear layer; ``"none"``: the identity.
    """
    if kind == "none":
        return nn.Identity()
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind != "mlp":
        raise SimCLRError(f"unknown projection head {kind!r}; known: {', '.join(HEADS)}")
    if depth < 2:
        raise SimCLRError(f"an MLP head needs depth >= 2, got {depth}")
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(depth - 1):
        layers += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*layers)


class SimCLRModel(nn.Module):
    """Backbone f(.) and projection head g(.): images (B, C, H, W) -> projections (B, out_dim)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
