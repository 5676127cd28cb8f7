import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import adjust_hue, rotate

from simclr.augment import (
    AugmentConfig,
    BatchAugment,
    crop_grid,
    crop_params,
    rotated,
    shift_hue,
)
from simclr.errors import SimCLRError


def _images(n: int = 8, c: int = 3, size: int = 28) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def _augment(cfg: AugmentConfig, c: int = 3) -> BatchAugment:
    # mean 0, std 1: the output is the augmented image in [0, 1].
    return BatchAugment(cfg, torch.zeros(c), torch.ones(c))


@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_and_range(channels: int) -> None:
    cfg = AugmentConfig(size=32, blur_p=0.5)
    out = _augment(cfg, channels)(_images(c=channels), torch.Generator().manual_seed(0))
    assert out.shape == (8, channels, 32, 32)
    assert out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1


def test_reproducible_under_a_seed() -> None:
    aug = _augment(AugmentConfig(size=24, blur_p=0.5))
    x = _images()
    a = aug(x, torch.Generator().manual_seed(7))
    b = aug(x, torch.Generator().manual_seed(7))
    c = aug(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_samples_get_independent_parameters() -> None:
    aug = _augment(AugmentConfig(size=24))
    same = _images(1).expand(16, -1, -1, -1)
    out = aug(same, torch.Generator().manual_seed(0))
    flat = out.flatten(1)
    distinct = {tuple(row.tolist()) for row in flat}
    assert len(distinct) == 16
    # Crops differ in scale: per-sample brightness/contrast/grayscale give different statistics.
    assert out.mean(dim=(1, 2, 3)).std() > 1e-3


def test_crop_matrices_stay_inside_the_image() -> None:
    cfg = AugmentConfig(crop_scale=(0.08, 1.0))
    theta = crop_params(4096, 28, 28, cfg, torch.Generator().manual_seed(0), torch.device("cpu"))
    w, h = theta[:, 0, 0].abs(), theta[:, 1, 1]
    cx, cy = theta[:, 0, 2], theta[:, 1, 2]
    assert (cx.abs() + w <= 1 + 1e-6).all() and (cy.abs() + h <= 1 + 1e-6).all()
    area = w * h
    assert area.min() >= 0.08 - 1e-4 and area.max() <= 1 + 1e-6
    assert 0.4 < (theta[:, 0, 0] < 0).float().mean() < 0.6  # flips


def test_no_op_config_only_resizes() -> None:
    cfg = AugmentConfig(size=28, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0, jitter_p=0, grayscale_p=0)
    x = _images()
    out = _augment(cfg)(x, torch.Generator().manual_seed(0))
    assert torch.allclose(out, x.float() / 255, atol=1e-5)


@pytest.mark.parametrize("shift", [-0.5, -0.2, 0.0, 0.1, 0.45])
def test_hue_shift_matches_torchvision(shift: float) -> None:
    # Shifts past either end of the circle included: the hue must wrap, as adjust_hue's does.
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    x[0, :, 0, 0] = 0.5  # a grey pixel: no hue, unchanged
    x[0, :, 0, 1] = torch.tensor([0.9, 0.2, 0.9])  # two channels tied for the maximum
    ours = shift_hue(x, torch.full((2,), shift))
    assert torch.allclose(ours, adjust_hue(x, shift), atol=1e-5)
    assert torch.allclose(ours[0, :, 0, 0], torch.full((3,), 0.5))


def test_hue_shift_is_drawn_per_sample() -> None:
    x = torch.rand(3, 3, 5, 5, generator=torch.Generator().manual_seed(2))
    shifts = torch.tensor([0.3, -0.1, 0.0])
    ours = shift_hue(x, shifts)
    for i, shift in enumerate(shifts.tolist()):
        assert torch.allclose(ours[i], adjust_hue(x[i], shift), atol=1e-5)


def test_crop_grid_matches_affine_grid() -> None:
    g = torch.Generator().manual_seed(3)
    theta = crop_params(6, 40, 30, AugmentConfig(size=16, rotation=30.0), g, torch.device("cpu"))
    assert theta[:, 0, 1].abs().max() > 0  # rotated crops: the off-diagonal terms count too
    assert torch.allclose(crop_grid(theta, 16), F.affine_grid(theta, [6, 3, 16, 16], align_corners=False), atol=1e-6)


def test_grayscale_probability_one_gives_equal_channels() -> None:
    cfg = AugmentConfig(size=16, grayscale_p=1.0, jitter_p=0)
    out = _augment(cfg)(_images(), torch.Generator().manual_seed(0))
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])


@pytest.mark.parametrize("height, width", [(32, 32), (24, 40)])
@pytest.mark.parametrize("degrees", [30.0, -75.0, 180.0])
def test_rotation_matches_torchvision(height: int, width: int, degrees: float) -> None:
    # The whole image turned about its centre, against torchvision's rotate of the same
    # image; compared inside the largest centred disc, where neither reads beyond the edge.
    x = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)  # smooth: interpolation matters less
    theta = rotated(torch.eye(2, 3)[None], torch.tensor([degrees]), height, width)
    ours = F.grid_sample(x, F.affine_grid(theta, [1, 3, height, width], align_corners=False),
                         mode="bilinear", padding_mode="border", align_corners=False)
    ref = rotate(x, degrees, interpolation=InterpolationMode.BILINEAR)
    yy, xx = torch.meshgrid(torch.arange(height) - (height - 1) / 2, torch.arange(width) - (width - 1) / 2, indexing="ij")
    inside = (yy**2 + xx**2).sqrt() < min(height, width) / 2 - 2
    assert (ours - ref)[..., inside].abs().max() < 1e-4
    assert (ours - x)[..., inside].abs().mean() > 0.02  # it did turn


def test_rotation_is_off_by_default_and_drawn_per_sample() -> None:
    x = _images(16)
    plain = AugmentConfig(size=24)
    assert torch.equal(_augment(plain)(x, torch.Generator().manual_seed(3)),
                       _augment(AugmentConfig(size=24, rotation=0.0))(x, torch.Generator().manual_seed(3)))
    theta = crop_params(4096, 28, 28, AugmentConfig(rotation=90.0), torch.Generator().manual_seed(0), torch.device("cpu"))
    angle = torch.rad2deg(torch.atan2(-theta[:, 0, 1], theta[:, 1, 1]))  # column 1 is h * (-sin, cos)
    assert angle.min() > -90.5 and angle.max() < 90.5 and angle.std() > 45  # uniform on [-90, 90]: std 52
    # The same crops as without rotation (its angles are drawn last), each turned: same area, same centre.
    plain = crop_params(4096, 28, 28, AugmentConfig(), torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.allclose(torch.linalg.det(theta[:, :, :2]), torch.linalg.det(plain[:, :, :2]), atol=1e-6)
    assert torch.equal(theta[:, :, 2], plain[:, :, 2])


@pytest.mark.parametrize("bad", [dict(crop_scale=(0.5, 0.2)), dict(jitter_p=1.5), dict(size=4), dict(jitter_strength=-1),
                                 dict(rotation=200), dict(rotation=-1)])
def test_bad_config_is_refused(bad: dict) -> None:
    with pytest.raises(SimCLRError):
        AugmentConfig(**bad)
