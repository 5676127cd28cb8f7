"""Exhaustive search of a batch of queries in one pass over the vectors, exact in its results.

FAISS scans an exhaustive index once per query: a batch of 16 costs 16 passes over memory
(BENCHMARKS.md, "The JSON API"). :class:`BatchScan` keeps a bfloat16 copy of the vectors and
scores the whole batch with one matrix product (one pass, bandwidth-bound, 7-9 ms for 8-16
queries over 70,000 x 512 on 2 cores against 12-25 ms). bfloat16 scores are approximate, so
they only propose candidates: the best ``k + margin`` of each query are scored again from the
vectors as stored (float16, in float32 arithmetic: what the exhaustive index computes), and
the final top k is taken from those exact scores.

The candidates provably contain the true top k: with unit roundoff ``u = 2**-8``, a bfloat16
inner product is within ``(3u + u**2 + 2**-13) |q| |x|`` of the exact one (:data:`ERROR`). Any vector
outside the candidates has a proposed score at most the last candidate's, so an exact score at
most that plus ``eps``; when that is below the k-th exact score found, nothing outside can
enter the top k. Queries for which the check fails (a crowd of near-equal scores at the k-th
place) are answered by the exact index instead, so the answer is always the exact one.
"""

from __future__ import annotations

import numpy as np
import torch

U = 2.0 ** -8  # bfloat16's unit roundoff (8 significant bits, rounding to nearest)
# How far a proposed inner product can be from the exact one, per unit of |q| |x|: both inputs
# rounded to bfloat16 (2u + u^2), the product rounded to bfloat16 (u), float32 accumulation
# over 512-4096 dimensions, and the exact scores' own float32 rounding (both within 2**-14).
ERROR = 3 * U + U * U + 2.0 ** -13
MIN_MARGIN = 64  # candidates beyond k


class BatchScan:
    """Inner-product (``metric="ip"``, larger is nearer) or Euclidean (``"l2"``, distances)
    search over ``vectors`` (n, d), as stored.

    Args:
        vectors: the stored vectors (float16 or float32; a memory map is read once, in chunks).
        metric: ``"ip"`` or ``"l2"``.
    """

    def __init__(self, vectors: np.ndarray, metric: str = "ip", chunk: int = 65536):
        if metric not in ("ip", "l2"):
            raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
        self.metric = metric
        self.stored = vectors  # exact scores come from these
        n, d = vectors.shape
        self.low = torch.empty((n, d), dtype=torch.bfloat16)
        norms = np.empty(n, np.float64)
        for s in range(0, n, chunk):
            block = np.asarray(vectors[s : s + chunk], dtype=np.float32)
            self.low[s : s + chunk] = torch.from_numpy(block).to(torch.bfloat16)
            norms[s : s + chunk] = np.einsum("ij,ij->i", block.astype(np.float64), block.astype(np.float64))
        self.sq_norms = torch.from_numpy(norms.astype(np.float32))  # |x|^2, exact to float32
        self.max_norm = float(np.sqrt(norms.max())) if n else 0.0
        self.d = d
        self.fallbacks = 0  # queries the check sent to the exact index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The exact top k of each query: scores (similarities, or Euclidean distances ascending),
        ids, and a mask of the queries whose candidates could not be proven complete (their rows
        must be answered by the exact index)."""
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        n = self.low.shape[0]
        k = min(k, n)
        b = q.shape[0]
        if k == 0 or b == 0:
            return np.zeros((b, 0), np.float32), np.zeros((b, 0), np.int64), np.zeros(b, bool)
        rough = torch.mm(q.to(torch.bfloat16), self.low.T).float()  # (b, n)
        if self.metric == "l2":  # nearest = largest 2 q.x - |x|^2
            rough = 2 * rough - self.sq_norms
        c = min(n, k + max(MIN_MARGIN, k // 4))
        proposed, cand = rough.topk(c, dim=1)  # descending
        # Exact scores of the candidates, from the stored vectors (gathered in id order).
        ids = cand.numpy()
        flat = np.unique(ids)
        rows = torch.from_numpy(np.asarray(self.stored[flat], dtype=np.float32))
        where = torch.from_numpy(np.searchsorted(flat, ids))
        dots = torch.einsum("bd,bcd->bc", q, rows[where])
        exact = dots if self.metric == "ip" else 2 * dots - self.sq_norms[cand]
        best, order = exact.topk(k, dim=1)
        top = cand.gather(1, order)
        # Nothing outside the candidates can beat the k-th exact score (see the module's note).
        q_norm = q.norm(dim=1)
        reach = ERROR * q_norm * self.max_norm * (1 if self.metric == "ip" else 2)
        complete = (proposed[:, -1] + reach < best[:, -1]) | torch.tensor(c == n)
        if self.metric == "ip":
            scores = best
        else:
            scores = torch.sqrt(torch.clamp(q_norm[:, None] ** 2 - best, min=0))
        fallback = ~complete.numpy()
        self.fallbacks += int(fallback.sum())
        return scores.numpy().astype(np.float32), top.numpy().astype(np.int64), fallback
