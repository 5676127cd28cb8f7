import numpy as np
import pytest

from retrieval.anomaly import Calibration, auroc, knn_distance, leave_one_out
from retrieval.errors import RetrievalError
from tests.helpers import one_kind, product_range


def naive_auroc(scores, labels) -> float:
    pos = [s for s, l in zip(scores, labels) if l]
    neg = [s for s, l in zip(scores, labels) if not l]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_matches_pairwise_count_with_ties() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60).astype(float)  # many ties
    labels = rng.random(60) < 0.3
    assert auroc(scores, labels) == pytest.approx(naive_auroc(scores, labels))
    assert auroc(np.array([0.1, 0.2, 0.9]), np.array([False, False, True])) == 1.0
    with pytest.raises(RetrievalError):
        auroc(np.array([1.0]), np.array([True]))


def test_knn_distance_is_mean_cosine_distance() -> None:
    sims = np.array([[0.9, 0.7, 0.1], [1.0, -np.inf, -np.inf]], dtype=np.float32)
    np.testing.assert_allclose(knn_distance(sims, 2), [(0.1 + 0.3) / 2, 0.0], atol=1e-6)


def test_leave_one_out_drops_the_item_itself() -> None:
    sims = np.array([[1.0, 0.8, 0.6], [0.9, 0.9, 0.5]], dtype=np.float32)
    ids = np.array([[3, 1, 2], [5, 7, 9]])
    scores = leave_one_out(sims, ids, np.array([3, 7]), 2)
    np.testing.assert_allclose(scores, [(0.2 + 0.4) / 2, (0.1 + 0.5) / 2], atol=1e-6)


def test_calibration_percentiles_and_threshold() -> None:
    cal = Calibration(5, np.arange(100, dtype=np.float32), percentile=90)
    assert cal.threshold == pytest.approx(89.1)
    np.testing.assert_allclose(cal.percentile_of(np.array([-1.0, 49.0, 1000.0])), [0, 50, 100])
    with pytest.raises(RetrievalError, match="percentile"):
        Calibration(5, np.zeros(3), percentile=100)


def test_constructed_anomalies_are_found() -> None:
    """Normal items on a small cap of the sphere, anomalies spread elsewhere: AUROC near 1."""
    from simclr.knn import topk_neighbours
    import torch

    rng = np.random.default_rng(1)
    centre = np.zeros(16)
    centre[0] = 1
    normal = centre + 0.2 * rng.normal(size=(300, 16))
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    test_normal = centre + 0.2 * rng.normal(size=(50, 16))
    anomalies = rng.normal(size=(50, 16))
    queries = np.concatenate([test_normal, anomalies])
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    sims, _ = topk_neighbours(torch.tensor(queries, dtype=torch.float32), torch.tensor(normal, dtype=torch.float32), 5)
    scores = knn_distance(sims.numpy(), 5)
    assert auroc(scores, np.r_[np.zeros(50, bool), np.ones(50, bool)]) > 0.97



def test_gallery_whitened_distance_finds_what_cosine_after_whitening_misses() -> None:
    """The index's anomaly space against the old score (cosine on features whitened on the same
    collection, then normalised), leave-one-out over one homogeneous collection."""
    from retrieval.anomaly import WHITENED, AnomalySpace, mean_distance
    from retrieval.anomaly_eval import knn_l2

    feats, is_anomaly = one_kind()
    space = AnomalySpace.fit(feats[~is_anomaly], shrinkage=1e-2)
    assert space.kind == WHITENED
    z = space.transform(feats)
    d = knn_l2(z, z, 6)[:, 1:]  # each item's own zero distance left out
    new = auroc(mean_distance(d, 5), is_anomaly)
    # The old score: the same whitening, then L2-normalised and compared by cosine.
    unit = z / np.linalg.norm(z, axis=1, keepdims=True)
    sims = np.sort(unit @ unit.T, axis=1)[:, ::-1][:, 1:]
    old = auroc(knn_distance(sims, 5), is_anomaly)
    assert new > 0.97 and old < 0.75, (new, old)


