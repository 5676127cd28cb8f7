"""Atomic writes and safe loads of checkpoint files."""

from pathlib import Path

import pytest
import torch

from simclr.checkpoint import atomic_save, safe_load
from simclr.errors import SimCLRError
from tests.helpers import Payload



def test_a_round_trip_keeps_tensors_and_plain_data(tmp_path: Path) -> None:
    obj = {"w": torch.arange(6.0).view(2, 3), "config": {"lr": 0.3, "classes": ["a", "b"]}, "step": 7}
    atomic_save(obj, tmp_path / "deep" / "ck.pt")
    back = safe_load(tmp_path / "deep" / "ck.pt")
    assert torch.equal(back["w"], obj["w"]) and back["config"] == obj["config"] and back["step"] == 7
    assert [p.name for p in (tmp_path / "deep").iterdir()] == ["ck.pt"]  # no temporary file left


def test_pickled_code_is_refused_and_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"payload": Payload(marker)}, tmp_path / "ck.pt")
    with pytest.raises(SimCLRError, match="refused for safety"):
        safe_load(tmp_path / "ck.pt")
    assert not marker.exists()


def test_a_failed_write_without_a_message_is_one_line_and_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ck.pt"
    atomic_save({"step": 1}, path)
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise RuntimeError()  # an error with an empty message

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(SimCLRError) as err:
        atomic_save({"step": 2}, path)
    assert str(err.value) == f"cannot write {path}: RuntimeError (the previous file is intact)"
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_a_failed_load_without_a_message_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    atomic_save({"step": 1}, tmp_path / "ck.pt")

    def fail(*args, **kwargs):
        raise RuntimeError("\n\n")

    monkeypatch.setattr(torch, "load", fail)
    with pytest.raises(SimCLRError) as err:
        safe_load(tmp_path / "ck.pt")
    assert str(err.value) == f"checkpoint {tmp_path / 'ck.pt'} cannot be loaded: RuntimeError"
