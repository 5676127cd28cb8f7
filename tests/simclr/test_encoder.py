"""The encoder file: what indexing and the app load."""

from pathlib import Path

import pytest
import torch
import torchvision

from simclr.checkpoint import file_sha256, safe_load
from simclr.encoder import Encoder
from simclr.errors import SimCLRError
from simclr.train import CHECKPOINT
from tests.helpers import Payload


def test_encoder_file_round_trips(tiny_encoder: Path, tmp_path: Path) -> None:
    enc = Encoder.load(tiny_encoder)
    # The file holds the trained backbone: the same tensors as the checkpoint's model ...
    model = safe_load(tiny_encoder.parent / CHECKPOINT)["model"]
    for name, tensor in enc.backbone.state_dict().items():
        assert torch.equal(tensor, model[f"backbone.{name}"]), name
    # ... and saving it and loading it again changes nothing.
    checksum = enc.save(tmp_path / "copy.pt")
    again = Encoder.load(tmp_path / "copy.pt")
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(enc.embed(x), again.embed(x))
    assert again.spec == enc.spec
    assert again.checksum == checksum == file_sha256(tmp_path / "copy.pt") and len(checksum) == 64


def test_training_checkpoint_is_not_an_encoder(tiny_encoder: Path) -> None:
    with pytest.raises(SimCLRError, match="training checkpoint"):
        Encoder.load(tiny_encoder.parent / CHECKPOINT)


def test_pickled_code_in_an_encoder_file_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "encoder.pt"
    torch.save({"format": "simclr-encoder", "payload": Payload(marker)}, evil)
    with pytest.raises(SimCLRError, match="refused for safety"):
        Encoder.load(evil)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is not a PyTorch file \\(it is empty\\)"),
        (b"# A README\n", "is not a PyTorch file \\(it is something else: it starts with b'# A "),
        (b"PK\x03\x04 not really a zip", "cannot be loaded: it is truncated or corrupt"),
    ],
)
def test_a_file_that_is_not_an_encoder_is_named_for_what_it_is(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "encoder.pt"
    path.write_bytes(content)
    with pytest.raises(SimCLRError, match=message):
        Encoder.load(path)


def test_a_truncated_encoder_file_is_named(tiny_encoder: Path, tmp_path: Path) -> None:
    cut = tmp_path / "encoder.pt"
    cut.write_bytes(tiny_encoder.read_bytes()[:3000])
    with pytest.raises(SimCLRError, match="encoder.pt cannot be loaded: it is truncated or corrupt"):
        Encoder.load(cut)


def test_weights_that_do_not_load_give_one_line_even_without_a_message(
    tiny_encoder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(self, *args, **kwargs):
        raise RuntimeError()  # an error with an empty message

    monkeypatch.setattr(torchvision.models.ResNet, "load_state_dict", fail)
    with pytest.raises(SimCLRError) as err:
        Encoder.load(tiny_encoder)
    assert str(err.value) == f"{tiny_encoder}: weights do not match resnet18 (RuntimeError)"


def test_weights_of_another_shape_are_named(tiny_encoder: Path, tmp_path: Path) -> None:
    obj = safe_load(tiny_encoder)
    obj["spec"] = {**obj["spec"], "width": 16}
    torch.save(obj, tmp_path / "wide.pt")
    with pytest.raises(SimCLRError) as err:
        Encoder.load(tmp_path / "wide.pt")
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'wide.pt'}: weights do not match resnet18 (") and "\n" not in message
