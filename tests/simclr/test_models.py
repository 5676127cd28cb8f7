"""Backbones by name and width, projection heads, and starting from torchvision weights."""

from pathlib import Path

import pytest
import torch
import torchvision

from simclr.errors import SimCLRError
from simclr.models import _scaled_resnet, build_backbone, build_head, load_imagenet_weights
from simclr.pooling import stage_maps


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torchvision ResNet-18 state dict in a local file, as ``--init PATH`` takes it."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def test_a_local_weights_file_loads_into_the_backbone(resnet18_weights: Path) -> None:
    saved = torch.load(resnet18_weights, weights_only=True)
    backbone = build_backbone("resnet18")
    load_imagenet_weights(backbone, "resnet18", str(resnet18_weights))
    own = backbone.state_dict()
    assert set(own) == {k for k in saved if not k.startswith("fc.")}
    for name, tensor in own.items():
        assert torch.equal(tensor, saved[name]), name
    # Grayscale: the first convolution is the RGB average; the small stem's 3x3 one starts at random.
    gray = build_backbone("resnet18", in_channels=1)
    load_imagenet_weights(gray, "resnet18", str(resnet18_weights))
    assert torch.allclose(gray.conv1.weight, saved["conv1.weight"].mean(1, keepdim=True))
    small = build_backbone("resnet18", stem="small")
    random_conv1 = small.conv1.weight.detach().clone()
    load_imagenet_weights(small, "resnet18", str(resnet18_weights))
    assert torch.equal(small.conv1.weight, random_conv1) and torch.equal(small.layer4[1].conv2.weight, saved["layer4.1.conv2.weight"])


def test_weights_for_another_architecture_are_named(resnet18_weights: Path) -> None:
    backbone = build_backbone("resnet34")
    with pytest.raises(SimCLRError) as err:
        load_imagenet_weights(backbone, "resnet34", str(resnet18_weights))
    assert str(err.value) == (
        f"{resnet18_weights}: these are resnet18 weights, not resnet34 "
        "(use --arch resnet18, or give resnet34 weights)"
    )


def test_weights_at_another_width_are_refused(resnet18_weights: Path) -> None:
    with pytest.raises(SimCLRError, match=r"weights do not fit resnet18 at width 16 .*: 99 tensors of another shape") as err:
        load_imagenet_weights(build_backbone("resnet18", width=16), "resnet18", str(resnet18_weights))
    assert "\n" not in str(err.value)


def test_a_weights_file_that_does_not_load_gives_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "w.pth"
    path.write_bytes(b"PK\x03\x04")

    def fail(*args, **kwargs):
        raise RuntimeError()  # an error with an empty message

    monkeypatch.setattr(torch, "load", fail)
    with pytest.raises(SimCLRError) as err:
        load_imagenet_weights(build_backbone("resnet18", width=8), "resnet18", str(path))
    assert str(err.value) == f"{path}: not a torch weights file (RuntimeError)"


@pytest.mark.parametrize(("arch", "expansion"), [("resnet18", 1), ("resnet50", 4)])
def test_width_scales_every_stage(arch: str, expansion: int) -> None:
    width = 16
    backbone = build_backbone(arch, width=width)
    assert backbone.conv1.out_channels == width and backbone.bn1.num_features == width
    for i, stage in enumerate((backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4)):
        assert stage[-1].conv1.in_channels == width * 2**i * expansion, i  # stage i: width * 2^i (x expansion)
    assert backbone.feature_dim == width * 8 * expansion
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, width * 8 * expansion)
    gray = build_backbone(arch, in_channels=1, stem="small", width=width).eval()
    assert gray.conv1.weight.shape == (width, 1, 3, 3)
    assert gray(torch.randn(2, 1, 16, 16)).shape == (2, width * 8 * expansion)


@pytest.mark.parametrize(("stem", "kernel", "last_map"), [("standard", 7, 1), ("small", 3, 4), ("stride2", 3, 2)])
def test_each_stem_keeps_its_resolution(stem: str, kernel: int, last_map: int) -> None:
    # At 32 px: the standard stem divides by 4 before the first stage, stride2 by 2, small by 1;
    # the last stage divides by 8 more.
    backbone = build_backbone("resnet18", in_channels=1, stem=stem, width=8).eval()
    assert backbone.conv1.kernel_size == (kernel, kernel)
    _, _, last = stage_maps(backbone, torch.randn(2, 1, 32, 32))
    assert last.shape == (2, 64, last_map, last_map)


def test_the_scaled_resnet_at_width_64_is_torchvision_s() -> None:
    ours = {k: v.shape for k, v in _scaled_resnet("resnet18", 64).state_dict().items()}
    theirs = {k: v.shape for k, v in torchvision.models.resnet18().state_dict().items()}
    assert ours == theirs


@pytest.mark.parametrize("width", [0, 12])
def test_a_width_that_is_not_a_multiple_of_8_is_refused(width: int) -> None:
    with pytest.raises(SimCLRError, match=f"width must be a positive multiple of 8, got {width}"):
        build_backbone("resnet18", width=width)


def test_heads() -> None:
    x = torch.randn(4, 32)
    mlp = build_head("mlp", 32, hidden_dim=24, out_dim=8, depth=3)
    assert mlp(x).shape == (4, 8) and sum(isinstance(m, torch.nn.Linear) for m in mlp) == 3
    assert build_head("linear", 32, out_dim=8)(x).shape == (4, 8)
    assert torch.equal(build_head("none", 32)(x), x)
    with pytest.raises(SimCLRError, match="known: mlp, linear, none"):
        build_head("deep", 32)
