"""Dynamic batching: queries from many threads share passes, and each gets exactly the answer the
service gives it alone."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from retrieval.batcher import Batcher
from retrieval.errors import RetrievalError
from retrieval.options import Options
from retrieval.service import Service


@pytest.fixture(scope="module")
def service(tiny_index: Path) -> Service:
    return Service.open(tiny_index, device="cpu")


def _slowed(service: Service, seconds: float) -> None:
    """Make every pass take ``seconds`` longer, so that queries queue up behind it."""
    embed = service.embed_prepared

    def slow(prepared):  # noqa: ANN001, ANN202
        time.sleep(seconds)
        return embed(prepared)

    service.embed_prepared = slow  # type: ignore[method-assign]


def test_concurrent_queries_share_passes_and_get_their_own_answers(tiny_index: Path, image_folder: Path) -> None:
    service = Service.open(tiny_index, device="cpu")
    images = sorted(image_folder.rglob("*.png"))[:24]
    opts = [Options(k=3 + i % 4, classify=i % 2 == 0, anomaly=i % 3 == 0) for i in range(len(images))]
    alone = [service.ask([str(p)], o)[0] for p, o in zip(images, opts)]
    _slowed(service, 0.05)
    batcher = Batcher(service, max_batch=8)
    replies: list = [None] * len(images)

    def ask(i: int) -> None:
        replies[i] = batcher.submit(str(images[i]), opts[i]).result(timeout=60)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    assert batcher.answered == len(images)
    assert batcher.batches < len(images) / 2  # they queued up behind the slow passes and went together
    for reply, want, o in zip(replies, alone, opts):
        got = reply.answer
        assert got.query == want.query
        assert [h.id for h in got.hits] == [h.id for h in want.hits] and len(got.hits) == o.k
        np.testing.assert_allclose([h.similarity for h in got.hits], [h.similarity for h in want.hits], atol=1e-5)
        assert (got.prediction is None) == (want.prediction is None) and (got.anomaly is None) == (want.anomaly is None)
        if want.prediction is not None:
            assert got.prediction.label == want.prediction.label
        if want.anomaly is not None:
            assert got.anomaly.score == pytest.approx(want.anomaly.score, rel=1e-5)
        assert np.linalg.norm(reply.vector) == pytest.approx(1.0, abs=1e-4)


def test_a_lone_query_does_not_wait(service: Service, image_folder: Path) -> None:
    batcher = Batcher(service, max_wait=5.0)  # a wait would show
    image = str(next(image_folder.rglob("*.png")))
    start = time.perf_counter()
    for _ in range(3):
        batcher.ask([image], Options(k=2))
    assert time.perf_counter() - start < 5.0
    assert batcher.batches == 3
    batcher.close()


def test_errors_stay_with_their_query(service: Service, image_folder: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG broken")
    batcher = Batcher(service)
    good, broken, unknown = batcher.ask([str(next(image_folder.rglob("*.png"))), str(bad), "id:9999"], Options(k=2))
    assert good.answer.error is None and len(good.answer.hits) == 2
    assert "broken.png" in broken.answer.error and not broken.answer.hits
    assert "9999" in unknown.answer.error
    with pytest.raises(RetrievalError, match="k must be"):
        batcher.submit("id:1", Options(k=0))
    batcher.close()


def test_a_failing_pass_fails_its_queries_and_the_worker_goes_on(tiny_index: Path) -> None:
    service = Service.open(tiny_index, device="cpu")
    answer = service.answer_vectors
    calls = []

    def flaky(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return answer(*args, **kwargs)

    service.answer_vectors = flaky  # type: ignore[method-assign]
    batcher = Batcher(service)
    with pytest.raises(RuntimeError, match="boom"):
        batcher.submit("id:1", Options(k=2)).result(timeout=30)
    assert len(batcher.submit("id:1", Options(k=2)).result(timeout=30).answer.hits) == 2
    batcher.close()


def test_large_batches_scanned_in_one_pass_answer_as_one_by_one(tiny_encoder: Path) -> None:
    """On an exhaustive index of BATCH_SCAN_MIN_ITEMS items and more, batches of 8+ queries go
    through index.batch_scan (search and anomaly space); each answer equals the query's alone."""
    from index import IndexStore, Items
    from retrieval.anomaly import AnomalySpace
    from retrieval.service import BATCH_SCAN_MIN_ITEMS, QueryVectors
    from simclr.encoder import Encoder
    from tests.helpers import clustered

    enc = Encoder.load(tiny_encoder)
    n = BATCH_SCAN_MIN_ITEMS + 500
    base, queries = clustered(n, enc.dim, 3, queries=12)
    labels = [f"c{i % 3}" for i in range(n)]
    store = IndexStore.build(base, Items([f"x{i}" for i in range(n)], labels, [f"h{i}" for i in range(n)]), enc.checksum)
    service = Service(store, enc)
    service.space = AnomalySpace("plain")  # the anomaly space: the vectors themselves
    store.arrays["anomaly_vectors"] = (base * 3).astype(np.float16)
    service._anomaly_vectors = lambda: store.arrays["anomaly_vectors"]  # type: ignore[method-assign]
    opts = Options(k=10, classify=True, knn_k=50, anomaly=True, anomaly_k=5)
    q = QueryVectors(queries, queries * 3, [None] * 12, [None] * 12)
    batch = service.answer_vectors([f"q{i}" for i in range(12)], q, opts)
    assert service._scans["search"] is not None and service._scans["anomaly"] is not None
    for i, got in enumerate(batch):
        [alone] = service.answer_vectors([f"q{i}"], q.take([i]), opts)
        assert [h.id for h in got.hits] == [h.id for h in alone.hits]
        np.testing.assert_allclose([h.similarity for h in got.hits], [h.similarity for h in alone.hits], atol=1e-5)
        assert got.prediction.probabilities == pytest.approx(alone.prediction.probabilities, abs=1e-5)
        assert got.anomaly.score == pytest.approx(alone.anomaly.score, rel=1e-5)
