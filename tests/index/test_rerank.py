"""Compressed indexes re-ranked from the stored vectors: exactness, memory, appends, drift."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from index import IndexStore, IndexStoreError, Items, ann, ivf
from index.rerank import rerank
from tests.helpers import brute_force, clustered, unit


def _items(n: int, start: int = 0) -> Items:
    return Items([f"img/{i}.png" for i in range(start, start + n)], [None] * n, [f"h{i}" for i in range(start, start + n)])


def _compressed(vecs: np.ndarray, factory: str = "IVF16,PQ8x4fs") -> IndexStore:
    return IndexStore.build(vecs, _items(len(vecs)), "abc", factory=factory)


def test_rerank_equals_brute_force_and_skips_unfilled_slots() -> None:
    base, queries = clustered(600, 16, 0, queries=9)
    stored = base.astype(np.float16)
    cands = np.tile(np.arange(600), (9, 1))
    cands[:, 500:] = -1  # slots the index could not fill
    sims, ids = rerank(stored, queries, cands, 7)
    ref_sims, ref_ids = brute_force(stored[:500].astype(np.float32), queries, 7)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    sims, ids = rerank(stored, queries, np.full((9, 3), -1), 7)
    assert ids.shape == (9, 3) and (ids == -1).all() and np.isneginf(sims).all()


def test_reranked_search_equals_exact_search_when_the_candidates_cover_everything(tmp_path: Path) -> None:
    base, queries = clustered(2000, 32, 1, queries=30)
    store = _compressed(base)
    assert store.manifest.search.k_factor == ann.REFINE_K_FACTOR  # lossy codes: re-ranked by default
    store.save(tmp_path / "idx")
    loaded = IndexStore.load(tmp_path / "idx")
    assert loaded.manifest.search == store.manifest.search
    assert isinstance(loaded.vectors, np.memmap)  # re-ranking reads the file, not a copy in memory
    sims, ids = loaded.search(queries, 10, nprobe=16, k_factor=200)  # every list, every vector
    ref_sims, ref_ids = brute_force(base.astype(np.float16).astype(np.float32), queries, 10)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    # without re-ranking the 4-bit codes get the order and the similarities wrong
    raw_sims, raw_ids = loaded.search(queries, 10, nprobe=16, k_factor=0)
    assert (raw_ids != ref_ids).mean() > 0.3 and np.abs(raw_sims - ref_sims).max() > 1e-2


def test_auto_beyond_the_budget_is_compressed_and_re_ranked() -> None:
    dim = 512
    assert ann.choose_factory(2_000_000, dim, 8 << 30) == "IVF4096,Flat"  # 4 GB of vectors fit in 8 GiB
    factory = ann.choose_factory(2_000_000, dim, 1 << 30)
    assert factory == ann.compressed_factory(2_000_000, dim) and ann.rerank_depth(factory) == ann.REFINE_K_FACTOR
    assert ann.rerank_depth("IVF4096,Flat") == 0 and ann.rerank_depth("IVF64,PQ16,RFlat") == 0
    index = ann.new_index(dim, factory)
    assert (index.sa_code_size() + 8) * 2_000_000 <= (1 << 30) / 2  # codes and ids: half the budget at most
    smaller = ann.choose_factory(20_000_000, dim, 1 << 30)  # fewer bytes a vector where they would not fit
    assert (ann.new_index(dim, smaller).sa_code_size() + 8) * 20_000_000 <= (1 << 30) / 2
    assert ann.new_index(dim, smaller).sa_code_size() < index.sa_code_size()


def test_an_old_manifest_without_search_settings_searches_as_before(tmp_path: Path) -> None:
    base, queries = clustered(2000, 32, 2, queries=5)
    _compressed(base).save(tmp_path / "idx")
    path = tmp_path / "idx" / "manifest.json"
    data = json.loads(path.read_text())
    del data["search"], data["centroids"]
    path.write_text(json.dumps(data))
    old = IndexStore.load(tmp_path / "idx")
    assert old.manifest.search is None and old.manifest.centroids is None
    np.testing.assert_array_equal(old.search(queries, 5)[1], old.search(queries, 5, k_factor=0)[1])
    assert old.append(clustered(50, 32, 7), _items(50, 2000)) is None  # no build-time figure: no drift note


def test_appended_vectors_are_found_and_the_lists_are_not_retrained(tmp_path: Path) -> None:
    base, new = clustered(3000, 32, 3, queries=300)  # new items around the same centres
    _compressed(base, "IVF16,PQ16x4fs").save(tmp_path / "idx")
    store = IndexStore.load(tmp_path / "idx")
    before = ivf.centroids(store.index)
    assert store.append(new, _items(300, 3000)) is None  # same centres: no drift
    np.testing.assert_array_equal(ivf.centroids(store.index), before)
    store.save(tmp_path / "idx")
    again = IndexStore.load(tmp_path / "idx")
    _, ids = again.search(new, 1, k_factor=64)  # each new vector is its own nearest neighbour
    assert again.manifest.count == 3300 and (ids[:, 0] == np.arange(3000, 3300)).mean() > 0.98


def test_drifted_appends_get_a_note(tmp_path: Path) -> None:
    store = _compressed(clustered(3000, 32, 5))
    c = store.manifest.centroids
    assert c.nlist == 16 and 0 < c.distance < 1
    elsewhere = clustered(500, 32, 6)  # other centres
    note = store.append(elsewhere, _items(500, 3000))
    assert note is not None and "rebuilding the index" in note and f"above {ivf.DRIFT_FACTOR:g}x" in note


@pytest.mark.parametrize("shape", [(299, 16), (300, 17)])
def test_a_vector_file_that_does_not_match_the_index_is_refused_by_name(tmp_path: Path, shape: tuple) -> None:
    store = IndexStore.build(clustered(300, 16, 8), _items(300), "abc")
    store.save(tmp_path / "idx")
    np.save(tmp_path / "idx" / "vectors.npy", np.zeros(shape, np.float16))
    with pytest.raises(IndexStoreError) as err:
        IndexStore.load(tmp_path / "idx")
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "idx" / "vectors.npy") in message
    assert f"{shape[0]} vectors of dimension {shape[1]}" in message and "300 of dimension 16" in message


RSS_PROBE = textwrap.dedent("""
    import json, sys
    import numpy as np
    from index import IndexStore

    def status():
        rows = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return {k: int(rows[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}

    queries = np.load(sys.argv[2])
    before = status()
    store = IndexStore.load(sys.argv[1])
    for s in range(0, len(queries), 10):  # requests of 10 queries: re-ranking's working memory stays small
        store.search(queries[s : s + 10], 10)
    print(json.dumps({"before": before, "after": status()}))
""")


def test_search_stays_within_the_memory_of_the_codes(tmp_path: Path) -> None:
    """A 200,000 x 128 compressed index, loaded and searched in a fresh process: its memory,
    page cache of the memory-mapped vectors and of the libraries included, grows by less than the
    vectors would take as float32 (102 MB); its own memory by less than half their float16 file."""
    n, dim = 200_000, 128
    rng = np.random.default_rng(9)
    base = unit(rng.normal(size=(n, dim)).astype(np.float32))
    items = Items([""] * n, [None] * n, [""] * n)  # a small items table: the index is what is measured
    IndexStore.build(base, items, "abc", factory="IVF256,PQ32x4fs").save(tmp_path / "idx")
    np.save(tmp_path / "q.npy", base[:1000] + 0.01)
    del base
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(tmp_path / "idx"), str(tmp_path / "q.npy")],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[2])
    m = json.loads(out.stdout)
    float32_bytes = n * dim * 4
    grown = m["after"]["VmHWM"] - m["before"]["VmRSS"]
    own = m["after"]["RssAnon"] - m["before"]["RssAnon"]  # the process's own memory, page cache aside
    assert grown < float32_bytes, m
    assert own < n * dim * 2 / 2, m  # not even the float16 vectors were copied into memory


def test_the_manifest_s_nprobe_is_the_search_default(tmp_path: Path) -> None:
    base, queries = clustered(6000, 16, 10, queries=20)
    flat_ivf = IndexStore.build(base, _items(6000), "abc", factory="IVF64,Flat")
    assert flat_ivf.manifest.search.nprobe == ann.DEFAULT_NPROBE and flat_ivf.manifest.search.k_factor == 0
    compressed = _compressed(base, "IVF256,PQ8x4fs")
    assert compressed.manifest.search.nprobe == 256 // ann.COMPRESSED_PROBE_FRACTION
    compressed.save(tmp_path / "idx")
    loaded = IndexStore.load(tmp_path / "idx")
    default = loaded.search(queries, 10)[1]
    np.testing.assert_array_equal(default, loaded.search(queries, 10, nprobe=32)[1])
    assert (default != loaded.search(queries, 10, nprobe=1)[1]).any()
