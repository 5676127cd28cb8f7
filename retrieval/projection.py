"""A 2-D map of the gallery: PCA of the embeddings, computed once and cached in the index folder.

The map is linear, so a query lands on it by the same projection as the gallery items. For a
whitened encoder the PCA is taken after undoing the whitening (``unwhiten``): whitened vectors
have about the same variance in every direction, so their top two components would show little
but a few outliers.
"""

from __future__ import annotations

import logging

import numpy as np

from index import IndexStore

log = logging.getLogger(__name__)

POINTS = "map_points"  # (m, 3): item id, x, y
BASIS = "map_basis"  # (d + 1, 2): [vector, 1] @ basis = (x, y)


class EmbeddingMap:
    def __init__(self, points: np.ndarray, basis: np.ndarray):
        self.points = points
        self.basis = basis

    def project(self, vectors: np.ndarray) -> np.ndarray:
        """(n, d) unit vectors -> (n, 2) map coordinates."""
        v = np.asarray(vectors, dtype=np.float64)
        return np.hstack([v, np.ones((len(v), 1))]) @ self.basis

    @classmethod
    def for_store(cls, store: IndexStore, max_points: int = 2000, fit_sample: int = 20000, seed: int = 0,
                  unwhiten: np.ndarray | None = None) -> "EmbeddingMap":
        """The cached map of ``store``, or a new one (saved into the folder when it is writable).

        ``unwhiten`` (d, d), when given, maps the stored vectors back to the encoder's feature
        directions before the PCA (the inverse of its whitening matrix).
        """
        if POINTS in store.arrays and BASIS in store.arrays and store.arrays[BASIS].shape[0] == store.manifest.dim + 1:
            return cls(store.arrays[POINTS], store.arrays[BASIS])
        n = store.manifest.count
        rng = np.random.default_rng(seed)
        fit_rows = np.sort(rng.choice(n, min(n, fit_sample), replace=False))
        to_map = np.eye(store.manifest.dim) if unwhiten is None else np.asarray(unwhiten, dtype=np.float64)
        x = np.asarray(store.vectors[fit_rows], dtype=np.float64) @ to_map
        mean = x.mean(0)
        # The top two principal directions of the (sampled) gallery.
        _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
        comps = vt[:2].T if vt.shape[0] >= 2 else np.pad(vt.T, ((0, 0), (0, 2 - vt.shape[0])))
        basis = np.vstack([to_map @ comps, -mean @ comps])
        shown = np.sort(rng.choice(n, min(n, max_points), replace=False))
        xy = np.hstack([np.asarray(store.vectors[shown], dtype=np.float64), np.ones((len(shown), 1))]) @ basis
        points = np.column_stack([shown, xy])
        if store.path is not None:
            try:
                store.save_array(POINTS, points)
                store.save_array(BASIS, basis)
            except OSError as exc:  # a read-only index folder: keep the map in memory
                log.info("embedding map not cached in %s: %s", store.path, exc)
        return cls(points, basis)
