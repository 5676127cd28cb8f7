"""The encoder file: what indexing and the app load.

A small file holding the backbone's weights and what is needed to use them (architecture,
input size and channels, normalisation, and the whitening fit at the end of training). Its
embedding is the pooled output of the backbone (:mod:`simclr.pooling`), never the projection
head (SimCLR, section 4.2), PCA-whitened when the file holds a whitening (:mod:`simclr.whitening`), then
L2-normalised.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import first_line
from simclr.augment import normalize, resize, to_unit_float
from simclr.checkpoint import atomic_save, file_sha256, safe_load
from simclr.errors import SimCLRError
from simclr.models import build_backbone
from simclr.pooling import check_pooling, pooled_dim, pooled_features
from simclr.whitening import (
    DEFAULT_SHRINKAGE,
    can_whiten,
    check_whitening,
    evenly_spaced,
    fit_sample_size,
    fit_whitening,
    min_images,
)

ENCODER_FILE = "encoder.pt"  # the encoder file's name in a training run and in an index folder
FORMAT = "simclr-encoder"
VERSION = 1


@dataclass
class EncoderSpec:
    """How to build and feed the backbone."""

    arch: str
    stem: str
    width: int
    in_channels: int
    image_size: int
    feature_dim: int
    mean: list[float]
    std: list[float]
    trained_on: str = ""
    train_config: dict[str, Any] = field(default_factory=dict)
    pooling: str = "global"  # simclr.pooling (files written before it existed: global)
    flip_average: bool = False  # features: the mean of the image's and its mirror image's

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> "EncoderSpec":
        try:
            return cls(**d)
        except TypeError as exc:
            raise SimCLRError(f"{where}: encoder description is malformed ({first_line(exc, type(exc).__name__)})") from None


class Encoder(nn.Module):
    """Backbone plus preprocessing: uint8 images (B, C, H, W) -> unit vectors (B, D)."""

    def __init__(self, spec: EncoderSpec, backbone: nn.Module | None = None):
        super().__init__()
        check_pooling(spec.pooling)
        self.spec = spec
        self.backbone = backbone or build_backbone(spec.arch, spec.in_channels, spec.stem, spec.width)
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32), persistent=False)
        self.register_buffer("white_mean", None, persistent=False)
        self.register_buffer("white_matrix", None, persistent=False)
        self.white_count: int | None = None
        self.checksum = ""
        self.path: Path | None = None

    @property
    def whitened(self) -> bool:
        return self.white_matrix is not None

    def set_whitening(self, mean: torch.Tensor | None, matrix: torch.Tensor | None, where: str = "encoder",
                      count: int | None = None) -> None:
        """Use ``(features - mean) @ matrix`` before normalising (``None``: raw features);
        ``count``: the images it was fit on, when known."""
        self.white_count = count if matrix is not None else None
        if matrix is None:
            self.white_mean = self.white_matrix = None
            return
        check_whitening(mean, matrix, self.spec.feature_dim, where)
        self.white_mean, self.white_matrix = mean.float().to(self.device), matrix.float().to(self.device)

    def whitening_fit_count(self) -> int | None:
        """How many images the whitening was fit on: as recorded, or (files written before the
        count was) what the trainer fits one on; ``None`` without a whitening."""
        if self.white_matrix is None:
            return None
        return self.white_count or fit_sample_size(self.dim)

    def set_flip_average(self, on: bool) -> None:
        """Embed each image as the mean of its own and its mirror image's features (or not) from
        now on; the whitening, fit for the old features, is dropped."""
        self.spec.flip_average = bool(on)
        self.set_whitening(None, None)

    def set_pooling(self, pooling: str) -> None:
        """Embed with ``pooling`` (:mod:`simclr.pooling`) from now on; the whitening, fit for the
        old features, is dropped."""
        check_pooling(pooling)
        self.spec.pooling, self.spec.feature_dim = pooling, pooled_dim(self.backbone, pooling)
        self.set_whitening(None, None)

    @torch.no_grad()
    def fit_whitening(self, images: torch.Tensor, max_images: int | None = None, shrinkage: float = DEFAULT_SHRINKAGE,
                      batch_size: int = 1024) -> None:
        """Fit the whitening on up to ``max_images`` of uint8 (N, C, H, W) training images
        (evenly spaced, so the same images every time; default :func:`fit_sample_size`)."""
        sample = evenly_spaced(images, max_images or fit_sample_size(self.dim))
        if not can_whiten(sample.shape[0], self.dim):
            raise SimCLRError(
                f"{sample.shape[0]} images are too few to fit a whitening of {self.dim}-d features "
                f"(at least {min_images(self.dim)})"
            )
        self.set_whitening(*fit_whitening(embed_images(self, sample, batch_size, features=True), shrinkage),
                           count=sample.shape[0])

    def unwhitening(self) -> torch.Tensor | None:
        """The inverse of the whitening matrix (D, D), float64 on the CPU: whitened directions
        back to feature directions; ``None`` without a whitening."""
        return None if self.white_matrix is None else torch.linalg.inv(self.white_matrix.double().cpu())

    @property
    def dim(self) -> int:
        return self.spec.feature_dim

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> normalised float (B, C, S, S) on the encoder's device."""
        if x.dim() != 4 or x.shape[1] != self.spec.in_channels:
            raise SimCLRError(
                f"encoder expects images with {self.spec.in_channels} channel(s), got shape {tuple(x.shape)}"
            )
        x = to_unit_float(x.to(self.device, non_blocking=True))
        return normalize(resize(x, self.spec.image_size), self.mean, self.std)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding (B, D): backbone features, whitened when the encoder has a whitening,
        L2-normalised; float32, on the encoder's device."""
        return self.from_features(self.features(x))

    @torch.no_grad()
    def from_features(self, feats: torch.Tensor) -> torch.Tensor:
        """The embedding (N, D) of backbone features (N, D) from :meth:`features`: whitened when
        the encoder has a whitening, L2-normalised."""
        if self.white_matrix is not None:
            feats = (feats - self.white_mean) @ self.white_matrix
        return F.normalize(feats, dim=1)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features (B, D) of uint8 images (:mod:`simclr.pooling`), float32,
        as they are; with ``flip_average``, the mean of the images' and their mirror images'."""
        was_training = self.backbone.training
        if was_training:  # (switching modes walks every module: only when needed)
            self.backbone.eval()
        x = self.preprocess(x)
        feats = self._pooled(x)
        if self.spec.flip_average:
            # Two passes rather than one of twice the batch: the same work, half the peak memory.
            feats = (feats + self._pooled(x.flip(-1))) / 2
        if was_training:
            self.backbone.train()
        return feats

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            return pooled_features(self.backbone, x, self.spec.pooling).float()

    def save(self, path: str | Path) -> str:
        """Write the encoder file atomically; returns its SHA-256."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.backbone.state_dict().items()}
        obj = {"format": FORMAT, "version": VERSION, "spec": asdict(self.spec), "backbone": state}
        if self.white_matrix is not None:
            obj["whitening"] = {"mean": self.white_mean.cpu().contiguous(), "matrix": self.white_matrix.cpu().contiguous()}
            if self.white_count:
                obj["whitening"]["count"] = int(self.white_count)
        atomic_save(obj, path)
        self.checksum = file_sha256(path)
        self.path = Path(path)
        return self.checksum

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "Encoder":
        """Load an encoder file (tensors and plain data only; pickled code is refused)."""
        obj = safe_load(path, what="encoder file")
        if obj.get("format") != FORMAT:
            hint = " (a training checkpoint? use encoder.pt from the same folder)" if "model" in obj else ""
            raise SimCLRError(f"{path} is not an encoder file{hint}")
        if obj.get("version") != VERSION:
            raise SimCLRError(f"{path}: encoder format version {obj.get('version')} is not supported (expected {VERSION})")
        spec = EncoderSpec.from_dict(obj.get("spec", {}), str(path))
        try:
            enc = cls(spec)
        except SimCLRError as exc:
            raise SimCLRError(f"{path}: {exc}") from None
        try:
            enc.backbone.load_state_dict(obj["backbone"])
        except (RuntimeError, KeyError) as exc:
            raise SimCLRError(f"{path}: weights do not match {spec.arch} ({first_line(exc, type(exc).__name__)})") from None
        dim = pooled_dim(enc.backbone, spec.pooling)
        if dim != spec.feature_dim:
            raise SimCLRError(f"{path}: encoder description says {spec.feature_dim}-d features, but {spec.arch} "
                              f"(width {spec.width}) with {spec.pooling} pooling gives {dim}")
        white = obj.get("whitening")
        if white is not None:
            if not isinstance(white, dict) or not all(isinstance(white.get(k), torch.Tensor) for k in ("mean", "matrix")):
                raise SimCLRError(f"{path}: the whitening entry is malformed")
            count = white.get("count")
            enc.set_whitening(white["mean"], white["matrix"], where=str(path),
                              count=count if isinstance(count, int) and count > 0 else None)
        enc.checksum = file_sha256(path)
        enc.path = Path(path)
        enc.backbone.to(memory_format=torch.channels_last)
        return enc.to(device).eval()


def channel_stats(images: torch.Tensor, max_samples: int = 10000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 (N, C, H, W) images in [0, 1] units (on a sample)."""
    if images.shape[0] > max_samples:
        step = images.shape[0] // max_samples
        images = images[::step][:max_samples]
    x = images.float() / 255
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp(min=1e-3)
    return mean.tolist(), std.tolist()


@torch.no_grad()
def embed_images(encoder: Encoder, images: torch.Tensor, batch_size: int = 1024, features: bool = False) -> torch.Tensor:
    """Embed uint8 (N, C, H, W) images held in memory: (N, D) unit vectors on the encoder's device
    (with ``features``, the backbone's raw features instead: :meth:`Encoder.features`)."""
    fn = encoder.features if features else encoder.embed
    out = [fn(images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out) if out else torch.empty(0, encoder.dim, device=encoder.device)
