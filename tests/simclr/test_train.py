"""The training loop: files it writes, resuming, refusals, and training on some classes."""

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from simclr.checkpoint import safe_load
from simclr.config import TrainConfig
from simclr.data import load_folder
from simclr.encoder import ENCODER_FILE, Encoder, embed_images
from simclr.errors import SimCLRError
from simclr.models import SimCLRModel
from simclr import train as train_module
from simclr.train import CHECKPOINT, METRICS, Trainer, TrainingDiverged, train, with_turns
from simclr.training_data import load_size, only_classes
from tests.helpers import TINY, pattern
from tests.helpers import Payload


def _cfg(folder: Path, out: Path, **changes) -> TrainConfig:
    return TrainConfig(**{"data": str(folder), "out": str(out), **TINY, **changes})


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return safe_load(path)["model"]


@pytest.fixture(scope="module")
def half_run(image_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-epoch run stopped after its first epoch, as an interruption leaves it (read-only:
    tests take a copy from :func:`interrupted`)."""
    out = tmp_path_factory.mktemp("half") / "run"
    Trainer(_cfg(image_folder, out, epochs=2)).fit(until_epoch=1)
    return out


@pytest.fixture
def interrupted(half_run: Path, tmp_path: Path) -> Path:
    """This test's own copy of :func:`half_run`."""
    return Path(shutil.copytree(half_run, tmp_path / "run"))


def test_resume_gives_the_same_weights_as_a_straight_run(image_folder: Path, interrupted: Path, tmp_path: Path) -> None:
    straight = train(_cfg(image_folder, tmp_path / "straight", epochs=2))
    resumed = train(_cfg(image_folder, interrupted, epochs=2), resume=True)
    assert resumed.epochs == 2 and resumed.steps == straight.steps
    a, b = _weights(straight.checkpoint), _weights(resumed.checkpoint)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_tiny_training_learns_and_writes_its_files(tiny_encoder: Path, image_folder: Path) -> None:
    run = tiny_encoder.parent
    for name in (CHECKPOINT, ENCODER_FILE, METRICS, "curves.png"):
        assert (run / name).stat().st_size > 0, name
    epochs = [json.loads(line) for line in (run / METRICS).read_text().splitlines()]
    losses = [r["loss"] for r in epochs if r["kind"] == "epoch"]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    # NT-Xent of embeddings that carry no information is log(2N - 1) for a batch of N.
    assert losses[-1] < math.log(2 * 16 - 1) - 0.3
    enc = Encoder.load(tiny_encoder)
    data = load_folder(image_folder, size=enc.spec.image_size)
    feats = embed_images(enc, data.images)
    assert feats.shape == (48, enc.dim)
    assert torch.allclose(feats.norm(dim=1), torch.ones(48), atol=1e-4)


@pytest.fixture
def one_picture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """48 copies of one picture: two views of an image are exactly as alike as views of two
    images, so the loss can only sit at chance level, ln(2N - 1). The grace period is cut to 9
    steps (the real one, 100 steps, is for real runs)."""
    from PIL import Image

    one = Image.fromarray(pattern("checks", np.random.default_rng(0)))
    same = tmp_path / "same" / "part"
    same.mkdir(parents=True)
    for i in range(48):
        one.save(same / f"{i:02d}.png")
    monkeypatch.setattr(train_module, "CHANCE_GRACE_STEPS", 9)
    return same.parent


def _chance_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "chance level" in r.getMessage()]


