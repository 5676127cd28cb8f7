"""How the encoder pools the backbone's maps: global, or multi-scale (stages 2 and 3 on a grid)."""

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
from simclr.train import train
from tests.helpers import TINY


def naive_multiscale(backbone: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Stage outputs caught by hooks on torchvision's own forward; stages 2 and 3 averaged over
    each quadrant by slicing, stage 4 over everything."""
    maps = {}
    hooks = [getattr(backbone, f"layer{i}").register_forward_hook(lambda m, a, out, i=i: maps.__setitem__(i, out))
             for i in (2, 3, 4)]
    backbone(x)
    for h in hooks:
        h.remove()
    def halves(n: int) -> list[slice]:  # an odd side's middle row or column belongs to both halves
        return [slice(0, -(-n // 2)), slice(n // 2, n)]

    parts = []
    for i in (2, 3):
        m = maps[i]
        quads = [m[:, :, r, c] for r in halves(m.shape[2]) for c in halves(m.shape[3])]
        parts.append(torch.stack([q.mean((2, 3)) for q in quads], 2).flatten(1))  # channel-major, as flatten(1) of (C, 2, 2)
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
        assert torch.allclose(got, naive_multiscale(backbone, x), atol=1e-5)
        assert got.shape == (3, pooled_dim(backbone, "multiscale"))
        # global pooling is the backbone as it is (what the projection head sees in training)
        assert torch.equal(pooled_features(backbone, x, "global"), backbone(x))
        assert pooled_dim(backbone, "global") == backbone.feature_dim


def test_the_cpu_recipe_s_embedding_is_512_d() -> None:
    # width 16, small stem: 4 x 32 (stage 2) + 4 x 64 (stage 3) + 128 (stage 4)
    assert pooled_dim(build_backbone("resnet18", 1, "small", 16), "multiscale") == 512


def test_a_run_with_multiscale_pooling_writes_an_encoder_that_embeds_with_it(image_folder: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(data=str(image_folder), out=str(tmp_path / "run"), **{**TINY, "pooling": "multiscale"})
    enc = Encoder.load(train(cfg).encoder)
    assert enc.spec.pooling == "multiscale" and enc.dim == pooled_dim(enc.backbone, "multiscale")
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    feats = enc.features(x)
    assert torch.allclose(feats, naive_multiscale(enc.backbone, enc.preprocess(x)), atol=1e-5)
    emb = enc.embed(x)
    assert emb.shape == (5, enc.dim) and torch.allclose(emb.norm(dim=1), torch.ones(5))


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
    with pytest.raises(SimCLRError, match=r"bad.pt: unknown pooling 'max'; known: global, multiscale"):
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
