"""Inverted files at scale: training on a sample sized for the lists, adding in chunks, drift.

Training k-means costs (sample x lists x dimension) per iteration, so the sample is sized for
the number of lists (:data:`TRAIN_PER_LIST` points each, FAISS warns under 39) rather than for
the collection. Vectors are added from a possibly memory-mapped float16 array a chunk at a
time, so a build never holds the collection as float32. Appended vectors go into the lists
trained at build time; :func:`centroid_distance` measured on them against the same figure
measured at build time (stored in the manifest) says when the data has drifted away from the
centroids enough that a rebuild, which retrains them, would pay.
"""

from __future__ import annotations

import faiss
import numpy as np

TRAIN_PER_LIST = 64
MIN_TRAIN = 65_536  # product and scalar quantisers, and inverted files of few lists
ADD_CHUNK = 65_536
DRIFT_SAMPLE = 20_000  # vectors measured for the centroid distance
# Appended vectors whose mean distance to their nearest centroid exceeds the build's by this
# factor: a rebuild is suggested. New images of the indexed kind measured 1.005 times the build's
# figure, real embeddings pushed to cosine 0.89 from themselves 1.15, unaugmented images appended
# to an index of augmented views 1.66
# (BENCHMARKS.md, "Search beyond memory").
DRIFT_FACTOR = 1.2


def train_size(index: faiss.Index, n: int) -> int:
    """Training vectors for ``index`` out of ``n``: :data:`TRAIN_PER_LIST` per inverted list, at
    least :data:`MIN_TRAIN` (a product quantiser's 256 centroids per sub-quantiser), at most ``n``."""
    ivf = faiss.try_extract_index_ivf(index)
    return min(n, max(MIN_TRAIN, TRAIN_PER_LIST * ivf.nlist if ivf is not None else 0))


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """``size`` distinct rows of ``n``, sorted (a memory map is read in file order)."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def train_rows(index: faiss.Index, n: int, seed: int = 0) -> np.ndarray:
    """The rows of ``n`` that ``index`` is trained on (seeded: the same rows every time)."""
    return sample_rows(n, train_size(index, n), seed)


def held_out_rows(index: faiss.Index, n: int, count: int = DRIFT_SAMPLE, seed: int = 1) -> np.ndarray:
    """Up to ``count`` rows not among :func:`train_rows` (any rows when too few are left):
    where the build measures the centroid distance that appended vectors are compared with."""
    rest = np.setdiff1d(np.arange(n), train_rows(index, n))
    if len(rest) < min(count, n) // 2:
        rest = np.arange(n)
    return rest if len(rest) <= count else np.sort(np.random.default_rng(seed).choice(rest, count, replace=False))


def as_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def add_chunks(index: faiss.Index, vectors: np.ndarray, progress: bool = False, chunk: int = ADD_CHUNK) -> None:
    """Add (n, d) vectors, float16 or float32, memory-mapped or not, ``chunk`` rows at a time."""
    n = vectors.shape[0]
    bar = None
    if progress and n > chunk:
        from tqdm import tqdm

        bar = tqdm(total=n, unit=" vectors", unit_scale=True, desc="indexing", leave=False)
    for start in range(0, n, chunk):
        index.add(as_f32(vectors[start : start + chunk]))
        if bar is not None:
            bar.update(min(chunk, n - start))
    if bar is not None:
        bar.close()


def centroids(index: faiss.Index) -> np.ndarray | None:
    """The inverted file's centroids (nlist, d) float32, ``None`` for an index without one."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return None
    quantizer = faiss.downcast_index(ivf.quantizer)
    storage = getattr(quantizer, "storage", None)  # an HNSW quantiser keeps them in a flat storage
    return (faiss.downcast_index(storage) if storage is not None else quantizer).reconstruct_n(0, ivf.nlist)


def centroid_distance(cents: np.ndarray, vectors: np.ndarray) -> float:
    """Mean cosine distance (1 - similarity) of unit ``vectors`` (m, d) to their nearest centroid.

    Inner-product inverted files train spherical k-means, so the centroids are unit vectors too.
    """
    flat = faiss.IndexFlatIP(cents.shape[1])
    flat.add(as_f32(cents))
    total = 0.0
    for s in range(0, vectors.shape[0], ADD_CHUNK):
        sims, _ = flat.search(as_f32(vectors[s : s + ADD_CHUNK]), 1)
        total += float((1.0 - sims[:, 0]).sum())
    return total / max(1, vectors.shape[0])
