"""Exact re-ranking of a compressed index's candidates from the stored vectors.

A compressed index (IVF-PQ) holds a few bytes per vector, so it fits in memory where the
vectors do not, but its similarities are approximate and its order wrong among close
neighbours. It proposes ``k * k_factor`` candidates per query; their stored vectors
(``vectors.npy``, float16, memory-mapped: only the rows read come into memory, and they are
page cache, not the process's own memory) give their exact similarities, and the best ``k``
are kept. This is FAISS's ``IndexRefine`` with the refinement vectors on disk instead of in
memory (Jégou et al., "Searching in one billion vectors: re-rank with source coding", 2011).
"""

from __future__ import annotations

import numpy as np

# Rows gathered per step: (queries x candidates) vectors of dimension d as float32 stay below this
# (the gathered rows and their copy in candidate order are the working memory of re-ranking).
GATHER_BYTES = 16 << 20


def rerank(vectors: np.ndarray, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of each query's candidates by exact inner product with the stored vectors.

    Args:
        vectors: (n, d) stored vectors, float16 or float32, typically a read-only memory map.
        queries: (q, d) float32.
        candidates: (q, c) int64 row ids, -1 for slots the index could not fill.
        k: results per query.

    Returns:
        Similarities (q, min(k, c)) float32, descending, and ids (q, min(k, c)) int64; slots
        without a candidate hold -inf and -1.
    """
    q, c = candidates.shape
    k = min(k, c)
    sims_out = np.full((q, k), -np.inf, np.float32)
    ids_out = np.full((q, k), -1, np.int64)
    if q == 0 or k == 0:
        return sims_out, ids_out
    step = max(1, GATHER_BYTES // max(1, c * vectors.shape[1] * 4))
    for s in range(0, q, step):
        cand = candidates[s : s + step]
        valid = cand >= 0
        # Sorted unique rows: the memory map is read in file order, each row once per step.
        rows, inverse = np.unique(cand[valid], return_inverse=True)
        gathered = np.asarray(vectors[rows], dtype=np.float32)
        sims = np.full(cand.shape, -np.inf, np.float32)
        qi = np.nonzero(valid)[0]
        sims[valid] = np.einsum("ij,ij->i", gathered[inverse], queries[s : s + step][qi])
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < c else np.broadcast_to(np.arange(c), sims.shape)
        top_sims = np.take_along_axis(sims, top, 1)
        order = np.argsort(-top_sims, axis=1, kind="stable")
        top = np.take_along_axis(top, order, 1)
        sims_out[s : s + step] = np.take_along_axis(sims, top, 1)
        ids_out[s : s + step] = np.where(np.isfinite(sims_out[s : s + step]), np.take_along_axis(cand, top, 1), -1)
    return sims_out, ids_out
