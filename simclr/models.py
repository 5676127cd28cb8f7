"""Backbones by name, projection heads, and the SimCLR model that joins them."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

from common.errors import first_line
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
STEMS = ("standard", "small", "stride2")
# The stems without max-pool: one 3x3 convolution of this stride.
CONV_STEM_STRIDES = {"small": 1, "stride2": 2}
HEADS = ("mlp", "linear", "none")


def build_backbone(arch: str, in_channels: int = 3, stem: str = "standard", width: int = 64) -> nn.Module:
    """A torchvision ResNet without its classifier: (B, C, H, W) -> pooled features (B, D).

    Args:
        arch: a name in :data:`BACKBONES`.
        in_channels: channels of the input images (1 for grayscale).
        stem: ``"standard"`` (7x7 stride-2 conv and max-pool), ``"small"`` (3x3 stride-1 conv,
            no max-pool; the SimCLR paper's choice for 32 px CIFAR images) or ``"stride2"`` (3x3
            stride-2 conv, no max-pool: at one width, half the maps' side of ``small`` for a
            quarter of its cost, twice that of ``standard`` for four times its cost).
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
    if stem in CONV_STEM_STRIDES:
        model.conv1 = nn.Conv2d(in_channels, model.conv1.out_channels, 3, CONV_STEM_STRIDES[stem], 1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, model.conv1.out_channels, 7, 2, 3, bias=False)
    model.feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    return model


def _scaled_resnet(arch: str, width: int) -> torchvision.models.ResNet:
    """A ResNet whose four stages have ``width * (1, 2, 4, 8)`` channels (torchvision: 64 * ...)."""
    # torchvision builds width 64 only: build that without memory, then replace every module
    # that holds weights.
    with torch.device("meta"):
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
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    return model


def load_imagenet_weights(backbone: nn.Module, arch: str, init: str) -> None:
    """Start ``backbone`` from ImageNet weights: torchvision's download, or a local file.

    ``init`` is ``"imagenet"`` (download when online) or a path to a state dict saved from
    torchvision's model (as downloaded into ``~/.cache/torch/hub/checkpoints``). The first
    convolution is averaged over RGB for grayscale input and dropped when its shape differs
    (small stem); the classifier is dropped.

    Raises:
        SimCLRError: no such file, not a state dict, weights of another architecture (both
            named), or tensors that do not fit ``backbone`` (of another shape, unknown, or
            missing, which would stay random).
    """
    if init == "imagenet":
        where = f"ImageNet weights for {arch}"
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
        where = str(path)
        if not path.is_file():
            raise SimCLRError(f"--init {init!r}: neither 'imagenet' nor a weights file")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise SimCLRError(f"{path}: not a torch weights file ({first_line(exc, type(exc).__name__)})") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            hint = " (an encoder file of this tool? retrieval train --init takes one)" if isinstance(state, dict) and "backbone" in state else ""
            raise SimCLRError(f"{path}: expected a state dict of {arch} weights{hint}")
    fit_weights(backbone, arch, state, where)


def fit_weights(backbone: nn.Module, arch: str, state: dict[str, torch.Tensor], where: str) -> None:
    """Load the ResNet state dict ``state`` (read from ``where``) into ``backbone``.

    The first convolution is averaged over its input channels when ``backbone`` has other
    channels, and dropped (left at random) when its kernel differs (another stem); the
    classifier is dropped.

    Raises:
        SimCLRError: weights of another architecture (both named), or tensors that do not fit
            ``backbone`` (of another shape, unknown, or missing, which would stay random).
    """
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    found = _arch_of(state)
    if found is not None and found != arch:
        raise SimCLRError(f"{where}: these are {found} weights, not {arch} (use --arch {found}, or give {arch} weights)")
    conv = backbone.conv1.weight
    if "conv1.weight" in state:
        w = state["conv1.weight"]
        if w.shape[1] != conv.shape[1] and w.shape[2:] == conv.shape[2:]:
            w = w.mean(1, keepdim=True).repeat(1, conv.shape[1], 1, 1)
        if w.shape == conv.shape:
            state["conv1.weight"] = w
        else:
            del state["conv1.weight"]
            log.info("%s: conv1 is %s here (another stem), so it starts at random", where, tuple(conv.shape))
    own = backbone.state_dict()
    bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    unknown = [k for k in state if k not in own]
    # Tensors the file lacks would silently stay random; only conv1 (dropped above) and the
    # batch-norm step counters, which old torchvision files leave out, may be missing.
    missing = [k for k in own if k not in state and k != "conv1.weight" and not k.endswith("num_batches_tracked")]
    if bad or unknown or missing or not state:
        width = backbone.bn1.num_features
        at = f" at width {width} (ImageNet weights have width 64)" if width != 64 else ""
        raise SimCLRError(
            f"{where}: weights do not fit {arch}{at}: {len(bad)} tensors of another shape, {len(unknown)} unknown, "
            f"{len(missing)} missing (e.g. {', '.join((bad + unknown + missing)[:3]) or 'no tensors at all'})"
        )
    backbone.load_state_dict(state, strict=False)
    log.info("loaded %s into the %s backbone", where, arch)


@functools.cache
def _arch_keys(arch: str) -> frozenset[str]:
    with torch.device("meta"):  # the names only: no memory, no initialisation
        keys = BACKBONES[arch]().state_dict().keys()
    return frozenset(k for k in keys if not k.startswith("fc.") and not k.endswith("num_batches_tracked"))


def _arch_of(state: dict[str, torch.Tensor]) -> str | None:
    """The architecture in :data:`BACKBONES` whose tensor names ``state`` has, if any."""
    names = {k for k in state if not k.endswith("num_batches_tracked")}
    return next((a for a in BACKBONES if _arch_keys(a) == names), None)


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
    """Backbone f(.) and projection head g(.): images (B, C, H, W) -> projections (B, out_dim).

    Batches of other sizes (multi-crop's small crops) may follow the first: each goes through
    the backbone on its own (one call per resolution, as DINO's multi-crop wrapper), and the
    head projects them all at once, in order. One forward call keeps DDP to one pass a step.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor, *more: torch.Tensor) -> torch.Tensor:
        if not more:
            return self.head(self.backbone(x))
        return self.head(torch.cat([self.backbone(t) for t in (x, *more)]))
