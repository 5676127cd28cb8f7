"""Choosing the torch device."""

import pytest
import torch

from simclr.device import pick_device
from simclr.errors import SimCLRError


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_is_the_cpu_without_cuda(no_cuda: None) -> None:
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device() == torch.device("cpu")
    assert pick_device("cpu") == torch.device("cpu")


def test_cuda_without_cuda_is_one_line(no_cuda: None) -> None:
    for name in ("cuda", "cuda:1"):
        with pytest.raises(SimCLRError) as err:
            pick_device(name)
        assert str(err.value) == "device cuda was asked for, but CUDA is not available here"


@pytest.mark.parametrize(("name", "message"), [
    ("tpu", "unknown device 'tpu'; use auto, cpu, cuda or cuda:N"),
    ("gpu0", "unknown device 'gpu0'; use auto, cpu, cuda or cuda:N"),
    ("meta", "unsupported device 'meta'; use auto, cpu, cuda or cuda:N"),
])
def test_other_devices_are_refused_with_the_choices(name: str, message: str) -> None:
    with pytest.raises(SimCLRError) as err:
        pick_device(name)
    assert str(err.value) == message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_is_the_gpu_with_cuda() -> None:
    assert pick_device("auto") == torch.device("cuda", 0) == pick_device("cuda")
