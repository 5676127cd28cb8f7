import numpy as np
import pytest

from index import ann
from index.errors import IndexStoreError
from tests.helpers import brute_force, clustered, unit



def test_flat_equals_brute_force() -> None:
    base, queries = clustered(2000, 24, 0, queries=50)
    index, factory = ann.build(base, "Flat")
    sims, ids = ann.search(index, queries, 10)
    ref_sims, ref_ids = brute_force(base, queries, 10)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    assert (ids == ref_ids).mean() > 0.999  # ties aside, the same neighbours in the same order


def test_auto_exhaustive_index_equals_brute_force_on_the_stored_float16_vectors() -> None:
    base, queries = clustered(2000, 24, 0, queries=50)
    index, factory = ann.build(base, "auto")
    assert factory == ann.EXHAUSTIVE and ann.is_exhaustive(index)
    stored = base.astype(np.float16).astype(np.float32)  # what the index folder keeps
    sims, ids = ann.search(index, queries, 10)
    ref_sims, ref_ids = brute_force(stored, queries, 10)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    assert (ids == ref_ids).mean() > 0.999
    # against the float32 originals: float16 rounding only
    np.testing.assert_allclose(sims, brute_force(base, queries, 10)[0], atol=2e-3)


def test_as_flat_keeps_the_vectors_and_the_metric() -> None:
    base, queries = clustered(500, 16, 1, queries=20)
    for metric in (ann.faiss.METRIC_INNER_PRODUCT, ann.faiss.METRIC_L2):
        sq = ann.faiss.IndexScalarQuantizer(16, ann.faiss.ScalarQuantizer.QT_fp16, metric)
        sq.add(base)
        flat = ann.as_flat(sq)
        assert isinstance(flat, ann.faiss.IndexFlat) and flat.metric_type == metric
        np.testing.assert_array_equal(flat.search(queries, 5)[1], sq.search(queries, 5)[1])
    ivf, _ = ann.build(base, "IVF4,Flat")
    assert ann.as_flat(ivf) is ivf and not ann.is_exhaustive(ivf)


def test_l2_table_equals_brute_force() -> None:
    rng = np.random.default_rng(0)
    table_vectors = (rng.normal(size=(3000, 32)) * 3).astype(np.float16)
    queries = rng.normal(size=(40, 32)).astype(np.float32) * 3
    dists, ids = ann.L2Table(table_vectors).search(queries, 7)
    full = np.linalg.norm(queries[:, None, :] - table_vectors.astype(np.float32)[None], axis=2)
    ref_ids = np.argsort(full, axis=1)[:, :7]
    np.testing.assert_allclose(dists, np.take_along_axis(full, ref_ids, 1), rtol=1e-4, atol=1e-4)
    assert (ids == ref_ids).mean() > 0.99


def recall_at(ids: np.ndarray, ref: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, ref)]))


@pytest.mark.parametrize("factory", ["IVF64,Flat", "IVF64,SQ8", "IVF64,PQ16,RFlat", "HNSW32"])
def test_approximate_indexes_reach_recall(factory: str) -> None:
    base, queries = clustered(8000, 32, 2, queries=200)
    index, _ = ann.build(base, factory)
    ann.set_search_params(index, nprobe=16, ef_search=64)
    _, ids = ann.search(index, queries, 10)
    _, ref = brute_force(base, queries, 10)
    assert recall_at(ids, ref) >= 0.9


def test_product_quantisers_skip_the_polysemous_ordering_and_answer_as_faiss_factory_does() -> None:
    # The polysemous training only permutes each codebook (for Hamming-filtered search): the
    # answers must be those of FAISS's own factory index, to the last bit.
    rng = np.random.default_rng(0)
    base, queries = rng.normal(size=(1000, 8)).astype(np.float32), rng.normal(size=(50, 8)).astype(np.float32)
    ours = ann.new_index(8, "IVF4,PQ2,RFlat")
    assert not ann.faiss.downcast_index(ann.faiss.downcast_index(ours).base_index).do_polysemous_training
    theirs = ann.faiss.index_factory(8, "IVF4,PQ2,RFlat", ann.faiss.METRIC_INNER_PRODUCT)
    for index in (ours, theirs):
        index.train(base)
        index.add(base)
        ann.set_search_params(index, nprobe=4)
    for got, want in zip(ours.search(queries, 10), theirs.search(queries, 10)):
        np.testing.assert_array_equal(got, want)
    # Quantisers nested anywhere: under a refine stage, as a graph's storage, as the coarse quantiser.
    faiss = ann.faiss
    for factory in ("PCA16,IVF64,PQ8,Refine(PQ16)", "HNSW8_PQ8", "IVF64(PQ4),PQ8", "OPQ8,IVF64,PQ8,RFlat"):
        index = ann.new_index(32, factory)  # (held: the parts below are views into it)
        seen, parts = [], [faiss.downcast_index(index)]
        while parts:
            part = parts.pop()
            seen += [part.do_polysemous_training] if hasattr(part, "do_polysemous_training") else []
            parts += [faiss.downcast_index(getattr(part, name)) for name in ("index", "base_index", "refine_index",
                      "storage", "quantizer") if isinstance(getattr(part, name, None), faiss.Index)]
        assert seen and not any(seen), factory


def test_search_params_change_ivf_breadth() -> None:
    base = clustered(4000, 16, 4)
    index, _ = ann.build(base, "IVF32,Flat")
    ann.set_search_params(index, nprobe=7)
    assert ann.faiss.extract_index_ivf(index).nprobe == 7


def test_search_params_change_refine_depth() -> None:
    index, _ = ann.build(clustered(4000, 16, 4), "IVF32,PQ4,RFlat")
    ann.set_search_params(index, k_factor=3)
    assert ann.faiss.downcast_index(index).k_factor == 3
    ann.set_search_params(index)
    assert ann.faiss.downcast_index(index).k_factor == ann.REFINE_K_FACTOR


def test_auto_choice_by_size() -> None:
    assert ann.choose_factory(10_000, 512) == "SQfp16"
    assert ann.choose_factory(2_000_000, 128) == "IVF4096,Flat"
    assert ann.choose_factory(50_000_000, 512, memory_budget=1 << 30) == "IVF2048,PQ32x4fs"  # re-ranked from vectors.npy


def test_k_larger_than_index_returns_everything() -> None:
    base = clustered(5, 8)
    index, _ = ann.build(base)
    sims, ids = ann.search(index, base[:2], 50)
    assert ids.shape == (2, 5) and sorted(ids[0].tolist()) == [0, 1, 2, 3, 4]


def test_bad_factory_and_tiny_training_set() -> None:
    with pytest.raises(IndexStoreError, match="invalid FAISS factory string 'Bogus9'"):
        ann.build(clustered(10, 8), "Bogus9")
    with pytest.raises(IndexStoreError, match="needs at least 1024 vectors"):
        ann.build(clustered(100, 8), "IVF1024,Flat")
