import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from index import IndexStore, Items
from retrieval.errors import RetrievalError
from retrieval.service import Options, QueryVectors, Service
from simclr.encoder import Encoder


@pytest.fixture(scope="module")
def service(tiny_index: Path) -> Service:
    return Service.open(tiny_index, device="cpu")


def test_a_file_finds_itself_first(service: Service, image_folder: Path) -> None:
    path = image_folder / "bars" / "bars_003.png"
    [answer] = service.ask([str(path)], Options(k=5))
    assert answer.error is None
    assert [h.rank for h in answer.hits] == [1, 2, 3, 4, 5]
    assert answer.hits[0].ref == str(path.resolve())
    assert answer.hits[0].similarity == pytest.approx(1.0, abs=1e-3)
    sims = [h.similarity for h in answer.hits]
    assert sims == sorted(sims, reverse=True)


def test_an_item_query_leaves_itself_out(service: Service) -> None:
    [answer] = service.ask(["id:4"], Options(k=3, classify=True, anomaly=True))
    assert 4 not in [h.id for h in answer.hits] and len(answer.hits) == 3
    assert answer.prediction is not None and answer.anomaly is not None


def test_unreadable_query_gets_an_error_and_the_others_are_answered(service: Service, image_folder: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    answers = service.ask([str(bad), str(image_folder / "checks" / "checks_000.png"), str(tmp_path / "missing.jpg")], Options(k=2))
    assert "not an image" in answers[0].error
    assert answers[1].error is None and len(answers[1].hits) == 2
    assert "file not found" in answers[2].error


def test_k_larger_than_the_index_answers_all_with_a_note(service: Service) -> None:
    [answer] = service.ask([Image.new("RGB", (20, 20), "blue")], Options(k=500))
    assert len(answer.hits) == 48
    assert "larger than the index" in answer.note


def test_pil_images_of_any_mode(service: Service) -> None:
    images = [Image.new(mode, (30, 20)) for mode in ("L", "RGBA", "CMYK", "I;16", "P", "1")]
    answers = service.ask(images, Options(k=1))
    assert all(a.error is None and len(a.hits) == 1 for a in answers)


def test_stream_answers_every_query_in_order(service: Service, image_folder: Path) -> None:
    files = [str(p) for p in sorted((image_folder / "stripes").iterdir())] * 5
    answers = list(service.ask_stream(iter(files), Options(k=1), batch_size=7))
    assert [a.query for a in answers] == files
    assert all(a.error is None for a in answers)


def test_another_encoder_is_refused_unless_forced(tiny_index: Path, tiny_encoder: Path, tmp_path: Path) -> None:
    other = Encoder.load(tiny_encoder)
    other.spec.trained_on = "something else"
    other.save(tmp_path / "other.pt")
    with pytest.raises(RetrievalError, match=r"sha256 [0-9a-f]{16}.*sha256 [0-9a-f]{16}.*--force"):
        Service.open(tiny_index, tmp_path / "other.pt")
    assert Service.open(tiny_index, tmp_path / "other.pt", force=True).store.manifest.count == 48


def _hand_made(tiny_encoder: Path) -> Service:
    # Four labelled items at angles 0, 10, 20 and 90 degrees in a plane (the rest of the
    # dimensions zero), so that similarities to a query at 0 degrees are cosines.
    enc = Encoder.load(tiny_encoder)
    angles = np.radians([0.0, 10.0, 20.0, 90.0])
    vecs = np.zeros((4, enc.dim), np.float32)
    vecs[:, 0], vecs[:, 1] = np.cos(angles), np.sin(angles)
    items = Items([f"item{i}" for i in range(4)], ["cat", "dog", "dog", "cat"], ["a", "b", "c", "d"])
    return Service(IndexStore.build(vecs, items, enc.checksum, factory="Flat"), enc)  # exact float32 cosines


def test_weighted_knn_against_a_hand_computed_example(tiny_encoder: Path) -> None:
    service = _hand_made(tiny_encoder)
    q = np.zeros((1, service.encoder.dim), np.float32)
    q[0, 0] = 1.0
    [a] = service.answer_vectors(["q"], QueryVectors(q, None, [None], [None]), Options(k=3, classify=True, knn_k=3, temperature=0.5))
    w = {c: math.exp(c / 0.5) for c in (1.0, math.cos(math.radians(10)), math.cos(math.radians(20)))}
    cat = w[1.0]
    dog = w[math.cos(math.radians(10))] + w[math.cos(math.radians(20))]
    assert a.prediction.label == "dog"
    assert a.prediction.probabilities["dog"] == pytest.approx(dog / (cat + dog), abs=1e-5)
    assert a.prediction.probabilities["cat"] == pytest.approx(cat / (cat + dog), abs=1e-5)
    assert [h.ref for h in a.hits] == ["item0", "item1", "item2"]


def test_anomaly_verdict_uses_the_calibration(tiny_encoder: Path) -> None:
    service = _hand_made(tiny_encoder)
    q = np.zeros((2, service.encoder.dim), np.float32)
    q[0, 0] = 1.0  # on top of item0
    q[1, 2] = 1.0  # orthogonal to every item
    answers = service.answer_vectors(["near", "far"], QueryVectors(q, None, [None] * 2, [None] * 2),
                                     Options(k=1, anomaly=True, anomaly_k=2))
    near, far = answers[0].anomaly, answers[1].anomaly
    assert near.score == pytest.approx((0 + 1 - math.cos(math.radians(10))) / 2, abs=1e-5)
    assert far.score == pytest.approx(1.0, abs=1e-5)
    assert not near.unusual and far.unusual and far.percentile == 100.0


def _naive_drop_own(sims: np.ndarray, ids: np.ndarray, own: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row by row: drop the row's own id if present (else the last column), keep k columns."""
    out_s, out_i = [], []
    for s, i, o in zip(sims, ids, own):
        pos = [j for j, v in enumerate(i) if o >= 0 and v == o]
        drop = pos[0] if pos else len(i) - 1
        keep = [j for j in range(len(i)) if j != drop][:k]
        out_s.append(s[keep]), out_i.append(i[keep])
    return np.array(out_s), np.array(out_i)


def test_dropping_own_ids_when_an_approximate_index_leaves_empty_slots() -> None:
    from retrieval.anomaly import drop_own

    # Row 0 is a file query (no own id) with two empty slots; row 1 is item 5 with one.
    sims = np.array([[0.9, 0.5, -np.inf, -np.inf], [0.99, 0.7, 0.6, -np.inf]], np.float32)
    ids = np.array([[3, 8, -1, -1], [5, 2, 9, -1]])
    own = np.array([-1, 5])
    got_s, got_i = drop_own(sims, ids, own, 3)
    want_s, want_i = _naive_drop_own(sims, ids, own, 3)
    assert np.array_equal(got_i, want_i) and np.array_equal(got_s, want_s)
    assert got_i.tolist() == [[3, 8, -1], [2, 9, -1]]


def test_an_other_k_is_calibrated_at_the_index_percentile(tiny_encoder: Path, image_folder: Path, tmp_path: Path) -> None:
    from retrieval.anomaly import calibrate
    from retrieval.build import IndexConfig, build_index

    out = tmp_path / "idx"
    build_index(IndexConfig(source=str(image_folder), out=str(out), encoder=str(tiny_encoder), workers=0,
                            progress=False, percentile=80.0))
    service = Service.open(out, device="cpu")
    [a] = service.ask([str(image_folder / "bars" / "bars_000.png")], Options(k=1, anomaly=True, anomaly_k=3))
    space = (service.anomaly_table(), service.store.arrays["anomaly_vectors"])
    expected = calibrate(service.store, 3, 80.0, *space).threshold
    assert a.anomaly.k == 3 and a.anomaly.threshold == pytest.approx(expected)
    assert a.anomaly.threshold != pytest.approx(calibrate(service.store, 3, 99.0, *space).threshold)


def test_a_one_kind_index_ranks_its_planted_anomalies_on_top(tiny_encoder: Path) -> None:
    """Service wiring of the anomaly space: a gallery of one kind of thing, queries that are
    either more of it or far from its mean; leave-one-out calibration in the same space."""
    from retrieval.build import _fit_anomaly_space
    from retrieval.anomaly import auroc
    from tests.helpers import one_kind

    enc = Encoder.load(tiny_encoder)
    d = enc.dim
    feats, is_anomaly = one_kind(seed=3, n=600, anomalies=20, dim=d)
    gallery = feats[:400]  # normal items only
    vecs = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    store = IndexStore.build(vecs, Items([f"g{i}" for i in range(400)], [None] * 400, [str(i) for i in range(400)]), enc.checksum)
    _fit_anomaly_space(store, gallery, vecs, None, 1e-2)
    service = Service(store, enc)
    queries = feats[400:]
    unit = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    qv = QueryVectors(unit, service.space.transform(queries), [None] * len(queries), [None] * len(queries))
    answers = service.answer_vectors([str(i) for i in range(len(queries))], qv, Options(k=1, anomaly=True))
    scores = np.array([a.anomaly.score for a in answers])
    assert auroc(scores, is_anomaly[400:]) > 0.97
    flagged = np.array([a.anomaly.unusual for a in answers])
    assert flagged[is_anomaly[400:]].mean() > 0.8 and flagged[~is_anomaly[400:]].mean() < 0.1
    # An item asked about by id is scored leave-one-out, like the calibration.
    [own] = service.ask(["id:7"], Options(k=1, anomaly=True))
    assert own.anomaly.percentile < 100


def test_an_index_of_one_kind_of_the_encoders_range_scores_in_the_search_embedding(tiny_encoder: Path, tmp_path: Path) -> None:
    """An encoder whose whitening was fit on all three kinds of pattern, an index of one kind
    built with ``--anomaly-space auto``: the build joins the search vectors (the whitening knows the other kinds) to the raw features
    in the anomaly space, stores that in the manifest and says it in ``retrieval info``; a query
    is mapped as the build mapped its items (an indexed file scores as its stored vector), and
    the other kinds score as unusual."""
    import torch

    from retrieval.anomaly import JOINT
    from retrieval.build import IndexConfig, build_index
    from retrieval.info import describe_folder
    from simclr.images import image_to_tensor
    from tests.helpers import CLASSES, pattern

    tints = {"bars": (1.0, 0.3, 0.3), "stripes": (0.3, 0.3, 1.0), "checks": (0.3, 1.0, 0.3)}

    def kind_of(kind: str, rng: np.random.Generator) -> Image.Image:
        """A pattern of ``kind`` in its own tint: a kind the tiny encoder's features tell apart."""
        gray = pattern(kind, rng).mean(-1, keepdims=True) / 255
        return Image.fromarray((40 + 200 * gray * np.array(tints[kind])).astype(np.uint8))

    rng = np.random.default_rng(5)
    enc = Encoder.load(tiny_encoder)
    enc.fit_whitening(torch.stack([image_to_tensor(kind_of(CLASSES[i % 3], rng), 16) for i in range(1200)]))
    enc_path = tmp_path / "encoder.pt"
    enc.save(enc_path)
    assert Encoder.load(enc_path).white_count == 1200  # recorded beside the whitening
    gallery = tmp_path / "bars"
    gallery.mkdir()
    for i in range(400):
        kind_of("bars", rng).save(gallery / f"b{i:03d}.png")
    out = tmp_path / "idx"
    build_index(IndexConfig(source=str(gallery), out=str(out), encoder=str(enc_path), workers=0, progress=False,
                            anomaly_space="auto"))
    store = IndexStore.load(out)
    info = store.manifest.anomaly
    assert info.input == JOINT and info.offset > 3 and info.reach <= 3 and info.mode == "auto" and info.embedding_space is not None, info
    words = describe_folder(out).anomaly
    assert "beside the search embedding" in words and "one part of that collection" in words, words
    service = Service.open(out, device="cpu")
    own = gallery / "b007.png"
    qv = service.embed([str(own)])
    item = store.items.refs.index(str(own.resolve()))
    np.testing.assert_allclose(qv.anomaly[0], np.asarray(store.arrays[info.vectors][item], np.float32), atol=2e-2)
    others = [tmp_path / f"{kind}.png" for kind in ("stripes", "checks", "bars")]
    for path, kind in zip(others, ("stripes", "checks", "bars")):
        kind_of(kind, rng).save(path)
    answers = service.ask([str(p) for p in others], Options(k=1, anomaly=True))
    assert [a.anomaly.unusual for a in answers] == [True, True, False], [a.anomaly for a in answers]