def test_anomaly_space_is_a_whitening_of_the_gallery() -> None:
    from retrieval.anomaly import PLAIN, AnomalySpace

    feats, _ = one_kind(n=2000)
    space = AnomalySpace.fit(feats, shrinkage=1e-6)
    z = space.transform(feats).astype(np.float64)
    assert np.allclose(z.mean(0), 0, atol=1e-3) and np.allclose(np.cov(z.T, bias=True), np.eye(16), atol=1e-3)
    # 4 items a dimension: still every direction whitened (the plain whitening the anomaly
    # scores were measured with, not the encoders' raising of the directions past n / 10).
    few = AnomalySpace.fit(feats[:64], shrinkage=1e-6)
    z = few.transform(feats[:64]).astype(np.float64)
    assert few.kind != PLAIN and np.allclose(np.cov(z.T, bias=True), np.eye(16), atol=1e-3)
    # Too few items (under 2 a dimension and under 500): raw features, as they are.
    small = AnomalySpace.fit(feats[:20], shrinkage=1e-2)
    assert small.kind == PLAIN and np.array_equal(small.transform(feats[:3]), feats[:3])
    assert "too few" in small.describe()
    with pytest.raises(RetrievalError, match="shrinkage must be positive"):
        AnomalySpace.fit(feats, shrinkage=0)


