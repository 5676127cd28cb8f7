"""How the encoder pools the backbone's maps (global, or stages 2 and 3 on a grid beside the last),
and averages an image's features with its mirror image's."""

from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from simclr.checkpoint import atomic_save, safe_load
from simclr.config import TrainConfig
from simclr.encoder import Encoder, EncoderSpec
from simclr.errors import SimCLRError
from simclr.models import build_backbone
from simclr.pooling import pooled_dim, pooled_features
from simclr.train import CHECKPOINT, Trainer, train
from tests.helpers import TINY


def naive_pooled(backbone: torch.nn.Module, x: torch.Tensor, grids: tuple[int, int]) -> torch.Tensor:
    """Stage outputs caught by hooks on torchvision's own forward; stages 2 and 3 averaged over
    each cell of a g x g grid by slicing (cell i spans floor(i n / g) to ceil((i + 1) n / g), so
    a side that g does not divide shares its boundary rows), stage 4 over everything."""
    maps = {}
    hooks = [getattr(backbone, f"layer{i}").register_forward_hook(lambda m, a, out, i=i: maps.__setitem__(i, out))
             for i in (2, 3, 4)]
    backbone(x)
    for h in hooks:
        h.remove()
    def cells(n: int, g: int) -> list[slice]:
        return [slice(i * n // g, -(-(i + 1) * n // g)) for i in range(g)]

    parts = []
    for i, g in zip((2, 3), grids):
        m = maps[i]
        quads = [m[:, :, r, c] for r in cells(m.shape[2], g) for c in cells(m.shape[3], g)]
        parts.append(torch.stack([q.mean((2, 3)) for q in quads], 2).flatten(1))  # channel-major, as flatten(1) of (C, g, g)
    parts.append(maps[4].mean((2, 3)))
    return torch.cat(parts, 1)


@pytest.mark.parametrize("arch,stem,width,size", [("resnet18", "small", 16, 28), ("resnet18", "standard", 8, 64),
                                                  ("resnet50", "small", 8, 16)])
def test_multiscale_features_are_the_stage_maps_pooled_on_a_grid(arch: str, stem: str, width: int, size: int) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(arch, 3, stem, width).eval()
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        got = pooled_features(backbone, x, "multiscale")
        assert torch.allclose(got, naive_pooled(backbone, x, (2, 2)), atol=1e-5)
        assert got.shape == (3, pooled_dim(backbone, "multiscale"))
        pyramid = pooled_features(backbone, x, "pyramid")  # stage 2 on 4 x 4
        assert torch.allclose(pyramid, naive_pooled(backbone, x, (4, 2)), atol=1e-5)
        assert pyramid.shape == (3, pooled_dim(backbone, "pyramid"))
        # global pooling is the backbone as it is (what the projection head sees in training)
        assert torch.equal(pooled_features(backbone, x, "global"), backbone(x))
        assert pooled_dim(backbone, "global") == backbone.feature_dim


def test_the_cpu_recipe_s_embedding_is_512_d() -> None:
    # width 16, small stem: 4 x 32 (stage 2) + 4 x 64 (stage 3) + 128 (stage 4)
    assert pooled_dim(build_backbone("resnet18", 1, "small", 16), "multiscale") == 512
    # the CPU photo profile's network, width 32: 16 x 64 (stage 2) + 4 x 128 (stage 3) + 256 (stage 4)
    assert pooled_dim(build_backbone("resnet18", 3, "standard", 32), "pyramid") == 1792


@pytest.mark.parametrize("pooling,grids", [("multiscale", (2, 2)), (None, (4, 2))])
def test_a_run_writes_an_encoder_that_embeds_with_its_pooling(image_folder: Path, tmp_path: Path, pooling: str | None,
                                                              grids: tuple[int, int]) -> None:
    # None: a folder's defaults on a CPU (the photo profile), the pyramid, averaged with the
    # mirror image's
    cfg = TrainConfig(data=str(image_folder), out=str(tmp_path / "run"),
                      **{**TINY, "pooling": pooling, "flip_average": None if pooling is None else False})
    enc = Encoder.load(train(cfg).encoder)
    name = pooling or "pyramid"
    assert enc.spec.pooling == name and enc.dim == pooled_dim(enc.backbone, name)
    assert enc.spec.flip_average == (pooling is None)
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    feats = enc.features(x)
    naive = naive_pooled(enc.backbone, enc.preprocess(x), grids)
    if enc.spec.flip_average:
        naive = (naive + naive_pooled(enc.backbone, enc.preprocess(x).flip(-1), grids)) / 2
    assert torch.allclose(feats, naive, atol=1e-5)
    emb = enc.embed(x)
    assert emb.shape == (5, enc.dim) and torch.allclose(emb.norm(dim=1), torch.ones(5))


def test_a_mirror_averaged_encoder_embeds_an_image_and_its_mirror_alike(tiny_encoder: Path, tmp_path: Path) -> None:
    plain = Encoder.load(tiny_encoder)
    mirrored = Encoder.load(tiny_encoder)
    mirrored.set_flip_average(True)
    x = torch.randint(0, 256, (4, 3, 20, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert torch.allclose(mirrored.features(x), (plain.features(x) + plain.features(x.flip(-1))) / 2, atol=1e-6)
    assert torch.allclose(mirrored.embed(x), mirrored.embed(x.flip(-1)), atol=1e-5)
    assert not torch.allclose(plain.embed(x), plain.embed(x.flip(-1)), atol=1e-3)  # what the averaging adds
    mirrored.save(tmp_path / "m.pt")
    assert Encoder.load(tmp_path / "m.pt").spec.flip_average
    # files written before the option embed each image as it is
    obj = safe_load(tiny_encoder)
    del obj["spec"]["flip_average"]
    atomic_save(obj, tmp_path / "old.pt")
    assert not Encoder.load(tmp_path / "old.pt").spec.flip_average


def test_a_resumed_run_keeps_its_embedding_unless_told_otherwise(image_folder: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(data=str(image_folder), out=str(tmp_path / "run"),
                      **{**TINY, "pooling": "multiscale", "flip_average": False})
    train(cfg)
    more = {k: v for k, v in TINY.items() if k not in ("pooling", "flip_average")}
    # a folder's CPU defaults are the pyramid, mirror-averaged: resuming without the options
    # keeps the run's own
    resumed = Trainer(TrainConfig(data=str(image_folder), out=cfg.out, **more), resume=True, explicit=set(more))
    assert (resumed.cfg.pooling, resumed.cfg.flip_average) == ("multiscale", False)
    told = Trainer(TrainConfig(data=str(image_folder), out=cfg.out, **{**more, "pooling": "pyramid", "flip_average": True}),
                   resume=True, explicit={*more, "pooling", "flip_average"})
    assert (told.cfg.pooling, told.cfg.flip_average) == ("pyramid", True) and told.encoder().spec.flip_average
    # a checkpoint from before the options pooled globally and embedded each image as it is
    state = safe_load(tmp_path / "run" / CHECKPOINT)
    del state["config"]["pooling"], state["config"]["flip_average"]
    atomic_save(state, tmp_path / "run" / CHECKPOINT)
    old = Trainer(TrainConfig(data=str(image_folder), out=cfg.out, **more), resume=True, explicit=set(more))
    assert (old.cfg.pooling, old.cfg.flip_average) == ("global", False)
    assert old.embed_dim == pooled_dim(old.encoder().backbone, "global")


def test_an_encoder_file_from_before_pooling_was_recorded_pools_globally(tiny_encoder: Path, tmp_path: Path) -> None:
    obj = safe_load(tiny_encoder)
    del obj["spec"]["pooling"]
    atomic_save(obj, tmp_path / "old.pt")
    old = Encoder.load(tmp_path / "old.pt")
    assert old.spec.pooling == "global"
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(old.embed(x), Encoder.load(tiny_encoder).embed(x))


def test_an_unknown_pooling_or_a_dimension_that_does_not_fit_is_named(tiny_encoder: Path, tmp_path: Path) -> None:
    obj = safe_load(tiny_encoder)
    obj["spec"]["pooling"] = "max"
    atomic_save(obj, tmp_path / "bad.pt")
    with pytest.raises(SimCLRError, match=r"bad.pt: unknown pooling 'max'; known: global, multiscale, pyramid"):
        Encoder.load(tmp_path / "bad.pt")
    obj["spec"]["pooling"] = "multiscale"  # the stored feature_dim is the global one's
    atomic_save(obj, tmp_path / "bad.pt")
    with pytest.raises(SimCLRError, match=r"bad.pt: encoder description says \d+-d features, but resnet18 .* multiscale pooling gives \d+"):
        Encoder.load(tmp_path / "bad.pt")
    with pytest.raises(SimCLRError, match="unknown pooling 'avg'"):
        TrainConfig(pooling="avg").validate()
    spec = EncoderSpec(**{**asdict(Encoder.load(tiny_encoder).spec), "pooling": "nope"})
    with pytest.raises(SimCLRError, match="unknown pooling 'nope'"):
        Encoder(spec)
