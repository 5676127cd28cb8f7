import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from simclr import dist as simclr_dist
from simclr.errors import SimCLRError
from simclr.loss import NTXentLoss, chance_loss
from tests.helpers import free_port


def naive_ntxent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """NT-Xent written as the paper's sum over positive pairs, one term at a time."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    total = torch.zeros(())
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        num = torch.exp(z[i] @ z[pos] / t)
        den = sum(torch.exp(z[i] @ z[j] / t) for j in range(2 * n) if j != i)
        total = total - torch.log(num / den)
    return total / (2 * n)


@pytest.mark.parametrize("t", [0.1, 0.5, 1.0])
def test_matches_naive_loop(t: float) -> None:
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    assert torch.allclose(NTXentLoss(t)(z1, z2), naive_ntxent(z1, z2, t), atol=1e-5)


@pytest.mark.parametrize("n", [1, 4, 32])
def test_closed_form_for_identical_views(n: int) -> None:
    z = torch.ones(n, 8)
    assert NTXentLoss(0.5)(z, z).item() == pytest.approx(-math.log(1 / (2 * n - 1)), abs=1e-5)


@pytest.mark.parametrize("views", [2, 3, 6])
def test_chance_level_is_the_loss_of_projections_that_tell_nothing_apart(views: int) -> None:
    """Every view the same projection, whatever it is and whatever the temperature: the loss that
    a run which learns nothing sits at (the trainer's warning compares with it)."""
    n = 8
    z = torch.randn(1, 5).expand(n, 5)
    for t in (0.2, 0.5):
        assert NTXentLoss(t)(*[z] * views).item() == pytest.approx(chance_loss(n, views), abs=1e-5)
    with pytest.raises(SimCLRError, match="at least 2 images and 2 views"):
        chance_loss(1)


def test_gradient_matches_naive_loop() -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.randn(5, 4, generator=g, requires_grad=True)
    b = torch.randn(5, 4, generator=g, requires_grad=True)
    ga = torch.autograd.grad(NTXentLoss(0.3)(a, b), a)[0]
    gb = torch.autograd.grad(naive_ntxent(a, b, 0.3), a)[0]
    assert torch.allclose(ga, gb, atol=1e-5)


def naive_multi_view(views: list[torch.Tensor], t: float) -> torch.Tensor:
    """Every view an anchor; for each of its positives (the other views of its image) the
    term -log(exp(s_pos / t) / sum over every other view of exp(s / t)), averaged over its
    positives, then over anchors."""
    z = [F.normalize(v, dim=1) for v in views]
    n, nv = views[0].shape[0], len(views)
    everything = [(a, i) for a in range(nv) for i in range(n)]
    total = torch.zeros(())
    for a, i in everything:
        den = sum(torch.exp(z[a][i] @ z[b][j] / t) for b, j in everything if (b, j) != (a, i))
        terms = [-torch.log(torch.exp(z[a][i] @ z[b][i] / t) / den) for b in range(nv) if b != a]
        total = total + sum(terms) / len(terms)
    return total / (nv * n)


@pytest.mark.parametrize("nv", [3, 5])
def test_multi_view_matches_naive_loop(nv: int) -> None:
    g = torch.Generator().manual_seed(4)
    views = [torch.randn(4, 5, generator=g, requires_grad=True) for _ in range(nv)]
    ours, ref = NTXentLoss(0.2)(*views), naive_multi_view(views, 0.2)
    assert torch.allclose(ours, ref, atol=1e-5)
    assert torch.allclose(torch.autograd.grad(ours, views[2])[0], torch.autograd.grad(ref, views[2])[0], atol=1e-5)


def test_multi_view_of_two_is_nt_xent() -> None:
    g = torch.Generator().manual_seed(5)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    assert torch.allclose(NTXentLoss(0.5)._multi_view((z1, z2)), NTXentLoss(0.5)(z1, z2), atol=1e-6)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(SimCLRError, match="temperature"):
        NTXentLoss(0.0)
    with pytest.raises(SimCLRError, match="views"):
        NTXentLoss()(torch.randn(4, 3), torch.randn(5, 3))


# ---------------------------------------------------------------- two processes (gloo)

def _worker(rank: int, world: int, port: int, xs: tuple[torch.Tensor, ...], weight: torch.Tensor, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.save(_ddp_step(rank, world, xs, weight), f"{out}/rank{rank}.pt")
    simclr_dist.shutdown()


def _ddp_step(rank: int, world: int, xs: tuple[torch.Tensor, ...], weight: torch.Tensor) -> dict:
    """This rank's loss (averaged over ranks) and gradient. The DDP wrapper is unreferenced
    once this returns, so that ``shutdown`` collects it before destroying the group (one
    left alive aborted the process at exit in about 1 run in 3)."""
    model = torch.nn.Linear(xs[0].shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        model.weight.copy_(weight)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    n = xs[0].shape[0] // world
    part = slice(rank * n, (rank + 1) * n)
    loss = NTXentLoss(0.5)(*(ddp(x[part]) for x in xs))
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    return {"loss": mean_loss, "grad": model.weight.grad.clone()}


@pytest.mark.parametrize("views", [2, 4])
def test_two_processes_match_one_process_on_the_joined_batch(views: int) -> None:
    g = torch.Generator().manual_seed(3)
    xs = tuple(torch.randn(8, 6, generator=g) for _ in range(views))
    weight = torch.randn(4, 6, generator=g)
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(2, free_port(), xs, weight, out), nprocs=2, join=True)
        results = [torch.load(f"{out}/rank{r}.pt") for r in range(2)]
    model = torch.nn.Linear(6, 4, bias=False)
    with torch.no_grad():
        model.weight.copy_(weight)
    loss = NTXentLoss(0.5)(*(model(x) for x in xs))
    loss.backward()
    for r in results:
        assert r["loss"].item() == pytest.approx(loss.item(), abs=1e-5)
        assert torch.allclose(r["grad"], model.weight.grad, atol=1e-5)
