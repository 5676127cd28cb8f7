"""FAISS indexes over unit vectors: choosing, building, searching.

Vectors are L2-normalised embeddings, so inner product is cosine similarity. Indexes are
named by FAISS factory strings (``"Flat"``, ``"SQfp16"``, ``"IVF4096,PQ32"``, ``"HNSW32"``);
``"auto"`` picks exhaustive search up to :data:`EXACT_LIMIT` vectors and an approximate index above.

Exhaustive search holds the vectors as float16 (``SQfp16``): the index folder stores them at
that precision anyway (``vectors.npy``), so nothing is lost that the folder keeps, and a scan
reads half the bytes. Scanning is bound by memory bandwidth, so one query over 70,000 512-d
vectors takes a third of the time of a float32 ``Flat`` scan, at recall@10 1.000 and
similarities within 1e-4 (BENCHMARKS.md, "Search").
"""

from __future__ import annotations

import logging
import math

import faiss
import numpy as np

from common.errors import first_line, last_line
from index import ivf
from index.errors import IndexStoreError

log = logging.getLogger(__name__)

EXACT_LIMIT = 1_000_000
EXHAUSTIVE = "SQfp16"  # what "auto" picks up to EXACT_LIMIT vectors
DEFAULT_MEMORY_BUDGET = 8 << 30  # bytes for the vectors of an approximate index
# Query-time defaults, from the search benchmarks (BENCHMARKS.md): IVF-Flat and re-ranked IVF-PQ
# reach recall@10 1.000 at 1M vectors with these; HNSW32 0.935 on synthetic data, 1.000 on real embeddings.
DEFAULT_NPROBE = 32
DEFAULT_EF_SEARCH = 256
REFINE_K_FACTOR = 16
# The compressed index "auto" picks beyond the memory budget (BENCHMARKS.md, "Search beyond memory").
COMPRESSED_MAX_LISTS = 2048  # assigning n vectors to the lists costs n x lists dot products
COMPRESSED_PROBE_FRACTION = 8  # its default nprobe: an eighth of the lists
FLAT_PROBE_FRACTION = 64  # IVF-Flat's default nprobe: a 64th of the lists (at least DEFAULT_NPROBE)


