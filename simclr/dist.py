"""Distributed helpers that are safe to call without a process group.

Under ``torchrun`` the environment names the rank and world size; everywhere else every
helper answers as the single process of a world of one.
"""

from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    """Only the main process prints, logs and saves (torchrun's RANK decides once the group is gone)."""
    return rank() == 0 if is_dist() else int(os.environ.get("RANK", "0")) == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: torch.device) -> None:
    """Join the process group torchrun describes: NCCL on CUDA, gloo on the CPU."""
    if is_dist() or not launched_by_torchrun():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    if is_dist():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group. DDP wrappers that are no longer referenced are collected
    first: one still alive when the group is gone can abort the process at exit
    ("terminate called without an active exception")."""
    if is_dist():
        gc.collect()
        dist.destroy_process_group()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        t = t.clone()
        dist.all_reduce(t)
        t /= world_size()
    return t


def broadcast_int(value: int, device: torch.device) -> int:
    """Rank 0's ``value`` on every rank (``value`` itself without a group)."""
    if not is_dist():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return int(t.item())


class GatherLayer(torch.autograd.Function):
    """All-gather that keeps gradients: forward concatenates every rank's tensor; backward
    sums the gradients from all ranks and returns each rank the slice of its own input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
        out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        all_grads = torch.stack(grads)
        dist.all_reduce(all_grads)
        return all_grads[dist.get_rank()]


def gather(x: torch.Tensor) -> torch.Tensor:
    """(B, D) on each rank -> (world * B, D), differentiable; the identity without a group."""
    if not is_dist() or world_size() == 1:
        return x
    return torch.cat(GatherLayer.apply(x), 0)
