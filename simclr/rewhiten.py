"""Giving an existing encoder file a whitening (or taking it away): ``retrieval whiten``.

For encoders trained with ``--no-whiten`` or before whitening existed; training fits one by
default (:mod:`simclr.whitening`). The result is a new file: the old one, and indexes built
with it, stay as they are.
"""

from __future__ import annotations

from pathlib import Path

from simclr.data import load_images
from simclr.device import pick_device
from simclr.encoder import Encoder
from simclr.errors import SimCLRError
from simclr.images import match_channels
from simclr.whitening import DEFAULT_SHRINKAGE


def rewhiten(encoder: str | Path, data: str = "fashion-mnist:train", out: str | Path | None = None,
             shrinkage: float | None = None, max_images: int | None = None, remove: bool = False,
             device: str = "auto") -> Path:
    """Write a copy of ``encoder`` whitened on images of ``data`` (or, with ``remove``, without any
    whitening); returns the new file (default: ``NAME-whitened.pt`` / ``NAME-plain.pt`` beside it).

    Raises:
        SimCLRError: the target exists (nothing is written), ``max_images`` < 1, or too few images.
    """
    encoder = Path(encoder)
    enc = Encoder.load(encoder, pick_device(device))
    target = Path(out) if out is not None else encoder.with_name(f"{encoder.stem}-{'plain' if remove else 'whitened'}.pt")
    if target.exists():
        raise SimCLRError(f"{target} exists; choose another --out (nothing was written)")
    if max_images is not None and max_images < 1:
        raise SimCLRError(f"--max-images must be >= 1, got {max_images}")
    if remove:
        enc.set_whitening(None, None)
    else:
        images = load_images(data, size=enc.spec.image_size, channels=enc.spec.in_channels)
        enc.fit_whitening(match_channels(images.images, enc.spec.in_channels), max_images=max_images,
                          shrinkage=DEFAULT_SHRINKAGE if shrinkage is None else shrinkage)
    enc.save(target)
    return target
