"""Optimisers and the learning-rate schedule of SimCLR.

LARS (You et al. 2017, as used by SimCLR) adapts each layer's step to the ratio of its weight
and gradient norms; biases and normalisation parameters are excluded from that adaptation
and from weight decay, as in the paper.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from simclr.errors import SimCLRError

OPTIMIZERS = ("lars", "sgd", "adamw")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios.

    Each tensor's decayed gradient ``d = g + weight_decay * w`` is scaled by the trust ratio
    ``eta * |w| / |d|`` (1 where either norm is 0), as SimCLR's ``lars_optimizer.py`` does (the
    LARS paper divides by ``|g| + weight_decay * |w|``), then accumulated with momentum
    (``buf = momentum * buf + d``) and applied as ``w -= lr * buf``. Parameter groups with
    ``lars_exclude=True`` take plain SGD-momentum steps without weight decay.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 1e-6, eta: float = 1e-3):  # noqa: ANN001
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if not group["lars_exclude"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(grad)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, torch.ones_like(w_norm)
                    )
                    grad = grad.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(grad).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights (decayed, adapted) and biases/norm parameters (neither)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_norm = isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm, nn.LayerNorm, nn.GroupNorm))
            (no_decay if is_norm or name == "bias" else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
    ]


def scaled_lr(base_lr: float, batch_size: int, scaling: str) -> float:
    """SimCLR's learning rate for a global batch: ``base * B / 256`` or ``base * sqrt(B)``."""
    if scaling == "linear":
        return base_lr * batch_size / 256
    if scaling == "sqrt":
        return base_lr * math.sqrt(batch_size)
    if scaling == "none":
        return base_lr
    raise SimCLRError(f"unknown learning-rate scaling {scaling!r}; known: linear, sqrt, none")


def build_optimizer(
    name: str, model: nn.Module, lr: float, weight_decay: float, momentum: float = 0.9, eta: float = 1e-3
) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta)
    for g in groups:
        g.pop("lars_exclude")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise SimCLRError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")


class WarmupCosine:
    """The learning-rate multiplier of step ``step``: linear warm-up from ~0 to 1 over
    ``warmup_steps``, then cosine decay to ``final_ratio`` at ``total_steps``.

    An object rather than a closure so that a time-budgeted run can fix ``total_steps`` once it
    has measured its step time, and so that ``LambdaLR.state_dict`` stores the schedule (it
    saves the ``__dict__`` of callable objects): a resumed run continues the same schedule.
    """

    def __init__(self, total_steps: int, warmup_steps: int, final_ratio: float = 0.0):
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.final_ratio = float(final_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.final_ratio + (1 - self.final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(total_steps: int, warmup_steps: int, final_ratio: float = 0.0) -> WarmupCosine:
    """A multiplier per step: linear warm-up from ~0 to 1, then cosine decay to ``final_ratio``."""
    return WarmupCosine(total_steps, warmup_steps, final_ratio)
