import json
import math
from pathlib import Path

import pytest
import torch

from simclr.checkpoint import safe_load
from simclr.config import TrainConfig
from simclr.encoder import Encoder, embed_images
from simclr.errors import SimCLRError
from simclr.knn import knn_evaluate
from simclr.train import CHECKPOINT, ENCODER, METRICS, Trainer, TrainingDiverged, train
from tests.conftest import TINY


def _cfg(folder: Path, out: Path, **changes) -> TrainConfig:
    return TrainConfig(**{"data": str(folder), "out": str(out), **TINY, **changes})


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return safe_load(path)["model"]


def test_resume_gives_the_same_weights_as_a_straight_run(image_folder: Path, tmp_path: Path) -> None:
    straight = train(_cfg(image_folder, tmp_path / "a", epochs=2))
    # Stop after one epoch of a two-epoch run (as an interruption would), then resume.
    Trainer(_cfg(image_folder, tmp_path / "b", epochs=2)).fit(until_epoch=1)
    resumed = train(_cfg(image_folder, tmp_path / "b", epochs=2), resume=True)
    assert resumed.epochs == 2 and resumed.steps == straight.steps
    a, b = _weights(straight.checkpoint), _weights(resumed.checkpoint)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_tiny_training_learns_and_writes_its_files(tiny_encoder: Path, image_folder: Path) -> None:
    from simclr.data import load_folder

    run = tiny_encoder.parent
    for name in (CHECKPOINT, ENCODER, METRICS, "curves.png"):
        assert (run / name).stat().st_size > 0, name
    epochs = [json.loads(line) for line in (run / METRICS).read_text().splitlines()]
    losses = [r["loss"] for r in epochs if r["kind"] == "epoch"]
    assert len(losses) == 12
    # NT-Xent of embeddings that carry no information is log(2N - 1) for a batch of N.
    assert losses[-1] < math.log(2 * 16 - 1) - 0.3
    enc = Encoder.load(tiny_encoder)
    data = load_folder(image_folder, size=enc.spec.image_size)
    feats = embed_images(enc, data.images)
    assert feats.shape == (48, enc.dim)
    assert torch.allclose(feats.norm(dim=1), torch.ones(48), atol=1e-4)


def test_knn_monitor_runs_on_folder_holdout(image_folder: Path, tmp_path: Path) -> None:
    result = train(_cfg(image_folder, tmp_path, knn_every=1, knn_k=5))
    assert result.knn_top1 is not None and 0 <= result.knn_top1 <= 1


def test_existing_run_is_not_overwritten(image_folder: Path, tmp_path: Path) -> None:
    train(_cfg(image_folder, tmp_path))
    before = (tmp_path / CHECKPOINT).read_bytes()
    with pytest.raises(SimCLRError, match="--resume"):
        train(_cfg(image_folder, tmp_path))
    assert (tmp_path / CHECKPOINT).read_bytes() == before


def test_resume_with_another_configuration_is_refused(image_folder: Path, tmp_path: Path) -> None:
    train(_cfg(image_folder, tmp_path))
    with pytest.raises(SimCLRError, match="another configuration.*width"):
        train(_cfg(image_folder, tmp_path, width=16), resume=True, explicit={"width"})


def test_batch_larger_than_data_is_refused(image_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(SimCLRError, match="larger than the data set"):
        train(_cfg(image_folder, tmp_path, batch_size=64))


@pytest.mark.parametrize("field,value,message", [
    ("arch", "vgg11", "known: resnet18, resnet34, resnet50"),
    ("head", "deep", "known: mlp, linear, none"),
    ("optimizer", "adam", "known: lars, sgd, adamw"),
    ("data", "mnist:train", "known data sets: fashion-mnist, cifar10"),
])
def test_unknown_names_list_the_known_ones(image_folder: Path, tmp_path: Path, field: str, value: str, message: str) -> None:
    with pytest.raises(SimCLRError, match=message):
        train(_cfg(image_folder, tmp_path, **{field: value}))


@pytest.mark.parametrize("field,value,message", [
    ("width", 0, "width must be >= 1, got 0"),
    ("knn_temperature", 0.0, "knn temperature must be positive, got 0.0"),
    ("log_every", 0, "log-every must be >= 1, got 0"),
    ("lars_eta", -1.0, "LARS trust coefficient must be positive, got -1.0"),
])
def test_out_of_range_settings_are_named(field: str, value: object, message: str) -> None:
    with pytest.raises(SimCLRError, match=message):
        TrainConfig(**{field: value}).validate()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Trainer(_cfg(image_folder, tmp_path, epochs=2)).fit(until_epoch=1)
    good = (tmp_path / CHECKPOINT).read_bytes()
    trainer = Trainer(_cfg(image_folder, tmp_path, epochs=2), resume=True)
    original = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda x, g: original(x, g) * math.nan)
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        trainer.fit()
    assert (tmp_path / CHECKPOINT).read_bytes() == good