def choose_factory(n: int, dim: int, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> str:
    """The factory string ``"auto"`` stands for, given the collection's size.

    Up to :data:`EXACT_LIMIT` vectors: :data:`EXHAUSTIVE` (every vector compared, at float16). Above, an inverted file with
    about 4 sqrt(n) lists: full vectors in the lists (``IVF{nlist},Flat``) when they fit in
    ``memory_budget``, else :func:`compressed_factory`, whose candidates the index folder
    re-ranks exactly from its stored vectors (:mod:`index.rerank`). On the benchmarks IVF-Flat
    beat HNSW32 on recall at the same speed-up over exact search and built in less than half
    the time (BENCHMARKS.md, Search).
    """
    if n <= EXACT_LIMIT:
        return EXHAUSTIVE
    nlist = ivf_lists(n)
    if n * 4 * dim <= memory_budget:
        return f"IVF{nlist},Flat"
    return compressed_factory(n, dim, memory_budget)


def compressed_factory(n: int, dim: int, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> str:
    """The index ``"auto"`` picks when the vectors exceed the memory budget: an inverted file of
    about sqrt(n) lists (at most :data:`COMPRESSED_MAX_LISTS`) holding 4-bit product-quantised
    codes, scanned with SIMD (FAISS fast scan): dim/8 bytes a vector, or dim/16 or dim/32 where
    the codes and their ids would take more than half ``memory_budget``. Its order is rough:
    re-ranking :data:`REFINE_K_FACTOR` candidates per result from the stored vectors restores
    it, and visiting an eighth of the lists finds the neighbours. On 1M real embeddings this
    beat IVF-PQ with more lists, an HNSW graph over the centroids, 8-bit codes and SQ8 on
    recall at the same speed (BENCHMARKS.md, "Search beyond memory")."""
    nlist = min(2 ** int(round(math.log2(math.sqrt(n)))), COMPRESSED_MAX_LISTS)
    for per in (4, 8, 16):
        m = _pq_subquantizers(dim, per)
        if n * (m // 2 + 8) <= memory_budget // 2:
            break
    else:
        log.warning("the index's codes alone (%d MB) exceed half the memory budget", n * (m // 2 + 8) >> 20)
    return f"IVF{nlist},PQ{m}x4fs"


LOSSY_CODES = ("PQ", "SQ4", "SQ6", "SQ8", "SQbf16", "LSH", "RaBitQ")


def rerank_depth(factory: str) -> int:
    """How many candidates per result an index folder re-ranks from its stored vectors for a new
    index of ``factory``: :data:`REFINE_K_FACTOR` for lossy codes (PQ, SQ8 ...) without a refine
    stage of their own, 0 for indexes whose similarities are exact at the stored precision."""
    if "RFlat" in factory or "Refine" in factory:
        return 0
    return REFINE_K_FACTOR if any(code in factory for code in LOSSY_CODES) else 0


def default_nprobe(index: faiss.Index) -> int | None:
    """The lists a new inverted file visits by default: an eighth of them for 4-bit fast-scan
    codes (cheap to scan), a 64th (at least :data:`DEFAULT_NPROBE`) for full vectors in the
    lists; ``None`` for other indexes (:data:`DEFAULT_NPROBE` then applies). On 1M real
    embeddings ``IVF4096,Flat`` at nprobe 32 found 0.957 of the 10 nearest, at 64 0.977
    (BENCHMARKS.md, "Search beyond memory")."""
    inverted = faiss.try_extract_index_ivf(index)
    if inverted is None:
        return None
    kind = type(faiss.downcast_index(inverted)).__name__
    if "FastScan" in kind:
        return min(inverted.nlist, max(DEFAULT_NPROBE, inverted.nlist // COMPRESSED_PROBE_FRACTION))
    if kind == "IndexIVFFlat":
        return min(inverted.nlist, max(DEFAULT_NPROBE, inverted.nlist // FLAT_PROBE_FRACTION))
    return None


def ivf_lists(n: int) -> int:
    """The number of inverted lists for ``n`` vectors: the power of two nearest 4 sqrt(n)."""
    return 2 ** int(round(math.log2(4 * math.sqrt(n))))


def _pq_subquantizers(dim: int, per: int = 4) -> int:
    """The largest divisor of ``dim`` not above dim / ``per`` (PQ needs m | dim)."""
    for m in range(max(1, dim // per), 0, -1):
        if dim % m == 0:
            return m
    return 1


def build(
    vectors: np.ndarray,
    factory: str = "auto",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    seed: int = 0,
    progress: bool = False,
) -> tuple[faiss.Index, str]:
    """Build an inner-product index over ``vectors`` (n, d); returns it and its factory string.

    ``vectors`` may be float16 and memory-mapped: they are read a chunk at a time. Indexes that
    need training (IVF, PQ) are trained on a random sample sized for their lists
    (:func:`index.ivf.train_size`); ``progress`` shows a bar while the vectors are added.
    """
    n, dim = vectors.shape
    if factory == "auto":
        factory = choose_factory(n, dim, memory_budget)
    index = new_index(dim, factory)
    if not index.is_trained:
        needed = _min_train(index)
        if n < needed:
            raise IndexStoreError(
                f"index type {factory!r} needs at least {needed} vectors to train, got {n}; "
                "use --index-type Flat for small collections"
            )
        index.train(_as_f32(vectors[ivf.train_rows(index, n, seed)]))
    ivf.add_chunks(index, vectors, progress)
    return index, factory


def new_index(dim: int, factory: str) -> faiss.Index:
    """An empty index of ``factory``, without the polysemous codebook ordering FAISS's factory
    asks of product quantisers: it serves Hamming-filtered search, which nothing here uses, and
    took nine tenths of a PQ index's training (BENCHMARKS.md, "Search")."""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        reason = last_line(exc, "invalid")
        raise IndexStoreError(f"invalid FAISS factory string {factory!r} for dimension {dim} ({reason})") from None
    parts = [faiss.downcast_index(index)]
    while parts:  # the index and every index inside it (pre-transform, refine, graph storage, coarse quantiser)
        part = parts.pop()
        if hasattr(part, "do_polysemous_training"):
            part.do_polysemous_training = False
        for name in ("index", "base_index", "refine_index", "storage", "quantizer"):
            inner = getattr(part, name, None)
            if isinstance(inner, faiss.Index):
                parts.append(faiss.downcast_index(inner))
    return index


def _min_train(index: faiss.Index) -> int:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return ivf.nlist
    return 256  # PQ's 8-bit codebooks


def add(index: faiss.Index, vectors: np.ndarray) -> None:
    """Add (n, d) vectors, float16 or float32, memory-mapped or not, a chunk at a time."""
    ivf.add_chunks(index, vectors)


def set_search_params(index: faiss.Index, nprobe: int | None = None, ef_search: int | None = None,
                      k_factor: int | None = None) -> None:
    """Apply query-time parameters where the index has them (ignored elsewhere): IVF lists to
    visit, HNSW search breadth (of an HNSW index, or of the graph over an inverted file's
    centroids, where it is at least the lists visited), and how many candidates per result a
    refine stage re-ranks."""
    on_gpu = type(index).__name__.startswith("Gpu")
    space = faiss.GpuParameterSpace() if on_gpu else faiss.ParameterSpace()
    inverted = None if on_gpu else faiss.try_extract_index_ivf(index)
    nlist = inverted.nlist if inverted is not None else getattr(index, "nlist", None)
    if nlist:
        nprobe = min(nprobe or DEFAULT_NPROBE, nlist)
        space.set_index_parameter(index, "nprobe", nprobe)
        quantizer = faiss.downcast_index(inverted.quantizer) if inverted is not None else None
        if isinstance(quantizer, faiss.IndexHNSW):  # a narrow graph search misses near lists
            quantizer.hnsw.efSearch = max(ef_search or DEFAULT_EF_SEARCH, nprobe)
    top = index if on_gpu else faiss.downcast_index(index)
    if isinstance(top, faiss.IndexRefine):
        top.k_factor = k_factor or REFINE_K_FACTOR
        top = faiss.downcast_index(top.base_index)
    if "HNSW" in type(top).__name__:
        top.hnsw.efSearch = ef_search or DEFAULT_EF_SEARCH


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product: similarities (q, k') float32 and ids (q, k') int64, k' = min(k, n).

    Slots an approximate index could not fill hold id -1 and similarity -inf.
    """
    queries = _as_f32(queries)
    if queries.ndim != 2 or queries.shape[1] != index.d:
        raise IndexStoreError(f"queries must have shape (n, {index.d}), got {queries.shape}")
    k = min(k, index.ntotal)
    if k <= 0 or queries.shape[0] == 0:
        return np.zeros((queries.shape[0], 0), np.float32), np.zeros((queries.shape[0], 0), np.int64)
    sims, ids = index.search(queries, k)
    sims[ids < 0] = -np.inf
    return sims, ids


def is_exhaustive(index: faiss.Index) -> bool:
    """Whether a search compares the query with every vector (no inverted lists, no graph)."""
    return isinstance(faiss.downcast_index(index), (faiss.IndexFlat, faiss.IndexScalarQuantizer))


def as_flat(index: faiss.Index) -> faiss.Index:
    """An exhaustive float16 index as a float32 ``IndexFlat`` of the same vectors and metric
    (what GPU FAISS searches; it has no exhaustive scalar-quantised index); others unchanged."""
    top = faiss.downcast_index(index)
    if not isinstance(top, faiss.IndexScalarQuantizer):
        return index
    flat = faiss.IndexFlat(top.d, top.metric_type)
    if top.ntotal:
        flat.add(top.reconstruct_n(0, top.ntotal))
    return flat


def to_gpu(index: faiss.Index) -> faiss.Index:
    """A GPU copy of ``index`` when FAISS sees a GPU and supports the type; else ``index``."""
    if faiss.get_num_gpus() == 0:
        return index
    try:
        return faiss.index_cpu_to_all_gpus(as_flat(index))
    except (RuntimeError, AttributeError) as exc:  # e.g. HNSW has no GPU version
        log.info("searching on the CPU: %s", first_line(exc, type(exc).__name__))
        return index


def _as_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


class L2Table:
    """Exhaustive Euclidean k-nearest-neighbour search over a table of vectors (n, d),
    unnormalised, held as float16 as they are stored (FAISS ``IndexScalarQuantizer``; a float32
    ``IndexFlatL2`` on the GPU when there is one). Built from a possibly memory-mapped float16
    array in chunks."""

    def __init__(self, vectors: np.ndarray):
        table = faiss.IndexScalarQuantizer(int(vectors.shape[1]), faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2)
        self.index = table if faiss.get_num_gpus() == 0 else to_gpu(faiss.IndexFlatL2(int(vectors.shape[1])))
        add(self.index, vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Distances (q, k') ascending (Euclidean, not squared; unfilled slots +inf) and ids."""
        queries = _as_f32(queries)
        k = min(k, self.index.ntotal)
        if k <= 0 or queries.shape[0] == 0:
            return np.zeros((queries.shape[0], 0), np.float32), np.zeros((queries.shape[0], 0), np.int64)
        d2, ids = self.index.search(queries, k)
        dists = np.sqrt(np.maximum(d2, 0))
        dists[ids < 0] = np.inf
        return dists, ids
