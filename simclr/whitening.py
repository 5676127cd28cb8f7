"""PCA whitening of backbone features, fit on unlabelled images of the training data.

Pooled ResNet features are non-negative (they come after a ReLU) and a few directions carry
most of their variance, so cosine similarities between raw features are dominated by those
directions. Centering the features and scaling each principal direction to unit variance
(with shrinkage, so that directions of near-zero variance are not blown up) is the standard
fix in image retrieval (Jegou and Chum, ECCV 2012); on Fashion-MNIST it raises weighted-kNN
accuracy and anomaly AUROC of every encoder tried (BENCHMARKS.md).
"""

from __future__ import annotations

import math

import torch

from simclr.errors import SimCLRError

DEFAULT_SHRINKAGE = 1e-4  # added to each eigenvalue, as a fraction of the largest
FIT_IMAGES = 10_000  # images sampled from the training data to fit the whitening
# A whitening fit on n images trusts the n / 10 leading directions of their covariance; the
# directions past those, which n images cannot estimate, are scaled like the last trusted one
# rather than blown up as if they were signal. With 10 images a dimension every direction is
# trusted: the plain whitening.
MIN_IMAGES_PER_DIM = 10
# Fewer images than this (and than 10 a dimension): no whitening. On the photo-like set the
# 1,792-d pyramid whitened on a gallery of 500 photos still gains 2.8 points of kNN top-1 over
# its unwhitened features (BENCHMARKS.md, "Small folders").
MIN_WHITEN_IMAGES = 500


def min_images(dim: int, per_dim: float | None = None, at_least: int | None = None) -> int:
    """The fewest images a whitening of ``dim``-d features is fit on (:func:`can_whiten`):
    ``at_least`` (None: :data:`MIN_WHITEN_IMAGES`), or ``per_dim`` a dimension (None:
    :data:`MIN_IMAGES_PER_DIM`) if that is fewer."""
    per = MIN_IMAGES_PER_DIM if per_dim is None else per_dim
    return min(math.ceil(per * dim), MIN_WHITEN_IMAGES if at_least is None else at_least)


def can_whiten(images: int, dim: int, per_dim: float | None = None, at_least: int | None = None) -> bool:
    """Whether ``images`` images are enough to fit a whitening of ``dim``-d features
    (:func:`min_images`: by default 500, or 10 a dimension if that is fewer)."""
    return images >= min_images(dim, per_dim, at_least)


def trusted_directions(images: int, dim: int, per_direction: float) -> int:
    """How many leading directions a whitening fit on ``images`` images whitens
    (:func:`fit_whitening`): one per ``per_direction`` images, all of them with
    ``per_direction`` <= 0."""
    return dim if per_direction <= 0 else max(1, min(dim, int(images / per_direction)))


def fit_sample_size(dim: int) -> int:
    """How many training images to fit a ``dim``-d whitening on: :data:`FIT_IMAGES`, or more
    when the dimension needs more (:func:`can_whiten`)."""
    return max(FIT_IMAGES, MIN_IMAGES_PER_DIM * dim)


def evenly_spaced_positions(n: int, count: int) -> torch.Tensor:
    """Up to ``count`` of the positions 0..n-1, spread evenly over all of them (the same ones every
    time): position ``floor(i n / count)`` for the i-th. (A whole step, ``n // count``, would take
    the first ``count`` alone for n under ``2 count``: one class of a folder read class by class.)"""
    count = max(0, min(n, count))
    return torch.arange(count, dtype=torch.int64) * n // max(count, 1)


def evenly_spaced(rows: torch.Tensor, count: int) -> torch.Tensor:
    """Up to ``count`` rows of ``rows``, spread evenly over them (:func:`evenly_spaced_positions`)."""
    return rows[evenly_spaced_positions(rows.shape[0], count)]


def fit_whitening(features: torch.Tensor, shrinkage: float = DEFAULT_SHRINKAGE,
                  images_per_direction: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and matrix (D, D) such that ``(f - mean) @ matrix`` has covariance
    ``diag(l / (l' + shrinkage * l_max))`` in the principal axes (``l``: the eigenvalues; ``l'``:
    the same, with those past the ``N / images_per_direction`` largest raised to the last of
    those, so that directions too few images estimate are not blown up; ``l' = l`` from
    ``images_per_direction`` images a dimension).

    Args:
        features: raw (not normalised) features (N, D), N >= 2.
        shrinkage: > 0; larger values whiten less (the small-variance directions stay small).
        images_per_direction: the images each whitened direction needs; None:
            :data:`MIN_IMAGES_PER_DIM`; 0: every direction, however few the images (the plain
            whitening).
    """
    if features.dim() != 2 or features.shape[0] < 2:
        raise SimCLRError(f"whitening needs at least 2 feature rows, got shape {tuple(features.shape)}")
    if not shrinkage > 0:
        raise SimCLRError(f"whitening shrinkage must be positive, got {shrinkage}")
    x = features.detach().double().cpu()
    mean = x.mean(0)
    centred = x - mean
    cov = centred.T @ centred / x.shape[0]
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    eigenvalues = eigenvalues.clamp(min=0)  # (ascending)
    floor = shrinkage * float(eigenvalues.max())
    if not floor > 0:
        raise SimCLRError("whitening needs features that vary: every training feature is the same")
    per = MIN_IMAGES_PER_DIM if images_per_direction is None else images_per_direction
    trusted = trusted_directions(x.shape[0], len(eigenvalues), per)
    scaled = eigenvalues.clamp(min=float(eigenvalues[-trusted]))
    matrix = eigenvectors / (scaled + floor).sqrt()
    return mean.float(), matrix.float()


def check_whitening(mean: torch.Tensor, matrix: torch.Tensor, dim: int, where: str) -> None:
    """Refuse a stored whitening whose shapes do not fit features of ``dim`` dimensions."""
    if tuple(mean.shape) != (dim,) or tuple(matrix.shape) != (dim, dim):
        raise SimCLRError(
            f"{where}: whitening of shape {tuple(mean.shape)}, {tuple(matrix.shape)} does not fit {dim}-d features"
        )
    if not (torch.isfinite(mean).all() and torch.isfinite(matrix).all()):
        raise SimCLRError(f"{where}: whitening holds values that are not finite")
