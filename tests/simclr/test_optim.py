"""LARS, the warm-up/cosine schedule and the learning-rate scaling, against their formulas."""

import math

import pytest
import torch
from torch import nn

from simclr.errors import SimCLRError
from simclr.optim import LARS, build_optimizer, scaled_lr, warmup_cosine

# Parameters of :func:`_model` that LARS neither decays nor adapts: biases and normalisation.
EXCLUDED = {"body.0.bias", "body.1.weight", "body.1.bias", "body.3.bias"}


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        self.extra = nn.Linear(5, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.extra(x)


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = _Net()
    with torch.no_grad():
        model.body[1].weight.uniform_(0.5, 1.5)  # (not all ones, so that decay on it would show)
        model.body[1].bias.uniform_(-0.5, 0.5)
        model.extra.weight.zero_()  # a weight of norm 0 takes the plain step (trust ratio 1)
    return model.double()


def _naive_lars_step(w: torch.Tensor, g: torch.Tensor, buf: torch.Tensor | None, excluded: bool,
                     lr: float, momentum: float, wd: float, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One LARS step of one tensor, as SimCLR's lars_optimizer.py takes it: the decayed gradient
    d = g + wd * w is scaled by the trust ratio eta * |w| / |d| (1 when either norm is 0; the
    LARS paper, You et al. 2017, divides by |g| + wd * |w| instead), accumulated with momentum
    (the first step starts the buffer at d) and applied with the learning rate. Excluded
    tensors take d = g, unscaled."""
    w, g = w.flatten().tolist(), g.flatten().tolist()
    d = list(g) if excluded else [gi + wd * wi for gi, wi in zip(g, w)]
    if not excluded:
        w_norm = math.sqrt(sum(x * x for x in w))
        d_norm = math.sqrt(sum(x * x for x in d))
        trust = eta * w_norm / d_norm if w_norm > 0 and d_norm > 0 else 1.0
        d = [x * trust for x in d]
    new_buf = d if buf is None else [momentum * b + x for b, x in zip(buf.tolist(), d)]
    new_w = [wi - lr * b for wi, b in zip(w, new_buf)]
    return torch.tensor(new_w, dtype=torch.float64), torch.tensor(new_buf, dtype=torch.float64)


def test_lars_steps_match_a_naive_reference() -> None:
    lr, momentum, wd, eta = 0.5, 0.9, 0.05, 0.02  # a large decay, so that how it enters shows
    model = _model()
    opt = build_optimizer("lars", model, lr, wd, momentum, eta)
    assert isinstance(opt, LARS)
    gen = torch.Generator().manual_seed(1)
    x, target = torch.randn(16, 5, dtype=torch.float64, generator=gen), torch.randn(16, 3, dtype=torch.float64, generator=gen)
    bufs: dict[str, torch.Tensor] = {}
    for step in range(3):
        model.zero_grad()
        (model(x) - target).square().mean().backward()
        before = {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters()}
        opt.step()
        for name, p in model.named_parameters():
            w, g = before[name]
            expected, bufs[name] = _naive_lars_step(w, g, bufs.get(name), name in EXCLUDED, lr, momentum, wd, eta)
            moved, naive_moved = p.detach().flatten() - w.flatten(), expected - w.flatten()
            assert torch.allclose(moved, naive_moved, rtol=1e-6, atol=1e-12), (step, name)
        # The check can fail: adapted steps are far from plain SGD's.
        if step == 0:
            w, g = before["body.0.weight"]
            assert not torch.allclose(model.body[0].weight.detach() - w, -lr * (g + wd * w), rtol=0.1)


def test_lars_groups_put_biases_and_norms_apart() -> None:
    model = _model()
    opt = build_optimizer("lars", model, 0.1, 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    excluded = {names[id(p)] for g in opt.param_groups if g["lars_exclude"] for p in g["params"]}
    assert excluded == EXCLUDED
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups if g["lars_exclude"])


def _schedule(step: int, total: int, warmup: int, final: float) -> float:
    """The schedule as written down: (s + 1) / W during warm-up, then a half cosine from 1 to final."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / (total - warmup))
    return final + (1 - final) * (1 + math.cos(math.pi * t)) / 2


@pytest.mark.parametrize("final", [0.0, 0.1])
def test_warmup_cosine_follows_its_formula(final: float) -> None:
    total, warmup = 100, 10
    factor = warmup_cosine(total, warmup, final)
    # Closed forms at the landmarks: first step, mid warm-up, end of warm-up, middle, end.
    assert factor(0) == pytest.approx(0.1)
    assert factor(4) == pytest.approx(0.5)
    assert factor(9) == pytest.approx(1.0) and factor(10) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(final + (1 - final) / 2)
    assert factor(100) == pytest.approx(final) and factor(150) == pytest.approx(final)
    for step in range(0, 120, 7):
        assert factor(step) == pytest.approx(_schedule(step, total, warmup, final)), step
    # Through LambdaLR, as the trainer uses it: the rate of step s is base * factor(s).
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    for step in range(total):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.4 * _schedule(step, total, warmup, final)), step
        opt.step()
        sched.step()


def test_warmup_cosine_without_warmup_starts_at_the_full_rate() -> None:
    factor = warmup_cosine(10, 0)
    assert factor(0) == pytest.approx(1.0) and factor(5) == pytest.approx(0.5) and factor(10) == pytest.approx(0.0)


@pytest.mark.parametrize(("scaling", "expected"), [("linear", 0.3 * 1024 / 256), ("sqrt", 0.3 * 32), ("none", 0.3)])
def test_scaled_lr(scaling: str, expected: float) -> None:
    assert scaled_lr(0.3, 1024, scaling) == pytest.approx(expected)


def test_unknown_names_are_refused_with_the_known_ones() -> None:
    with pytest.raises(SimCLRError, match="unknown learning-rate scaling 'cube'; known: linear, sqrt, none"):
        scaled_lr(0.3, 256, "cube")
    with pytest.raises(SimCLRError, match="unknown optimizer 'adam'; known: lars, sgd, adamw"):
        build_optimizer("adam", _model(), 0.1, 0.0)
