"""``retrieval encoder``: an encoder file from pretrained weights (a local torchvision file here:
random weights, as the point is the plumbing), whitened on the user's images, indexable at once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torchvision
from typer.testing import CliRunner

from retrieval.cli import app
from retrieval.pretrained import encoder_from_weights
from simclr import whitening
from simclr.data import load_images
from simclr.encoder import Encoder, embed_images
from simclr.pretrained import IMAGENET_MEAN, IMAGENET_STD, pretrained_encoder

runner = CliRunner()
SIZE = 32  # tiny input resolution: fast on a CPU


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torchvision ResNet-18 state dict in a local file, as ``--init PATH`` takes it."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def test_the_encoder_holds_the_weights_and_feeds_them_as_imagenet_did(resnet18_weights: Path, image_folder: Path,
                                                                      tmp_path: Path) -> None:
    result = encoder_from_weights(str(resnet18_weights), "resnet18", image_size=SIZE, out=tmp_path / "enc.pt", device="cpu")
    assert result.path == tmp_path / "enc.pt" and result.whitening.images == 0
    assert result.whitening.note == "give --data (your images) to whiten it"
    enc = Encoder.load(result.path)
    saved = torch.load(resnet18_weights, weights_only=True)
    own = enc.backbone.state_dict()
    assert set(own) == {k for k in saved if not k.startswith("fc.")}
    assert all(torch.equal(own[k], saved[k]) for k in own)
    spec = enc.spec
    assert (spec.arch, spec.stem, spec.width, spec.in_channels, spec.image_size, spec.feature_dim) == (
        "resnet18", "standard", 64, 3, SIZE, 512)
    assert spec.mean == pytest.approx(IMAGENET_MEAN) and spec.std == pytest.approx(IMAGENET_STD)
    assert spec.trained_on == str(resnet18_weights.resolve())
    assert spec.train_config == {"init": str(resnet18_weights.resolve()), "arch": "resnet18"}
    assert not enc.whitened
    images = load_images(str(image_folder), size=SIZE).images
    vectors = enc.embed(images[:8])
    assert vectors.shape == (8, 512) and torch.allclose(vectors.norm(dim=1), torch.ones(8), atol=1e-5)
    # Grayscale: ImageNet's statistics averaged over the channels.
    gray = pretrained_encoder(str(resnet18_weights), "resnet18", SIZE, in_channels=1).spec
    assert gray.mean == pytest.approx([sum(IMAGENET_MEAN) / 3]) and gray.std == pytest.approx([sum(IMAGENET_STD) / 3])


def test_the_whitening_is_fit_on_the_images_of_data(resnet18_weights: Path, image_folder: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(whitening, "MIN_IMAGES_PER_DIM", 0.05)  # 26 images fit a 512-d whitening here
    src = tmp_path / "photos"
    shutil.copytree(image_folder, src)
    (src / "bars" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = encoder_from_weights(str(resnet18_weights), "resnet18", data=str(src), image_size=SIZE,
                                  out=tmp_path / "enc.pt", device="cpu", workers=0)
    assert result.whitening.images == 48 and [Path(ref).name for ref, _ in result.whitening.failures] == ["broken.png"]
    assert result.lines()[-1] == "whitened on 48 images"
    enc = Encoder.load(result.path)
    assert enc.whitened and enc.spec.train_config["whitening"]["images"] == 48
    # The same fit on features computed another way (the images in memory, not streamed).
    plain = pretrained_encoder(str(resnet18_weights), "resnet18", SIZE)
    features = embed_images(plain, load_images(str(image_folder), size=SIZE).images, features=True)
    mean, matrix = whitening.fit_whitening(features)
    assert torch.allclose(enc.white_mean, mean, rtol=1e-4, atol=1e-4)
    # (W W^T is (C + floor)^-1, free of the eigenvectors' signs.)
    assert torch.allclose(enc.white_matrix @ enc.white_matrix.T, matrix @ matrix.T, rtol=1e-3, atol=1e-4)


def test_too_few_images_leave_it_unwhitened_and_say_so(resnet18_weights: Path, image_folder: Path, tmp_path: Path) -> None:
    result = encoder_from_weights(str(resnet18_weights), "resnet18", data=str(image_folder), image_size=SIZE,
                                  out=tmp_path / "a.pt", device="cpu", workers=0)
    assert result.whitening.images == 0 and not Encoder.load(result.path).whitened
    assert result.lines()[-1] == "unwhitened: 48 images are too few to fit a whitening of 512-d features (at least 500)"
    result = encoder_from_weights(str(resnet18_weights), "resnet18", data=str(image_folder), image_size=SIZE,
                                  out=tmp_path / "b.pt", device="cpu", max_images=10)
    assert result.whitening.note.startswith("10 images (--max-images 10 of 48) are too few")


def test_the_command_writes_an_encoder_that_indexes_at_once(resnet18_weights: Path, image_folder: Path,
                                                           tmp_path: Path) -> None:
    enc = tmp_path / "photos-encoder.pt"
    r = run("encoder", "--init", resnet18_weights, "--arch", "resnet18", "--data", image_folder, "--image-size", SIZE,
            "--out", enc, "--device", "cpu", "--workers", 0, "--no-progress")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == [
        f"encoder: {enc}",
        f"resnet18 with weights from {resnet18_weights.resolve()}: 512-d embeddings of {SIZE} px images",
        "unwhitened: 48 images are too few to fit a whitening of 512-d features (at least 500)",
    ]
    r = run("index", "--encoder", enc, "--source", image_folder, "--out", tmp_path / "idx", "--workers", 0, "--no-progress")
    assert r.exit_code == 0, r.output
    assert "indexed 48 images" in r.output
    query = image_folder / "bars" / "bars_003.png"
    r = run("query", tmp_path / "idx", query, "-k", 1, "--json")
    assert r.exit_code == 0, r.output
    hit = json.loads(r.output)["hits"][0]  # an indexed image finds itself
    assert hit["ref"] == str(query.resolve()) and hit["similarity"] == pytest.approx(1, abs=1e-3)  # float16 as stored


def _bad_inputs(tmp: Path, weights: Path) -> list[tuple[list[object], str]]:
    """(command-line arguments, the one line of error they give) for each kind of bad input."""
    resnet34 = tmp / "resnet34.pth"
    with torch.device("meta"):
        names = torchvision.models.resnet34().state_dict()
    torch.save({k: torch.zeros(v.shape, dtype=v.dtype) for k, v in names.items()}, resnet34)
    text = tmp / "notes.pth"
    text.write_text("not weights")
    a_list = tmp / "list.pth"
    torch.save([torch.zeros(1)], a_list)
    (tmp / "empty").mkdir()
    (tmp / "taken.pt").write_bytes(b"mine")
    missing = tmp / "missing.pth"
    return [
        (["--init", resnet34, "--arch", "resnet18"],
         f"{resnet34}: these are resnet34 weights, not resnet18 (use --arch resnet34, or give resnet18 weights)"),
        (["--init", missing, "--arch", "resnet18"], f"--init {str(missing)!r}: neither 'imagenet' nor a weights file"),
        (["--init", text, "--arch", "resnet18"], f"{text}: not a torch weights file ("),
        (["--init", a_list, "--arch", "resnet18"], f"{a_list}: expected a state dict of resnet18 weights"),
        (["--init", weights, "--arch", "resnet99"], "unknown architecture 'resnet99'; known: resnet18, resnet34, resnet50"),
        (["--init", weights, "--arch", "resnet18", "--data", tmp / "empty"], f"{tmp / 'empty'}: no image files found"),
        (["--init", weights, "--arch", "resnet18", "--out", tmp / "taken.pt"],
         f"{tmp / 'taken.pt'} exists; choose another --out (nothing was written)"),
        (["--init", weights, "--arch", "resnet18", "--max-images", 0], "--max-images must be >= 1, got 0"),
    ]


def test_bad_input_is_one_line_and_writes_nothing(resnet18_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out.pt"
    for args, message in _bad_inputs(tmp_path, resnet18_weights):
        r = run("encoder", *args, *([] if "--out" in args else ["--out", out]), "--image-size", SIZE, "--device", "cpu")
        assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, (args, r.output)
        assert r.output.startswith(f"error: {message}"), (args, r.output)
        assert not out.exists() and (tmp_path / "taken.pt").read_bytes() == b"mine"

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.models, "get_weight", offline)
    r = run("encoder", "--init", "imagenet", "--arch", "resnet18", "--out", out, "--device", "cpu")
    assert r.exit_code == 1 and r.output == (
        "error: cannot download ImageNet weights for resnet18 (OSError); pass --init PATH with a local torchvision weights file\n")
    assert not out.exists()


def test_training_from_weights_feeds_them_as_imagenet_did(resnet18_weights: Path, image_folder: Path, tmp_path: Path) -> None:
    """``retrieval train --init``: the weights are adapted with inputs normalised as in their own
    training (ImageNet's statistics), not with the collection's; a run from random weights
    keeps the collection's own."""
    from simclr.config import TrainConfig
    from simclr.encoder import channel_stats
    from simclr.train import train

    common = dict(data=str(image_folder), arch="resnet18", stem="standard", width=64, image_size=SIZE, batch_size=16,
                  epochs=1, head_hidden=32, head_out=16, knn_every=0, progress=False, device="cpu", whiten=False)
    adapted = train(TrainConfig(out=str(tmp_path / "a"), init=str(resnet18_weights), **common))
    spec = Encoder.load(adapted.encoder).spec
    assert spec.mean == pytest.approx(IMAGENET_MEAN) and spec.std == pytest.approx(IMAGENET_STD)
    scratch = train(TrainConfig(out=str(tmp_path / "r"), **common))
    own_mean, own_std = channel_stats(load_images(str(image_folder), size=SIZE).images)
    spec = Encoder.load(scratch.encoder).spec
    # (the trainer measures them on images decoded at its load size: close to these, not equal)
    assert spec.mean == pytest.approx(own_mean, abs=0.02) and spec.std == pytest.approx(own_std, abs=0.02)
    assert spec.mean != pytest.approx(IMAGENET_MEAN, abs=0.05)
