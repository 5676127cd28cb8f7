"""SimCLR's augmentations (arXiv 2002.05709, appendix A), run on whole batches on the device.

Each sample gets its own random crop, flip, colour-jitter factors, grayscale and blur
decisions, drawn from one ``torch.Generator`` so that a seed reproduces a batch exactly.
Working on the batch tensor avoids the per-image Python and PIL work of a DataLoader
pipeline, which on a small CPU costs more than the model itself.

The four colour-jitter operations run in a random order drawn once per batch (torchvision
draws it per image); their strengths are drawn per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from simclr.errors import SimCLRError

_GRAY = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class AugmentConfig:
    """Parameters of the SimCLR augmentation pipeline.

    Attributes:
        size: output side in pixels.
        crop_scale: range of the crop's area as a fraction of the image (SimCLR: (0.08, 1)).
        crop_ratio: range of the crop's aspect ratio.
        flip_p: probability of a horizontal flip.
        jitter_p: probability of colour jitter (SimCLR: 0.8).
        jitter_strength: s; brightness, contrast and saturation factors lie in
            [1 - 0.8 s, 1 + 0.8 s] and the hue shift in [-0.2 s, 0.2 s].
        grayscale_p: probability of converting to grayscale (SimCLR: 0.2).
        blur_p: probability of a Gaussian blur (SimCLR on ImageNet: 0.5; 0 disables it).
        blur_sigma: range of the blur's standard deviation, in pixels at 224 px,
            scaled to ``size``.
        rotation: the crop turns by an angle drawn uniformly from [-rotation, rotation]
            degrees about its centre (0: never; 180: any angle), for collections whose
            subjects have no upright (parts on a belt, cells, aerial views). What the turned
            crop takes from beyond the image's edge repeats the edge.
    """

    size: int = 32
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    jitter_strength: float = 0.5
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    rotation: float = 0.0

    def __post_init__(self) -> None:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise SimCLRError(f"crop scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise SimCLRError(f"crop ratio must satisfy 0 < min <= max, got {self.crop_ratio}")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p"):
            p = getattr(self, name)
            if not 0 <= p <= 1:
                raise SimCLRError(f"{name} must lie in [0, 1], got {p}")
        if self.jitter_strength < 0:
            raise SimCLRError(f"jitter strength must be >= 0, got {self.jitter_strength}")
        if not 0 <= self.rotation <= 180:
            raise SimCLRError(f"rotation must lie in [0, 180] degrees, got {self.rotation}")
        if self.size < 8:
            raise SimCLRError(f"image size must be at least 8 pixels, got {self.size}")


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def _bernoulli(n: int, p: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device) < p


def gray(x: torch.Tensor) -> torch.Tensor:
    """Luma of (B, C, H, W) images as (B, 1, H, W); a 1-channel image is its own luma."""
    if x.shape[1] == 1:
        return x
    r, gr, b = x.unbind(1)
    return (_GRAY[0] * r + _GRAY[1] * gr + _GRAY[2] * b).unsqueeze(1)


def crop_params(
    n: int, height: int, width: int, cfg: AugmentConfig, g: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Affine matrices (n, 2, 3) for random resized crops with random horizontal flips
    (and random rotations when ``cfg.rotation`` is set), in ``affine_grid``'s coordinates.

    As torchvision's ``RandomResizedCrop``: up to 10 tries of (area, log-ratio) per sample,
    the first that fits wins, and a centre crop of the clamped ratio otherwise.
    """
    tries = 10
    area = _uniform(n * tries, *cfg.crop_scale, g, device).view(n, tries)
    log_r = _uniform(n * tries, math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), g, device)
    ratio = log_r.exp().view(n, tries)
    # Crop sides as fractions of the image sides.
    w = torch.sqrt(area * ratio * height / width)
    h = torch.sqrt(area / ratio * width / height)
    fits = (w <= 1) & (h <= 1)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.zeros_like(fits[:, 0], dtype=torch.long))
    w = w.gather(1, first[:, None]).squeeze(1)
    h = h.gather(1, first[:, None]).squeeze(1)
    # Fallback: the whole image at the nearest allowed aspect ratio.
    none_fit = ~fits.any(1)
    if none_fit.any():
        aspect = width / height
        r = min(max(aspect, cfg.crop_ratio[0]), cfg.crop_ratio[1])
        fw, fh = (1.0, aspect / r) if aspect >= r else (r / aspect, 1.0)
        w = torch.where(none_fit, torch.full_like(w, fw), w)
        h = torch.where(none_fit, torch.full_like(h, fh), h)
    cx = (torch.rand(n, generator=g, device=device) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=g, device=device) * 2 - 1) * (1 - h)
    flip = torch.where(_bernoulli(n, cfg.flip_p, g, device), -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    if cfg.rotation > 0:
        theta = rotated(theta, _uniform(n, -cfg.rotation, cfg.rotation, g, device), height, width)
    return theta


def rotated(theta: torch.Tensor, degrees: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The crops of ``theta`` (n, 2, 3) turned by ``degrees`` (n,) about their centres.

    ``affine_grid`` measures x in half-widths and y in half-heights; the rotation is made in
    pixels (scale to pixels, rotate, scale back) so that a turned crop of a non-square image
    keeps its shape. Positive angles turn the content counter-clockwise, as torchvision's
    ``rotate``.
    """
    a = torch.deg2rad(degrees)
    cos, sin = a.cos(), a.sin()
    # Sampling positions turn by -angle so that the picture turns by +angle (y points down).
    rot = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)  # (n, 2, 2)
    to_px = torch.tensor([width / 2, height / 2], device=theta.device)
    linear = (rot * to_px[None, None, :] / to_px[None, :, None]) @ theta[:, :, :2]
    return torch.cat([linear, theta[:, :, 2:]], 2)


def shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Turn the hue of (B, 3, H, W) RGB images in [0, 1] by ``shift`` (B,) turns, keeping their
    HSV saturation and value (torchvision's ``adjust_hue``).

    Done in one pass rather than through an HSV image and back: an RGB pixel with maximum M and
    minimum m has the hexagonal hue h (in sixths of a turn), and the pixel of hue h' is
    M - (M - m) * clamp(min(k, 4 - k), 0, 1) in each channel, with k = (n + h') mod 6 and n = 5, 3, 1
    for red, green and blue.
    """
    r, g, b = x.unbind(1)
    # Elementwise over the three planes: a reduction over dim 1 is several times slower on a CPU.
    maxc = torch.maximum(torch.maximum(r, g), b)
    delta = maxc - torch.minimum(torch.minimum(r, g), b)
    safe = delta.clamp(min=1e-8)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    sixths = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    sixths = sixths + 6.0 * shift.view(-1, 1, 1)
    k = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1) + sixths.unsqueeze(1)
    k = k - 6.0 * torch.floor(k / 6.0)  # k mod 6, without the slow remainder kernel
    return maxc.unsqueeze(1) - delta.unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp(0, 1)


def crop_grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    """``F.affine_grid(theta, [n, c, size, size], align_corners=False)``, built by broadcasting:
    the same sampling positions (n, size, size, 2), several times faster on a CPU than the
    batched matrix product ``affine_grid`` runs."""
    base = (torch.arange(size, device=theta.device, dtype=theta.dtype) * 2 + 1) / size - 1  # pixel centres
    xs, ys = base.view(1, 1, size), base.view(1, size, 1)
    t = theta.reshape(-1, 6, 1, 1)
    gx = t[:, 0] * xs + t[:, 1] * ys + t[:, 2]
    gy = t[:, 3] * xs + t[:, 4] * ys + t[:, 5]
    return torch.stack((gx, gy), -1)


def _view(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1, 1, 1, 1)


def color_jitter(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation and hue jitter with per-sample factors (B, C, H, W)."""
    n, c = x.shape[:2]
    device = x.device
    s = cfg.jitter_strength
    apply = _bernoulli(n, cfg.jitter_p, g, device)
    one = torch.ones(n, device=device)

    def factor(lo: float, hi: float, neutral: torch.Tensor) -> torch.Tensor:
        return torch.where(apply, _uniform(n, lo, hi, g, device), neutral)

    bright = factor(max(0.0, 1 - 0.8 * s), 1 + 0.8 * s, one)
    contrast = factor(max(0.0, 1 - 0.8 * s), 1 + 0.8 * s, one)
    satur = factor(max(0.0, 1 - 0.8 * s), 1 + 0.8 * s, one)
    hue = factor(-min(0.5, 0.2 * s), min(0.5, 0.2 * s), torch.zeros(n, device=device))
    # Saturation and hue do not exist for one channel.
    ops = [0, 1] if c == 1 else [0, 1, 2, 3]
    order = torch.randperm(len(ops), generator=g, device=device).tolist()
    for i in order:
        op = ops[i]
        if op == 0:
            x = (x * _view(bright)).clamp_(0, 1)
        elif op == 1:
            mean = gray(x).mean(dim=(1, 2, 3), keepdim=True)
            x = (x * _view(contrast) + mean * (1 - _view(contrast))).clamp_(0, 1)
        elif op == 2:
            lum = gray(x)
            x = (x * _view(satur) + lum * (1 - _view(satur))).clamp_(0, 1)
        else:
            x = shift_hue(x, hue).clamp_(0, 1)
    return x


def random_grayscale(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    if x.shape[1] == 1 or p == 0:
        return x
    mask = _view(_bernoulli(x.shape[0], p, g, x.device))
    return torch.where(mask, gray(x).expand_as(x), x)


def gaussian_blur(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Per-sample Gaussian blur, kernel about 10% of the side (SimCLR), sigma scaled from 224 px."""
    n, c, height, width = x.shape
    device = x.device
    scale = height / 224
    sigma = _uniform(n, cfg.blur_sigma[0] * scale, cfg.blur_sigma[1] * scale, g, device).clamp(min=1e-3)
    apply = _bernoulli(n, cfg.blur_p, g, device)
    radius = max(1, int(0.05 * height))
    taps = torch.arange(-radius, radius + 1, device=device, dtype=x.dtype)
    kernel = torch.exp(-(taps[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)
    identity = (taps == 0).to(x.dtype).expand_as(kernel)
    kernel = torch.where(apply[:, None], kernel, identity).repeat_interleave(c, 0)  # (n*c, k)
    y = x.reshape(1, n * c, height, width)
    y = F.pad(y, (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, 1, -1), groups=n * c)
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, height, width)


def to_unit_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images to float32 in [0, 1]; float input is taken as already scaled."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize float (B, C, H, W) to (B, C, size, size), antialiased when shrinking."""
    if x.shape[-2:] == (size, size):
        return x
    shrink = x.shape[-1] > size or x.shape[-2] > size
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


class BatchAugment:
    """Two-view SimCLR augmentation of uint8 batches on any device.

    Args:
        cfg: augmentation parameters.
        mean, std: per-channel statistics (C,) used to normalise the output.
    """

    def __init__(self, cfg: AugmentConfig, mean: torch.Tensor, std: torch.Tensor):
        self.cfg = cfg
        self.mean = mean.float()
        self.std = std.float()

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Augment (B, C, H, W) images (uint8 or float in [0, 1]) into (B, C, size, size) floats."""
        cfg = self.cfg
        x = to_unit_float(x)
        n, c, height, width = x.shape
        theta = crop_params(n, height, width, cfg, g, x.device)
        grid = crop_grid(theta, cfg.size)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if cfg.jitter_p > 0 and cfg.jitter_strength > 0:
            x = color_jitter(x, cfg, g)
        x = random_grayscale(x, cfg.grayscale_p, g)
        if cfg.blur_p > 0:
            x = gaussian_blur(x, cfg, g)
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return normalize(x, mean, std)