def test_a_gallery_under_two_items_a_dimension_whitens_the_directions_it_can_estimate() -> None:
    """600 items of 400-d features: the 300 leading directions of their covariance whitened,
    the other 100 scaled like the 300th (against a numpy reference), and a defect along a
    direction where the gallery barely varies ranked far above where raw features rank it."""
    from retrieval.anomaly import AnomalySpace

    rng = np.random.default_rng(0)
    scales = np.geomspace(10.0, 0.01, 400)
    basis = np.linalg.qr(rng.normal(size=(400, 400)))[0]
    make = lambda n: (rng.normal(size=(n, 400)) * scales) @ basis.T + 5.0  # noqa: E731
    gallery = make(600)
    space = AnomalySpace.fit(gallery, shrinkage=1e-6)
    assert space.kind != "plain" and "its 300 leading directions of 400" in space.describe()
    centred = gallery - gallery.mean(0)
    values, vectors = np.linalg.eigh(centred.T @ centred / 600)
    values = np.clip(values, 0, None)
    floored = np.maximum(values, values[-300])
    reference = centred @ (vectors / np.sqrt(floored + 1e-6 * values.max()))
    np.testing.assert_allclose(space.transform(gallery), reference, rtol=1e-3, atol=1e-3 * np.abs(reference).max())
    # Normal queries, and queries with a defect of size 1 along the gallery's quietest direction.
    normal, defect = make(200), make(200) + basis[:, -1]
    is_anomaly = np.r_[np.zeros(200, bool), np.ones(200, bool)]

    def score(x: np.ndarray, g: np.ndarray) -> np.ndarray:
        d = np.sqrt(((x[:, None, :] - g[None, :, :]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, :5].mean(1)

    queries = np.r_[normal, defect]
    whitened = auroc(score(space.transform(queries), space.transform(gallery)), is_anomaly)
    raw = auroc(score(queries, gallery), is_anomaly)
    assert whitened > 0.95 and raw < 0.65, (whitened, raw)


def test_appending_a_new_kind_of_image_is_noted_and_more_of_the_same_is_not() -> None:
    """Appended items scored against the gallery as it was: more of the same kind pass the
    threshold about as often as the gallery's own items; items shifted away from the kind do
    not, and the note says to rebuild."""
    from index.ann import L2Table
    from retrieval.anomaly import AnomalySpace, append_drift_note, calibrate
    from tests.helpers import one_kind, product_range

    feats, _ = one_kind(seed=4, n=1400, anomalies=0, dim=16)
    gallery, same = feats[:1000], feats[1000:]
    space = AnomalySpace.fit(gallery, 1e-4)
    g = space.transform(gallery).astype(np.float16)

    class Store:  # what calibrate reads of an index
        class manifest:
            count = len(g)
    cal = calibrate(Store, 5, 99.0, L2Table(g), g)
    assert append_drift_note(g, space.transform(same).astype(np.float16), cal) is None
    shifted = same + np.linspace(3.0, 0.2, 16).astype(np.float32) * 2.5  # the same spread, moved off the mean
    note = append_drift_note(g, space.transform(shifted).astype(np.float16), cal)
    assert note is not None and note.endswith("rebuild the index (without --append) so that the space is fit on them too")
    share = int(note.split("%")[0])
    assert share > 50
    # A handful of appended images says nothing either way.
    assert append_drift_note(g, space.transform(shifted[:5]).astype(np.float16), cal) is None


def _broad_whitening(feats: np.ndarray):
    """The whitening an encoder trained on ``feats`` carries (fit on all of them)."""
    import torch

    from retrieval.anomaly import EncoderWhitening
    from simclr.whitening import fit_whitening

    mean, matrix = fit_whitening(torch.from_numpy(feats))
    return EncoderWhitening(mean.double().numpy(), matrix.double().numpy(), len(feats))


def _space_auroc(space, gallery: np.ndarray, queries: np.ndarray, is_anomaly: np.ndarray, whitening) -> float:
    from retrieval.anomaly import mean_distance
    from retrieval.anomaly_eval import knn_l2

    def mapped(f: np.ndarray) -> np.ndarray:
        return space.map(f, whitening.embed(f) if whitening is not None else None)

    return auroc(mean_distance(knn_l2(mapped(queries), mapped(gallery), 5), 5), is_anomaly)


def test_one_kind_of_a_product_range_is_scored_with_the_embedding_the_range_whitened() -> None:
    """An encoder trained on a whole product range, one product's items as the gallery: its
    whitening knows what sets the products apart, and the search embedding (that whitening,
    then normalised) whitened again on the gallery, beside the gallery-whitened raw features,
    ranks the other products above where those features alone rank them (the score before; the
    items that show their product least crowd near the range's centre, where raw features
    confuse them)."""
    from retrieval.anomaly import JOINT, AnomalySpace, fit_space

    feats, kinds = product_range()
    queries, query_kinds = product_range(seed=1, n=100)
    whitening = _broad_whitening(feats)
    gallery = feats[kinds == 0]
    space = fit_space(gallery, None, whitening, 1e-4)  # (the default: auto)
    assert space.input == JOINT and space.placement.offset > 20 and space.placement.part
    assert "beside the search embedding" in space.describe() and "one part of that collection" in space.describe()
    assert space.width(16) == 32 and space.map(gallery[:3], whitening.embed(gallery[:3])).shape == (3, 32)
    new = _space_auroc(space, gallery, queries, query_kinds != 0, whitening)
    old = _space_auroc(AnomalySpace.fit(gallery, 1e-4), gallery, queries, query_kinds != 0, None)
    assert new > 0.99 and old < 0.9, (new, old)
    # The gallery's own search vectors give the same space as its features do.
    from_vectors = fit_space(gallery, whitening.embed(gallery), whitening, 1e-4, "joined")
    np.testing.assert_allclose(from_vectors.embedding_part.matrix, space.embedding_part.matrix, rtol=1e-4, atol=1e-6)
    # Its first part is the space the features alone give, which --anomaly-space features keeps
    # (the placement recorded).
    np.testing.assert_array_equal(space.matrix, AnomalySpace.fit(gallery, 1e-4).matrix)
    alone = fit_space(gallery, None, whitening, 1e-4, "features")
    assert alone.input == "features" and alone.embedding_part is None and alone.placement == space.placement
    assert "one part of that collection" in alone.describe() and "as --anomaly-space features asks" in alone.describe()
    # An index built before the reach was recorded says so, and gives no verdict.
    from retrieval.anomaly import Placement

    old = Placement(space.placement.offset, None)
    assert not old.part and old.describe().endswith("(its reach was not recorded: the index was built before it was)")


def test_a_gallery_sampled_from_the_encoders_own_collection_keeps_raw_features() -> None:
    """Where the gallery is what the encoder's whitening was fit on (or a sample of it: a
    one-kind collection, or the whole range), the space is the one fit on raw features, as
    before; its offset from the whitening's centre is what sampling gives (about 1)."""
    from retrieval.anomaly import FEATURES, JOINT, AnomalySpace, fit_space, place_gallery

    for feats in (one_kind(n=3000)[0], product_range()[0]):
        whitening = _broad_whitening(feats)
        for gallery in (feats, feats[::3], feats[1::7]):
            space = fit_space(gallery, None, whitening, 1e-4, "auto")
            assert space.input == FEATURES and space.placement.offset < 1.5, space.placement
            assert "a sample of that collection" in space.describe()
            np.testing.assert_array_equal(space.matrix, AnomalySpace.fit(gallery, 1e-4).matrix)
    # place_gallery against a naive reference. The offset: the squared distance of the two
    # centres in the whitening's units, over the gallery's own variance in them times
    # (1/n + 1/count). The reach: the items' mean squared distance from the whitening's centre
    # along the direction to the gallery's centre, in those units, less that same noise.
    feats, kinds = product_range()
    whitening = _broad_whitening(feats)
    g = feats[kinds == 2].astype(np.float64)
    w = (g - whitening.mean) @ whitening.matrix
    centred = w - w.mean(0)
    noise = (centred**2).sum() / (len(g) - 1) * (1 / len(g) + 1 / len(feats))
    offset = np.sum(w.mean(0) ** 2) / noise
    reach = np.mean((w @ (w.mean(0) / np.linalg.norm(w.mean(0)))) ** 2) - noise
    placed = place_gallery(g, whitening.mean, whitening.matrix, len(feats), batch=100)
    assert (placed.offset, placed.reach) == (pytest.approx(offset, rel=1e-6), pytest.approx(reach, rel=1e-6))
    # A part making up a share p of the collection reaches at most 1 / p (here 1 / 6).
    assert 1 < placed.reach <= 6 and placed.part
    # Without an encoder whitening there is nothing to compare with: raw features, and
    # "joined" is refused in one line naming why; so is an unknown mode.
    assert fit_space(g, None, None, mode="auto").input == FEATURES
    with pytest.raises(RetrievalError, match="needs an encoder with a whitening"):
        fit_space(g, None, None, mode="joined")
    with pytest.raises(RetrievalError, match="unknown anomaly space 'nonsense'; known: auto, features, joined"):
        fit_space(g, None, whitening, mode="nonsense")
    broken = g.copy()
    broken[5, 3] = np.nan
    with pytest.raises(RetrievalError, match="the encoder gave NaN or infinite features for the gallery"):
        fit_space(broken, None, whitening)
    # A gallery too small to whiten its own space cannot tell its own spread, on which the
    # offset's sampling noise rests (one item has none: its offset was 1e12, "shifted off"):
    # no placement, no verdict, raw features; "joined" still joins where asked.
    for few in (g[:1], g[:3]):
        space = fit_space(few, None, whitening, 1e-4, "auto")
        assert space.kind == "plain" and space.placement is None and space.input == FEATURES
        assert "collection" not in space.describe() and "too few to fit a whitening" in space.describe()
        assert fit_space(few, None, whitening, 1e-4, "joined").input == JOINT


def test_a_gallery_shifted_off_the_encoders_collection_keeps_raw_features() -> None:
    """The encoder's own kind under other light (every feature scaled, as darker photos scale
    them): its mean lies as far from the whitening's centre as a part of a broader collection's
    does, but it reaches beyond where any part of that collection could (a reach past 1 / p for
    every share p down to PART_REACH's), so auto keeps the raw features' space and says why;
    the same kind as it was, and one kind of a range, join."""
    from retrieval.anomaly import FEATURES, JOINT, PART_REACH, fit_space

    feats, _ = one_kind(n=3000, anomalies=0)
    whitening = _broad_whitening(feats)
    for light in (0.9, 0.8, 0.6):
        space = fit_space(feats * light, None, whitening, 1e-4)
        assert space.placement.offset > 100 and space.placement.reach > PART_REACH, (light, space.placement)
        assert space.input == FEATURES and "shifted off that collection" in space.describe()
        assert fit_space(feats * light, None, whitening, 1e-4, "joined").input == JOINT  # (asked for: joined)
    assert fit_space(feats, None, whitening, 1e-4).input == FEATURES  # a sample: nothing to join for
    feats, kinds = product_range()
    assert fit_space(feats[kinds == 4], None, _broad_whitening(feats), 1e-4).input == JOINT
