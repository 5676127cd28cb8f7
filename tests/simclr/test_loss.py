import math
import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from simclr import dist as simclr_dist
from simclr.errors import SimCLRError
from simclr.loss import NTXentLoss


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


def test_gradient_matches_naive_loop() -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.randn(5, 4, generator=g, requires_grad=True)
    b = torch.randn(5, 4, generator=g, requires_grad=True)
    ga = torch.autograd.grad(NTXentLoss(0.3)(a, b), a)[0]
    gb = torch.autograd.grad(naive_ntxent(a, b, 0.3), a)[0]
    assert torch.allclose(ga, gb, atol=1e-5)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(SimCLRError, match="temperature"):
        NTXentLoss(0.0)
    with pytest.raises(SimCLRError, match="views"):
        NTXentLoss()(torch.randn(4, 3), torch.randn(5, 3))


# ---------------------------------------------------------------- two processes (gloo)

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, x1: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.save(_ddp_step(rank, world, x1, x2, weight), f"{out}/rank{rank}.pt")
    simclr_dist.shutdown()


def _ddp_step(rank: int, world: int, x1: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor) -> dict:
    """This rank's loss (averaged over ranks) and gradient. The DDP wrapper is unreferenced
    once this returns, so that ``shutdown`` collects it before destroying the group (one
    left alive aborted the process at exit in about 1 run in 3)."""
    model = torch.nn.Linear(x1.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        model.weight.copy_(weight)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    n = x1.shape[0] // world
    part = slice(rank * n, (rank + 1) * n)
    loss = NTXentLoss(0.5)(ddp(x1[part]), ddp(x2[part]))
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    return {"loss": mean_loss, "grad": model.weight.grad.clone()}


def test_two_processes_match_one_process_on_the_joined_batch() -> None:
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    weight = torch.randn(4, 6, generator=g)
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(2, _free_port(), x1, x2, weight, out), nprocs=2, join=True)
        results = [torch.load(f"{out}/rank{r}.pt") for r in range(2)]
    model = torch.nn.Linear(6, 4, bias=False)
    with torch.no_grad():
        model.weight.copy_(weight)
    loss = NTXentLoss(0.5)(model(x1), model(x2))
    loss.backward()
    for r in results:
        assert r["loss"].item() == pytest.approx(loss.item(), abs=1e-5)
        assert torch.allclose(r["grad"], model.weight.grad, atol=1e-5)
