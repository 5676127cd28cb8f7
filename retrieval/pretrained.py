"""``retrieval encoder``: an encoder file from pretrained weights, to index a collection at once.

The weights come from :func:`simclr.pretrained.pretrained_encoder` (ImageNet, downloaded or
a local torchvision file); the whitening is fit here, on the raw features of a sample of the
user's own images, streamed through :func:`retrieval.embed.embed_collection` (files are read
by DataLoader workers, never all held in memory). ``retrieval train --init`` starts from the
same weights and adapts them to the collection with SimCLR. ``retrieval whiten``
(:func:`rewhiten`) fits a whitening the same way for an encoder file that has none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from retrieval.embed import Collection, embed_collection, open_collection
from retrieval.errors import RetrievalError
from simclr.config import photo_image_size
from simclr.device import pick_device
from simclr.encoder import Encoder
from simclr.errors import SimCLRError
from simclr.pretrained import pretrained_encoder
from simclr.whitening import DEFAULT_SHRINKAGE, can_whiten, evenly_spaced, fit_sample_size, fit_whitening, min_images

DEFAULT_OUT = "encoder-{arch}-imagenet.pt"  # in the current folder when --out is left out


@dataclass
class WhiteningFit:
    """How fitting a whitening on a collection went."""

    images: int  # images whose features the whitening was fit on; 0: no whitening was fit
    failures: list[tuple[str, str]] = field(default_factory=list)  # (ref, reason) of unreadable files
    note: str = ""  # why there is no whitening


def whiten_on(encoder: Encoder, coll: Collection, max_images: int | None = None,
              shrinkage: float = DEFAULT_SHRINKAGE, workers: int | None = None, progress: bool = False) -> WhiteningFit:
    """Fit ``encoder``'s whitening on the raw features of up to ``max_images`` evenly spaced items
    of ``coll`` (default :func:`~simclr.whitening.fit_sample_size`: the same images every time).

    Too few images (:func:`~simclr.whitening.can_whiten`), before or after unreadable files are
    skipped, leave the encoder unwhitened and say so in the note: an index can still be built.
    """
    dim = encoder.dim
    positions = evenly_spaced(torch.arange(len(coll)), max_images or fit_sample_size(dim)).tolist()
    need = min_images(dim)
    limited = f" (--max-images {max_images} of {len(coll)})" if len(positions) < len(coll) else ""
    if not can_whiten(len(positions), dim):
        return WhiteningFit(0, note=f"{len(positions)} images{limited} are too few to fit a whitening of {dim}-d "
                                    f"features (at least {need})")
    embedded = embed_collection(encoder, coll.select(positions), workers=workers, progress=progress)
    count = embedded.features.shape[0]
    if not can_whiten(count, dim):
        return WhiteningFit(0, embedded.failures, f"{count} readable images ({len(embedded.failures)} unreadable) are too "
                                                  f"few to fit a whitening of {dim}-d features (at least {need})")
    encoder.set_whitening(*fit_whitening(torch.from_numpy(embedded.features), shrinkage),
                          count=len(embedded.features))
    return WhiteningFit(count, embedded.failures)


def rewhiten(encoder: str | Path, data: str = "fashion-mnist:train", out: str | Path | None = None,
             shrinkage: float | None = None, max_images: int | None = None, remove: bool = False,
             device: str = "auto", workers: int | None = None, pooling: str | None = None,
             flip_average: bool | None = None) -> tuple[Path, WhiteningFit | None]:
    """Write a copy of ``encoder`` whitened on a sample of ``data`` (streamed: a folder larger than
    memory is fine), or, with ``remove``, without any whitening; returns the new file (default:
    ``NAME-whitened.pt`` / ``NAME-plain.pt`` beside it) and how the fit went. For encoders trained with
    ``--no-whiten`` or before whitening existed; the old file, and indexes built with it, stay.
    ``pooling`` also switches how the copy pools its features (:mod:`simclr.pooling`): the same
    weights, another embedding, whitened for it; ``flip_average`` likewise switches the averaging of
    each image's features with its mirror image's.

    Raises:
        RetrievalError: the target exists (nothing is written), ``max_images`` < 1, or too few
            readable images.
    """
    encoder = Path(encoder)
    enc = Encoder.load(encoder, pick_device(device))
    target = Path(out) if out is not None else encoder.with_name(f"{encoder.stem}-{'plain' if remove else 'whitened'}.pt")
    if target.exists():
        raise RetrievalError(f"{target} exists; choose another --out (nothing was written)")
    if max_images is not None and max_images < 1:
        raise RetrievalError(f"--max-images must be >= 1, got {max_images}")
    fit = None
    if pooling is not None:
        try:
            enc.set_pooling(pooling)
        except SimCLRError as exc:
            raise RetrievalError(f"--pooling: {exc}") from None
    if flip_average is not None:
        enc.set_flip_average(flip_average)
    if remove:
        enc.set_whitening(None, None)
    else:
        fit = whiten_on(enc, open_collection(data), max_images, DEFAULT_SHRINKAGE if shrinkage is None else shrinkage,
                        workers)
        if not fit.images:
            raise RetrievalError(f"{data}: {fit.note} (nothing was written)")
    enc.save(target)
    return target, fit


@dataclass
class PretrainedResult:
    """What ``retrieval encoder`` wrote."""

    path: Path
    arch: str
    trained_on: str
    feature_dim: int
    image_size: int
    whitening: WhiteningFit

    def lines(self) -> list[str]:
        white = self.whitening
        return [
            f"encoder: {self.path}",
            f"{self.arch} with weights from {self.trained_on}: {self.feature_dim}-d embeddings of "
            f"{self.image_size} px images",
            f"whitened on {white.images} images" if white.images else f"unwhitened: {white.note}",
        ]


def encoder_from_weights(
    init: str,
    arch: str = "resnet50",
    data: str | None = None,
    image_size: int | None = None,
    out: str | Path | None = None,
    device: str = "auto",
    whiten: bool = True,
    max_images: int | None = None,
    shrinkage: float = DEFAULT_SHRINKAGE,
    in_channels: int = 3,
    workers: int | None = None,
    progress: bool = False,
) -> PretrainedResult:
    """Write an encoder file holding pretrained weights, whitened on images of ``data`` when given.

    Args:
        init: ``"imagenet"`` (download, or torchvision's cache) or a local torchvision weights file.
        arch: the ResNet the weights are of.
        data: a source (folder of images, ``fashion-mnist:train`` ...) to fit the whitening on;
            ``None``: no whitening.
        image_size: input resolution (default: :func:`simclr.config.photo_image_size` of the device).
        out: the encoder file to write, which must not exist (default :data:`DEFAULT_OUT` in the
            current folder).
        whiten: ``False``: no whitening even with ``data``.
        max_images: images of ``data`` to fit the whitening on (default: 10 per feature
            dimension, at least 10,000), evenly spaced.
        shrinkage: the whitening's shrinkage (:func:`simclr.whitening.fit_whitening`).
        workers: image-decoding processes (default: one per core, up to 8).

    Raises:
        UserError: the target exists (nothing is written), a bad option, a source that is not
            there or holds no images, or weights that cannot be had or do not fit ``arch``.
    """
    target = Path(out) if out is not None else Path(DEFAULT_OUT.format(arch=arch))
    if target.exists():
        raise RetrievalError(f"{target} exists; choose another --out (nothing was written)")
    if max_images is not None and max_images < 1:
        raise RetrievalError(f"--max-images must be >= 1, got {max_images}")
    if not shrinkage > 0:
        raise RetrievalError(f"whitening shrinkage must be positive, got {shrinkage}")
    dev = pick_device(device)
    coll = open_collection(data) if data is not None and whiten else None  # a bad source fails before the weights
    encoder = pretrained_encoder(init, arch, image_size or photo_image_size(dev), in_channels).to(dev)
    if coll is not None:
        fit = whiten_on(encoder, coll, max_images, shrinkage, workers, progress)
        if fit.images:
            encoder.spec.train_config["whitening"] = {"data": coll.source, "images": fit.images, "shrinkage": shrinkage}
    else:
        fit = WhiteningFit(0, note="--no-whiten" if not whiten else "give --data (your images) to whiten it")
    encoder.save(target)
    spec = encoder.spec
    return PretrainedResult(target, spec.arch, spec.trained_on, spec.feature_dim, spec.image_size, fit)