def test_a_run_at_chance_level_narrows_its_crops_once_then_says_so(
    one_picture: Path, image_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """At the grace step the crops narrow from 50% to 90% of the image and the run trains on;
    a loss still at chance a grace period later is reported once, with the way out that is
    left, and in the result. The same recipe on 48 different pictures learns, untouched."""
    caplog.set_level(logging.WARNING, logger="simclr.train")
    trainer = Trainer(_cfg(one_picture, tmp_path / "stuck", epochs=12))
    stuck = trainer.fit()
    assert trainer.augment.cfg.crop_scale == (0.9, 1.0)  # (TINY's crops: 0.5 to 1)
    assert stuck.narrowed is not None and (stuck.narrowed.step, stuck.narrowed.crop_from, stuck.narrowed.crop_to) == (9, 0.5, 0.9)
    assert stuck.narrowed.loss >= 0.99 * stuck.chance_loss
    narrowed, reported = _chance_warnings(caplog)
    assert "at step 9 " in narrowed and "crops keep at least 90%" in narrowed
    assert "at step 18 " in reported and "--init" in reported and "--crop-min 0.9" not in reported
    assert stuck.chance_loss == pytest.approx(math.log(2 * 16 - 1))
    assert stuck.at_chance and stuck.final_loss >= 0.99 * stuck.chance_loss
    assert "--init" in stuck.chance_line() and "step 9 " in stuck.narrowed_line()
    records = [json.loads(line) for line in (tmp_path / "stuck" / METRICS).read_text().splitlines()]
    assert [(r["step"], r["crop_min"]) for r in records if r["kind"] == "crops"] == [(9, 0.9)]
    caplog.clear()
    learned = Trainer(_cfg(image_folder, tmp_path / "learned", epochs=12))
    result = learned.fit()
    assert not result.at_chance and result.chance_line() is None and result.narrowed is None
    assert learned.augment.cfg.crop_scale == (0.5, 1.0)
    assert result.final_loss < 0.9 * result.chance_loss
    assert not _chance_warnings(caplog)


def test_chance_crop_min_0_keeps_the_crops_and_warns_with_the_crop_advice(
    one_picture: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="simclr.train")
    trainer = Trainer(_cfg(one_picture, tmp_path / "kept", epochs=12, chance_crop_min=0.0))
    result = trainer.fit()
    assert result.narrowed is None and result.narrowed_line() is None and trainer.augment.cfg.crop_scale == (0.5, 1.0)
    (warning,) = _chance_warnings(caplog)
    assert "at step 9 " in warning and "--crop-min 0.9" in warning
    assert result.at_chance and "--crop-min 0.9" in result.chance_line()


def test_a_run_resumed_after_its_crops_narrowed_goes_on_exactly(one_picture: Path, tmp_path: Path) -> None:
    """The narrowing is part of the checkpoint: a run stopped after it and resumed trains with
    the narrowed crops, to the same weights as the run that never stopped."""
    straight = train(_cfg(one_picture, tmp_path / "straight", epochs=6, save_minutes=0.0))
    Trainer(_cfg(one_picture, tmp_path / "stopped", epochs=6, save_minutes=0.0)).fit(until_epoch=4)  # (narrowed at 9)
    resumed = Trainer(_cfg(one_picture, tmp_path / "stopped", epochs=6), resume=True)
    assert resumed.augment.cfg.crop_scale == (0.9, 1.0) and resumed.narrowed.step == 9
    result = resumed.fit()
    assert result.narrowed == straight.narrowed
    a, b = _weights(straight.checkpoint), _weights(result.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_chance_crop_min_outside_0_to_1_is_refused(image_folder: Path, tmp_path: Path) -> None:
    for bad in (-0.1, 1.5):
        with pytest.raises(SimCLRError, match="chance-crop-min must lie in"):
            _cfg(image_folder, tmp_path, epochs=1, chance_crop_min=bad).validate()


def test_epochs_write_files_when_a_save_is_due(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every epoch writes with save_minutes 0; with an hour, only the run's end does (a small
    collection's epochs last seconds). The weights are the same either way."""
    written: list[int] = []
    real_save = Trainer.save
    monkeypatch.setattr(Trainer, "save", lambda self, *a, **kw: written.append(self.step) or real_save(self, *a, **kw))
    every = train(_cfg(image_folder, tmp_path / "every", epochs=4, save_minutes=0.0))
    assert written == [3, 6, 9, 12]
    written.clear()
    hourly = train(_cfg(image_folder, tmp_path / "hourly", epochs=4, save_minutes=60.0))
    assert written == [12] and hourly.steps == every.steps == 12
    a, b = _weights(every.checkpoint), _weights(hourly.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_knn_monitor_runs_on_folder_holdout(image_folder: Path, tmp_path: Path) -> None:
    result = train(_cfg(image_folder, tmp_path, knn_every=1, knn_k=5))
    assert math.isfinite(result.final_loss)
    # Every tenth of the 48 images is a query: the accuracy is a count out of 5.
    assert result.knn_top1 is not None and 0 <= result.knn_top1 <= 1
    assert result.knn_top1 * 5 == pytest.approx(round(result.knn_top1 * 5))


def test_existing_run_is_not_overwritten(image_folder: Path, interrupted: Path) -> None:
    before = (interrupted / CHECKPOINT).read_bytes()
    with pytest.raises(SimCLRError, match="--resume"):
        train(_cfg(image_folder, interrupted, epochs=2))
    assert (interrupted / CHECKPOINT).read_bytes() == before


def test_resume_with_another_configuration_is_refused(image_folder: Path, interrupted: Path) -> None:
    with pytest.raises(SimCLRError, match="another configuration.*width"):
        train(_cfg(image_folder, interrupted, epochs=2, width=16), resume=True, explicit={"width"})


def test_a_checkpoint_that_does_not_load_gives_one_line_even_without_a_message(
    image_folder: Path, interrupted: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(self, *args, **kwargs):
        raise RuntimeError()  # an error with an empty message

    monkeypatch.setattr(SimCLRModel, "load_state_dict", fail)
    with pytest.raises(SimCLRError) as err:
        Trainer(_cfg(image_folder, interrupted, epochs=2), resume=True)
    assert str(err.value) == f"{interrupted / CHECKPOINT} does not fit this model (RuntimeError)"


def test_a_checkpoint_with_the_obsolete_workers_option_resumes(image_folder: Path, interrupted: Path) -> None:
    state = safe_load(interrupted / CHECKPOINT)
    state["config"] = {**state["config"], "workers": 4}  # as versions with a `workers` option saved it
    torch.save(state, interrupted / CHECKPOINT)
    trainer = Trainer(_cfg(image_folder, interrupted, epochs=2), resume=True)
    assert trainer.epoch == 1 and not hasattr(trainer.cfg, "workers")


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


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(image_folder: Path, interrupted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = (interrupted / CHECKPOINT).read_bytes()
    trainer = Trainer(_cfg(image_folder, interrupted, epochs=2), resume=True)
    original = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda x, g: original(x, g) * math.nan)
    with pytest.raises(TrainingDiverged, match="last good checkpoint"):
        trainer.fit()
    assert (interrupted / CHECKPOINT).read_bytes() == good


def test_pickled_code_in_a_checkpoint_is_refused_on_resume(image_folder: Path, interrupted: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    state = torch.load(interrupted / CHECKPOINT, weights_only=True)
    state["payload"] = Payload(marker)
    torch.save(state, interrupted / CHECKPOINT)
    with pytest.raises(SimCLRError, match="refused for safety"):
        train(_cfg(image_folder, interrupted, epochs=2), resume=True)
    assert not marker.exists()


def test_a_bf16_step_on_the_cpu_matches_fp32(image_folder: Path, tmp_path: Path) -> None:
    """``--precision bf16`` on the CPU: the same first step in bf16 autocast and in fp32 gives
    nearly the same loss and gradient, and the weights stay float32 (autocast computes in bf16;
    it does not store in it)."""
    steps = {}
    for precision, seed in (("fp32", 0), ("bf16", 0), ("fp32", 1)):
        trainer = Trainer(_cfg(image_folder, tmp_path / f"{precision}-{seed}", precision=precision, device="cpu"))
        loss = trainer.train_step(trainer.images[:16], torch.Generator().manual_seed(seed))
        grad = torch.cat([p.grad.flatten() for p in trainer.model.parameters()])
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
        steps[precision, seed] = (loss.item(), grad)
    (loss32, grad32), (loss16, grad16) = steps["fp32", 0], steps["bf16", 0]
    assert math.isfinite(loss16) and abs(loss16 - loss32) < 0.02 * loss32
    # bf16 keeps 8 bits of mantissa: in this width-8 network the gradients agree to a cosine of
    # 0.80-0.95 over seeds of the views; the same step on other views (what a wrong bf16 path
    # amounts to) agrees to -0.2-0.2.
    cosine = torch.nn.functional.cosine_similarity
    assert cosine(grad16, grad32, dim=0) > 0.6
    assert abs(cosine(steps["fp32", 1][1], grad32, dim=0)) < 0.4


def test_a_multi_crop_step_feeds_small_crops_beside_the_full_views(image_folder: Path, tmp_path: Path) -> None:
    """``small_crops=3``: the backbone sees the two full views of the batch at the training
    size, then 3 small crops of each image at half that size, in one forward; the loss gets
    5 views of the batch, and without small crops the step is unchanged (2 views, 1 pass)."""
    for crops in (0, 3):
        trainer = Trainer(_cfg(image_folder, tmp_path / str(crops), small_crops=crops, device="cpu"))
        shapes: list[tuple[int, ...]] = []
        seen: list[tuple[int, ...]] = []
        trainer.model.backbone.register_forward_hook(lambda m, args, out, shapes=shapes: shapes.append(tuple(args[0].shape)))
        trainer.loss_fn = lambda *views, seen=seen, loss_fn=trainer.loss_fn: seen.extend(tuple(v.shape) for v in views) or loss_fn(*views)
        loss = trainer.train_step(trainer.images[:16], torch.Generator().manual_seed(0))
        assert math.isfinite(loss.item())
        c = trainer.images.shape[1]
        assert shapes == [(32, c, 16, 16)] + ([(48, c, 8, 8)] if crops else [])
        assert seen == [(16, 16)] * (2 + crops)


def test_rotation_negatives_put_each_turn_of_an_image_in_the_batch_as_its_own_image(image_folder: Path, tmp_path: Path) -> None:
    """``rotation_negatives``: the step on B images is the plain step on 4B images (the B
    images, then each turned by 90, 180 and 270 degrees), so each turn is a negative of the others."""
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4)
    turned = with_turns(images)
    naive = [torch.from_numpy(np.rot90(img.numpy(), k, (1, 2)).copy()) for k in range(4) for img in images]
    assert torch.equal(turned, torch.stack(naive))
    with pytest.raises(SimCLRError, match="rotation negatives need square images, got 4 x 6"):
        with_turns(torch.zeros(2, 3, 4, 6, dtype=torch.uint8))
    with pytest.raises(SimCLRError, match="--rotation 90 makes them positives: give one"):
        TrainConfig(rotation_negatives=True, rotation=90).validate()
    TrainConfig(rotation_negatives=True, rotation=10).validate()
    losses, seen = [], []
    for negatives in (True, False):
        torch.manual_seed(0)
        trainer = Trainer(_cfg(image_folder, tmp_path / str(negatives), rotation_negatives=negatives, device="cpu"))
        trainer.loss_fn = lambda *views, loss_fn=trainer.loss_fn: seen.append(tuple(views[0].shape)) or loss_fn(*views)
        x = trainer.images[:8]
        losses.append(trainer.train_step(x if negatives else with_turns(x), torch.Generator().manual_seed(0)))
    assert seen == [(32, 16), (32, 16)]
    assert torch.equal(losses[0], losses[1])


def test_multi_crop_options_are_checked() -> None:
    assert TrainConfig(image_size=40).augment_config(3, small=True).size == 20
    assert TrainConfig(small_crop_size=12).augment_config(3, small=True).size == 12
    with pytest.raises(SimCLRError, match="small crops must be >= 0"):
        TrainConfig(small_crops=-1).validate()
    with pytest.raises(SimCLRError, match="crop scale"):
        TrainConfig(small_crop_min=0.5, small_crop_max=0.2).validate()


# ----------------------------------------------------------------------------- some classes only

def test_only_classes_keeps_the_images_of_those_classes(image_folder: Path) -> None:
    data = load_folder(image_folder, size=16)
    bars = only_classes(data, ["bars"])
    expected = [r for r in data.refs if Path(r).parent.name == "bars"]
    assert bars.refs == expected and len(expected) == 16
    assert bars.labels.tolist() == [data.classes.index("bars")] * 16
    assert torch.equal(bars.images, load_folder(image_folder / "bars", size=16).images)
    two = only_classes(data, ["stripes", "bars"])
    assert sorted(two.refs) == sorted(r for r in data.refs if Path(r).parent.name in ("bars", "stripes"))


def test_only_classes_refuses_unknown_classes_and_unlabelled_data(image_folder: Path) -> None:
    data = load_folder(image_folder, size=16)
    with pytest.raises(SimCLRError) as err:
        only_classes(data, ["bars", "cats"])
    assert str(err.value) == f"{image_folder} has no class 'cats'; known: bars, checks, stripes"
    unlabelled = load_folder(image_folder / "bars", size=16)
    with pytest.raises(SimCLRError, match="has no labels, so it cannot be narrowed to classes bars"):
        only_classes(unlabelled, ["bars"])


def test_training_on_one_class_sees_only_its_images(image_folder: Path, tmp_path: Path) -> None:
    trainer = Trainer(_cfg(image_folder, tmp_path, classes=["checks"]))
    assert torch.equal(trainer.images, load_folder(image_folder / "checks", size=load_size(16)).images)
    result = trainer.fit()
    assert result.steps == 1  # 16 images of the class, batches of 16 (the whole folder: 3 steps)
    assert safe_load(result.checkpoint)["config"]["classes"] == ["checks"]
    with pytest.raises(SimCLRError, match="has no class 'dogs'; known: bars, checks, stripes"):
        Trainer(_cfg(image_folder, tmp_path / "other", classes=["dogs"]))


def test_a_run_starts_from_an_encoder_file_with_its_weights_and_normalisation(
        tiny_encoder: Path, image_folder: Path, tmp_path: Path) -> None:
    """``--init ENCODER``: a collection of one kind adapts an encoder trained on a broader one."""
    start = Encoder.load(tiny_encoder)
    trainer = Trainer(_cfg(image_folder, tmp_path / "adapted", init=str(tiny_encoder)))
    own, given = trainer.model.backbone.state_dict(), start.backbone.state_dict()
    assert own.keys() == given.keys()
    for name in own:
        assert torch.equal(own[name].cpu(), given[name]), name
    assert list(trainer.mean) == start.spec.mean and list(trainer.std) == start.spec.std
    scratch = Trainer(_cfg(image_folder, tmp_path / "scratch"))
    assert not torch.equal(scratch.model.backbone.layer4[0].conv1.weight, own["layer4.0.conv1.weight"])
    # Grayscale from a colour encoder: the first convolution and the normalisation are the channels' average.
    gray = Trainer(_cfg(image_folder, tmp_path / "gray", init=str(tiny_encoder), in_channels=1))
    assert torch.allclose(gray.model.backbone.conv1.weight.cpu(), given["conv1.weight"].mean(1, keepdim=True))
    assert gray.mean == pytest.approx([sum(start.spec.mean) / 3]) and gray.std == pytest.approx([sum(start.spec.std) / 3])


@pytest.mark.parametrize(("change", "option"), [({"width": 16}, "--width 8"), ({"stem": "stride2"}, "--stem small")])
def test_an_encoder_file_of_another_network_is_refused_naming_both(
        tiny_encoder: Path, image_folder: Path, tmp_path: Path, change: dict, option: str) -> None:
    with pytest.raises(SimCLRError) as err:
        Trainer(_cfg(image_folder, tmp_path / "run", init=str(tiny_encoder), **change))
    built = {**TINY, **change}
    assert str(err.value) == (
        f"--init {tiny_encoder}: an encoder of resnet18, stem small, width 8, but this run builds resnet18, "
        f"stem {built['stem']}, width {built['width']} (pass --arch resnet18 --stem small --width 8)")
    assert option in str(err.value) and not (tmp_path / "run" / CHECKPOINT).exists()


def test_the_knn_monitor_takes_evenly_spaced_capped_sets(image_folder: Path, tmp_path: Path) -> None:
    # The folder's images come class by class: a gallery of its first items would hold one class.
    trainer = Trainer(_cfg(image_folder, tmp_path, knn_max_gallery=6, knn_max_queries=3))
    (gallery, queries) = trainer._eval_data()
    labels = trainer.source.labels
    assert len(gallery.positions) == 6 and len(queries.positions) == 3
    assert set(labels[gallery.positions].tolist()) == set(labels.tolist())  # every class, not the first one alone
    assert not set(gallery.positions.tolist()) & set(queries.positions.tolist())
    # Uncapped, every tenth image is a query and the rest the gallery.
    (gallery, queries) = Trainer(_cfg(image_folder, tmp_path / "all"))._eval_data()
    assert queries.positions.tolist() == list(range(0, 48, 10)) and len(gallery.positions) == 48 - 5