def test_unknown_config_keys_are_named() -> None:
    with pytest.raises(SimCLRError, match="colour, speed"):
        TrainConfig.from_dict({"speed": 1, "colour": 2})


def test_encoder_file_round_trips(tiny_encoder: Path, image_folder: Path) -> None:
    enc = Encoder.load(tiny_encoder)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    again = Encoder.load(tiny_encoder)
    assert torch.equal(enc.embed(x), again.embed(x))
    assert enc.checksum == again.checksum and len(enc.checksum) == 64


def test_training_checkpoint_is_not_an_encoder(tiny_encoder: Path) -> None:
    with pytest.raises(SimCLRError, match="training checkpoint"):
        Encoder.load(tiny_encoder.parent / CHECKPOINT)


class _Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_code_in_an_encoder_file_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "encoder.pt"
    torch.save({"format": "simclr-encoder", "payload": _Payload(marker)}, evil)
    with pytest.raises(SimCLRError, match="refused for safety"):
        Encoder.load(evil)
    assert not marker.exists()


def test_pickled_code_in_a_checkpoint_is_refused_on_resume(image_folder: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = TrainConfig(data=str(image_folder), out=str(run), **TINY)
    train(cfg)
    marker = tmp_path / "pwned"
    state = torch.load(run / CHECKPOINT, weights_only=True)
    state["payload"] = _Payload(marker)
    torch.save(state, run / CHECKPOINT)
    with pytest.raises(SimCLRError, match="refused for safety"):
        train(TrainConfig(data=str(image_folder), out=str(run), **{**TINY, "epochs": 2}), resume=True)
    assert not marker.exists()


def test_knn_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(200, 16, generator=g), dim=1)
    labels = torch.randint(0, 4, (200,), generator=g)
    queries = torch.nn.functional.normalize(torch.randn(30, 16, generator=g), dim=1)
    q_labels = torch.randint(0, 4, (30,), generator=g)
    k, t = 7, 0.1
    result = knn_evaluate(queries, q_labels, gallery, labels, 4, k, t)
    correct = 0
    for i in range(30):
        sims = [(float(queries[i] @ gallery[j]), j) for j in range(200)]
        sims.sort(reverse=True)
        votes = [0.0] * 4
        for s, j in sims[:k]:
            votes[int(labels[j])] += math.exp(s / t)
        correct += int(max(range(4), key=lambda c: votes[c]) == int(q_labels[i]))
    assert result.top1 == pytest.approx(correct / 30)


def test_a_bf16_step_on_the_cpu_matches_fp32(image_folder: Path, tmp_path: Path) -> None:
    """``--precision bf16`` on the CPU: the same first step in bf16 autocast and in fp32 gives
    nearly the same loss and gradient, and the weights stay float32 (autocast computes in bf16;
    it does not store in it)."""
    steps = {}
    for precision in ("fp32", "bf16"):
        trainer = Trainer(_cfg(image_folder, tmp_path / precision, precision=precision, device="cpu"))
        loss = trainer.train_step(trainer.images[:16], torch.Generator().manual_seed(0))
        grad = torch.cat([p.grad.flatten() for p in trainer.model.parameters()])
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
        steps[precision] = (loss.item(), grad)
    (loss32, grad32), (loss16, grad16) = steps["fp32"], steps["bf16"]
    assert math.isfinite(loss16) and abs(loss16 - loss32) < 0.02 * loss32
    # bf16 keeps 8 bits of mantissa: in this width-8 network the gradients agree to a cosine
    # of 0.88 (0.97+ in the head, 0.85 at the stem); a wrong bf16 path would be near 0.
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.8


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
