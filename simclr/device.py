"""Choosing the torch device: the one definition that training, embedding and serving share."""

from __future__ import annotations

import torch

from simclr import dist
from simclr.errors import SimCLRError


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: this process's GPU under torchrun, the first GPU, or the CPU; else ``cpu``,
    ``cuda`` or ``cuda:N``.

    Raises:
        SimCLRError: an unknown device name, or CUDA asked for where there is none.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SimCLRError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SimCLRError("device cuda was asked for, but CUDA is not available here")
        if device.index is None:
            device = torch.device("cuda", dist.local_rank())
    elif device.type != "cpu":
        raise SimCLRError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device
