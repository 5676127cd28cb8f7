"""PCA whitening of encoder features: against a naive numpy reference, and through the encoder file."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from simclr import whitening
from simclr.checkpoint import safe_load
from simclr.config import TrainConfig
from simclr.encoder import Encoder, embed_images
from simclr.errors import SimCLRError
from simclr.train import train
from simclr.whitening import fit_whitening
from tests.helpers import TINY


def _correlated(n: int = 4000, d: int = 6, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) * np.array([10.0, 5.0, 2.0, 1.0, 0.3, 0.05])[:, None]
    return rng.normal(size=(n, d)) @ mix + rng.normal(size=d) * 3


def test_whitened_covariance_matches_a_naive_reference() -> None:
    x = _correlated()
    shrink = 1e-3
    mean, matrix = fit_whitening(torch.from_numpy(x), shrink)
    # Naive: the covariance's eigen-decomposition in numpy; in the principal axes the whitened
    # covariance is l / (l + shrink * l_max).
    centred = x - x.mean(0)
    cov = centred.T @ centred / len(x)
    evals = np.linalg.eigvalsh(cov)
    expected = np.sort(evals / (evals + shrink * evals.max()))
    y = (torch.from_numpy(x).float() - mean) @ matrix
    got_cov = np.cov(y.double().numpy().T, bias=True)
    assert np.allclose(mean.numpy(), x.mean(0), atol=1e-4)
    assert np.allclose(np.sort(np.linalg.eigvalsh(got_cov)), expected, atol=2e-3)
    assert np.allclose(got_cov, np.diag(np.diag(got_cov)), atol=2e-3)  # decorrelated
    # With almost no shrinkage the whitened features have the identity covariance.
    mean, matrix = fit_whitening(torch.from_numpy(x), 1e-9)
    y = (torch.from_numpy(x).float() - mean) @ matrix
    assert np.allclose(np.cov(y.double().numpy().T, bias=True), np.eye(6), atol=1e-2)


@pytest.mark.parametrize(
    ("features", "shrink", "message"),
    [(torch.ones(1, 4), 1e-4, "at least 2"), (torch.randn(10, 4), 0.0, "positive"), (torch.ones(10, 4), 1e-4, "vary")],
)
def test_bad_whitening_input_is_named(features: torch.Tensor, shrink: float, message: str) -> None:
    with pytest.raises(SimCLRError, match=message):
        fit_whitening(features, shrink)


def test_can_whiten_needs_500_images_or_ten_a_dimension(tiny_encoder: Path) -> None:
    assert whitening.can_whiten(500, 1792) and not whitening.can_whiten(499, 1792)
    assert whitening.can_whiten(320, 32) and not whitening.can_whiten(319, 32)  # 10 a dimension is fewer
    with pytest.raises(SimCLRError, match=r"499 images are too few .* 64-d features \(at least 500\)"):
        Encoder.load(tiny_encoder).fit_whitening(torch.zeros(499, 3, 32, 32, dtype=torch.uint8))


def test_with_fewer_than_ten_images_a_dimension_only_the_leading_directions_are_whitened() -> None:
    # 300 images of 100-d features: the 30 leading directions are whitened as usual, the 70 that
    # 300 images cannot estimate are scaled like the 30th, not blown up to unit variance.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 100)) * np.geomspace(10.0, 0.01, 100)
    shrink = 1e-4
    mean, matrix = fit_whitening(torch.from_numpy(x), shrink)
    centred = x - x.mean(0)
    evals, evecs = np.linalg.eigh(centred.T @ centred / len(x))
    evals = np.clip(evals, 0, None)
    raised = np.maximum(evals, evals[-30])
    naive = evecs / np.sqrt(raised + shrink * evals.max())
    y = (torch.from_numpy(x).float() - mean) @ matrix
    assert np.allclose(np.abs(y.double().numpy()), np.abs(centred @ naive), atol=1e-3)  # (eigenvectors up to sign)
    variances = np.sort(np.var(y.double().numpy(), axis=0))[::-1]
    assert np.allclose(variances[:30], 1.0, atol=0.02)  # the trusted directions: whitened
    assert variances[30:].max() < 1.0 and variances[-1] < 1e-3  # the rest: no louder than the 30th
    # From 10 images a dimension on, nothing is raised: the plain whitening of the reference test.
    plain = x[:, :30]
    mean, matrix = fit_whitening(torch.from_numpy(plain), 1e-9)
    y = (torch.from_numpy(plain).float() - mean) @ matrix
    assert np.allclose(np.cov(y.double().numpy().T, bias=True), np.eye(30), atol=1e-2)


@pytest.mark.parametrize("dim", [64, 512, 2048])
def test_the_default_sample_is_always_large_enough(dim: int) -> None:
    # ResNet-50's 2,048-d features need 20,480 images, more than the usual 10,000.
    n = whitening.fit_sample_size(dim)
    assert whitening.can_whiten(n, dim) and n >= whitening.FIT_IMAGES
    assert whitening.evenly_spaced(torch.arange(3 * n), n).tolist() == list(range(0, 3 * n, 3))


@pytest.mark.parametrize("n, count", [(15, 10), (19, 10), (29, 10), (10, 10), (7, 10), (1, 3), (0, 5), (100, 1)])
def test_evenly_spaced_rows_reach_across_the_whole_collection(n: int, count: int) -> None:
    # A folder read class by class: the rows must come from every part of it, not its start.
    got = whitening.evenly_spaced_positions(n, count).tolist()
    naive = sorted({int(i * n / count) for i in range(count)} if n > count else set(range(n)))
    assert got == naive and len(got) == min(n, count)
    if n > count:  # the last pick lies in the last n / count rows
        assert got[-1] >= n - n / count - 1
    assert whitening.evenly_spaced(torch.arange(n) * 2, count).tolist() == [2 * p for p in got]


def _whitened_encoder(tiny_encoder: Path) -> Encoder:
    enc = Encoder.load(tiny_encoder)
    enc.set_whitening(None, None)
    enc.fit_whitening(torch.randint(0, 256, (700, 3, 32, 32), dtype=torch.uint8), max_images=700)
    return enc


def test_embedding_is_the_whitened_normalised_feature(tiny_encoder: Path, tmp_path: Path) -> None:
    enc = _whitened_encoder(tiny_encoder)
    x = torch.randint(0, 256, (9, 3, 32, 32), dtype=torch.uint8)
    feats = enc.features(x)
    naive = F.normalize((feats - enc.white_mean) @ enc.white_matrix, dim=1)
    assert torch.allclose(enc.embed(x), naive, atol=1e-6)
    assert not torch.allclose(enc.embed(x), F.normalize(feats, dim=1), atol=1e-2)
    # Saved and loaded, the encoder embeds the same; without a whitening, the plain normalised features.
    enc.save(tmp_path / "white.pt")
    again = Encoder.load(tmp_path / "white.pt")
    assert again.whitened and torch.allclose(again.embed(x), enc.embed(x), atol=1e-6)
    enc.set_whitening(None, None)
    enc.save(tmp_path / "plain.pt")
    plain = Encoder.load(tmp_path / "plain.pt")
    assert not plain.whitened and torch.allclose(plain.embed(x), F.normalize(feats, dim=1), atol=1e-6)


def test_malformed_whitening_in_an_encoder_file_is_refused(tiny_encoder: Path, tmp_path: Path) -> None:
    obj = safe_load(tiny_encoder)
    dim = Encoder.load(tiny_encoder).dim
    for bad, message in (({"mean": torch.zeros(dim), "matrix": torch.eye(dim + 1)}, "does not fit"),
                         ({"mean": torch.zeros(dim)}, "malformed"),
                         ({"mean": torch.full((dim,), float("nan")), "matrix": torch.eye(dim)}, "not finite")):
        torch.save({**obj, "whitening": bad}, tmp_path / "bad.pt")
        with pytest.raises(SimCLRError, match=message):
            Encoder.load(tmp_path / "bad.pt")


def test_training_writes_a_whitened_encoder_and_the_monitor_uses_it(image_folder: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from simclr.data import load_folder
    from simclr.knn import knn_evaluate
    from simclr.encoder import ENCODER_FILE as ENCODER

    monkeypatch.setattr(whitening, "MIN_IMAGES_PER_DIM", 0.5)  # 48 images, 64-d features
    result = train(TrainConfig(data=str(image_folder), out=str(tmp_path / "w"), **{**TINY, "knn_every": 1, "knn_k": 5}))
    enc = Encoder.load(result.encoder)
    assert enc.whitened
    # The monitor's figure is the saved encoder's: same gallery (all but every tenth image), same
    # queries, decoded as an index decodes them (at the encoder's size, not training's load size).
    data = load_folder(image_folder, size=enc.spec.image_size)
    feats = embed_images(enc, data.images)
    q = torch.arange(len(data)) % 10 == 0
    r = knn_evaluate(feats[q], data.labels[q], feats[~q], data.labels[~q], len(data.classes), 5, 0.07)
    assert r.top1 == pytest.approx(result.knn_top1)
    plain = train(TrainConfig(data=str(image_folder), out=str(tmp_path / "p"), **{**TINY, "whiten": False}))
    assert not Encoder.load(tmp_path / "p" / ENCODER).whitened and plain.encoder.exists()


def test_too_few_images_leave_the_encoder_unwhitened(tiny_encoder: Path) -> None:
    # 48 training images cannot fit a whitening of 64-d features (500 needed).
    assert not Encoder.load(tiny_encoder).whitened
